"""CLI subcommands for task-vector compression: compress, decompress, inspect.

    lfm-engine compress --base B --model FT --codec int4 --group-size 128 \
        [--override FILTER=CODEC ...] [--json REPORT.json] OUT.lfmd
    lfm-engine compress --base B --model FT --codec sign1 --distill-scales CALIB.txt \
        [--distill-chat] [--distill-steps 50] [--distill-lr 0.01] OUT.lfmd
    lfm-engine decompress --base B [--force] [--overwrite] IN.lfmd OUT_DIR
    lfm-engine inspect [--json] IN.lfmd

`register(subparsers)` adds all three; each also has add_parser(subparsers) and
run(args) -> int for the lead's cli.py. Errors print one line to stderr: exit 2 for bad
inputs, 1 for any other failure, 130 on Ctrl-C or SIGTERM (cli/guard.py); never a
traceback, and the output appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import sys

from lfm_engine.cli.guard import guarded, thread_count


def _override(text: str) -> tuple[str, str]:
    # FILTER=CODEC[:k=v,...]: filters hold no '=', so split at the first one.
    filt, eq, codec = text.partition("=")
    if not eq or not filt or not codec:
        raise argparse.ArgumentTypeError(f"--override wants FILTER=CODEC, got '{text}'")
    return filt, codec


def add_compress_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compress", help="encode a fine-tuned model as compressed deltas (.lfmd)",
                              description="Encode FT - B tensor by tensor into an .lfmd container.")
    p.add_argument("--base", required=True, help="base model folder (or .safetensors file)")
    p.add_argument("--model", required=True, help="fine-tuned model folder (or .safetensors file)")
    p.add_argument("--codec", default="int4",
                   help="codec for matrices: sign1, int8, int4, int2, nf4, ternary, sparse_int, lowrank; options as "
                        "CODEC:key=value,... e.g. lowrank:rank=32 (default int4)")
    p.add_argument("--group-size", type=int, default=None, help="group size of intN / sparse_int (default 128)")
    p.add_argument("--override", action="append", type=_override, default=[], metavar="FILTER=CODEC",
                   help="per-tensor codec by name filter (glob, or re:REGEX); CODEC 'raw' stores the tensor as is; "
                        "repeatable, first match wins")
    p.add_argument("--distill-scales", default=None, metavar="TEXTS_FILE",
                   help="BitDelta scale distillation for sign1 entries: train their scales (signs frozen) so the "
                        "compressed model's logits match the fine-tune's on these calibration texts (one per line); "
                        "needs transformers and a model folder")
    p.add_argument("--distill-chat", action="store_true",
                   help="wrap each calibration text in the chat template as a user turn")
    p.add_argument("--distill-steps", type=int, default=50, help="distillation steps (default 50)")
    p.add_argument("--distill-lr", type=float, default=1e-2,
                   help="Adam learning rate on the scale multipliers (default 0.01)")
    p.add_argument("--threads", type=thread_count, default=0, help="CPU threads (0 = all)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="print only the totals")
    p.add_argument("out", help="output .lfmd file")
    p.set_defaults(func=run_compress)
    return p


def add_decompress_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("decompress", help="rebuild a model folder from a base and an .lfmd container")
    p.add_argument("--base", required=True, help="base model folder the container was made against")
    p.add_argument("--force", action="store_true", help="decode even if the base fingerprint differs")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--threads", type=thread_count, default=0, help="CPU threads (0 = all)")
    p.add_argument("input", help="input .lfmd file")
    p.add_argument("out_dir", help="output model folder")
    p.set_defaults(func=run_decompress)
    return p


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="show what an .lfmd container holds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("input", help=".lfmd file")
    p.set_defaults(func=run_inspect)
    return p


def register(subparsers) -> None:
    """Add compress, decompress and inspect to an argparse subparsers object."""
    add_compress_parser(subparsers)
    add_decompress_parser(subparsers)
    add_inspect_parser(subparsers)


# One-module convention of cli_<name>.py: add_parser/run for the `compress` subcommand.
add_parser = add_compress_parser


# problems with the inputs or arguments (exit 2); anything else is a failure (exit 1), and
# Ctrl-C / SIGTERM exit 130, all without a traceback and without a half-written output
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError)


def run_compress(args) -> int:
    from lfm_engine.compress import compress_model

    def work():
        distill = None
        if args.distill_scales is not None:
            from lfm_engine.compress.distill import DistillConfig, read_prompts

            distill = DistillConfig(read_prompts(args.distill_scales), chat=args.distill_chat,
                                    steps=args.distill_steps, lr=args.distill_lr)
        return compress_model(args.base, args.model, args.out, codec=args.codec, group_size=args.group_size,
                              overrides=dict(args.override), n_threads=args.threads, distill=distill)

    rc, rep = guarded(work, "compress", USER_ERRORS)
    if rc:
        return rc
    print(rep.table(max_rows=0 if args.quiet else None))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_json(), f, indent=2)
    return 0


def run_decompress(args) -> int:
    from lfm_engine.compress import decompress_model

    rc, out = guarded(lambda: decompress_model(args.base, args.input, args.out_dir, force=args.force,
                                               overwrite=args.overwrite, n_threads=args.threads),
                      "decompress", USER_ERRORS)
    if rc:
        return rc
    print(f"wrote {out}")
    return 0


def run_inspect(args) -> int:
    from lfm_engine.compress import inspect_container

    rc, info = guarded(lambda: inspect_container(args.input), "inspect", USER_ERRORS)
    if rc:
        return rc
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']}, {len(info['tensors'])} tensors, {info['params']} params, "
          f"{info['bits_per_param']:.3f} bits/param, {info['file_bytes'] / 2**20:.2f} MiB")
    print(f"base fingerprint: {info['base']}")
    print(f"source: {info['source']}")
    print(f"{'tensor':<56} {'codec':<10} {'shape':<16} {'dtype':<9} {'bits/param':>10} {'rel.err':>9}")
    for t in info["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        err = t.get("rel_error")
        print(f"{t['name'][-56:]:<56} {t['codec']:<10} {shape:<16} {t['dtype']:<9} "
              f"{t.get('bits_per_param', 0.0):10.3f} {'' if err is None else f'{err:9.4f}'}")
    return 0


def run(args) -> int:
    return args.func(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-engine")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
