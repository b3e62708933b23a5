"""Benchmark: multi-LoRA fused apply (y += scale * x A^T B^T per token's adapter) vs torch baselines.

Cases (H_in = H_out = --hidden, rank --rank, --dtype storage):
  decode-T-distinct   T tokens, each with its own adapter (T adapters read once each)
  decode-T-shared     T tokens on one adapter
  prefill-TxS         T tokens in S contiguous segments (requests), one adapter each (segment form)
Providers:
  ours-cpu / ours-cuda / ours-triton   lfm_engine.lora_apply (backend=...)
  torch-gather-bmm    gather A[token_slot], B[token_slot] per token, two bmm (weights copied T times)
  torch-per-adapter   PEFT's mixed-batch way: a Python loop over the adapters in the batch, one
                      pair of matmuls on each adapter's sub-batch (index_select / index_add_)
  base-layer          x @ W^T of the bare base layer, to read the LoRA overhead against
Bytes (docs/spec/lora.md): sum over distinct active adapters of r (H_in + H_out) itemsize
+ T (H_in + H_out) itemsize; "% copy" is against the copy bandwidth measured in this run.

    python bench/bench_lora.py [--hidden 4096] [--rank 16] [--tokens 1,16,64,256] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchlib import Report, copy_bandwidth, device_name, time_fn
from lfm_engine.ops.lora import lora_apply
from lfm_engine.reference.lora import segments_to_token_slot


def torch_gather_bmm(x, A, B, ts, ranks, scales, y):
    """Gather each token's adapter and run two batched matmuls (no-adapter tokens masked)."""
    active = ts >= 0
    s = ts.clamp(min=0).long()
    u = torch.bmm(A[s], x.unsqueeze(2))  # [T, R, 1]; padding rows of A are zero in this bench
    d = torch.bmm(B[s], u).squeeze(2) * (scales[s] * active).unsqueeze(1).to(x.dtype)
    y += d
    return y


def torch_per_adapter(x, A, B, ts, ranks, scales, y):
    """PEFT's approach for mixed batches: loop over the adapters present, sub-batch matmuls."""
    for s in torch.unique(ts).tolist():
        if s < 0:
            continue
        idx = (ts == s).nonzero(as_tuple=True)[0]
        r = int(ranks[s])
        sub = x.index_select(0, idx)
        d = (sub @ A[s, :r].t()) @ B[s, :, :r].t() * float(scales[s])
        y.index_add_(0, idx, d.to(y.dtype))
    return y


def timed(fn, device: str, reps: int, stat: str) -> float:
    """Median (benchlib.time_fn) or, on a machine shared with other jobs, the minimum
    over reps: time slices stolen by other processes inflate single runs by milliseconds."""
    if stat == "median":
        return time_fn(fn, device=device, warmup=2, reps=reps)
    for _ in range(2):
        fn()
    best = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best.append(time.perf_counter() - t0)
    return min(best) if stat == "min" else statistics.median(best)


def make_case(T, n_adapters, H, r, dtype, device, gen, segments=None):
    A = (torch.randn(n_adapters, r, H, generator=gen) / H ** 0.5).to(dtype).to(device)
    B = (torch.randn(n_adapters, H, r, generator=gen) / r ** 0.5).to(dtype).to(device)
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    y = torch.zeros(T, H, dtype=dtype, device=device)
    ranks = torch.full((n_adapters,), r, dtype=torch.int32, device=device)
    scales = torch.full((n_adapters,), 2.0, device=device)
    if segments is None:
        ts = (torch.arange(T) % n_adapters).to(torch.int32).to(device)
        seg = None
    else:
        bounds = torch.linspace(0, T, segments + 1).round().to(torch.int32)
        seg = (bounds.to(device), (torch.arange(segments) % n_adapters).to(torch.int32).to(device))
        ts = segments_to_token_slot(seg[0].cpu(), seg[1].cpu()).to(device)
    return A, B, x, y, ranks, scales, ts, seg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--prefill", default="512x4", help="TxS: T tokens in S segments (comma list)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="min = best of reps (use on a machine shared with other jobs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for ours and torch alike (0 = library defaults)")
    ap.add_argument("--no-base", action="store_true", help="skip the base-layer row")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.threads > 0:
        import lfm_engine

        torch.set_num_threads(args.threads)
        lfm_engine.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    H, r = args.hidden, args.rank
    item = torch.tensor([], dtype=dtype).element_size()
    bw = copy_bandwidth(dev)
    rep = Report(f"multi-LoRA fused apply, H={H}, r={r}, {args.dtype}, {args.stat} of {args.reps}",
                 device_name(dev), bw)
    providers = {}
    if dev == "cpu":
        providers["ours-cpu"] = lambda *a: lora_apply(*a, backend="cpu")
    else:
        providers["ours-cuda"] = lambda *a: lora_apply(*a, backend="cuda", validate=False)
        try:
            import triton  # noqa: F401

            providers["ours-triton"] = lambda *a: lora_apply(*a, backend="triton", validate=False)
        except ImportError:
            pass
    providers["torch-gather-bmm"] = torch_gather_bmm
    providers["torch-per-adapter"] = torch_per_adapter
    gen = torch.Generator().manual_seed(0)
    W = None if args.no_base else torch.randn(H, H, generator=gen).to(dtype).to(dev)

    cases = []
    for T in [int(v) for v in args.tokens.split(",") if v]:
        cases.append((f"decode-{T}-distinct", T, T, None))
        cases.append((f"decode-{T}-shared", T, 1, None))
    for spec in [s for s in args.prefill.split(",") if s]:
        T, S = (int(v) for v in spec.split("x"))
        cases.append((f"prefill-{T}x{S}", T, S, S))

    for name, T, n_ad, segs in cases:
        A, B, x, y, ranks, scales, ts, seg = make_case(T, n_ad, H, r, dtype, dev, gen, segs)
        n_active = len(torch.unique(ts[ts >= 0]))
        nbytes = n_active * r * (H + H) * item + T * (H + H) * item
        for pname, fn in providers.items():
            if pname.startswith("ours") and seg is not None:
                call = lambda fn=fn: lora_apply(x, A, B, None, ranks, scales, y, seg_start=seg[0], seg_slot=seg[1],
                                                backend=pname.split("-")[1],
                                                validate=pname == "ours-cpu")
            else:
                call = lambda fn=fn: fn(x, A, B, ts, ranks, scales, y)
            t = timed(call, dev, args.reps, args.stat)
            rep.add(name, pname, t, nbytes, T=T, adapters=n_active)
        if W is not None:
            t = timed(lambda: x @ W.t(), dev, args.reps, args.stat)
            rep.add(name, "base-layer", t, H * H * item + T * 2 * H * item, T=T)
    print(rep.table(baseline="torch-per-adapter"))
    rep.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
