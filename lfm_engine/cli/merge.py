"""`lfm-engine merge CONFIG.yml OUT_DIR [...]`: the model-merge subcommand.

``add_parser(subparsers)`` registers the subcommand on an argparse subparsers
object (lfm_engine/cli.py wires it); ``run(args)`` executes it and returns the
exit status: 0 success, 2 configuration/input problems (all listed), 1 a failure
during the merge (no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings

from lfm_engine.cli.guard import thread_count

# mergekit-yaml options accepted for compatibility that change nothing here, and why
NOOP_FLAGS = {
    "--lazy-unpickle": "pickle checkpoints are never loaded (safetensors only)",
    "--low-cpu-memory": "the merge already streams tensor by tensor with bounded memory",
    "--trust-remote-code": "lfm-engine reads config.json and tensors only and never runs model code",
    "--clone-tensors": "every output tensor is written from its own buffer",
    "--read-to-gpu": "inputs are read through host memory and copied to --device on a side stream",
    "--async-write": "output shards are always written on a background thread",
    "--allow-crimes": "lfm-engine checks each tensor's shape, but models whose architecture "
                      "keys differ (model_type, hidden_size, ...) are still refused",
}
# mergekit-yaml options with no equivalent: refused, naming why
REFUSED_FLAGS = {
    "--no-safe-serialization": "lfm-engine writes safetensors only (never pickles)",
    "--multi-gpu": "one device per merge; use --device cuda:N",
    "--gpu-rich": "use --device cuda",
    "--unsafe-truncate-embeddings": "embeddings of different vocabulary sizes are merged on "
                                    "their common rows already; the base's other rows are kept",
    "--lora-merge-dtype": "model+lora references are not supported yet",
}
_KMB = re.compile(r"\s*(\d+)\s*([kKmMbB])\s*")


def add_config_and_output(p, what: str) -> None:
    """The CONFIG.yml OUT_DIR positionals shared by `merge` and `moe`."""
    p.add_argument("config", metavar="CONFIG.yml", help=f"{what} configuration")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output model folder (must not exist)")


def methods_help() -> str:
    """The merge_method values and their parameters, from the method registry."""
    from lfm_engine.core.merge_registry import METHODS, REQUIRED
    lines = ["merge methods (merge_method:) and their parameters (* = per model; docs/merge.md):"]
    for name, m in METHODS.items():
        ps = []
        for p in m.params:
            d = "required" if p.default is REQUIRED or p.config_required else (
                "unset" if p.default is None else str(p.default).lower() if isinstance(p.default, bool) else p.default)
            ps.append(f"{p.name}{'*' if p.per_model else ''}={d}")
        lines.append(f"  {name:<17} {m.summary}")
        if ps:
            lines.append(f"  {'':<17}   {', '.join(ps)}")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge models described by a mergekit-style YAML config",
        description="Merge HF safetensors model folders as described by a mergekit YAML "
                    "config, streaming tensor by tensor.",
        epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_and_output(p, "mergekit-style merge")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the inputs, print the plan, write nothing")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's spelling)")
    p.add_argument("--threads", "-j", "--num-threads", dest="threads", type=thread_count, default=None,
                   help="CPU threads (0 or absent: all)")
    p.add_argument("--out-shard-size", default="5GB",
                   help="largest output shard in bytes: 5GB, 500MB, 2GiB, or mergekit's units "
                        "5B (= 5e9), 500M, 10K; a plain integer is bytes (default: 5GB)")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=None,
                   help="seed of DARE/DELLA masks (default 0)")
    p.add_argument("--allow-overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new model is complete)")
    p.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True,
                   help="copy the tokenizer files to the output (default)")
    p.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                   help="write no tokenizer files")
    p.add_argument("--write-model-card", dest="write_model_card", action="store_true", default=True,
                   help="write README.md describing the merge (default)")
    p.add_argument("--no-write-model-card", dest="write_model_card", action="store_false",
                   help="write no README.md")
    p.add_argument("--intermediate-dir", default=None, metavar="DIR",
                   help="multi-stage configs: keep named stages in DIR/NAME (default: a "
                        "temporary folder removed at the end)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="accepted for mergekit compatibility; the summary is printed anyway")
    for flag, why in NOOP_FLAGS.items():
        p.add_argument(flag, dest="noop_flags", action="append_const", const=flag,
                       help=f"accepted, no effect: {why}")
    for flag, why in REFUSED_FLAGS.items():
        p.add_argument(flag, dest="refused_flags", action="append_const", const=flag,
                       help=argparse.SUPPRESS)
    p.add_argument("--transformers-cache", "--lora-merge-cache", dest="cache_dirs", action="append",
                   metavar="DIR", help="accepted, no effect: nothing is downloaded or cached")
    p.set_defaults(func=run)
    return p


def shard_size(text: str):
    """mergekit's K/M/B units (thousand, million, billion bytes: 5B = 5e9) as an int;
    any other spelling (5GB, 500MB, 2GiB, 123) is left to lfm_engine.io.safetensors.parse_size."""
    m = _KMB.fullmatch(text)
    if m:
        return int(m.group(1)) * {"k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    return text


def run(args) -> int:
    from lfm_engine.cli.guard import sigterm_unwinds
    from lfm_engine.merge import MergeConfigErrors, merge_models
    from lfm_engine.io.model_folder import CheckpointError

    def show(msg, category, filename, lineno, file=None, line=None):
        print(f"warning: {msg}", file=sys.stderr)

    refused = getattr(args, "refused_flags", None) or []
    if refused:
        for flag in refused:
            print(f"error: {flag} is not supported: {REFUSED_FLAGS[flag]}", file=sys.stderr)
        return 2
    if args.cuda and args.device not in (None, "cuda") and not str(args.device).startswith("cuda"):
        print(f"error: --cuda contradicts --device {args.device}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if args.cuda else "cpu")
    for flag in dict.fromkeys(getattr(args, "noop_flags", None) or []):
        print(f"note: {flag} accepted, no effect: {NOOP_FLAGS[flag]}", file=sys.stderr)
    if getattr(args, "cache_dirs", None):
        print("note: --transformers-cache/--lora-merge-cache accepted, no effect: "
              "nothing is downloaded or cached", file=sys.stderr)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        # SIGTERM (e.g. a job scheduler) unwinds like Ctrl-C so the temporary folder is removed
        with sigterm_unwinds():
            res = merge_models(args.config, args.out_dir, device=device, threads=args.threads or None,
                               out_shard_size=shard_size(args.out_shard_size), seed=args.seed,
                               allow_overwrite=args.allow_overwrite, dry_run=args.dry_run,
                               quiet=args.quiet, copy_tokenizer=args.copy_tokenizer,
                               write_model_card=args.write_model_card,
                               intermediate_dir=args.intermediate_dir)
    except MergeConfigErrors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except Exception as e:  # a failure mid-merge; the temporary folder is already gone
        print(f"error: merge failed: {type(e).__name__}: {e} (no output written)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old
    if args.dry_run:
        print(res.summary())
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m lfm_engine.cli.merge``) until cli.py wires the command."""
    parser = argparse.ArgumentParser(prog="lfm-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
