"""Benchmark of the task-vector codecs (docs/spec/codec.md, issue "Task-vector compression").

Three tables, one run:
 1. throughput: encode and fused decode-and-add of sign1/int8/int4/int2/nf4 (C++ kernels)
    vs the plain-torch reference, GB/s and fraction of this machine's copy bandwidth
    measured in the same run. Bytes counted: encode = delta read + codes/scales written;
    decode-and-add = codes/scales + base read + output written.
 2. quality: bits/param, ratio vs the bf16 delta and relative error of every codec on
    real-shaped structured deltas (low-rank + sparse outliers + noise).
 3. serving: S fine-tunes of one base, T tokens spread over the slots, one layer
    [out, in]: (a) batched = one base matmul for all tokens + delta_apply (compressed
    deltas, nothing decoded to memory); (b) decode-then-matmul per slot; (c) separate
    full models = one matmul per slot against its own dense fine-tuned weights.

Times are the minimum of interleaved rounds (see interleaved()): the 2-core machine this
was written on is shared, and medians there measure the neighbours.

--device cuda replaces table 1 by its GPU form: decode-and-add of each codec by the CUDA C++
kernel (ours-cuda), the Triton kernel (ours-triton) and the same arithmetic in plain torch ops
on the GPU (torch), timed with CUDA events with L2 flushed before each call
(benchlib.gpu_time), next to the GPU's copy bandwidth measured in the same run. Encoding
stays on the CPU (there is no GPU encoder). Table 3 (serving) is CPU-only and is skipped there.

    python bench/bench_codec.py [--device cuda] [--size 4096] [--slots 8] [--tokens 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from benchlib import Report, copy_bandwidth, device_name, time_fn
from lfm_engine.ops.codec import decode_add, decode_delta, delta_apply, encode_delta
from lfm_engine.reference.codec import NF4_LEVELS


def structured_delta(rows, cols, rank=16, outliers=0.002, noise=0.3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / math.sqrt(rank)
    d += noise * torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < outliers
    d += mask * 8.0 * torch.randn(rows, cols, generator=g)
    return (1e-3 * d).to(dtype)


def interleaved(fns: dict, reps: int = 7) -> dict:
    """Seconds per provider: the minimum over `reps` rounds that run every provider once,
    in turn. On a shared machine (other jobs on the same cores) the minimum is the least
    disturbed run, and interleaving exposes every provider to the same background load."""
    import time

    for f in fns.values():
        f()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def throughput(n: int, threads: int, rep: Report) -> None:
    delta = structured_delta(n, n, dtype=torch.bfloat16)
    base = torch.randn(n, n).to(torch.bfloat16)
    out = torch.empty_like(base)
    t_copy = interleaved({"copy": lambda: out.copy_(base)})["copy"]
    for codec in ("sign1", "int8", "int4", "int2", "nf4"):
        opts = {} if codec == "sign1" else {"group_size": 128}
        enc = encode_delta(delta, codec, **opts)
        fb = enc.nbytes
        t = interleaved({"ours": lambda: encode_delta(delta, codec, n_threads=threads, **opts)}, reps=3)
        t_ref = interleaved({"ref": lambda: encode_delta(delta, codec, backend="reference", **opts)}, reps=1)
        case = f"encode {codec} {n}x{n} bf16"
        rep.add(case, "lfm cpu", t["ours"], nbytes(delta) + fb)
        rep.add(case, "torch reference", t_ref["ref"], nbytes(delta) + fb)
        t = interleaved({"ours": lambda: decode_add(enc, base, out=out, n_threads=threads),
                         "copy": lambda: out.copy_(base)}, reps=9)
        t_ref = interleaved({"ref": lambda: decode_add(enc, base, out=out, backend="reference")}, reps=1)
        case = f"decode+add {codec} {n}x{n} bf16"
        rep.add(case, "lfm cpu", t["ours"], fb + 2 * nbytes(base), copy_same_round=t["copy"])
        rep.add(case, "torch reference", t_ref["ref"], fb + 2 * nbytes(base))
        t_copy = min(t_copy, t["copy"])
    rep.add(f"copy bf16 {n}x{n} (out.copy_(b))", "torch copy", t_copy, 2 * nbytes(base))


def torch_decode_add(enc, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = base + decode(enc) in plain torch ops on base's device (the GPU baseline): the
    same float32 arithmetic as our kernels, one rounding to out's dtype. sign1/int8/int4/int2/nf4."""
    rows, cols = base.shape
    dev = base.device
    f = enc.fields
    if enc.codec == "sign1":
        words = f["signs"].view(torch.int32)
        bits = (words.unsqueeze(-1) >> torch.arange(32, device=dev, dtype=torch.int32)) & 1
        neg = bits.reshape(rows, -1)[:, :cols].bool()
        s = f["scales"].float().reshape(-1, 1)
        d = torch.where(neg, -s, s)
    else:
        g = int(enc.options.get("group_size", 128))
        if enc.codec == "int8":
            q = f["q"].float()
        else:
            nbits = {"int4": 4, "int2": 2, "nf4": 4}[enc.codec]
            shifts = torch.arange(8 // nbits, device=dev, dtype=torch.int32) * nbits
            u = (f["packed"].to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
            u = u.reshape(rows, -1)[:, :cols]
            if enc.codec == "nf4":
                q = NF4_LEVELS.to(dev)[u.long()]
            else:
                q = torch.where(u >= (1 << (nbits - 1)), u - (1 << nbits), u).float()
        d = q * f["scales"].float().repeat_interleave(g, dim=1)[:, :cols]
    return out.copy_(base.float() + d)


def throughput_gpu(n: int, rep: Report, reps: int = 20) -> None:
    """Table 1 on the GPU: decode-and-add of an n x n bf16 matrix, every codec, ours vs torch."""
    from lfm_engine.ops._dispatch import native_has_cuda, triton_importable
    from lfm_engine.ops.codec import Encoded

    delta = structured_delta(n, n, dtype=torch.bfloat16)
    base = torch.randn(n, n).to(torch.bfloat16).cuda()
    out = torch.empty_like(base)
    backends = (["cuda"] if native_has_cuda() else []) + (["triton"] if triton_importable() else [])
    for codec in ("sign1", "int8", "int4", "int2", "nf4"):
        opts = {} if codec == "sign1" else {"group_size": 128}
        e = encode_delta(delta, codec, **opts)
        enc = Encoded(e.codec, e.shape, e.dtype, {k: v.cuda() for k, v in e.fields.items()}, e.options)
        moved = enc.nbytes + 2 * nbytes(base)
        case = f"decode+add {codec} {n}x{n} bf16"
        want = torch_decode_add(enc, base, torch.empty_like(base))
        for be in backends:
            got = decode_add(enc, base, out=out, backend=be)
            agrees = bool(torch.equal(got, want))
            t = time_fn(lambda be=be: decode_add(enc, base, out=out, backend=be), device="cuda", warmup=3, reps=reps)
            rep.add(case, f"ours-{be}", t, moved, agrees_with_torch=agrees)
        t = time_fn(lambda: torch_decode_add(enc, base, out), device="cuda", warmup=2, reps=max(3, reps // 2))
        rep.add(case, "torch", t, moved)
    t = time_fn(lambda: out.copy_(base), device="cuda", warmup=3, reps=reps)
    rep.add(f"copy bf16 {n}x{n} (out.copy_(b))", "torch copy", t, 2 * nbytes(base))


def quality(rows: int, cols: int) -> list:
    d = structured_delta(rows, cols)
    d_bf = d.to(torch.bfloat16).float()  # what a bf16 checkpoint's delta looks like
    cases = [
        ("sign1", {}), ("sign1", {"per_tensor": True}),
        ("int8", {"group_size": 128}), ("int4", {"group_size": 128}), ("int4", {"group_size": 32}),
        ("nf4", {"group_size": 128}), ("nf4", {"group_size": 128, "scale_search": "mse"}),
        ("int2", {"group_size": 128}), ("int2", {"group_size": 32}),
        ("ternary", {"density": 0.1}), ("ternary", {"density": 0.3}),
        ("sparse_int", {"density": 0.1, "bits": 8}), ("sparse_int", {"density": 0.3, "bits": 4}),
        ("sparse_int", {"density": 0.5, "bits": 4, "method": "dare"}),
        ("lowrank", {"rank": 16}), ("lowrank", {"rank": 64}), ("lowrank", {"energy": 0.5}),
    ]
    rows_out = []
    for codec, opts in cases:
        enc = encode_delta(d_bf, codec, dtype=torch.bfloat16, **opts)
        err = float((decode_delta(enc) - d_bf).norm() / d_bf.norm())
        rows_out.append((codec, opts, enc.bits_per_param, enc.ratio(torch.bfloat16), err))
    # masks: K fine-tunes sharing structure (shared low-rank part + task-specific noise)
    K = 4
    shared = structured_delta(rows, cols, seed=7)
    stack = torch.stack([shared + structured_delta(rows, cols, rank=4, seed=10 + i) for i in range(K)])
    for mode in ("emr", "tall"):
        enc = encode_delta(stack, "masks", mode=mode, merged_codec="int8")
        err = float((decode_delta(enc) - stack).norm() / stack.norm())
        rows_out.append(("masks", {"mode": mode, "K": K, "merged": "int8"}, enc.bits_per_param,
                         enc.ratio(torch.bfloat16), err))
    return rows_out


def serving(n: int, slots: int, tokens: int, threads: int, rep: Report, dtype=torch.float32) -> None:
    g = torch.Generator().manual_seed(3)
    w_base = (torch.randn(n, n, generator=g) / math.sqrt(n)).to(dtype)
    x = torch.randn(tokens, n, generator=g).to(dtype)
    slot = (torch.arange(tokens) % slots).to(torch.int32)
    deltas_f = [structured_delta(n, n, seed=20 + s) for s in range(slots)]
    for codec in ("sign1", "int4", "nf4"):
        opts = {} if codec == "sign1" else {"group_size": 128}
        encs = [encode_delta(d, codec, **opts) for d in deltas_f]
        full = [decode_add(e, w_base) for e in encs]  # the S dense fine-tuned models (same math)
        case = f"serve {codec} S={slots} T={tokens} {n}x{n} {str(dtype)[6:]}"

        def batched():
            y = x @ w_base.T
            delta_apply(x, encs, slot, y, n_threads=threads)
            return y

        def decode_then_matmul():
            y = torch.empty(tokens, n, dtype=dtype)
            for s in range(slots):
                idx = (slot == s).nonzero().reshape(-1)
                w = decode_add(encs[s], w_base, n_threads=threads)
                y[idx] = x[idx] @ w.T
            return y

        def separate():
            y = torch.empty(tokens, n, dtype=dtype)
            for s in range(slots):
                idx = (slot == s).nonzero().reshape(-1)
                y[idx] = x[idx] @ full[s].T
            return y

        y1, y3 = batched(), separate()
        err = float((y1 - y3).norm() / y3.norm())
        assert err < 1e-3, f"batched and separate disagree: {err}"
        moved_sep = slots * nbytes(w_base)
        moved_bat = nbytes(w_base) + sum(e.nbytes for e in encs)
        t = interleaved({"sep": separate, "dec": decode_then_matmul, "bat": batched}, reps=5)
        rep.add(case, "separate models", t["sep"], moved_sep)
        rep.add(case, "decode+matmul", t["dec"], moved_bat + 2 * moved_sep)
        rep.add(case, "batched delta", t["bat"], moved_bat, rel_diff=err)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="matrix side for throughput and serving")
    ap.add_argument("--quality-shape", type=int, nargs=2, default=[1024, 4096])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and for our kernels alike (0 = defaults). On a shared, loaded machine "
                         "use 1: torch's OpenMP GEMV slows down 30x when its threads are preempted")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "quality", "serving"])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU form of table 1")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per GPU case (--device cuda)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("bench_codec: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 0
    if gpu:
        bw = copy_bandwidth("cuda", nbytes=1 << 30)
        rep = Report("task-vector codecs (GPU)", device_name("cuda"), bw)
    else:
        bw = copy_bandwidth("cpu", reps=9)
        rep = Report("task-vector codecs (CPU)", device_name("cpu"), bw)
    if "throughput" not in args.skip:
        if gpu:
            throughput_gpu(args.size, rep, args.reps)
        else:
            throughput(args.size, args.threads, rep)
    q = []
    if "quality" not in args.skip:
        q = quality(*args.quality_shape)
    if gpu and "serving" not in args.skip:
        print("bench_codec: the serving table is CPU-only; skipped with --device cuda", file=sys.stderr)
    elif "serving" not in args.skip:
        for t in args.tokens:
            serving(args.size, args.slots, t, args.threads, rep)
    print(rep.table(baseline="torch" if gpu else "torch reference"))
    srv = {}
    for r in rep.rows:
        if r.case.startswith("serve"):
            srv.setdefault(r.case, {})[r.provider] = r.seconds
    if srv:
        print("\n# serving speedup of the batched compressed-delta path")
        for case, d in srv.items():
            print(f"{case:<44} vs separate models {d['separate models'] / d['batched delta']:5.2f}x   "
                  f"vs decode+matmul {d['decode+matmul'] / d['batched delta']:5.2f}x")
    if q:
        print(f"\n# bits/param vs relative error, structured delta {args.quality_shape[0]}x{args.quality_shape[1]} "
              "(rank-16 + 0.2% outliers + noise), ratio vs the bf16 delta")
        print(f"{'codec':<12} {'options':<44} {'bits/param':>10} {'ratio':>8} {'rel.err':>8}")
        for codec, opts, bits, ratio, err in q:
            print(f"{codec:<12} {json.dumps(opts):<44} {bits:10.3f} {ratio:7.2f}x {err:8.4f}")
    if args.json:
        data = rep.to_json()
        data["quality"] = [dict(codec=c, options=o, bits_per_param=b, ratio=r, rel_error=e) for c, o, b, r, e in q]
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
