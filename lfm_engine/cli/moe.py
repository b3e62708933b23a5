"""`lfm-engine moe CONFIG.yml OUT_DIR` (mergekit-moe): a Mixtral or Qwen2-MoE model from dense fine-tunes.

See lfm_engine.merge.moe for the config keys, moe_arch for the output architectures and
layouts, moe_gates for the gate modes. ``--dry-run`` checks everything and prints the plan.
Exit status: 0 success, 2 configuration/input problems (all listed), 1 a failure
while writing (no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations

import sys


def add_parser(subparsers):
    from lfm_engine.cli.merge import add_config_and_output
    p = subparsers.add_parser(
        "moe", help="build a Mixtral or Qwen2-MoE mixture of experts from dense fine-tunes (mergekit-moe)",
        description="Assemble a MoE model: attention/embeddings from base_model, one expert MLP "
                    "per listed model, router from prompts (gate_mode); Qwen2-MoE when the config "
                    "has a shared expert (or architecture: qwen), Mixtral otherwise.")
    add_config_and_output(p, "mergekit-moe style")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0,
                   help="seed of the random gate modes (default 0)")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                   action="store_true", help="allow every expert to be the same model (mergekit's flag)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the models, print the plan, write nothing")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lfm_engine.cli.guard import guarded
    from lfm_engine.cli.merge import shard_size
    from lfm_engine.merge.moe import build_moe
    rc, plan = guarded(lambda: build_moe(args.config, args.out_dir, seed=args.seed,
                                         out_shard_size=shard_size(args.out_shard_size),
                                         allow_overwrite=args.allow_overwrite, dry_run=args.dry_run,
                                         allow_all_same=args.allow_all_same), "moe")
    if rc:
        return rc
    if args.dry_run:
        print(plan.summary())
        return 0
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {len(plan.entries)} tensors ({plan.arch}) into {args.out_dir}", file=sys.stderr)
    return 0
