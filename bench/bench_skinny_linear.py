"""skinny_linear (the base matmul of a small decode batch) vs torch.nn.functional.linear on the CPU.

Cases: the ~120M fixture's GEMM shapes (N x K = 1024x1024 q/k/v/o, 2816x1024 gate/up,
1024x2816 down, 8192x1024 lm_head) at M = 1, 4, 8, 16 rows, fp32 and bf16. Each timed call
runs over `--weights` distinct weight matrices (default 8, 32-90 MB in fp32), so W streams
from memory as in a model's forward, not from a warm cache. Times are per weight; both
providers use the same threads (torch's intra-op threads; ours n_threads equal to it), timed
in interleaved rounds. Bytes: W once + x + y per call; "% copy" is against the copy bandwidth
measured in the same run. Also printed per shape: time(M) / time(M = 1), the figure that
matters for batching (1.0 = a batch of M rows costs one row).

    python bench/bench_skinny_linear.py [--threads 1] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import Report, copy_bandwidth, device_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1024x1024,2816x1024,1024x2816,8192x1024", help="N x K list")
    ap.add_argument("--ms", default="1,4,8,16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--weights", type=int, default=8, help="distinct weights per timed call")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); ours use the same")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.shapes, a.ms, a.weights, a.reps = "256x256,512x256", "1,8", 2, 3

    from lfm_engine.ops.skinny_linear import native_available, skinny_linear

    if not native_available():
        print("# skipped: the compiled core lfm_engine._C is not built")
        return 0
    nt = torch.get_num_threads()
    rep = Report("bench_skinny_linear: y = x W^T, few rows, W streamed from memory", device_name("cpu"),
                 copy_bandwidth("cpu"))
    ratios = []
    g = torch.Generator().manual_seed(0)
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        for shape in a.shapes.split(","):
            N, K = (int(v) for v in shape.split("x"))
            ws = [torch.randn(N, K, generator=g).to(dtype) for _ in range(a.weights)]
            per_m = {}
            for M in (int(v) for v in a.ms.split(",")):
                x = torch.randn(M, K, generator=g).to(dtype)
                provs = {"ours-cpu": lambda w, x=x: skinny_linear(x, w, n_threads=nt),
                         "torch-linear": lambda w, x=x: torch.nn.functional.linear(x, w)}
                times = {p: [] for p in provs}
                with torch.inference_mode():
                    for rnd in range(a.reps + 1):
                        for p in (list(provs) if rnd % 2 == 0 else list(provs)[::-1]):
                            t0 = time.perf_counter()
                            for w in ws:
                                provs[p](w)
                            if rnd:
                                times[p].append((time.perf_counter() - t0) / len(ws))
                case = f"{dname} {N}x{K} M={M}"
                nbytes = (N * K + M * K + M * N) * ws[0].element_size()
                for p, t in times.items():
                    rep.add(case, p, statistics.median(t), nbytes, min_s=min(t))
                per_m[M] = {p: statistics.median(t) for p, t in times.items()}
            if 1 in per_m:
                for M, t in per_m.items():
                    if M != 1:
                        ratios.append(f"{dname} {N}x{K} M={M}: ours {t['ours-cpu'] / per_m[1]['ours-cpu']:.2f}x, "
                                      f"torch {t['torch-linear'] / per_m[1]['torch-linear']:.2f}x the M=1 time")
    print(rep.table(baseline="torch-linear"))
    print("# cost of M rows relative to one row (median times):")
    for r in ratios:
        print("  " + r)
    print(f"# load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rep.write_json(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
