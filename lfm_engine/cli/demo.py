"""`lfm-engine demo`: the command-line face of lfm_engine.demo (the built-in example)."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the built-in example: merge, compress and serve SmolLM2-135M-Instruct's "
                                           "fine-tunes when cached, else generated models checked against references")
    p.add_argument("--model", default="auto", choices=["auto", "example", "generated"],
                   help="auto (default): the real example model when it and its fine-tunes are cached "
                        "(lfm-engine fetch-example-model; python tools/build_example_finetunes.py), else "
                        "generated weights; example: require the real model; generated: always generated weights")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $LFM_ENGINE_CACHE or ~/.cache/lfm_engine)")
    p.add_argument("--rows", type=int, default=512, help="rows of the generated weight (default 512)")
    p.add_argument("--cols", type=int, default=1024, help="columns of the generated weight (default 1024)")
    p.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the generated model (default 256)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the generated model (default 2)")
    p.add_argument("--intermediate", type=int, default=512, help="MLP width of the generated model (default 512)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary of the generated model (default 512)")
    p.add_argument("--batch", type=int, default=8, help="rows of the mixed-adapter batch (default 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (default 16)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="greedy tokens generated per row (default 8; 16 with the real model)")
    p.add_argument("--workdir", default=None,
                   help="folder for the generated models (default: a temporary folder, removed at the end)")
    p.add_argument("--peft", action="store_true",
                   help="also compare the mixed-batch logits with PEFT's own mixed batch (needs peft)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tensors", "merge", "compress", "serve"],
                   help="parts to leave out")


def run(args) -> int:
    import sys

    from lfm_engine.demo.runner import run as run_demo

    if args.model != "generated":
        from lfm_engine.demo import real

        has_model, has_ft, hint = real.available(args.cache_dir)
        if has_model and has_ft:
            args.new_tokens = 16 if args.new_tokens is None else args.new_tokens
            return real.run(args)
        if args.model == "example":
            print(f"lfm-engine demo: {hint}", file=sys.stderr)
            return 2
        print(f"note: {hint}\n      running the demo on generated weights instead.\n")
    args.new_tokens = 8 if args.new_tokens is None else args.new_tokens
    return run_demo(args)
