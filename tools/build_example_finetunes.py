#!/usr/bin/env python
"""Train the example fine-tunes of SmolLM2-135M-Instruct into the cache (lfm_engine.models.finetunes).

    lfm-engine fetch-example-model                 # once: the base model
    python tools/build_example_finetunes.py        # 4 LoRA adapters + 3 full fine-tunes, scores.json

Seeds are fixed; rerunning is a no-op unless --force or the recipe's FORMAT_VERSION changed.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    from lfm_engine.models import example, finetunes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="cache folder (default: $LFM_ENGINE_CACHE or ~/.cache/lfm_engine)")
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/finetunes/smollm2-135m-instruct)")
    ap.add_argument("--force", action="store_true", help="train again even if built")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if not example.is_cached(args.cache_dir):
        print(f"the example model is not cached; fetch it first: {example.FETCH_HINT}", file=sys.stderr)
        return 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or finetunes.finetunes_dir(args.cache_dir)
    t0 = time.perf_counter()
    finetunes.build(example.example_model_dir(args.cache_dir), out, force=args.force,
                    progress=lambda m: print(m, flush=True))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
