"""`lfm-engine moe CONFIG.yml OUT_DIR` (mergekit-moe): a Mixtral or Qwen2-MoE model from dense fine-tunes.

See lfm_engine.merge.moe for the config keys, moe_arch for the output architectures and
layouts, moe_gates for the gate modes. ``--dry-run`` checks everything and prints the plan.
mergekit-moe's options are accepted with its meaning where they have one here; those
that change nothing say so once, those with no equivalent are refused naming why.
Exit status: 0 success, 2 configuration/input problems (all listed), 1 a failure
while writing (no output folder is left behind), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from lfm_engine.cli.guard import thread_count

# mergekit-moe options that change nothing here, and why
NOOP_FLAGS = {
    "--lazy-unpickle": "pickle checkpoints are never loaded (safetensors only)",
    "--low-cpu-memory": "tensors are streamed one at a time already",
    "--trust-remote-code": "only config.json and tensors are read; the hidden gate modes run "
                           "transformers' own model classes",
    "--clone-tensors": "every output tensor is written from its own buffer",
    "--async-write": "shards are written as the tensors stream",
    "--read-to-gpu": "tensors are copied, never computed on, except the hidden-state pass (--device)",
    "--safe-serialization": "safetensors is the only output format",
}
# mergekit-moe options with no equivalent: refused, naming why
REFUSED_FLAGS = {
    "--load-in-4bit": "the hidden-state pass runs in float32; bitsandbytes loading is not supported",
    "--load-in-8bit": "the hidden-state pass runs in float32; bitsandbytes loading is not supported",
    "--no-safe-serialization": "lfm-engine writes safetensors only (never pickles)",
    "--multi-gpu": "the hidden-state pass runs on one device; use --device cuda:N",
    "--gpu-rich": "use --device cuda",
}


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
    p.add_argument("--out-shard-size", default="5GB",
                   help="largest output shard: 5GB, 500MB, or mergekit's 5B (= 5e9), 500M (default 5GB)")
    p.add_argument("--allow-overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                   action="store_true", help="allow every expert to be the same model (mergekit's flag)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the models, print the plan, write nothing")
    p.add_argument("--device", default=None, help="device of the hidden-state pass (gate_mode hidden, "
                                                  "hidden_avg): cpu or cuda[:N] (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's spelling)")
    p.add_argument("-j", "--num-threads", dest="threads", type=thread_count, default=None,
                   help="CPU threads of the hidden-state pass (default: torch's)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer files (default: yes)")
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a copy of the config as mergekit_moe_config.yml (default: yes)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="accepted (mergekit's logging level)")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.add_argument("--transformers-cache", "--lora-merge-cache", dest="cache_dirs", action="append",
                   metavar="DIR", help="accepted, no effect: nothing is downloaded or cached")
    for flag, why in NOOP_FLAGS.items():
        p.add_argument(flag, dest="noop_flags", action="append_const", const=flag, help=f"accepted, no effect: {why}")
    for flag in REFUSED_FLAGS:
        p.add_argument(flag, dest="refused_flags", action="append_const", const=flag, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _device(args):
    """The hidden-state pass's device, or an error message."""
    if args.cuda and args.device is not None and not str(args.device).startswith("cuda"):
        return None, f"--cuda contradicts --device {args.device}"
    device = args.device or ("cuda" if args.cuda else "cpu")
    if str(device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            return None, f"--device {device}: no CUDA device is available"
    elif device != "cpu":
        return None, f"--device {device}: expected cpu or cuda[:N]"
    return device, None


def run(args) -> int:
    from lfm_engine.cli.guard import guarded
    from lfm_engine.cli.merge import shard_size
    from lfm_engine.merge.moe import build_moe
    for flag in args.refused_flags or []:
        print(f"error: {flag} is not supported: {REFUSED_FLAGS[flag]}", file=sys.stderr)
    device, problem = _device(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    if args.refused_flags or problem:
        return 2
    for flag in dict.fromkeys(args.noop_flags or []):
        print(f"note: {flag} accepted, no effect: {NOOP_FLAGS[flag]}", file=sys.stderr)
    if args.cache_dirs:
        print("note: --transformers-cache/--lora-merge-cache accepted, no effect: nothing is downloaded "
              "or cached", file=sys.stderr)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    rc, plan = guarded(lambda: build_moe(args.config, args.out_dir, seed=args.seed,
                                         out_shard_size=shard_size(args.out_shard_size),
                                         allow_overwrite=args.allow_overwrite, dry_run=args.dry_run,
                                         allow_all_same=args.allow_all_same, device=device,
                                         copy_tokenizer=args.copy_tokenizer,
                                         write_config_copy=args.write_model_card), "moe")
    if rc:
        return rc
    if args.dry_run:
        print(plan.summary())
        return 0
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {len(plan.entries)} tensors ({plan.arch}) into {args.out_dir}", file=sys.stderr)
    return 0
