"""`lfm-engine merge CONFIG.yml OUT_DIR [...]`: the model-merge subcommand.

``add_parser(subparsers)`` registers the subcommand on an argparse subparsers
object (lfm_engine/cli.py wires it); ``run(args)`` executes it and returns the
exit status: 0 success, 2 configuration/input problems (all listed), 1 a failure
during the merge (no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge models described by a mergekit-style YAML config",
        description="Merge HF safetensors model folders as described by a mergekit YAML "
                    "config (ties, dare_ties, della, slerp, ...), streaming tensor by tensor.")
    p.add_argument("config", metavar="CONFIG.yml", help="mergekit-style merge configuration")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output model folder (must not exist)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the inputs, print the plan, write nothing")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--out-shard-size", default="5GB",
                   help="largest output shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE/DELLA masks (default 0)")
    p.add_argument("--allow-overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new model is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lfm_engine.merge import MergeConfigErrors, merge_models
    from lfm_engine.merge.io import CheckpointError

    def show(msg, category, filename, lineno, file=None, line=None):
        print(f"warning: {msg}", file=sys.stderr)

    old = warnings.showwarning
    warnings.showwarning = show
    # SIGTERM (e.g. a job scheduler) unwinds like Ctrl-C so the temporary folder is removed
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        res = merge_models(args.config, args.out_dir, device=args.device, threads=args.threads,
                           out_shard_size=args.out_shard_size, seed=args.seed,
                           allow_overwrite=args.allow_overwrite, dry_run=args.dry_run,
                           quiet=args.quiet)
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
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
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
