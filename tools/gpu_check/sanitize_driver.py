"""Small cases of each CUDA C++ kernel family, for compute-sanitizer (tools/gpu_check step 3).

    compute-sanitizer --tool memcheck python tools/gpu_check/sanitize_driver.py --family merge
    python tools/gpu_check/sanitize_driver.py --family lora --device cpu     # self-test, no GPU

Families:
  merge         every merge method (bf16/fp16/fp32, odd shapes, K = 3, quantised deltas so
                the exact-k cut falls inside runs of equal magnitudes; DELLA rows longer than
                the in-register sort so the segmented sort path runs too)
  merge-select  only the exact-k selection (ties, breadcrumbs) with many ties at the cut:
                k_hist, k_tie_count, k_tie_locate do their work (the racecheck case)
  lora          shrink, expand and apply, token and segment slot maps, mixed ranks (0 too),
                garbage in the rank padding, an output column slice
  codec         decode-and-add of sign1/int8/int4/int2/nf4 (per-row and per-tensor sign1,
                alpha != 1) and decode without a base
Every case runs the device backend ("cuda" on --device cuda, "cpu" on --device cpu) and
compares it with the CPU kernel on CPU copies of the inputs, so a kernel that reads or
writes the wrong memory also shows as a wrong result. Sizes are tiny: under the sanitizer
each kernel runs 10-100x slower. Exit status 0 = every case agreed; 1 = a case disagreed or
raised (each named on stderr). Tolerances: tests/conftest.py's per-dtype table.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import TOLERANCES  # noqa: E402  (the project's one tolerance table)

from lfm_engine.ops.codec import Encoded, decode_add, decode_delta, encode_delta  # noqa: E402
from lfm_engine.ops.lora import lora_apply, lora_expand, lora_shrink  # noqa: E402
from lfm_engine.ops.merge import merge_tensors  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MERGE_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                 "della_linear", "della", "linear"]
# One rounding step of each dtype: the merged output may differ from the CPU kernel's by one
# rounding where float64 L1 sums are ordered differently (tests/test_merge_gpu.py).
ONE_ROUNDING = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _merge_inputs(shape, dtype, seed, quantised):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    if quantised:  # few distinct magnitudes: many equal |delta| at every cut
        b = torch.round(b * 4) / 4
    xs = []
    for _ in range(3):
        d = 0.02 * torch.randn(shape, generator=g)
        if quantised:
            d = torch.round(d * 100) / 100
        xs.append((b + d).to(dtype))
    return b.to(dtype), xs


def _merge_kwargs(method):
    kw = dict(weights=[1.0, 0.5, -0.7], seed=77, name="model.layers.1.mlp.down_proj.weight")
    if method not in ("task_arithmetic", "linear"):
        kw["density"] = [0.5, 0.3, 0.9]
    if method.startswith("breadcrumbs"):
        kw["gamma"] = [0.01, 0.1, 0.0]
    if method.startswith("della"):
        kw["density"] = [0.5, 0.3, 0.8]
        kw["epsilon"] = [0.05, 0.1, 0.15]
    return kw


def merge_cases(select_only: bool):
    if select_only:
        plan = [(m, shape, [torch.bfloat16]) for m in ("ties", "breadcrumbs", "breadcrumbs_ties")
                for shape in [(4097,), (129, 257)]]
    else:  # every dtype on one odd 2-D shape; bf16 on long DELLA-sized rows
        plan = [(m, shape, dts) for m in MERGE_METHODS
                for shape, dts in [((33, 129), DTYPES), ((2, 5000), [torch.bfloat16])]]
    for method, shape, dtypes in plan:
        for dtype in dtypes:
            yield f"merge {method} {shape} {str(dtype)[6:]}", (method, shape, dtype)


def run_merge(case, backend, device):
    method, shape, dtype = case
    b, xs = _merge_inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1], quantised=method != "della")
    kw = _merge_kwargs(method)
    want = merge_tensors(b, xs, method, backend="cpu", **kw)
    got = merge_tensors(b.to(device), [x.to(device) for x in xs], method, backend=backend, **kw).cpu()
    if torch.equal(got, want):
        return
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=ONE_ROUNDING[dtype])
    frac = (got != want).float().mean().item()
    if frac > 0.05:
        raise AssertionError(f"{frac:.2%} of the outputs differ from the CPU kernel")


def lora_cases():
    for dtype in DTYPES:
        for T, H_in, H_out, form in [(1, 129, 77, "tokens"), (7, 256, 384, "tokens"), (70, 64, 96, "segments")]:
            yield f"lora {str(dtype)[6:]} T={T} {H_in}->{H_out} {form}", (dtype, T, H_in, H_out, form)


def run_lora(case, backend, device):
    dtype, T, H_in, H_out, form = case
    g = torch.Generator().manual_seed(T)
    ranks = [16, 4, 0, 64]
    n, R = len(ranks), max(ranks)
    A = torch.randn(n, R, H_in, generator=g) / H_in ** 0.5
    B = torch.randn(n, H_out, R, generator=g) / R ** 0.5
    for s, r in enumerate(ranks):  # garbage beyond each rank: it must never be read
        A[s, r:] = 1e4
        B[s, :, r:] = 1e4
    A, B = A.to(dtype), B.to(dtype)
    x = torch.randn(T, H_in, generator=g).to(dtype)
    y0 = torch.randn(T, H_out + 5, generator=g).to(dtype)
    rk = torch.tensor(ranks, dtype=torch.int32)
    sc = torch.rand(n, generator=g) + 0.5
    if form == "tokens":
        ts = torch.randint(-1, n, (T,), generator=g, dtype=torch.int32)
        maps = dict(token_slot=ts)
    else:
        maps = dict(seg_start=torch.tensor([0, 5, 6, 40, T], dtype=torch.int32),
                    seg_slot=torch.tensor([3, -1, 0, 1], dtype=torch.int32))
    dev = lambda t: t.to(device)  # noqa: E731
    dmaps = {k: dev(v) for k, v in maps.items()}
    tol = TOLERANCES[dtype]
    u_want = lora_shrink(x, A, ranks=rk, backend="cpu", **maps)
    u_got = lora_shrink(dev(x), dev(A), ranks=dev(rk), backend=backend, **dmaps)
    torch.testing.assert_close(u_got.cpu(), u_want, atol=2e-5, rtol=2e-5)
    y_want = lora_expand(u_want, B, ranks=rk, scales=sc, y=y0.clone(), y_col_offset=2, backend="cpu", **maps)
    y_got = lora_expand(dev(u_want), dev(B), ranks=dev(rk), scales=dev(sc), y=dev(y0.clone()), y_col_offset=2,
                        backend=backend, **dmaps)
    torch.testing.assert_close(y_got.cpu().float(), y_want.float(), **tol)
    y_want = lora_apply(x, A, B, ranks=rk, scales=sc, y=y0.clone(), y_col_offset=2, backend="cpu", **maps)
    y_got = lora_apply(dev(x), dev(A), dev(B), ranks=dev(rk), scales=dev(sc), y=dev(y0.clone()), y_col_offset=2,
                       backend=backend, **dmaps)
    torch.testing.assert_close(y_got.cpu().float(), y_want.float(), **tol)


def codec_cases():
    for codec, opts in [("sign1", {}), ("sign1", {"per_tensor": True}), ("int8", {"group_size": 64}),
                        ("int4", {"group_size": 64}), ("int2", {"group_size": 32}), ("nf4", {"group_size": 64})]:
        for dtype in DTYPES:
            yield f"codec {codec} {opts} {str(dtype)[6:]}", (codec, opts, dtype)


def run_codec(case, backend, device):
    codec, opts, dtype = case
    g = torch.Generator().manual_seed(5)
    enc = encode_delta(0.02 * torch.randn(37, 301, generator=g), codec, **opts)
    base = torch.randn(37, 301, generator=g).to(dtype)
    enc_d = Encoded(enc.codec, enc.shape, enc.dtype, {k: v.to(device) for k, v in enc.fields.items()}, enc.options)
    for alpha in (1.0, 0.75):
        want = decode_add(enc, base, alpha=alpha, backend="cpu")
        out = torch.full((37, 301), float("nan"), dtype=dtype, device=device)
        got = decode_add(enc_d, base.to(device), alpha=alpha, out=out, backend=backend).cpu()
        if not torch.equal(got, want):
            raise AssertionError(f"decode_add alpha={alpha}: differs from the CPU kernel in "
                                 f"{int((got != want).sum())} elements")
    want = decode_delta(enc, out_dtype=dtype, backend="cpu")  # no base: out = decode(enc)
    got = decode_delta(enc_d, out_dtype=dtype, backend=backend).cpu()
    if not torch.equal(got, want):
        raise AssertionError(f"decode_delta: differs from the CPU kernel in {int((got != want).sum())} elements")


FAMILIES = {
    "merge": (lambda: merge_cases(False), run_merge),
    "merge-select": (lambda: merge_cases(True), run_merge),
    "lora": (lora_cases, run_lora),
    "codec": (codec_cases, run_codec),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--device", default="cuda", help="cuda (the CUDA C++ kernels) or cpu (self-test)")
    ap.add_argument("--limit", type=int, default=0, help="run only the first N cases (0 = all)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sanitize_driver: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    backend = "cuda" if args.device.startswith("cuda") else "cpu"
    cases, run = FAMILIES[args.family]
    done = failed = 0
    for label, case in cases():
        if args.limit and done >= args.limit:
            break
        done += 1
        try:
            run(case, backend, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # report every case, not just the first
            failed += 1
            print(f"sanitize_driver: FAILED {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                  file=sys.stderr)
            traceback.print_exc(limit=3)
    status = "ok" if failed == 0 else f"{failed} FAILED"
    print(f"sanitize_driver: {args.family} on {args.device}: {done} cases, {status}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
