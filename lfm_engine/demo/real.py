"""`lfm-engine demo` on the real example model (SmolLM2-135M-Instruct) and its fine-tunes.

Runs when the model is in the cache (``lfm-engine fetch-example-model``) and its example
fine-tunes are built (``python tools/build_example_finetunes.py``; models/finetunes.py).
Three parts, all printing real text and exact task scores (models/tasks.py):

 1. serve: one prompt per task, each sent to the base and to every LoRA adapter, all rows
    in one mixed Engine batch (each row its own adapter), greedy;
 2. merge: the three full fine-tunes (persona, upper, add) merged with DELLA through
    ``lfm_engine.merge_models``; each task's score next to the fine-tunes' own;
 3. compress: the "add" fine-tune encoded with int4 (group 32) and sign1 into .lfmd
    containers (``compress_model``), rebuilt (``decompress_model``) and scored.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

MERGE_TASKS = ["persona", "upper", "add"]


def available(cache_dir=None) -> tuple:
    """(model is cached, fine-tunes are built, hint for what is missing or None)."""
    from lfm_engine.models import example, finetunes

    has_model = example.is_cached(cache_dir)
    has_ft = has_model and finetunes.is_built(finetunes.finetunes_dir(cache_dir))
    hint = None
    if not has_model:
        hint = (f"the real example model (SmolLM2-135M-Instruct) is not in the cache "
                f"({example.example_model_dir(cache_dir)}); to use it: {example.FETCH_HINT}, "
                f"then: python tools/build_example_finetunes.py")
    elif not has_ft:
        hint = ("the example fine-tunes are not built; build them (a few minutes on a CPU) with: "
                "python tools/build_example_finetunes.py")
    return has_model, has_ft, hint


def run(args) -> int:
    import json

    from transformers.utils import logging as hf_logging

    import lfm_engine
    from lfm_engine.models import example, finetunes
    from lfm_engine.models.scoring import Scorer, read_folder
    from lfm_engine.models.serve_check import adapter_folders, engine_generate
    from lfm_engine.models.tasks import TASKS

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        lfm_engine.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_dir = example.example_model_dir(args.cache_dir)
    ft_dir = finetunes.finetunes_dir(args.cache_dir)
    meta = json.loads((ft_dir / "scores.json").read_text())
    info = lfm_engine.build_info()
    print(f"lfm_engine {lfm_engine.__version__}  (SIMD {info['simd']}, CUDA {'on' if info['cuda'] else 'off'})")
    print(f"example model: SmolLM2-135M-Instruct in {model_dir}\nfine-tunes:    {ft_dir}")
    print("tasks (exact match on unseen prompts): "
          + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    parts = [p for p in ("serve", "merge", "compress") if p not in args.skip]
    failures = []
    scorer = None
    work = args.workdir or tempfile.mkdtemp(prefix="lfm_demo_")
    os.makedirs(work, exist_ok=True)
    try:
        if "serve" in parts:
            print("\n[1/3] One mixed batch through Engine: every task's prompt, base and every LoRA adapter")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            adapters = adapter_folders(ft_dir)
            reqs, labels = [], []
            for task in adapters:
                prompt, answer = TASKS[task].examples(1, "eval")[0]
                ids = finetunes.prompt_ids(tok, prompt)
                for a in [None] + list(adapters):
                    reqs.append((a, ids))
                    labels.append((task, prompt, answer, a))
            t0 = time.perf_counter()
            outs = engine_generate(model_dir, adapters, reqs, args.new_tokens)
            dt = time.perf_counter() - t0
            last = None
            for (task, prompt, answer, a), toks in zip(labels, outs):
                if task != last:
                    acc = meta.get(f"adapters/{task}", {}).get(task)
                    print(f"      prompt: {prompt!r}   (expected from the '{task}' adapter: {answer!r}; it answers "
                          f"{acc:.0%} of the unseen {task} prompts exactly)")
                    last = task
                text = tok.decode(toks, skip_special_tokens=True)
                mark = "  <- exact" if text == answer else ""
                print(f"        {a or 'base':>8}: {text!r}{mark}")
            print(f"      {len(reqs)} rows, {sum(map(len, outs))} tokens in {dt:.1f} s (one Engine, "
                  f"{len(adapters)} adapters resident in one AdapterPool)")
            own = [(task, a, text) for (task, _, answer, a), text in
                   zip(labels, (tok.decode(o, skip_special_tokens=True) for o in outs)) if a == task]
            if not any(text == TASKS[t].examples(1, "eval")[0][1] for t, _, text in own):
                failures.append("serve (no adapter answered its own prompt exactly)")
        if {"merge", "compress"} & set(parts):
            scorer = Scorer(model_dir, ft_dir, meta)
        if "merge" in parts:
            print("\n[2/3] DELLA merge of the full fine-tunes persona + upper + add (lfm_engine.merge_models):")
            # DELLA kept the most of the three tasks in bench/bench_quality.py (docs/quality.md)
            cfg = {"merge_method": "della", "base_model": str(model_dir), "dtype": "float32",
                   "models": [{"model": str(ft_dir / "full" / t),
                               "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for t in MERGE_TASKS]}
            out = Path(work) / "merged"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            lfm_engine.merge_models(cfg, out, quiet=True, write_model_card=False)
            dt = time.perf_counter() - t0
            s = scorer.score(read_folder(out), MERGE_TASKS)
            print(f"      merged in {dt:.1f} s -> {out}")
            print(f"      {'':24}" + "".join(f"{t:>9}" for t in MERGE_TASKS) + f"{'avg':>9}")
            print(f"      {'base':24}" + "".join(f"{meta['base'][t]:>9.2f}" for t in MERGE_TASKS)
                  + f"{sum(meta['base'][t] for t in MERGE_TASKS) / 3:>9.2f}")
            print(f"      {'each fine-tune, own task':24}" + "".join(f"{meta['full/' + t][t]:>9.2f}" for t in MERGE_TASKS)
                  + f"{sum(meta['full/' + t][t] for t in MERGE_TASKS) / 3:>9.2f}")
            print(f"      {'DELLA merge (one model)':24}" + "".join(f"{s[t]:>9.2f}" for t in MERGE_TASKS)
                  + f"{sum(s[t] for t in MERGE_TASKS) / 3:>9.2f}")
        if "compress" in parts:
            task = "add"
            print(f"\n[3/3] Compressing the '{task}' fine-tune (compress_model -> .lfmd, decompress_model back):")
            own = meta[f"full/{task}"]
            delta_mb = None
            for codec, opts in (("int4", {"group_size": 32}), ("sign1", {})):
                path = Path(work) / f"{task}.{codec}.lfmd"
                rebuilt = Path(work) / f"{task}.{codec}"
                shutil.rmtree(rebuilt, ignore_errors=True)
                t0 = time.perf_counter()
                res = lfm_engine.compress_model(model_dir, ft_dir / "full" / task, path, codec=codec, options=opts)
                lfm_engine.decompress_model(model_dir, path, rebuilt)
                dt = time.perf_counter() - t0
                sd = read_folder(rebuilt)
                s = scorer.score(sd, [task])
                size = path.stat().st_size / 1e6
                if delta_mb is None:
                    delta_mb = sum(f.stat().st_size for f in (ft_dir / "full" / task).glob("*.safetensors")) / 1e6
                print(f"      {codec:<6} {size:7.1f} MB .lfmd for the whole model (the fine-tune's safetensors: "
                      f"{delta_mb:.0f} MB)  '{task}' accuracy {s[task]:.2f} (fine-tune {own[task]:.2f}, "
                      f"base {meta['base'][task]:.2f})  held-out ppl {s['ppl']:.2f} (fine-tune {own['ppl']:.2f})  "
                      f"{dt:.1f} s")
                del res
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nTotal {time.perf_counter() - t_start:.1f} s. ", end="")
    if failures:
        print(f"FAILED: {', '.join(failures)}.")
        return 1
    print("Done.")
    return 0
