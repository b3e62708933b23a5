"""Mixed-adapter serving benchmark: decode step and generation throughput.

Model: a Llama built from a config with random weights (default: hidden 1024, 8 layers,
MHA 16 heads, intermediate 2816, vocab 32000, fp32), 16 adapters r=16 on all 7
projections (q, k, v, o, gate, up, down), made with peft and saved as PEFT folders;
`--seqs` sequences, each adapter on seqs/16 of them (round robin).

Providers:
  base   the plain transformers model, no LoRA at all
  lfm    our attach() + AdapterPool (lora_apply kernels), mixed batch through pool.assign
  peft   PEFT's mixed batch: model(..., adapter_names=[...])
Cases:
  decode step      one token per sequence over a `--ctx`-token KV cache (model forward incl. lm_head)
  decode layers    the same step through the decoder stack only (no lm_head), where the LoRA share is larger
  generate         `--seqs` requests, `--prompt` prompt tokens, `--new` greedy tokens each:
                   lfm/base through Engine (continuous batching), peft through model.generate(adapter_names=...)
"LoRA overhead" = time(provider) / time(base) - 1, from the medians, from the minimums, and
"paired": the median over rounds of the ratio within a round (the steadiest on a shared
machine). GB/s counts the weights read once per step (base weights + the distinct active
adapters' A/B).

    python bench/bench_serve.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import Report, copy_bandwidth, device_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128, help="KV length for the decode-step cases")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT provider (decode cases)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for every provider (0: torch's default); set LFM_NUM_THREADS "
                         "to the same value for our kernels")
    ap.add_argument("--pool-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of our adapter pool's tables (the model stays fp32; bf16 halves the adapter "
                         "bytes and rounds A and B to bf16)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.hidden, a.layers, a.intermediate, a.heads, a.vocab = 128, 2, 352, 4, 1000
        a.adapters, a.rank, a.seqs, a.ctx, a.prompt, a.new, a.reps = 4, 8, 8, 16, 8, 4, 3

    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from lfm_engine.serve import AdapterPool, Engine, Request, attach

    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=max(512, a.ctx + 8, a.prompt + a.new + 8))
    model = LlamaForCausalLM(cfg).to(dev).eval()
    names = [f"ad{i}" for i in range(a.adapters)]
    rows = [names[i % a.adapters] for i in range(a.seqs)]
    g = torch.Generator().manual_seed(1)
    ctx_ids = torch.randint(0, a.vocab, (a.seqs, a.ctx), generator=g).to(dev)
    step_ids = torch.randint(0, a.vocab, (a.seqs, 1), generator=g).to(dev)
    prompts = [torch.randint(0, a.vocab, (a.prompt,), generator=g).tolist() for _ in range(a.seqs)]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = base_bytes - model.lm_head.weight.numel() * model.lm_head.weight.element_size() \
        - model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    rep = Report("bench_serve: mixed-adapter decode and generation", device_name(a.device), copy_bandwidth(a.device))
    print(f"# model: llama hidden {a.hidden}, {a.layers} layers, inter {a.intermediate}, vocab {a.vocab}, fp32; "
          f"{a.adapters} adapters r={a.rank} on {len(proj)} projections ({a.pool_dtype} pool); {a.seqs} sequences, "
          f"ctx {a.ctx}",
          flush=True)

    # Three copies of one base model: plain, PEFT-wrapped, ours. Each provider keeps its own
    # KV cache; the decode steps of the providers are interleaved round by round (order
    # rotating) so that load from other processes on a shared machine hits them alike.
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=proj, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), lcfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, lcfg)
    pm.eval()
    pm.save_pretrained(tmp, selected_adapters=names)
    pool_dtype = getattr(torch, a.pool_dtype)
    one = sum(p.numel() for n, p in pm.named_parameters() if f".{names[0]}." in n)
    lora_bytes = one * pool_dtype.itemsize * len(set(rows))  # ours
    peft_bytes = one * 4 * len(set(rows))

    ours = copy.deepcopy(model)
    pool = AdapterPool(capacity=a.adapters, device=dev, dtype=pool_dtype)
    attach(ours, pool)
    for f in [pool.load(n, os.path.join(tmp, n)) for n in names]:
        f.result()

    def with_pool(fn):
        def run(ids, c):
            with pool.assign(rows):
                return fn(ids, c)
        return run

    providers = {
        "base": (lambda ids, c: model(ids, cache=c, use_cache=True),
                 lambda ids, c: model.model(ids, cache=c, use_cache=True), 0),
        "lfm": (with_pool(lambda ids, c: ours(ids, cache=c, use_cache=True)),
                with_pool(lambda ids, c: ours.model(ids, cache=c, use_cache=True)), lora_bytes),
        "peft": (lambda ids, c: pm(input_ids=ids, cache=c, use_cache=True, adapter_names=rows),
                 lambda ids, c: _peft_layers(pm, ids, c, rows), peft_bytes),
    }
    if a.no_peft:
        del providers["peft"]
    times = {(p, k): [] for p in providers for k in (0, 1)}
    with torch.inference_mode():
        caches = {}
        for p, (full, _layers, _b) in providers.items():
            caches[p] = DynamicCache()
            full(ctx_ids, caches[p])
        order = list(providers)
        for rnd in range(a.reps + 1):  # round 0 is warm-up
            for p in order[rnd % len(order):] + order[:rnd % len(order)]:
                for k in (0, 1):
                    fn, c = providers[p][k], caches[p]
                    t0 = time.perf_counter()
                    fn(step_ids, c)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    c.crop(-1)  # back to the ctx-long cache for the next round
                    if rnd:
                        times[(p, k)].append(dt)
    for p, (_f, _l, lb) in providers.items():
        for k, case, nb in ((0, "decode step", base_bytes + lb), (1, "decode layers (no lm_head)", layer_bytes + lb)):
            # paired: the median over rounds of this provider's time over the base's in the
            # same round (back to back), which cancels the slow drifts of a shared machine
            paired = statistics.median(x / b - 1 for x, b in zip(times[(p, k)], times[("base", k)]))
            rep.add(case, p, statistics.median(times[(p, k)]), nb, min_s=min(times[(p, k)]), paired=paired)

    if not a.no_generate:
        gen_results = {}
        pool0 = AdapterPool(capacity=1, device=dev)
        attach(model, pool0)
        eng0 = Engine(model, pool0, max_batch_size=a.seqs)
        eng = Engine(ours, pool, max_batch_size=a.seqs)
        reqs0 = [Request(prompt=p, adapter=None, max_new_tokens=a.new, ignore_eos=True) for p in prompts]
        reqs = [Request(prompt=p, adapter=r, max_new_tokens=a.new, ignore_eos=True) for p, r in zip(prompts, rows)]
        eng0.generate(reqs0[:2])
        eng.generate(reqs[:2])
        t0 = time.perf_counter()
        eng0.generate(reqs0)
        gen_results["base"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = eng.generate(reqs)
        gen_results["lfm"] = time.perf_counter() - t0
        if not a.no_peft:
            with torch.inference_mode():
                batch = torch.tensor(prompts, device=dev)
                kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
                t0 = time.perf_counter()
                pm.generate(input_ids=batch, attention_mask=torch.ones_like(batch), adapter_names=rows, **kw)
                gen_results["peft"] = time.perf_counter() - t0
        ttft = sorted(r.time_to_first_token_s for r in res)[len(res) // 2]
        dec = sorted(r.decode_tokens_per_s for r in res)[len(res) // 2]
        print(f"# lfm engine: median time to first token {ttft * 1e3:.0f} ms, median per-request decode "
              f"{dec:.1f} tok/s, engine stats {eng.stats()}", flush=True)
        for prov, t in gen_results.items():
            rep.add(f"generate {a.seqs}x{a.new} tok", prov, t, 0, tokens_per_s=a.seqs * a.new / t)

    print(rep.table(baseline="base"))
    # On a shared machine the median moves with other people's load; the minimum over the
    # interleaved rounds is the steadier estimate of the unloaded time, so both are shown.
    print(f"{'case':<34} {'provider':<16} {'overhead(med)':>14} {'overhead(min)':>14} {'paired(med)':>12} "
          f"{'tokens/s':>10}")
    base_r = {r.case: r for r in rep.rows if r.provider == "base"}
    for r in rep.rows:
        if r.provider == "base":
            continue
        b = base_r.get(r.case)
        ov = r.seconds / b.seconds - 1 if b else float("nan")
        ovm = r.extra["min_s"] / b.extra["min_s"] - 1 if b and "min_s" in r.extra else float("nan")
        tps = r.extra.get("tokens_per_s")
        r.extra["lora_overhead"] = ov
        r.extra["lora_overhead_min"] = ovm
        pr = r.extra.get("paired")
        print(f"{r.case:<34} {r.provider:<16} {100 * ov:13.1f}% {100 * ovm:13.1f}% "
              f"{'' if pr is None else f'{100 * pr:11.1f}%'} {'' if tps is None else f'{tps:10.1f}'}")
    print(f"# load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rep.write_json(a.json)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _peft_layers(pm, ids, cache, rows):
    """PEFT's decoder stack without lm_head, with its per-row adapter routing hooks active."""
    with pm.base_model._enable_peft_forward_hooks(adapter_names=rows):
        return pm.base_model.model.model(ids, cache=cache, use_cache=True)


if __name__ == "__main__":
    raise SystemExit(main())
