"""Benchmark: fused task-vector merge on the GPU (CUDA C++ and Triton) vs plain torch on the GPU.

K fine-tuned 7B-layer tensors (bf16, on the GPU) merged into their base with each method:
  ours-cuda       merge_tensors(backend="cuda")    (lfm_engine built with nvcc)
  ours-triton     merge_tensors(backend="triton")
  torch-multipass lfm_engine.baselines.torch_merge on the same GPU tensors
and, in the same run, the GPU's copy bandwidth (a large device-to-device clone; bytes
read + written). Bytes of one pass: base + K models read, output written,
(K+1)*n*2 + n*2 for bf16; "% copy" = those bytes / time / copy bandwidth. The kernels
make several read passes (PASSES below); "per pass" divides all streamed bytes by the
time, the figure the target (>= 70% of copy bandwidth per pass) is about.

--stream adds the model-level case: ``lfm_engine.merge.gpu_stream.merge_on_device`` on
host (CPU) tensors, compared with the pinned host-to-device copy bandwidth measured now:
a merge streamed this way should run at about the PCIe rate.

Needs a CUDA GPU; on a machine without one it says so and exits 0 without numbers.

    python bench/bench_merge_gpu.py [--shapes 4096x11008,11008x4096] [--k 3] [--stream] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchlib import (MERGE_BENCH_METHODS, Report, copy_bandwidth, device_name, merge_bench_kwargs,
                                   time_fn)
from lfm_engine.core.merge_methods import resolve_merge_params

# Read passes over (base + K models) per method with default options.
# CUDA: 3 radix-histogram passes per magnitude cut (breadcrumbs: 2 cuts per model, read
#   together), the DELLA key pass (+ the sort's own passes over 8-byte keys, not counted),
#   the L1 norm pass, and the merge pass (consensus methods re-read the models in a second
#   sweep, mostly from L2; counted once).
# Triton: 2 histogram passes per cut (16 + 16 bits), otherwise as CUDA.
PASSES = {
    "cuda": {"task_arithmetic": 1, "linear": 1, "ties": 4, "dare_linear": 2, "dare_ties": 2,
             "breadcrumbs": 4, "breadcrumbs_ties": 4, "della": 3, "della_linear": 3},
    "triton": {"task_arithmetic": 1, "linear": 1, "ties": 3, "dare_linear": 2, "dare_ties": 2,
               "breadcrumbs": 5, "breadcrumbs_ties": 5, "della": 3, "della_linear": 3},
}
METHODS = MERGE_BENCH_METHODS
method_kwargs = merge_bench_kwargs


def _has_cuda_kernels() -> bool:
    import json

    from lfm_engine._native import has_native, native

    return has_native() and bool(json.loads(native().build_info()).get("cuda"))


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def pinned_h2d_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes/s of a pinned host -> device copy (one direction), measured now."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t = time_fn(lambda: dst.copy_(src, non_blocking=True), device="cuda", warmup=2, reps=reps)
    return nbytes / t


def bench_stream(rep: Report, shape, k: int, n_jobs: int, method: str) -> None:
    from lfm_engine.merge.gpu_stream import GpuJob, StreamStats, merge_on_device

    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(k)]
    jobs = [GpuJob(f"t{j}", [base] + models, dict(method=method, name=f"t{j}", **method_kwargs(method)))
            for j in range(n_jobs)]
    h2d = pinned_h2d_bandwidth()
    for depth in (1, 2):
        stats = StreamStats()
        for _ in merge_on_device(jobs[:2], device="cuda", depth=depth):  # warm-up (compile, allocator)
            pass
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in merge_on_device(jobs, device="cuda", depth=depth, stats=stats):
            pass
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        rep.add(f"stream {method} {n_jobs}x{shape[0]}x{shape[1]}", f"depth={depth}", t, stats.h2d_bytes,
                h2d_gbps=h2d / 1e9, frac_h2d=stats.h2d_bytes / t / h2d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x11008,11008x4096,4096x4096")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--providers", default="cuda,triton,torch")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--stream", action="store_true", help="also time the streamed model-level merge")
    ap.add_argument("--stream-jobs", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_merge_gpu: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 0
    from lfm_engine.ops.merge import merge_tensors
    from lfm_engine.baselines.torch_merge import merge_tensors_torch_multipass

    providers = args.providers.split(",")
    if "cuda" in providers and not _has_cuda_kernels():
        print("bench_merge_gpu: lfm_engine was built without CUDA kernels; skipping ours-cuda", file=sys.stderr)
        providers.remove("cuda")
    if "triton" in providers and not _has_triton():
        print("bench_merge_gpu: triton is not installed; skipping ours-triton", file=sys.stderr)
        providers.remove("triton")

    bw = copy_bandwidth("cuda", nbytes=1 << 30)
    rep = Report("fused merge, GPU (bf16, K=%d)" % args.k, device_name("cuda"), bw)
    per_pass = []
    for shape_s in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_s.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        base = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
        others = [(base.float() + 0.01 * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)
                  for _ in range(args.k)]
        n = base.numel()
        one_pass = (args.k + 1) * n * 2 + n * 2
        for method in args.methods.split(","):
            kw = method_kwargs(method)
            b = None if method == "linear" else base
            case = f"{method} {shape_s}"
            out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            for prov in ("cuda", "triton"):
                if prov not in providers:
                    continue
                t = time_fn(lambda: merge_tensors(b, others, method, name="w", out=out, backend=prov, **kw),
                            device="cuda", warmup=2, reps=args.reps)
                passes = PASSES[prov][method]
                pp = ((args.k + 1) * n * 2 * passes + n * 2) / t
                rep.add(case, f"ours-{prov}", t, one_pass, passes=passes, per_pass_gbps=pp / 1e9)
                per_pass.append((case, prov, passes, pp))
            if "torch" in providers:
                p = resolve_merge_params(method, args.k, name="w", **kw)
                tt = time_fn(lambda: merge_tensors_torch_multipass(b, others, p), device="cuda", warmup=1,
                             reps=max(2, args.reps // 2))
                rep.add(case, "torch-multipass", tt, one_pass)
            print(f"  done {case}", file=sys.stderr, flush=True)
        del base, others
        torch.cuda.empty_cache()
    if args.stream:
        bench_stream(rep, (4096, 11008), args.k, args.stream_jobs, "ties")
    print(rep.table(baseline="torch-multipass"))
    print("\nper-pass bandwidth of ours (all bytes streamed / time, vs copy):")
    for case, prov, passes, pp in per_pass:
        print(f"  {case:<30} {prov:<7} passes={passes}  {pp / 1e9:8.1f} GB/s  {100 * pp / bw:5.1f}% of copy")
    for r in rep.rows:
        if "frac_h2d" in r.extra:
            print(f"  {r.case} {r.provider}: {r.gbps():.1f} GB/s host->device, "
                  f"{100 * r.extra['frac_h2d']:.0f}% of pinned H2D ({r.extra['h2d_gbps']:.1f} GB/s)")
    rep.write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
