#!/usr/bin/env python
"""Retention tables on a real model: what merged and compressed fine-tunes still do.

Needs the example model and its fine-tunes in the cache:
    lfm-engine fetch-example-model && python tools/build_example_finetunes.py

Parts (--parts, default all):
  merge     the 3 full fine-tunes (persona, upper, add; models/finetunes.py) merged with
            lfm_engine.merge_models (the `lfm-engine merge` path, mergekit YAML) by every
            method; each task's exact-match accuracy of the merged model, the average and
            the normalized average (score / the fine-tune's own score), FusionBench-style;
            plus TALL-masks / EMR (codec "masks": one shared vector + a mask per task).
            With --mergekit, each config also runs through `mergekit-yaml` (same YAML,
            float32): its task scores next to ours and the largest weight difference.
  compress  every codec at its usual settings on each full fine-tune's deltas (the 28
            trained matrices): bits/param, relative error ||d - d^||_F / ||d||_F, the
            fine-tune's task accuracy with base + decoded delta, held-out perplexity.
            sign1 also with BitDelta's scale distillation (compress/distill.py; calibration:
            16 training examples of the fine-tune's task, DISTILL settings).
  serve     greedy outputs of every LoRA adapter through lfm_engine's Engine (one mixed
            batch) against PEFT's generate(), token for token.

Scores are exact-match accuracy on unseen prompts (models/tasks.py); the bottom layers
every fine-tune shares with the base are computed once (models/split.py) and a merged
model whose bottom is not bit-equal to the base's is scored with its own bottom.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lfm_engine.models.scoring import Scorer, read_folder

FULL_TASKS = ["persona", "upper", "add"]
COMPRESS_TASKS = FULL_TASKS

# (label, mergekit YAML fragment); models are the full fine-tunes, base the example model.
MERGES = [
    ("task_arithmetic λ=1", dict(merge_method="task_arithmetic", per_model=dict(weight=1.0))),
    ("task_arithmetic λ=0.5", dict(merge_method="task_arithmetic", per_model=dict(weight=0.5))),
    ("ties d=0.3", dict(merge_method="ties", per_model=dict(weight=1.0, density=0.3), parameters=dict(normalize=True))),
    ("dare_ties d=0.5", dict(merge_method="dare_ties", per_model=dict(weight=1.0, density=0.5))),
    ("della d=0.5 ε=0.1", dict(merge_method="della", per_model=dict(weight=1.0, density=0.5, epsilon=0.1))),
    ("breadcrumbs_ties d=0.8 γ=0.05", dict(merge_method="breadcrumbs_ties",
                                          per_model=dict(weight=1.0, density=0.8, gamma=0.05))),
    ("linear (average)", dict(merge_method="linear", per_model=dict(weight=1.0))),
    ("model_stock", dict(merge_method="model_stock")),
    ("slerp persona+upper t=0.5", dict(merge_method="slerp", pair=("persona", "upper"), parameters=dict(t=0.5))),
]

# (label, codec, options): the usual settings of docs/codecs.md
CODECS = [
    ("int8 g128", "int8", dict(group_size=128)),
    ("int4 g32", "int4", dict(group_size=32)),
    ("int4 g128", "int4", dict(group_size=128)),
    ("int4 g128 scale_search=mse", "int4", dict(group_size=128, scale_search="mse")),
    ("nf4 g128", "nf4", dict(group_size=128)),
    ("nf4 g128 scale_search=mse", "nf4", dict(group_size=128, scale_search="mse")),
    ("int2 g32", "int2", dict(group_size=32)),
    ("int2 g128", "int2", dict(group_size=128)),
    ("sign1 per row", "sign1", dict()),
    ("sign1 per tensor", "sign1", dict(per_tensor=True)),
    ("sign1 per row + scale distillation", "sign1", dict(distill=True)),
    ("sign1 per tensor + scale distillation", "sign1", dict(per_tensor=True, distill=True)),
    ("ternary d=0.3", "ternary", dict(density=0.3)),
    ("ternary d=0.1", "ternary", dict(density=0.1)),
    ("sparse_int d=0.3 4b", "sparse_int", dict(density=0.3, bits=4)),
    ("sparse_int d=0.1 8b", "sparse_int", dict(density=0.1, bits=8)),
    ("lowrank r=64", "lowrank", dict(rank=64)),
    ("lowrank r=16", "lowrank", dict(rank=16)),
    ("lowrank bands fp16:8,int8:16,int4:32 (Delta-CoMe-style)", "lowrank",
     dict(bands="float16:8,int8:16,int4:32")),
]


def merge_config(ft_dir: Path, base_dir: Path, spec: dict) -> dict:
    cfg = {"merge_method": spec["merge_method"], "dtype": "float32"}
    if spec["merge_method"] == "slerp":
        a, b = spec["pair"]
        cfg["base_model"] = str(ft_dir / "full" / a)
        cfg["models"] = [{"model": str(ft_dir / "full" / b)}]
    else:
        if spec["merge_method"] != "linear":  # linear averages the models; mergekit would
            cfg["base_model"] = str(base_dir)  # also want a weight for a named base
        cfg["models"] = [{"model": str(ft_dir / "full" / t), **({"parameters": dict(spec["per_model"])}
                                                               if spec.get("per_model") else {})}
                         for t in FULL_TASKS]
    if spec.get("parameters"):
        cfg["parameters"] = dict(spec["parameters"])
    return cfg


def run_mergekit(mk_exe: str, cfg: dict, workdir: Path, ours: dict, scorer: Scorer) -> dict:
    """The same config through `mergekit-yaml`: its task scores, its wall time and the
    largest |ours - mergekit| over all weights (DARE/DELLA draw different masks there)."""
    import yaml

    cp, out = workdir / "mergekit.yml", workdir / "mergekit_out"
    cp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run([mk_exe, str(cp), str(out), "--no-copy-tokenizer", "--quiet"], capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}
    seconds = time.perf_counter() - t0
    theirs = read_folder(out)
    diff = max((float((ours[n].float() - theirs[n].float()).abs().max()) for n in ours if n in theirs), default=0.0)
    s = scorer.score(theirs, FULL_TASKS)
    shutil.rmtree(out, ignore_errors=True)
    return {**s, "merge_s": round(seconds, 2), "max_abs_diff": diff,
            "missing": sorted(set(ours) ^ set(theirs))[:3]}


def run_merges(scorer: Scorer, ft_dir: Path, base_dir: Path, meta: dict, workdir: Path, seed: int,
               mk_exe: str = None) -> list:
    import lfm_engine

    rows = []
    own = {t: meta[f"full/{t}"][t] for t in FULL_TASKS}
    rows.append({"method": "base (no merge)", **{t: meta["base"][t] for t in FULL_TASKS}, "ppl": meta["base"]["ppl"]})
    rows.append({"method": "fine-tunes (each on its own task)", **own,
                 "ppl": sum(meta[f"full/{t}"]["ppl"] for t in FULL_TASKS) / len(FULL_TASKS)})
    for label, spec in MERGES:
        cfg = merge_config(ft_dir, base_dir, spec)
        out = workdir / "merged"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        lfm_engine.merge_models(cfg, out, seed=seed, quiet=True, write_model_card=False)
        t_merge = time.perf_counter() - t0
        merged = read_folder(out)
        s = scorer.score(merged, FULL_TASKS)
        rows.append({"method": label, **s, "merge_s": round(t_merge, 2), "config": cfg})
        print(f"  {label:34s} " + "  ".join(f"{t} {s[t]:.2f}" for t in FULL_TASKS) + f"  ppl {s['ppl']:.2f}"
              f"  (merge {t_merge:.1f} s)", flush=True)
        if mk_exe:
            mk = rows[-1]["mergekit"] = run_mergekit(mk_exe, cfg, workdir, merged, scorer)
            print(f"  {'  mergekit-yaml':34s} " + (mk["error"] if "error" in mk else
                  "  ".join(f"{t} {mk[t]:.2f}" for t in FULL_TASKS) + f"  ppl {mk['ppl']:.2f}  (merge "
                  f"{mk['merge_s']:.1f} s, max |diff| {mk['max_abs_diff']:.2e})"), flush=True)
        del merged
    if len(MERGES) > 2:  # not in --quick
        rows.extend(run_masks(scorer, ft_dir, meta))
    for r in rows:
        r["avg"] = sum(r[t] for t in FULL_TASKS) / len(FULL_TASKS)
        r["norm_avg"] = sum(r[t] / own[t] for t in FULL_TASKS if own[t] > 0) / len(FULL_TASKS)
    return rows


def run_masks(scorer: Scorer, ft_dir: Path, meta: dict) -> list:
    """TALL-masks / EMR: codec "masks" over the stacked task vectors, each task rebuilt with its mask."""
    from lfm_engine import decode_delta, encode_delta

    sds = {t: read_folder(ft_dir / "full" / t) for t in FULL_TASKS}
    keys = [k for k in scorer.top_keys() if k in sds[FULL_TASKS[0]] and sds[FULL_TASKS[0]][k].dim() == 2
            and any(not torch.equal(sds[t][k], scorer.base_sd[k]) for t in FULL_TASKS)]
    rows = []
    for mode in ("tall", "emr"):
        rebuilt = {t: {} for t in FULL_TASKS}
        for k in keys:
            stack = torch.stack([sds[t][k].float() - scorer.base_sd[k] for t in FULL_TASKS])
            enc = encode_delta(stack, "masks", mode=mode, merged_codec="int8")
            for i, t in enumerate(FULL_TASKS):
                rebuilt[t][k] = scorer.base_sd[k] + decode_delta(enc, task=i)
        s = {t: scorer.score(rebuilt[t], [t])[t] for t in FULL_TASKS}
        rows.append({"method": f"{mode.upper()} masks (per-task mask, merged int8)", **s, "ppl": float("nan")})
        print(f"  {mode} masks: {s}", flush=True)
    return rows


def bits_of(enc) -> int:
    return sum(v.numel() * v.element_size() * 8 for v in enc.fields.values())


DISTILL = dict(texts=16, steps=40, lr=1e-2)  # calibration: training prompts of the fine-tune's task


class _Top(torch.nn.Module):
    """The example model from the split layer up: forward(hidden [B, T, H], select [N, 2]) -> logits [N, V]."""

    def __init__(self, model, split: int):
        super().__init__()
        self.m, self.split = model, split

    def forward(self, hidden, select):
        from lfm_engine.models.split import top_logits

        return top_logits(self.m, hidden, self.split, select)


def distill(scorer: Scorer, task: str, sd: dict, encs: dict) -> dict:
    """BitDelta scale distillation of sign1 entries against the fine-tune ``sd`` (compress/distill.py).

    Calibration: DISTILL["texts"] training examples of the task (prompt + answer, every
    position's logits), run from the split layer up (the bottom is the base's).
    """
    from lfm_engine.compress.distill import DistillConfig, distill_sign1_scales
    from lfm_engine.models import finetunes as ft
    from lfm_engine.models.split import bottom_hidden, stack_hidden
    from lfm_engine.models.tasks import TASKS

    pad = scorer.tok.pad_token_id if scorer.tok.pad_token_id is not None else scorer.tok.eos_token_id
    seqs = [ft.encode(scorer.tok, p, a)[0] for p, a in TASKS[task].examples(DISTILL["texts"], "train")]
    hidden = bottom_hidden(scorer.base, seqs, scorer.split, pad)
    batches = []
    for i in range(0, len(seqs), 8):
        rows = list(range(i, min(i + 8, len(seqs))))
        sel = torch.tensor([(j, t) for j, r in enumerate(rows) for t in range(len(seqs[r]))])
        batches.append(({"hidden": stack_hidden([hidden[r] for r in rows]), "select": sel},
                        torch.ones(len(sel), dtype=torch.bool)))
    scorer.load(sd)
    top = _Top(scorer.probe, scorer.split)
    cfg = DistillConfig([p for p, _ in TASKS[task].examples(DISTILL["texts"], "train")], steps=DISTILL["steps"],
                        lr=DISTILL["lr"])
    new, rep = distill_sign1_scales(top, {"m." + k: scorer.base_sd[k] for k in encs},
                                    {"m." + k: e for k, e in encs.items()}, batches, cfg)
    print(f"    distilled {len(encs)} sign1 matrices: calibration loss {rep.loss_before:.4g} -> {rep.loss_after:.4g}",
          flush=True)
    return {k: new["m." + k] for k in encs}


def run_compress(scorer: Scorer, ft_dir: Path, meta: dict) -> list:
    from lfm_engine import decode_delta, encode_delta

    rows = []
    for task in COMPRESS_TASKS:
        sd = read_folder(ft_dir / "full" / task)
        keys = [k for k in scorer.top_keys() if k in sd and sd[k].dim() == 2 and not torch.equal(sd[k], scorer.base_sd[k])]
        n = sum(sd[k].numel() for k in keys)
        own = meta[f"full/{task}"]
        rows.append({"task": task, "codec": "uncompressed (fp32 delta)", "bits": 32.0, "rel_err": 0.0,
                     "score": own[task], "ppl": own["ppl"], "tensors": len(keys)})
        for label, codec, opts in CODECS:
            bits, err2, ref2, rebuilt = 0, 0.0, 0.0, {}
            opts = dict(opts)
            distilled = opts.pop("distill", False)
            encs = {k: encode_delta(sd[k].float() - scorer.base_sd[k], codec, **opts) for k in keys}  # default backends
            if distilled:
                encs = distill(scorer, task, sd, encs)
            for k in keys:
                d = sd[k].float() - scorer.base_sd[k]
                enc = encs[k]
                dh = decode_delta(enc)
                bits += bits_of(enc)
                err2 += float(((d - dh).double() ** 2).sum())
                ref2 += float((d.double() ** 2).sum())
                rebuilt[k] = scorer.base_sd[k] + dh
            s = scorer.score(rebuilt, [task])
            row = {"task": task, "codec": label, "bits": bits / n, "rel_err": (err2 / ref2) ** 0.5,
                   "score": s[task], "ppl": s["ppl"], "retention": s[task] / own[task] if own[task] else float("nan")}
            rows.append(row)
            print(f"  {task:8s} {label:40s} {row['bits']:6.3f} b/p  err {row['rel_err']:.4f}  "
                  f"score {row['score']:.2f}  ppl {row['ppl']:.2f}", flush=True)
    return rows


def run_serve(model_dir: Path, ft_dir: Path, meta: dict, new_tokens: int = 12) -> list:
    from lfm_engine.models.serve_check import engine_vs_peft

    return engine_vs_peft(model_dir, ft_dir, new_tokens=new_tokens)


def markdown(res: dict) -> str:
    lines = []
    if "merge" in res:
        lines += ["| method | " + " | ".join(FULL_TASKS) + " | avg | norm. avg | held-out ppl |",
                  "|---|" + "---:|" * (len(FULL_TASKS) + 3)]
        for r in res["merge"]:
            ppl = "–" if r["ppl"] != r["ppl"] else f"{r['ppl']:.2f}"
            lines.append(f"| {r['method']} | " + " | ".join(f"{r[t]:.2f}" for t in FULL_TASKS)
                         + f" | {r['avg']:.2f} | {r['norm_avg']:.2f} | {ppl} |")
        lines.append("")
        mk_rows = [r for r in res["merge"] if "mergekit" in r]
        if mk_rows:
            lines += ["Same configs through `mergekit-yaml` (float32): task scores ours / mergekit's.", "",
                      "| method | " + " | ".join(FULL_TASKS) + " | ppl | max abs weight diff | merge s ours / mergekit |",
                      "|---|" + "---:|" * (len(FULL_TASKS) + 3)]
            for r in mk_rows:
                mk = r["mergekit"]
                if "error" in mk:
                    lines.append(f"| {r['method']} | mergekit failed: {mk['error']} |")
                    continue
                lines.append(f"| {r['method']} | " + " | ".join(f"{r[t]:.2f} / {mk[t]:.2f}" for t in FULL_TASKS)
                             + f" | {r['ppl']:.2f} / {mk['ppl']:.2f} | {mk['max_abs_diff']:.2e} "
                             f"| {r['merge_s']:.1f} / {mk['merge_s']:.1f} |")
            lines.append("")
    if "compress" in res:
        lines += ["| fine-tune | codec | bits/param | rel. err | task acc. | retention | ppl |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["compress"]:
            ret = f"{r['retention']:.2f}" if "retention" in r else "1.00"
            lines.append(f"| {r['task']} | {r['codec']} | {r['bits']:.3f} | {r['rel_err']:.4f} | {r['score']:.2f} "
                         f"| {ret} | {r['ppl']:.2f} |")
        lines.append("")
    if "serve" in res:
        lines += ["| adapter | prompts | tokens equal to PEFT's |", "|---|---:|---:|"]
        for r in res["serve"]:
            lines.append(f"| {r['adapter']} | {r['prompts']} | {r['equal']}/{r['prompts']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from lfm_engine.models import example, finetunes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--parts", nargs="*", default=["merge", "compress", "serve"], choices=["merge", "compress", "serve"])
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    ap.add_argument("--workdir", default=None, help="folder for merged models (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="DARE/DELLA seed")
    ap.add_argument("--codecs", nargs="+", default=None, metavar="PREFIX",
                    help="compress part: only the codec rows whose label starts with one of these (e.g. nf4 int4)")
    ap.add_argument("--quick", action="store_true",
                    help="a few rows only (ties and task_arithmetic; int4/sign1 on one fine-tune): `lfm-engine bench --quick`")
    ap.add_argument("--mergekit", action="store_true",
                    help="also run every merge config through mergekit-yaml (must be on PATH) and score it")
    args = ap.parse_args(argv)
    mk_exe = None
    if args.mergekit:
        mk_exe = shutil.which("mergekit-yaml") or shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
        if mk_exe is None:
            print("--mergekit: mergekit-yaml is not installed (pip install mergekit)", file=sys.stderr)
            return 2
    if not example.is_cached(args.cache_dir):
        print(f"the example model is not cached: {example.FETCH_HINT}", file=sys.stderr)
        return 1
    model_dir = example.example_model_dir(args.cache_dir)
    ft_dir = finetunes.finetunes_dir(args.cache_dir)
    if not finetunes.is_built(ft_dir):
        print("the example fine-tunes are not built; building them now (python tools/build_example_finetunes.py)")
        finetunes.build(model_dir, ft_dir)
    meta = json.loads((ft_dir / "scores.json").read_text())
    t0 = time.perf_counter()
    res = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "load_before": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "finetunes": {k: v for k, v in meta.items() if isinstance(v, dict) and "ppl" in v}}
    global MERGES, CODECS, COMPRESS_TASKS
    if args.codecs:
        CODECS = [c for c in CODECS if c[0].startswith(tuple(args.codecs))]
        if not CODECS:
            ap.error(f"--codecs {' '.join(args.codecs)} matches no codec row")
    if args.quick:
        MERGES = [m for m in MERGES if m[0].startswith(("ties", "task_arithmetic λ=1"))]
        CODECS = [c for c in CODECS if c[0] in ("int4 g128", "sign1 per row")]
        COMPRESS_TASKS = FULL_TASKS[-1:]
        args.parts = [p for p in args.parts if p != "serve"]
    need_scorer = {"merge", "compress"} & set(args.parts)
    scorer = Scorer(model_dir, ft_dir, meta) if need_scorer else None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lfm_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "merge" in args.parts:
            print("merging the full fine-tunes (persona, upper, add):", flush=True)
            res["merge"] = run_merges(scorer, ft_dir, model_dir, meta, work, args.seed, mk_exe)
        if "compress" in args.parts:
            print("compressing each full fine-tune:", flush=True)
            res["compress"] = run_compress(scorer, ft_dir, meta)
        if "serve" in args.parts:
            print("serving every adapter through Engine vs PEFT:", flush=True)
            res["serve"] = run_serve(model_dir, ft_dir, meta)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["slow_scorings"] = scorer.slow if scorer else 0
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["load_after"] = os.getloadavg()[0]
    md = markdown(res)
    print(md)
    print(f"{res['seconds']:.0f} s; load average {res['load_before']:.1f} before, {res['load_after']:.1f} after")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
