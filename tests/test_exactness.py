"""Exact on every host: the same bits at every SIMD level, and the spec's float64 election.

Inputs are tie-heavy and cancel exactly: deltas on a coarse grid (multiples of 2^-10 in
bf16/fp16) with non-dyadic weights (0.3, 0.1, 0.7, 0.5), so many weighted election sums
are exactly zero in float64 (elected sign +1) while a fused multiply-add would make them
a tiny negative number (sign -1) and move the output by a whole delta. Every method runs
at every SIMD level this host supports (lfm_engine.set_simd_level, the LFM_SIMD variable)
and must give the same bits; the kernels must match backend="reference" (float64, the
spec) within the dtype tolerance, which a wrong elected sign exceeds by far.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lfm_engine
from conftest import assert_close
from lfm_engine import merge_tensors

HOST = lfm_engine.build_info()["simd_host"]
LEVELS = {"baseline": ["baseline"], "avx2": ["baseline", "avx2"], "avx512": ["baseline", "avx2", "avx512"],
          "neon": ["baseline", "neon"]}[HOST]

METHOD_KW = {
    "task_arithmetic": {},
    "linear": {},
    "ties": dict(density=0.6),
    "dare_linear": dict(density=0.6, seed=3),
    "dare_ties": dict(density=0.6, seed=3),
    "breadcrumbs": dict(density=0.8, gamma=0.05),
    "breadcrumbs_ties": dict(density=0.8, gamma=0.05),
    "della": dict(density=0.6, epsilon=0.1, seed=3),
    "della_linear": dict(density=0.6, epsilon=0.1, seed=3),
}
WEIGHTS = [0.3, 0.1, 0.7]


@pytest.fixture(autouse=True)
def _restore_level():
    yield
    lfm_engine.set_simd_level(None)


def _grid_models(shape, dtype, k=3, seed=0):
    """base + k fine-tunes whose deltas are small multiples of 2^-10 (exact in bf16/fp16
    next to a base on the same grid), often equal and opposite across models."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-64, 64, shape, generator=g).float() / 64).to(dtype)
    steps = torch.tensor([-7, -5, -3, -2, -1, 1, 2, 3, 5, 7], dtype=torch.float32) / 1024
    deltas = [steps[torch.randint(0, len(steps), shape, generator=g)] for _ in range(k)]
    # exact cancellations: model 1 mirrors model 0 on a third of the elements
    mirror = torch.rand(shape, generator=g) < 0.33
    if k > 1:
        deltas[1] = torch.where(mirror, -deltas[0] * 3, deltas[1])  # 0.3 d + 0.1 (-3 d): ~0 or exactly 0
    return base, [(base.float() + d).to(dtype) for d in deltas]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_issue_repro_fma_would_flip_the_sign():
    """weights 0.5, 0.3; deltas -0.0029296875, 0.0048828125: plain float64 gives exactly 0
    (sign +, model 2 agrees), fma(0.3, d2, 0.5 * d1) gives -5.4e-20 (sign -)."""
    assert 0.5 * -0.0029296875 + 0.3 * 0.0048828125 == 0.0
    b = torch.zeros(4097)
    x1 = torch.full((4097,), -0.0029296875)
    x2 = torch.full((4097,), 0.0048828125)
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        for method in ("ties", "breadcrumbs_ties", "dare_ties", "della"):
            kw = dict(density=1.0, weights=[0.5, 0.3])
            if method == "breadcrumbs_ties":
                kw["gamma"] = 0.0
            if method == "della":
                kw.update(density=0.9, epsilon=0.05, seed=1)
            out = merge_tensors(b, [x1, x2], method, **kw)
            ref = merge_tensors(b, [x1, x2], method, backend="reference", **kw)
            assert_close(out, ref.to(out.dtype), torch.float32)  # a wrong sign is off by a whole delta
            # the elected sign is +: only model 2 agrees; normalised TIES gives its delta back
            if method == "ties":
                assert torch.all(out == 0.0048828125)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
# (600, 512): over 2^18 elements, so the selection runs sample-and-bracket (not the radix
# passes) and bf16/f32 take the one-sweep merge_direct path
@pytest.mark.parametrize("shape", [(7,), (4097,), (33, 129), (600, 512)])
@pytest.mark.parametrize("method", list(METHOD_KW))
def test_every_level_same_bits_and_matches_reference(method, shape, dtype):
    base, models = _grid_models(shape, dtype)
    kw = dict(METHOD_KW[method], weights=WEIGHTS, name="model.layers.0.mlp.up_proj.weight")
    if method == "linear":
        base_arg = None
    else:
        base_arg = base
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        assert lfm_engine.build_info()["simd"] == level
        outs[level] = merge_tensors(base_arg, models, method, **kw)
    first = outs[LEVELS[0]]
    for level, o in outs.items():
        assert torch.equal(_bits(o), _bits(first)), f"{method} differs between {LEVELS[0]} and {level}"
    ref = merge_tensors(base_arg, models, method, backend="reference", **kw)
    assert_close(first, ref.to(dtype), dtype)


def test_data_really_cancels():
    """The fixture must hold exact float64 cancellations, or the tests above prove nothing."""
    base, models = _grid_models((4097,), torch.bfloat16)
    d = [m.double() - base.double() for m in models]
    s = WEIGHTS[0] * d[0] + WEIGHTS[1] * d[1]
    assert int((s == 0).sum()) > 100


def test_lfm_simd_environment_variable():
    code = ("import lfm_engine, torch; print(lfm_engine.build_info()['simd']); "
            "lfm_engine.merge_tensors(torch.zeros(4), [torch.ones(4)], 'ties', density=0.5)")
    env = dict(os.environ, LFM_SIMD="baseline")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "baseline", p.stderr
    env["LFM_SIMD"] = "bogus"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "LFM_SIMD: unknown SIMD level 'bogus'" in p.stderr


def test_unrunnable_level_is_an_error():
    other = "avx2" if HOST == "neon" else "neon"
    with pytest.raises(ValueError, match="cannot run on this CPU"):
        lfm_engine.set_simd_level(other)
    with pytest.raises(ValueError, match="unknown SIMD level"):
        lfm_engine.set_simd_level("sse9")


def test_bracket_miss_falls_back_exactly():
    """The magnitude cut is bracketed from a sample of evenly spread runs of 16 elements
    (S = n / 16 sampled elements, clamped to [2^14, 2^18]: merge_cpu.cpp sample_select);
    here the sampled runs hold the large deltas and the rest small ones, so the bracket
    (among the large values) misses the true cut (among the small ones, which take 5
    magnitudes, so thousands tie there and the lower index wins): the radix fallback must
    give the exact, level-independent answer."""
    n = 1 << 19
    sample = min(max(n // 16 // 16 * 16, 1 << 14), 1 << 18)
    stride = n // (sample // 16)
    g = torch.Generator().manual_seed(5)
    in_run = (torch.arange(n) % stride) < 16
    base = torch.zeros(n)
    models = []
    for _ in range(3):
        small = (torch.randint(1, 6, (n,), generator=g).float() / 1024) * torch.where(
            torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        large = torch.randn(n, generator=g) + 4.0
        models.append(torch.where(in_run, large, small))
    kw = dict(density=0.6, weights=WEIGHTS, name="w")
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        outs[level] = merge_tensors(base, models, "ties", **kw)
    for level, o in outs.items():
        assert torch.equal(_bits(o), _bits(outs[LEVELS[0]])), level
    ref = merge_tensors(base, models, "ties", backend="reference", **kw)
    assert_close(outs[LEVELS[0]], ref.float(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_election_merge_pass_every_k_and_a_ragged_tail(method, k, dtype):
    """The one-sweep election merge (AVX-512 intrinsics for K <= 4, the generic loop above):
    K from 1 to 5, an element count that is not a multiple of 16 (the tail), the same bits
    at every level and the same count of outputs that overflow the dtype."""
    from lfm_engine.io.safetensors import as_numpy
    from lfm_engine.ops.merge import merge_arrays_counted

    shape = (601, 509)
    base, models = _grid_models(shape, dtype, k=k, seed=k)
    big = torch.zeros(shape, dtype=torch.bool)
    big[5, :40] = True  # deltas that push the bf16/f32 output past its largest finite value
    fmax = torch.finfo(dtype).max
    base = torch.where(big, torch.tensor(fmax * 0.75, dtype=dtype), base)
    models = [torch.where(big, torch.tensor(fmax, dtype=dtype), m) for m in models]
    kw = dict(METHOD_KW[method], weights=[0.3, 0.1, 0.7, 0.5, 0.2][:k], lam=3.0)  # lambda 3: b + 3 * 0.25 max
    dt = str(dtype)[6:]
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        out, n_bad = merge_arrays_counted((as_numpy(base), dt), [(as_numpy(m), dt) for m in models], method,
                                          out_dtype=dt, **kw)
        outs[level] = (out, n_bad)
    first, n_first = outs[LEVELS[0]]
    for level, (o, n_bad) in outs.items():
        assert o.tobytes() == first.tobytes(), f"{method} K={k} differs between {LEVELS[0]} and {level}"
        assert n_bad == n_first, (level, n_bad, n_first)
    # the overflow really happened and was counted (breadcrumbs drops those largest deltas)
    assert n_first > 0 or method == "breadcrumbs_ties"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "dare_linear", "breadcrumbs"])
def test_weighted_sum_merge_pass_every_k_and_a_ragged_tail(method, k, dtype):
    """The one-sweep weighted-sum merge (AVX-512 intrinsics for any K <= 8, the generic
    loop elsewhere) under each keep rule (everything, drawn bytes, the magnitude cut): the
    same bits at every level, the same count of outputs that overflow the dtype, and the
    reference's values."""
    from lfm_engine.io.safetensors import as_numpy
    from lfm_engine.ops.merge import merge_arrays_counted

    shape = (601, 509)
    base, models = _grid_models(shape, dtype, k=k, seed=10 + k)
    big = torch.zeros(shape, dtype=torch.bool)
    big[7, :33] = True
    fmax = torch.finfo(dtype).max
    if method != "linear":  # b + lam * delta past the largest finite value
        base = torch.where(big, torch.tensor(fmax * 0.75, dtype=dtype), base)
        models = [torch.where(big, torch.tensor(fmax, dtype=dtype), m) for m in models]
    weights = [0.3, 0.1, 0.7, 0.5, 0.2, 0.9, 0.4, 0.6][:k]
    kw = dict(METHOD_KW[method], weights=weights, name="model.layers.0.mlp.up_proj.weight")  # DARE's draws
    if method != "linear":
        kw["lam"] = 5.0  # b + 5 * 0.3 * 0.25 max overflows even for K = 1
    dt = str(dtype)[6:]
    b = None if method == "linear" else (as_numpy(base), dt)
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        outs[level] = merge_arrays_counted(b, [(as_numpy(m), dt) for m in models], method, out_dtype=dt, **kw)
    first, n_first = outs[LEVELS[0]]
    for level, (o, n_bad) in outs.items():
        assert o.tobytes() == first.tobytes(), f"{method} K={k} differs between {LEVELS[0]} and {level}"
        assert n_bad == n_first, (level, n_bad, n_first)
    assert n_first > 0 or method in ("linear", "breadcrumbs")  # breadcrumbs drops the largest deltas
    ref = merge_tensors(None if method == "linear" else base, models, method, backend="reference", **kw)
    got = torch.from_numpy(first.view(np.int16)).view(torch.bfloat16) if dtype == torch.bfloat16 \
        else torch.from_numpy(first)
    finite = torch.isfinite(ref.to(dtype)) & torch.isfinite(got)
    assert_close(got[finite], ref.to(dtype)[finite], dtype)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sample_select_with_mixed_input_dtypes(method):
    """Over 2^18 elements the selection brackets from a sample; models whose dtype differs
    from the base's (here bf16 base, f32 / bf16 / f16 models) take the per-model scan over
    float32 scratch instead of the one sweep from the bytes: the same bits at every level
    and the reference's values."""
    base, models = _grid_models((600, 512), torch.bfloat16, k=3, seed=21)
    models = [models[0].float(), models[1], models[2].to(torch.float16)]
    kw = dict(METHOD_KW[method], weights=WEIGHTS, name="model.layers.0.mlp.up_proj.weight")
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        outs[level] = merge_tensors(base, models, method, **kw)
    first = outs[LEVELS[0]]
    for level, o in outs.items():
        assert torch.equal(_bits(o), _bits(first)), f"{method} differs between {LEVELS[0]} and {level}"
    ref = merge_tensors(base, models, method, backend="reference", **kw)
    assert_close(first, ref.to(first.dtype), first.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_value_bracket_keeps_the_lowest_flat_indices(dtype, n_threads):
    """Every |delta| equal (random signs): the sampled bracket is one value, the scan keeps
    only tie counts, and the cut's tie is found by rereading one block. The spec's tie rule
    (lower flat index wins) then says exactly which elements a TIES merge of one model keeps:
    the first floor(d * n) in flat order."""
    shape = (600, 512)  # over the sample-and-bracket threshold
    n = shape[0] * shape[1]
    g = torch.Generator().manual_seed(7)
    base = (torch.randint(-63, 64, shape, generator=g).float() / 64).to(dtype)  # |b| < 1: b +- 2^-8 exact
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = (base.float() + sign / 256).to(dtype)
    assert bool(((x.float() - base.float()).abs() == 1 / 256).all())
    for d in (0.3, 0.77):
        k = int(d * n)
        out = merge_tensors(base, [x], "ties", density=d, n_threads=n_threads)
        keep = torch.arange(n).reshape(shape) < k
        want = torch.where(keep, x, base)
        assert torch.equal(_bits(out), _bits(want)), (d, int((out != want).sum()))


def _three_magnitude_model(dtype, seed=11):
    """One model whose |delta| takes three values: 1/256 (about 60 % of the elements),
    2/256 (40 elements) and 3/256 (about 40 %), random signs. Returns base, x and the count
    of each magnitude."""
    shape = (600, 512)  # over the sample-and-bracket threshold
    n = shape[0] * shape[1]
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-63, 64, shape, generator=g).float() / 64).to(dtype)  # |b| < 1: b +- k/256 exact
    mag = torch.where(torch.rand(shape, generator=g) < 0.4, 3.0, 1.0).flatten()
    small = torch.nonzero(mag == 1.0).flatten()
    mag[small[torch.randperm(len(small), generator=g)[:40]]] = 2.0
    mag = mag.reshape(shape)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = (base.float() + sign * mag / 256).to(dtype)
    assert bool(((x.float() - base.float()).abs() == mag / 256).all())
    return base, x, mag, {m: int((mag == m).sum()) for m in (1.0, 2.0, 3.0)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_two_value_bracket_answers_at_either_end_and_between(dtype, n_threads):
    """A cut next to the boundary between two heavily tied magnitudes: the sampled bracket
    is [1/256, 3/256], whose ends are only counted and whose inside (the 40 elements at
    2/256) is collected. The k-th largest is then the upper end, the value in between or
    the lower end, by k; each case must keep exactly the spec's elements (every larger
    |delta|, then the equal ones by lower flat index) at every SIMD level."""
    base, x, mag, count = _three_magnitude_model(dtype)
    n = x.numel()
    flat_mag = mag.flatten()
    for k, kth in ((count[3.0] - 100, 3.0), (count[3.0] + 20, 2.0), (count[3.0] + 40 + 100, 1.0)):
        d = (k + 0.5) / n  # floor(d * n) == k
        above = flat_mag > kth
        ties = torch.nonzero(flat_mag == kth).flatten()[: k - int(above.sum())]
        keep = above.clone()
        keep[ties] = True
        want = torch.where(keep.reshape(x.shape), x, base)
        for level in LEVELS:
            lfm_engine.set_simd_level(level)
            out = merge_tensors(base, [x], "ties", density=d, n_threads=n_threads)
            assert torch.equal(_bits(out), _bits(want)), (level, kth, int((out != want).sum()))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_two_value_bracket_breadcrumbs_matches_reference(method):
    """breadcrumbs' two cuts (drop the top gamma, keep the next density) on the same three
    magnitudes, the lower cut next to the 1/256 | 3/256 boundary: same bits at every level,
    the reference's values."""
    base, x, _, count = _three_magnitude_model(torch.bfloat16, seed=12)
    n = x.numel()
    gamma = 0.01
    density = (count[3.0] + 20 - int(gamma * n)) / n  # the lower cut lands among the 2/256 values
    kw = dict(density=density, gamma=gamma, weights=[0.3, 0.7], name="w")
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        outs[level] = merge_tensors(base, [x, x], method, **kw)  # two models, same deltas
    first = outs[LEVELS[0]]
    for level, o in outs.items():
        assert torch.equal(_bits(o), _bits(first)), level
    ref = merge_tensors(base, [x, x], method, backend="reference", **kw)
    assert_close(first, ref.to(first.dtype), first.dtype)
