"""Compressed fine-tunes served together: one batched decode step vs the dense fine-tunes apart.

Model: the ~120M Llama fixture of bench_merge_models (hidden 1024, 8 layers, intermediate
2816, vocab 8192, MHA 16 heads), random weights, fp32 (or --dtype bfloat16) on the CPU.
`--finetunes` fine-tunes (default 8) differ from the base on all 7 projections of every layer (Δ ~ N(0, 0.002²));
each is compressed (sign1, int4 g=128) with encode_delta and registered with
AdapterPool.add_delta.

Providers (decode step: one new token per row over a `--ctx`-token KV cache, incl. lm_head):
  dense-apart     the 8 dense fine-tunes (base + decoded Δ, materialised), each decoding its
                  own row alone (batch 1, the same torch threads): what serving them without
                  lfm_engine costs. This is the fair baseline: each dense fine-tune's own
                  forward at batch 1, weights read once per row; batching rows of different
                  dense models is not possible without a per-row weight (which is what the
                  deltas give)
  lfm-<codec>     one forward of batch 8 through attach()+AdapterPool, row i with fine-tune i
  base-batch      the bare base model, batch 8 (the floor: the deltas add to this)
Speedup = time(dense-apart) / time(lfm-<codec>); the issue's target is >= 4x. Also printed:
each provider's process CPU time per step (min), the figure to read on a loaded machine
with --threads 1 (time spent waiting for a CPU is not in it). Bytes: weights
read once per step (8 dense models / base + the 8 compressed deltas). Outputs are checked:
lfm rows vs the dense fine-tunes' logits (max abs difference printed).

    python bench/bench_serve_delta.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import Report, copy_bandwidth, device_name  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--finetunes", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--codecs", default="sign1,int4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="model dtype (the bench_merge_models fixture is bf16; fp32 is the CPU default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); set LFM_NUM_THREADS for our kernels")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.hidden, a.layers, a.intermediate, a.vocab, a.heads, a.ctx, a.reps = 128, 2, 352, 512, 4, 8, 3

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from lfm_engine.ops.codec import decode_delta, encode_delta
    from lfm_engine.serve import AdapterPool, attach

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=max(256, a.ctx + 8))
    dtype = getattr(torch, a.dtype)
    base = LlamaForCausalLM(cfg).to(dtype).eval()
    n_params = sum(p.numel() for p in base.parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lin = {n: m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in PROJ}
    K = a.finetunes
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, a.vocab, (K, a.ctx), generator=g)
    step = torch.randint(0, a.vocab, (K, 1), generator=g)
    print(f"# model: llama hidden {a.hidden}, {a.layers} layers, inter {a.intermediate}, vocab {a.vocab}, {a.dtype}, "
          f"{n_params / 1e6:.0f}M params; {K} fine-tunes, one row each, ctx {a.ctx}", flush=True)
    rep = Report("bench_serve_delta: compressed fine-tunes in one batch vs dense fine-tunes apart",
                 device_name("cpu"), copy_bandwidth("cpu"))

    codecs = [c for c in a.codecs.split(",") if c]
    encs = {c: [{} for _ in range(K)] for c in codecs}
    for k in range(K):  # one fp32 delta at a time: only the encoded forms stay in memory
        for n, m in lin.items():
            d = 0.002 * torch.randn(m.weight.shape, generator=g)  # fp32 delta (codecs encode fp32)
            for c in codecs:
                encs[c][k][n] = encode_delta(d, c, **({"group_size": 128} if c.startswith("int") else {}))
            del d

    providers = {}
    served = {}
    for c in codecs:
        m = copy.deepcopy(base)
        pool = AdapterPool(capacity=1, delta_capacity=K, dtype=dtype)
        attach(m, pool)
        for k in range(K):
            pool.add_delta(f"ft{k}", encs[c][k])
        names = [f"ft{k}" for k in range(K)]
        dbytes = sum(e.data.numel() * e.data.element_size() + e.scales.numel() * e.scales.element_size()
                     for d in pool._deltas.entries.values() for e in d.modules.values())

        def run(ids, cache, m=m, pool=pool, names=names):
            with pool.assign(names):
                return m(ids, cache=cache, use_cache=True).logits

        providers[f"lfm-{c}"] = (run, base_bytes + dbytes)
        served[c] = run

    def base_run(ids, cache):
        return base(ids, cache=cache, use_cache=True).logits

    providers["base-batch"] = (base_run, base_bytes)
    # dense fine-tunes, materialised from the first codec's decoded deltas (what the
    # compressed rows must reproduce)
    c0 = codecs[0]
    dense = []
    for k in range(K):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for n, mod in m.named_modules():
                if n in encs[c0][k]:
                    mod.weight.copy_((mod.weight.float() + decode_delta(encs[c0][k][n])).to(dtype))
        dense.append(m)

    def apart(ids, caches):
        return torch.cat([dense[k](ids[k:k + 1], cache=caches[k], use_cache=True).logits
                          for k in range(K)])

    times = {p: [] for p in list(providers) + ["dense-apart"]}
    cpu = {p: [] for p in times}
    with torch.inference_mode():
        caches = {p: DynamicCache() for p in providers}
        for p, (fn, _) in providers.items():
            fn(ctx, caches[p])
        dcaches = [DynamicCache() for _ in range(K)]
        apart(ctx, dcaches)
        order = list(times)
        outs = {}
        for rnd in range(a.reps + 1):
            for p in order[rnd % len(order):] + order[:rnd % len(order)]:
                t0, p0 = time.perf_counter(), time.process_time()
                if p == "dense-apart":
                    outs[p] = apart(step, dcaches)
                    for c in dcaches:
                        c.crop(-1)
                else:
                    outs[p] = providers[p][0](step, caches[p])
                    caches[p].crop(-1)
                if rnd:
                    times[p].append(time.perf_counter() - t0)
                    cpu[p].append(time.process_time() - p0)
    err = (outs[f"lfm-{c0}"] - outs["dense-apart"]).abs().max().item()
    scale = outs["dense-apart"].abs().max().item()
    dense_bytes = K * base_bytes
    for p in times:
        nb = dense_bytes if p == "dense-apart" else providers[p][1]
        rep.add("decode step", p, statistics.median(times[p]), nb, min_s=min(times[p]))
    print(rep.table(baseline="dense-apart"))
    d_med, d_min = statistics.median(times["dense-apart"]), min(times["dense-apart"])
    for c in codecs:
        t = times[f"lfm-{c}"]
        print(f"lfm-{c}: {d_med / statistics.median(t):.2f}x (median) {d_min / min(t):.2f}x (min) "
              f"the throughput of the {K} dense fine-tunes apart")
    print("# process CPU time per step, min ms: " + ", ".join(f"{p} {1e3 * min(cpu[p]):.1f}" for p in cpu))
    for c in codecs:
        print(f"lfm-{c}: {min(cpu['dense-apart']) / min(cpu[f'lfm-{c}']):.2f}x in CPU time (min)")
    b = times["base-batch"]
    for c in codecs:
        t = times[f"lfm-{c}"]
        print(f"lfm-{c}: the deltas add {100 * (min(t) / min(b) - 1):.0f}% (min) to the bare base batch")
    print(f"# lfm-{c0} rows vs the dense fine-tunes: max |logit difference| {err:.2e} (logits up to {scale:.2f})")
    print(f"# load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rep.write_json(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
