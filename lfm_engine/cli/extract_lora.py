"""`lfm-engine extract-lora BASE FINETUNE OUT --rank R [--energy E]` (mergekit-extract-lora).

Writes a PEFT LoRA folder whose B @ A approximates FINETUNE − BASE per linear layer,
embeddings and lm_head saved in full (modules_to_save) or, with --embed-lora, as
low-rank factors (lfm_engine.merge.extract_lora), and prints per module how it was
stored, its rank and relative error. mergekit's option names are accepted
(--model, --base-model, --out-path, --max-rank, --embed-lora/--no-embed-lora,
--save-module, -e/--exclude-regex, -i/--include-regex, --skip-undecomposable,
--sv-epsilon, --distribute-scale/--no-distribute-scale).
Exit status: 0 success, 2 bad inputs or options, 1 a failure while extracting
(no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers):
    p = subparsers.add_parser(
        "extract-lora", help="extract a LoRA adapter from a fine-tune (mergekit-extract-lora)",
        description="Per-module low-rank SVD of FINETUNE - BASE, written as a PEFT LoRA folder.")
    p.add_argument("base", metavar="BASE", nargs="?", help="base model folder (or --base-model)")
    p.add_argument("finetune", metavar="FINETUNE", nargs="?", help="fine-tuned model folder (or --model)")
    p.add_argument("out_dir", metavar="OUT", nargs="?", help="adapter folder to write, must not exist "
                                                             "(or --out-path)")
    p.add_argument("--base-model", dest="base_opt", metavar="BASE", help="mergekit's spelling of BASE")
    p.add_argument("--model", dest="finetune_opt", metavar="FINETUNE", help="mergekit's spelling of FINETUNE")
    p.add_argument("--out-path", dest="out_opt", metavar="OUT", help="mergekit's spelling of OUT")
    p.add_argument("--rank", "--max-rank", dest="rank", type=int, default=128,
                   help="LoRA rank (with --energy: the largest rank; default 128, mergekit's)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this fraction of ||delta||_F^2")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="extract embeddings and lm_head as low-rank LoRA factors (PEFT's embedding "
                        "LoRA) instead of saving them in full as modules_to_save (the default)")
    p.add_argument("--save-module", dest="save_modules", action="append", default=[], metavar="NAME",
                   help="save this module (full name or last part, e.g. lm_head) in full; repeatable")
    p.add_argument("-e", "--exclude-regex", dest="exclude_regexes", action="append", default=[], metavar="RE",
                   help="leave out modules whose name matches (re.search); repeatable")
    p.add_argument("-i", "--include-regex", dest="include_regexes", action="append", default=[], metavar="RE",
                   help="extract only linear layers whose name matches one of these; repeatable")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out changed weights that are not linear layers (norms) instead of "
                        "saving them in full")
    p.add_argument("--include-lm-head", action="store_true",
                   help="extract lm_head low-rank (as a linear layer) instead of saving it in full")
    p.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="keep only singular values above this (default 0: all up to the rank)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split the singular values as sqrt(S) into A and B (default); with "
                        "--no-distribute-scale A = S·Vh and B = U")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD sketch")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no per-module report")
    p.set_defaults(func=run)
    return p


def _paths(args):
    """(base, fine-tune, out) from the positionals or mergekit's options, or an error message."""
    got = []
    for pos, opt, what in ((args.base, args.base_opt, "BASE (--base-model)"),
                           (args.finetune, args.finetune_opt, "FINETUNE (--model)"),
                           (args.out_dir, args.out_opt, "OUT (--out-path)")):
        if pos is not None and opt is not None and pos != opt:
            return None, f"{what} given twice, as {pos!r} and {opt!r}"
        if pos is None and opt is None:
            return None, f"{what} is missing"
        got.append(pos if pos is not None else opt)
    return got, None


def run(args) -> int:
    import sys

    from lfm_engine.cli.guard import guarded
    from lfm_engine.merge.extract_lora import ExtractError, extract
    paths, problem = _paths(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    base, finetune, out_dir = paths
    rc, report = guarded(lambda: extract(base, finetune, out_dir, rank=args.rank,
                                         energy=args.energy, include_lm_head=args.include_lm_head,
                                         embed_lora=args.embed_lora, save_modules=args.save_modules,
                                         exclude_regexes=args.exclude_regexes,
                                         include_regexes=args.include_regexes,
                                         skip_undecomposable=args.skip_undecomposable,
                                         sv_epsilon=args.sv_epsilon, distribute_scale=args.distribute_scale,
                                         seed=args.seed, allow_overwrite=args.allow_overwrite),
                         "extraction", (ExtractError,))
    if rc:
        return rc
    if not args.quiet:
        print(f"{'module':<48} {'shape':>14} {'stored as':>14} {'rank':>5} {'rel. error':>10}")
        for m in report:
            rank = "full" if m.rank is None else str(m.rank)
            print(f"{m.module:<48} {'x'.join(map(str, m.shape)):>14} {m.kind:>14} {rank:>5} {m.rel_error:>10.2e}")
        for m in report:
            if m.note:
                print(f"note: {m.module}: {m.note}")
        worst = max(report, key=lambda m: m.rel_error)
        print(f"{len(report)} modules into {out_dir}; worst relative error "
              f"{worst.rel_error:.2e} ({worst.module})")
    return 0
