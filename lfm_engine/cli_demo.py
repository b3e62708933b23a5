"""`lfm-engine demo`: the built-in example a newcomer runs first.

Merges generated tensors (a bf16 base and three fine-tunes of a 7B-style layer) with
every task-vector method: the fused C++ kernel against a plain-torch multi-pass merge
(mergekit's way), and the largest error of each against the float64 reference.
"""
from __future__ import annotations

import time

import torch


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the built-in example (merge generated tensors with each method)")
    p.add_argument("--rows", type=int, default=1024, help="rows of the generated weight (default 1024)")
    p.add_argument("--cols", type=int, default=2048, help="columns of the generated weight (default 2048)")
    p.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")


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
    from lfm_engine.merge_params import resolve_merge_params

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


def run(args) -> int:
    import lfm_engine

    info = lfm_engine.build_info()
    print(f"lfm_engine {lfm_engine.__version__}  (SIMD {info['simd']}, CUDA {'on' if info['cuda'] else 'off'})")
    print(f"Merging {args.models} bf16 fine-tunes of a {args.rows}x{args.cols} weight into their base, "
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
        return 1
    print("\nEvery result is within one bf16 rounding of the float64 reference (spec/merge.md).")
    return 0
