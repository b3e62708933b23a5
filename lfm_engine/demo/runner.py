"""`lfm-engine demo`: the built-in example a newcomer runs first.

Four parts, each printing what it did, its timings and its error against a reference;
the command exits 0 only when every check passes:

 1. tensors: merges generated tensors (a bf16 base and three fine-tunes of one layer)
    with every task-vector method: the fused C++ kernel against a plain-torch multi-pass
    merge (mergekit's way), and the largest error of each against the float64 reference.
 2. model merge: in a temporary folder (lfm_engine.demo.data) a small Llama-shaped base,
    3 fine-tunes and 4 PEFT LoRA adapters are generated; a mergekit-style YAML config
    merges the fine-tunes with TIES through ``lfm_engine.merge_models``; some output
    tensors are checked against ``merge_tensors(..., backend="reference")``.
 3. compression: one fine-tune is encoded with two codecs into .lfmd containers
    (``compress_model``): bits/param, size ratio, relative error; the container is
    decompressed (``decompress_model``) and the rebuilt weights checked.
 4. serving: the base is loaded as a transformers LlamaForCausalLM, the adapters go
    into an AdapterPool, ``attach`` makes its linears multi-LoRA, and one mixed batch
    (a different adapter, or none, per row) runs one forward and a greedy generation
    (``Engine``); logits are compared with a plain per-adapter torch computation (the
    adapter merged densely into the weights, W + s·B·A) and the generated tokens with
    greedy decoding of those merged models; with ``--peft`` also with PEFT's own mixed
    batch (``PeftModel(..., adapter_names=[...])``) on the same folders.

Tolerances (decided here; docs/spec/merge.md and docs/spec/lora.md define the math): merged fp32
tensors within atol 1e-5 + rtol 1e-5 of the float64 reference (the test-suite fp32
tolerance); LoRA logits within 1e-4 · max|logit| (fp32 accumulation order differs from
the dense W + s·B·A product); a greedy token may differ from the reference only where the
reference's top two logits are closer than that tolerance (a true tie).
"""
from __future__ import annotations

import sys
import time

import torch


def _time(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def merge_demo(rows: int, cols: int, k: int, threads: int = 0) -> list[dict]:
    from lfm_engine import merge_tensors
    from lfm_engine.baselines.torch_merge import merge_tensors_torch_multipass
    from lfm_engine.core.merge_methods import resolve_merge_params

    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    others = [(base.float() + 0.02 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16) for _ in range(k)]
    name = "model.layers.0.mlp.up_proj.weight"
    results = []
    for method, kw in [
        ("task_arithmetic", dict(weights=[0.5] * k)),
        ("ties", dict(density=0.2)),
        ("dare_linear", dict(density=0.3)),
        ("dare_ties", dict(density=0.3)),
        ("breadcrumbs", dict(density=0.5, gamma=0.01)),
        ("breadcrumbs_ties", dict(density=0.5, gamma=0.01)),
        ("della", dict(density=0.5, epsilon=0.1)),
        ("della_linear", dict(density=0.5, epsilon=0.1)),
        ("linear", dict()),
    ]:
        b = None if method == "linear" else base
        ours = merge_tensors(b, others, method, name=name, n_threads=threads, **kw)
        t_ours = _time(lambda: merge_tensors(b, others, method, name=name, n_threads=threads, **kw))
        params = resolve_merge_params(method, k, name=name, **kw)
        t_torch = _time(lambda: merge_tensors_torch_multipass(b, others, params), reps=1)
        ref = merge_tensors(b, others, method, name=name, backend="reference", **kw)
        err = (ours.float() - ref.float()).abs().max().item()
        ulp = (ref.float().abs().max().item()) * 2.0 ** -8  # one bf16 ulp at the largest value
        results.append(dict(method=method, ours_ms=t_ours * 1e3, torch_ms=t_torch * 1e3,
                            speedup=t_torch / t_ours, max_err=err, bf16_ulp=ulp))
    return results


# ----------------------------------------------------------------------------- part 2: model merge

TIES_MODELS = [dict(weight=0.5, density=0.5), dict(weight=0.3, density=0.7), dict(weight=0.2, density=0.3)]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # tests/conftest.py TOLERANCES[float32]


def ties_config(ds) -> str:
    """The mergekit-style YAML of the demo's TIES merge (also what `lfm-engine merge` reads)."""
    lines = ["merge_method: ties", f"base_model: {ds.base}", "models:"]
    for path, prm in zip(ds.finetunes, TIES_MODELS):
        lines += [f"  - model: {path}", f"    parameters: {{weight: {prm['weight']}, density: {prm['density']}}}"]
    lines += ["parameters:", "  normalize: true", "dtype: float32", ""]
    return "\n".join(lines)


def model_merge_demo(ds, workdir: str, threads: int = 0) -> dict:
    import os

    import lfm_engine
    from lfm_engine.demo.data import load_folder

    cfg_path = os.path.join(workdir, "ties.yml")
    with open(cfg_path, "w") as f:
        f.write(ties_config(ds))
    out = os.path.join(workdir, "merged-ties")
    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the generated folders carry no tokenizer; merge_models warns about that
        warnings.filterwarnings("ignore", message="no tokenizer files")
        res = lfm_engine.merge_models(cfg_path, out, quiet=True, threads=threads or None)
    seconds = time.perf_counter() - t0
    got = load_folder(out)
    names = list(ds.base_weights)
    # a few tensors of different kinds: embedding, attention, MLP, a norm vector
    picks = [n for n in names if n.endswith(("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                                             "layers.0.mlp.down_proj.weight", "layers.0.input_layernorm.weight"))]
    checks = []
    k = len(ds.finetunes)
    for n in picks:
        ref = lfm_engine.merge_tensors(ds.base_weights[n], [ft[n] for ft in ds.finetune_weights[:k]], "ties",
                                       weights=[m["weight"] for m in TIES_MODELS[:k]],
                                       density=[m["density"] for m in TIES_MODELS[:k]], normalize=True,
                                       name=n, model_positions=list(range(k)), out_dtype=torch.float32,
                                       backend="reference")
        diff = (got[n].float() - ref.float()).abs()
        bound = FP32_TOL["atol"] + FP32_TOL["rtol"] * ref.float().abs()
        checks.append(dict(name=n, max_err=float(diff.max()), ok=bool((diff <= bound).all())
                           and set(got) == set(names)))
    return dict(config=cfg_path, out=out, seconds=seconds, tensors=res.tensors,
                bytes=res.bytes_read + res.bytes_written, checks=checks)


# ----------------------------------------------------------------------------- part 3: codecs

CODECS = (("int4", 0.25), ("sign1", 0.8))  # codec, loosest relative error accepted on Gaussian deltas


def compress_demo(ds, workdir: str, threads: int = 0) -> list:
    import os

    import lfm_engine
    from lfm_engine.demo.data import load_folder

    ft = ds.finetune_weights[0]
    rows = []
    for codec, bound in CODECS:
        path = os.path.join(workdir, f"ft1.{codec}.lfmd")
        t0 = time.perf_counter()
        rep = lfm_engine.compress_model(ds.base, ds.finetunes[0], path, codec=codec, n_threads=threads)
        t_enc = time.perf_counter() - t0
        out = os.path.join(workdir, f"ft1.{codec}.rebuilt")
        t0 = time.perf_counter()
        lfm_engine.decompress_model(ds.base, path, out, n_threads=threads)
        t_dec = time.perf_counter() - t0
        back = load_folder(out)
        tot = rep.totals(encoded_only=True)
        # relative error of the rebuilt encoded tensors, recomputed from the files
        err_sq = d_sq = 0.0
        for st in rep.tensors:
            n = st.name
            if st.codec in ("raw", "zero"):
                if not torch.equal(back[n], ft[n]):
                    err_sq = float("inf")
                continue
            d = ft[n].double() - ds.base_weights[n].double()
            err_sq += float(((back[n].double() - ft[n].double()) ** 2).sum())
            d_sq += float((d ** 2).sum())
        rel_back = (err_sq / d_sq) ** 0.5 if d_sq > 0 else float("inf")
        # fp32 rounding of b + decode(delta) adds ~1e-7 relative to the weights; the delta is
        # ~1% of them, so allow 1e-4 on the delta's relative error
        ok = (set(back) == set(ft) and abs(rel_back - tot["rel_error"]) <= 1e-4 + 1e-3 * tot["rel_error"]
              and tot["rel_error"] <= bound)
        file_bytes = os.path.getsize(path)
        model_bytes = sum(t.numel() * t.element_size() for t in ft.values())
        rows.append(dict(codec=codec, bits=tot["bits_per_param"], ratio=tot["ratio"], rel_error=tot["rel_error"],
                         rel_error_rebuilt=rel_back, file_mb=file_bytes / 2**20, model_mb=model_bytes / 2**20,
                         encode_s=t_enc, decode_s=t_dec, bound=bound, ok=ok))
    return rows


# ----------------------------------------------------------------------------- part 4: serving


def _merged_params(ds, adapter: str) -> dict:
    """{module.weight: W + s·B·A} of one adapter (the plain dense per-adapter computation)."""
    ad = ds.adapter_weights[adapter]
    return {m + ".weight": ds.base_weights[m + ".weight"].float() + ad.delta(m) for m in ad.modules}


def _reference_logits(ref_model, ds, ids: torch.Tensor, row_adapters) -> torch.Tensor:
    from torch.func import functional_call

    out = torch.empty(ids.shape[0], ids.shape[1], ds.config["vocab_size"])
    for name in dict.fromkeys(row_adapters):
        rows = [i for i, a in enumerate(row_adapters) if a == name]
        params = {} if name is None else _merged_params(ds, name)
        out[rows] = functional_call(ref_model, params, (ids[rows],)).logits.float()
    return out


def _reference_greedy(ref_model, ds, prompt, adapter, n_new):
    """Greedy tokens of the dense per-adapter model (full recompute each step) and, per step,
    the margin between its two best logits (to tell a real disagreement from a tie)."""
    from torch.func import functional_call

    params = {} if adapter is None else _merged_params(ds, adapter)
    ids = list(prompt)
    toks, margins = [], []
    for _ in range(n_new):
        logits = functional_call(ref_model, params, (torch.tensor([ids]),)).logits[0, -1].float()
        top = torch.topk(logits, 2)
        toks.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(toks[-1])
    return toks, margins


def _peft_logits(ds, ids: torch.Tensor, row_adapters) -> torch.Tensor:
    """PEFT's own mixed batch (``adapter_names=``, "__base__" for rows without an adapter)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import warnings

    names = list(dict.fromkeys(a for a in row_adapters if a is not None))
    model = LlamaForCausalLM.from_pretrained(ds.base, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls APIs newer transformers deprecate
        pm = PeftModel.from_pretrained(model, ds.adapters[names[0]], adapter_name=names[0]).eval()
        for n in names[1:]:
            pm.load_adapter(ds.adapters[n], adapter_name=n)
    with torch.inference_mode():
        return pm(ids, adapter_names=[a if a is not None else "__base__" for a in row_adapters]).logits.float()


def serve_demo(ds, batch: int, prompt_len: int, new_tokens: int, threads: int = 0, peft: bool = False) -> dict:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from lfm_engine.serve import AdapterPool, Engine, Request, attach

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the report
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(ds.base, dtype=torch.float32).eval()
    ref_model = LlamaForCausalLM.from_pretrained(ds.base, dtype=torch.float32).eval()
    t_model = time.perf_counter() - t0
    names = list(ds.adapters)
    pool = AdapterPool(capacity=max(1, len(names)), device="cpu", dtype=torch.float32)
    attach(model, pool)
    t0 = time.perf_counter()
    futs = [pool.load(n, ds.adapters[n]) for n in names]
    for f in futs:
        f.result()
    t_load = time.perf_counter() - t0
    # mixed batch: adapters round robin with a base-only row every third row
    cycle = names[:2] + [None] + names[2:]
    row_adapters = [cycle[i % len(cycle)] for i in range(batch)]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, ds.config["vocab_size"], (batch, prompt_len), generator=g)
    with torch.inference_mode():
        with pool.assign(row_adapters):
            logits = model(ids).logits.float()
        reps, t_fwd = 3, float("inf")
        for _ in range(reps):
            t1 = time.perf_counter()
            with pool.assign(row_adapters):
                model(ids)
            t_fwd = min(t_fwd, time.perf_counter() - t1)
        t1 = time.perf_counter()
        model(ids)  # the bare base model (no assignment): the LoRA overhead reads against it
        t_base = time.perf_counter() - t1
        ref = _reference_logits(ref_model, ds, ids, row_adapters)
    scale = float(ref.abs().max())
    logit_tol = 1e-4 * scale
    logit_err = float((logits - ref).abs().max())
    # the adapters must matter: rows with an adapter differ from the base model's logits
    with torch.inference_mode():
        base_logits = ref_model(ids).logits.float()
    effect = min(float((ref[i] - base_logits[i]).abs().max()) for i, a in enumerate(row_adapters) if a is not None) \
        if any(a is not None for a in row_adapters) else float("inf")

    engine = Engine(model, pool, max_batch_size=batch)
    reqs = [Request(prompt=ids[i].tolist(), adapter=a, max_new_tokens=new_tokens, ignore_eos=True)
            for i, a in enumerate(row_adapters)]
    with torch.inference_mode():
        results = engine.generate(reqs)
    t_gen = engine.last_generate_s
    n_gen = sum(len(r.token_ids) for r in results)
    agree = ties = 0
    bad = []
    with torch.inference_mode():
        for i, (r, a) in enumerate(zip(results, row_adapters)):
            toks, margins = _reference_greedy(ref_model, ds, ids[i].tolist(), a, new_tokens)
            if r.token_ids == toks:
                agree += 1
                continue
            j = next(j for j, (x, y) in enumerate(zip(r.token_ids, toks)) if x != y) \
                if any(x != y for x, y in zip(r.token_ids, toks)) else min(len(toks), len(r.token_ids))
            if j < len(margins) and margins[j] <= logit_tol and len(r.token_ids) == len(toks):
                ties += 1
            else:
                bad.append(i)
    pool.close()
    peft_err = None
    if peft and any(a is not None for a in row_adapters):
        peft_err = float((logits - _peft_logits(ds, ids, row_adapters)).abs().max())
    return dict(peft_err=peft_err, batch=batch, prompt_len=prompt_len, row_adapters=row_adapters, t_model=t_model, t_load=t_load,
                t_fwd=t_fwd, t_base=t_base, prefill_tok_s=batch * prompt_len / t_fwd, logit_err=logit_err,
                logit_tol=logit_tol, adapter_effect=effect, gen_tokens=n_gen, t_gen=t_gen,
                gen_tok_s=n_gen / t_gen if t_gen > 0 else 0.0, agree=agree, ties=ties, bad=bad,
                ok=logit_err <= logit_tol and effect > 10 * logit_tol and not bad
                and (peft_err is None or peft_err <= logit_tol))


# ----------------------------------------------------------------------------- the command


def _tensor_part(args) -> int:
    print(f"[1/4] Merging {args.models} bf16 fine-tunes of a {args.rows}x{args.cols} weight into their base, "
          "fused C++ kernel vs plain torch (mergekit-style):\n")
    rows = merge_demo(args.rows, args.cols, args.models, args.threads)
    print(f"{'method':<18}{'ours ms':>10}{'torch ms':>11}{'speed-up':>10}{'max |err| vs fp64 ref':>24}")
    bad = 0
    for r in rows:
        ok = r["max_err"] <= r["bf16_ulp"]
        bad += not ok
        print(f"{r['method']:<18}{r['ours_ms']:>10.1f}{r['torch_ms']:>11.1f}{r['speedup']:>9.1f}x"
              f"{r['max_err']:>14.2e}  {'ok' if ok else 'TOO LARGE'} (1 bf16 ulp = {r['bf16_ulp']:.1e})")
    if bad:
        print(f"\n{bad} method(s) differ from the float64 reference by more than one bf16 rounding.")
    else:
        print("\nEvery result is within one bf16 rounding of the float64 reference (docs/spec/merge.md).")
    return bad


def _check_args(args) -> list:
    """The command-line values the demo cannot run with, as messages."""
    problems = [f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})"
                for k in ("rows", "cols", "models", "hidden", "layers", "intermediate", "vocab", "batch",
                          "prompt_len", "new_tokens") if getattr(args, k) < 1]
    if args.threads < 0:
        problems.append(f"--threads must be >= 0 (got {args.threads})")
    if args.hidden % 4:
        problems.append(f"--hidden must be a multiple of 4, the generated model's head count (got {args.hidden})")
    if args.vocab < 4:
        problems.append(f"--vocab must be >= 4 (token ids 0-2 are special; got {args.vocab})")
    if args.prompt_len + args.new_tokens > 256:
        problems.append("--prompt-len + --new-tokens must be <= 256, the generated model's context length")
    return problems


def _generate(args, work: str):
    """Phase 1b: the demo's model folders and adapters under WORK/models."""
    import os

    from lfm_engine.demo.data import make_demo_set

    t0 = time.perf_counter()
    ds = make_demo_set(os.path.join(work, "models"), hidden=args.hidden, layers=args.layers,
                       intermediate=args.intermediate, vocab=args.vocab)
    print(f"\nGenerated in {work}/models ({time.perf_counter() - t0:.2f} s):\n"
          f"      a Llama-shaped base (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{ds.n_params / 1e6:.2f}M params, fp32), fine-tunes "
          f"{', '.join(os.path.basename(p) for p in ds.finetunes)},\n      PEFT LoRA adapters "
          + ", ".join(f"{n} (r={a.rank}, {len({m.rsplit('.', 1)[-1] for m in a.modules})} projections"
                      f"{', rsLoRA' if a.use_rslora else ''})" for n, a in ds.adapter_weights.items()))
    return ds


def _merge_part(ds, work: str, args) -> bool:
    """Phase 2: a mergekit-style TIES merge checked against the reference; True when it passed."""
    print("\n[2/4] TIES merge of the 3 fine-tunes from a mergekit-style YAML (lfm_engine.merge_models):")
    m = model_merge_demo(ds, work, args.threads)
    print("      " + open(m["config"]).read().replace(work, "$DEMO").strip().replace("\n", "\n      "))
    print(f"      merged {m['tensors']} tensors in {m['seconds'] * 1e3:.0f} ms "
          f"({m['bytes'] / max(m['seconds'], 1e-9) / 1e9:.2f} GB/s read+written) -> {m['out']}")
    for c in m["checks"]:
        print(f"      {c['name']:<44} max |err| vs merge_tensors(backend='reference') "
              f"{c['max_err']:.2e}  {'ok' if c['ok'] else 'TOO LARGE'}")
    return all(c["ok"] for c in m["checks"])


def _compress_part(ds, work: str, args) -> bool:
    """Phase 3: compress / decompress one fine-tune with every demo codec; True when it passed."""
    print("\n[3/4] Compressing the task vector of ft1 (compress_model -> .lfmd, decompress_model back):")
    rows = compress_demo(ds, work, args.threads)
    print(f"      {'codec':<7}{'bits/param':>11}{'ratio':>9}{'rel.err':>9}{'rebuilt':>9}{'file MB':>9}"
          f"{'encode ms':>11}{'decode ms':>11}")
    for r in rows:
        print(f"      {r['codec']:<7}{r['bits']:>11.3f}{r['ratio']:>8.1f}x{r['rel_error']:>9.4f}"
              f"{r['rel_error_rebuilt']:>9.4f}{r['file_mb']:>9.2f}{r['encode_s'] * 1e3:>11.0f}"
              f"{r['decode_s'] * 1e3:>11.0f}  {'ok' if r['ok'] else 'FAILED'}")
    print(f"      (bits/param and ratio over the encoded matrices vs their fp32 delta; rel.err = "
          f"||x_hat - x|| / ||x - b||; 'rebuilt' recomputes it from the decompressed folder; "
          f"the fp32 model is {rows[0]['model_mb']:.2f} MB)")
    return all(r["ok"] for r in rows)


def _serve_part(ds, args) -> bool:
    """Phase 4: a mixed-adapter batch through AdapterPool + attach; True when it passed."""
    print("\n[4/4] Serving a mixed-adapter batch (transformers LlamaForCausalLM + AdapterPool + attach):")
    s = serve_demo(ds, args.batch, args.prompt_len, args.new_tokens, args.threads, peft=args.peft)
    print(f"      rows -> adapters: {[a or 'base' for a in s['row_adapters']]}")
    print(f"      model load {s['t_model'] * 1e3:.0f} ms, {len(ds.adapters)} adapters into the pool "
          f"{s['t_load'] * 1e3:.0f} ms")
    print(f"      one forward of {s['batch']}x{s['prompt_len']} tokens: {s['t_fwd'] * 1e3:.1f} ms "
          f"({s['prefill_tok_s']:.0f} tokens/s; the bare base model {s['t_base'] * 1e3:.1f} ms)")
    print(f"      max |logit err| vs dense per-adapter torch (W + s*B*A): {s['logit_err']:.2e} "
          f"(tolerance {s['logit_tol']:.1e}; the adapters move logits by >= {s['adapter_effect']:.2e})"
          f"  {'ok' if s['logit_err'] <= s['logit_tol'] else 'TOO LARGE'}")
    if s["peft_err"] is not None:
        print(f"      max |logit err| vs PEFT's mixed batch (adapter_names=...): {s['peft_err']:.2e}  "
              f"{'ok' if s['peft_err'] <= s['logit_tol'] else 'TOO LARGE'}")
    print(f"      Engine.generate: {s['gen_tokens']} greedy tokens in {s['t_gen'] * 1e3:.0f} ms "
          f"({s['gen_tok_s']:.0f} tokens/s); {s['agree']}/{s['batch']} rows token-identical to the "
          f"dense reference" + (f", {s['ties']} differ only at an exact tie" if s["ties"] else "")
          + (f", rows {s['bad']} DIFFER" if s["bad"] else ""))
    return bool(s["ok"])


def run(args) -> int:
    """The demo. Phases: check the arguments; (1) tensor merges; generate the model
    folders; (2) model merge, (3) compression, (4) serving, each checked; the summary."""
    import os
    import shutil
    import tempfile

    import lfm_engine

    problems = _check_args(args)
    if problems:
        for p in problems:
            print(f"lfm-engine demo: {p}", file=sys.stderr)
        return 2
    if "serve" not in args.skip and args.peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("lfm-engine demo: --peft needs the peft package (pip install peft)", file=sys.stderr)
            return 2
    if args.threads:
        lfm_engine.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = lfm_engine.build_info()
    print(f"lfm_engine {lfm_engine.__version__}  (SIMD {info['simd']}, CUDA {'on' if info['cuda'] else 'off'})\n")
    failures = []
    part_s = {}
    if "tensors" not in args.skip:
        t0 = time.perf_counter()
        if _tensor_part(args):
            failures.append("tensor merge")
        part_s["tensors"] = time.perf_counter() - t0
    parts = [p for p in ("merge", "compress", "serve") if p not in args.skip]
    if not parts:
        return 1 if failures else 0

    work = args.workdir or tempfile.mkdtemp(prefix="lfm_demo_")
    os.makedirs(work, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ds = _generate(args, work)
        part_s["generate"] = time.perf_counter() - t0
        for part, label, fn in (("merge", "model merge", lambda: _merge_part(ds, work, args)),
                                ("compress", "compression", lambda: _compress_part(ds, work, args)),
                                ("serve", "serving", lambda: _serve_part(ds, args))):
            if part in parts:
                t0 = time.perf_counter()
                if not fn():
                    failures.append(label)
                part_s[part] = time.perf_counter() - t0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nTotal {time.perf_counter() - t_start:.1f} s ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in part_s.items()) + "). ", end="")
    if failures:
        print(f"FAILED: {', '.join(failures)}.")
        return 1
    print("All checks passed.")
    return 0
