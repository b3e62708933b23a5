"""Benchmark: multi-LoRA shrink / expand / fused apply (y += scale * x A^T B^T per token's adapter) vs torch.

Cases (H_in = H_out = --hidden, rank --rank, --dtype storage), for each of --ops and --mixes:
  decode-T-distinct   T tokens, each with its own adapter (T adapters read once each)
  decode-T-uniform    T tokens spread round-robin over min(T, --uniform-adapters) adapters
  decode-T-shared     T tokens on one adapter (all identical)
  prefill-TxS         T tokens in S contiguous segments (requests), one adapter each (segment form; apply only)
The apply cases keep these names; shrink and expand cases are named "shrink decode-T-mix" and
"expand decode-T-mix". Every row's extras carry op, T, mix and the number of adapters.
Ops:
  shrink   u[t] = x[t] @ A[s]^T          (u float32 [T, r])
  expand   y[t] += scale[s] * u[t] @ B[s]^T
  apply    both, fused (y += scale * x A^T B^T)
Providers:
  ours-cpu / ours-cuda / ours-triton   lfm_engine.lora_shrink / lora_expand / lora_apply (backend=...)
  torch-mm            a dense torch.mm of the same shape with ONE adapter (x @ A0^T, then @ B0^T):
                      what vLLM's LoRA benchmark compares its kernels against
  torch-gather-bmm    gather A[token_slot], B[token_slot] per token, bmm (weights copied T times)
  torch-per-adapter   PEFT's mixed-batch way: a Python loop over the adapters in the batch, one
                      pair of matmuls on each adapter's sub-batch (index_select / index_add_); apply only
  base-layer          x @ W^T of the bare base layer, to read the LoRA overhead against (apply only)
Bytes (docs/spec/lora.md), y counted once: apply = sum over distinct active adapters of r (H_in + H_out)
itemsize + T (H_in + H_out) itemsize; shrink = adapters' r H_in itemsize + T H_in itemsize + T r 4;
expand = adapters' H_out r itemsize + T r 4 + T H_out itemsize. "% copy" is against the copy
bandwidth measured in this run on the same device. CUDA times: CUDA events, L2 flushed before
each call (benchlib.gpu_time).

    python bench/bench_lora.py [--device cuda] [--hidden 4096] [--rank 16] [--tokens 1,16,64,256]
                               [--ops shrink,expand,apply] [--mixes distinct,uniform,shared] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchlib import Report, copy_bandwidth, device_name, time_fn
from lfm_engine.ops.lora import lora_apply, lora_expand, lora_shrink
from lfm_engine.reference.lora import segments_to_token_slot


def torch_gather_bmm(x, A, B, ts, ranks, scales, y):
    """Gather each token's adapter and run two batched matmuls (no-adapter tokens masked)."""
    active = ts >= 0
    s = ts.clamp(min=0).long()
    u = torch.bmm(A[s], x.unsqueeze(2))  # [T, R, 1]; padding rows of A are zero in this bench
    d = torch.bmm(B[s], u).squeeze(2) * (scales[s] * active).unsqueeze(1).to(x.dtype)
    y += d
    return y


def torch_mm_apply(x, A, B, scale: float, y):
    """Dense torch.mm of the same shape, one adapter (slot 0) for every token. `scale` is a
    Python float: reading it from a GPU tensor inside the timed call would add a sync."""
    y.addmm_(torch.mm(x, A[0].t()), B[0].t(), alpha=scale)
    return y


def torch_mm_shrink(x, A):
    return torch.mm(x, A[0].t())


def torch_mm_expand(u, B, scale: float, y):
    y.addmm_(u, B[0].t(), alpha=scale)
    return y


def torch_gather_bmm_shrink(x, A, ts):
    return torch.bmm(A[ts.clamp(min=0).long()], x.unsqueeze(2)).squeeze(2)


def torch_gather_bmm_expand(u, B, ts, scales, y):
    s = ts.clamp(min=0).long()
    d = torch.bmm(B[s], u.unsqueeze(2)).squeeze(2) * (scales[s] * (ts >= 0)).unsqueeze(1).to(u.dtype)
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


MIXES = ("distinct", "uniform", "shared")
OPS = ("shrink", "expand", "apply")


def _list(text: str, allowed, what: str) -> list:
    vals = [v for v in text.split(",") if v]
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise SystemExit(f"bench_lora: unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    return vals


def n_adapters(T: int, mix: str, uniform: int) -> int:
    return {"distinct": T, "uniform": max(1, min(T, uniform)), "shared": 1}[mix]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--mixes", default="distinct,shared", help=f"adapter mixes of the decode cases ({','.join(MIXES)})")
    ap.add_argument("--uniform-adapters", type=int, default=8, help="adapters of the 'uniform' mix (capped at T)")
    ap.add_argument("--ops", default="apply", help=f"comma list of {','.join(OPS)}")
    ap.add_argument("--prefill", default="512x4", help="TxS: T tokens in S segments (comma list; apply only)")
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
    mixes = _list(args.mixes, MIXES, "mix")
    ops = _list(args.ops, OPS, "op")

    if args.threads > 0:
        import lfm_engine

        torch.set_num_threads(args.threads)
        lfm_engine.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench_lora: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 0
    H, r = args.hidden, args.rank
    item = torch.tensor([], dtype=dtype).element_size()
    bw = copy_bandwidth(dev)
    rep = Report(f"multi-LoRA {'/'.join(ops)}, H={H}, r={r}, {args.dtype}, {args.stat} of {args.reps}",
                 device_name(dev), bw)
    ours = ["cpu"] if dev == "cpu" else ["cuda"]
    if dev != "cpu":
        try:
            import triton  # noqa: F401

            ours.append("triton")
        except ImportError:
            pass
    gen = torch.Generator().manual_seed(0)
    W = None if args.no_base else torch.randn(H, H, generator=gen).to(dtype).to(dev)

    cases = []
    for T in [int(v) for v in args.tokens.split(",") if v]:
        for mix in mixes:
            cases.append((f"decode-{T}-{mix}", T, n_adapters(T, mix, args.uniform_adapters), None, mix))
    for spec in [s for s in args.prefill.split(",") if s]:
        T, S = (int(v) for v in spec.split("x"))
        cases.append((f"prefill-{T}x{S}", T, S, S, "segments"))

    for name, T, n_ad, segs, mix in cases:
        A, B, x, y, ranks, scales, ts, seg = make_case(T, n_ad, H, r, dtype, dev, gen, segs)
        n_active = len(torch.unique(ts[ts >= 0]))
        u = torch.randn(T, r, generator=gen).to(dev)
        u_x = u.to(dtype)  # the dense baseline multiplies in the storage dtype
        s0 = float(scales[0])
        for op in ops:
            if op != "apply" and seg is not None:
                continue
            label = name if op == "apply" else f"{op} {name}"
            extra = dict(op=op, T=T, mix=mix, adapters=n_active)
            if op == "apply":
                nbytes = n_active * r * (H + H) * item + T * (H + H) * item
            elif op == "shrink":
                nbytes = n_active * r * H * item + T * H * item + T * r * 4
            else:
                nbytes = n_active * H * r * item + T * r * 4 + T * H * item
            calls = {}
            for be in ours:
                chk = be == "cpu"
                kw = dict(seg_start=seg[0], seg_slot=seg[1]) if seg is not None else {}
                slots = None if seg is not None else ts
                if op == "apply":
                    calls[f"ours-{be}"] = (lambda be=be, kw=kw, slots=slots, chk=chk: lora_apply(
                        x, A, B, slots, ranks, scales, y, backend=be, validate=chk, **kw))
                elif op == "shrink":
                    calls[f"ours-{be}"] = (lambda be=be, chk=chk: lora_shrink(
                        x, A, ts, ranks, backend=be, validate=chk))
                else:
                    calls[f"ours-{be}"] = (lambda be=be, chk=chk: lora_expand(
                        u, B, ts, ranks, scales, y, backend=be, validate=chk))
            if op == "apply":
                calls["torch-mm"] = lambda: torch_mm_apply(x, A, B, s0, y)
                calls["torch-gather-bmm"] = lambda: torch_gather_bmm(x, A, B, ts, ranks, scales, y)
                calls["torch-per-adapter"] = lambda: torch_per_adapter(x, A, B, ts, ranks, scales, y)
            elif op == "shrink":
                calls["torch-mm"] = lambda: torch_mm_shrink(x, A)
                calls["torch-gather-bmm"] = lambda: torch_gather_bmm_shrink(x, A, ts)
            else:
                calls["torch-mm"] = lambda: torch_mm_expand(u_x, B, s0, y)
                calls["torch-gather-bmm"] = lambda: torch_gather_bmm_expand(u_x, B, ts, scales, y)
            for pname, call in calls.items():
                t = timed(call, dev, args.reps, args.stat)
                rep.add(label, pname, t, nbytes, **extra)
            if W is not None and op == "apply":
                t = timed(lambda: x @ W.t(), dev, args.reps, args.stat)
                rep.add(label, "base-layer", t, H * H * item + T * 2 * H * item, **extra)
    print(rep.table(baseline="torch-per-adapter" if ops == ["apply"] else "torch-mm"))
    rep.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
