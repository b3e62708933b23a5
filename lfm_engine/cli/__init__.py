"""lfm-engine: command line front end.

    lfm-engine demo                          run the built-in example (start here)
    lfm-engine fetch-example-model           fetch + convert SmolLM2-135M-Instruct into the cache
    lfm-engine merge CONFIG.yml OUT          merge models from a mergekit-style YAML
    lfm-engine extract-lora BASE FT OUT      extract a LoRA adapter from a fine-tune (--rank R)
    lfm-engine moe CONFIG.yml OUT            build a Mixtral MoE from dense fine-tunes (mergekit-moe)
    lfm-engine serve --model B --adapter ..  serve a base model with many LoRA adapters (HTTP)
    lfm-engine compress --base B --model FT  encode a fine-tune as compressed deltas (.lfmd)
    lfm-engine decompress --base B X.lfmd O  rebuild a model folder from a base and an .lfmd
    lfm-engine inspect X.lfmd                show what an .lfmd container holds
    lfm-engine bench [--quick|--full]        run the benchmark suites (tables, JSON, --plot PNG)
    lfm-engine info                          what this build has (CUDA, SIMD, threads)

Each subcommand lives in its own module (lfm_engine/cli/<name>.py) exposing
add_parser(subparsers) (or register(subparsers) for several commands) and run(args) ->
exit code; a command's parser may set its own `func` default. This file only wires them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Subcommand modules, in the order `--help` lists them.
SUBCOMMAND_MODULES = [
    "lfm_engine.cli.demo",
    "lfm_engine.cli.fetch_example_model",
    "lfm_engine.cli.merge",
    "lfm_engine.cli.extract_lora",
    "lfm_engine.cli.moe",
    "lfm_engine.cli.serve",
    "lfm_engine.cli.compress",
    "lfm_engine.cli.bench",
]


def _info_run(args) -> int:
    import lfm_engine

    info = lfm_engine.build_info()
    from lfm_engine._native import native

    info["threads"] = native().get_num_threads()
    info["include"] = lfm_engine.get_include()
    info["library"] = lfm_engine.get_library()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    import lfm_engine

    parser = argparse.ArgumentParser(
        prog="lfm-engine",
        description="Merge, compress and serve fine-tuned models with compiled kernels.",
    )
    parser.add_argument("--version", action="version", version=f"lfm_engine {lfm_engine.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in SUBCOMMAND_MODULES:
        mod = importlib.import_module(modname)
        before = set(sub.choices)
        if hasattr(mod, "register"):
            mod.register(sub)
        else:
            mod.add_parser(sub)
        for name in set(sub.choices) - before:
            # a module may register several commands with their own run functions
            if sub.choices[name].get_default("func") is None:
                sub.choices[name].set_defaults(func=mod.run)
    info = sub.add_parser("info", help="show what this build has (CUDA, SIMD level, threads)")
    info.set_defaults(func=_info_run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
