"""`lfm-engine extract-lora BASE FINETUNE OUT --rank R [--energy E]` (mergekit-extract-lora).

Writes a PEFT LoRA folder whose B @ A approximates FINETUNE − BASE per linear layer
(lfm_engine.merge.extract_lora) and prints the per-module rank and relative error.
Exit status: 0 success, 2 bad inputs or options, 1 a failure while extracting
(no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser(
        "extract-lora", help="extract a LoRA adapter from a fine-tune (mergekit-extract-lora)",
        description="Per-module low-rank SVD of FINETUNE - BASE, written as a PEFT LoRA folder.")
    p.add_argument("base", metavar="BASE", help="base model folder")
    p.add_argument("finetune", metavar="FINETUNE", help="fine-tuned model folder")
    p.add_argument("out_dir", metavar="OUT", help="adapter folder to write (must not exist)")
    p.add_argument("--rank", "--max-rank", dest="rank", type=int, required=True,
                   help="LoRA rank (with --energy: the largest rank)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this fraction of ||delta||_F^2")
    p.add_argument("--include-lm-head", action="store_true", help="also extract lm_head")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD sketch")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no per-module report")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lfm_engine.cli.guard import guarded
    from lfm_engine.merge.extract_lora import ExtractError, extract
    rc, report = guarded(lambda: extract(args.base, args.finetune, args.out_dir, rank=args.rank,
                                         energy=args.energy, include_lm_head=args.include_lm_head,
                                         seed=args.seed, allow_overwrite=args.allow_overwrite),
                         "extraction", (ExtractError,))
    if rc:
        return rc
    if not args.quiet:
        print(f"{'module':<48} {'shape':>14} {'rank':>5} {'rel. error':>10}")
        for m in report:
            print(f"{m.module:<48} {'x'.join(map(str, m.shape)):>14} {m.rank:>5} {m.rel_error:>10.2e}")
        worst = max(report, key=lambda m: m.rel_error)
        print(f"{len(report)} modules into {args.out_dir}; worst relative error "
              f"{worst.rel_error:.2e} ({worst.module})")
    return 0
