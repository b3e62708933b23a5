"""Exactness of the TIES-family election (docs/spec/merge.md, "Election arithmetic").

The elected sign is sign(sum_i kept_i * (w_i * (delta_i * f_i))) with every product rounded
to float64 and the sum taken in model order, nothing fused. A fused multiply-add (what
GCC's default contraction produced in the AVX2 clone) turns an exact 0 into a tiny
negative number and flips the sign; these tests build exactly such inputs.

The outputs are compared with backend="reference" (the float64 definition). The CPU
kernel rounds its weighted sum in fp32, so outputs may differ by fp32 roundings, but a
wrongly elected sign moves an element by a whole delta (at least 1/256 here), far above
the tolerance used.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm_engine import merge_tensors

GRID = 1.0 / 256.0  # deltas are integer multiples: exact in fp32, bf16 and fp16
TOL = GRID / 64  # far below one grid step: a flipped sign cannot hide under it


def _check(base, others, method, **kw):
    ours = merge_tensors(base, others, method, backend="cpu", **kw)
    ref = merge_tensors(base, others, method, backend="reference", **kw)
    diff = (ours.double() - ref.double()).abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= TOL, (
        f"{method}: element {worst} is {float(ours.reshape(-1)[worst])}, "
        f"reference {float(ref.reshape(-1)[worst])}")
    return ours, ref


@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_issue_repro_fma_flips_sign(n):
    """Weights 0.5, 0.3 and deltas -0.0029296875, 0.0048828125: the float64 sum is exactly 0
    (sign +1, model 2 agrees); fma(0.3, 0.0048828125, 0.5 * -0.0029296875) is -5.4e-20."""
    w1, w2, d1, d2 = 0.5, 0.3, -0.0029296875, 0.0048828125
    assert w1 * d1 + w2 * d2 == 0.0  # python floats: separately rounded products
    base = torch.zeros(n, dtype=torch.float32)
    x1 = torch.full((n,), d1, dtype=torch.float32)
    x2 = torch.full((n,), d2, dtype=torch.float32)
    ours, _ = _check(base, [x1, x2], "ties", weights=[w1, w2], density=1.0)
    # sign +1 -> only model 2 agrees; normalised by its weight: exactly d2
    assert torch.equal(ours, torch.full((n,), d2, dtype=torch.float32))


def _cancelling(rng, n, dtype):
    """Deltas (a, b, c) on the grid with 3a + b + 7c = 0, i.e. 0.3a + 0.1b + 0.7c = 0 in
    reals: the float64 election sum is then 0 or a rounding residue either side of 0, the
    case where any reordering or fusion decides differently. A quarter of the elements are
    random (not cancelling), and the base is on the grid too, so every delta is exact."""
    a = rng.integers(-6, 7, n)
    c = rng.integers(-6, 7, n)
    b = -3 * a - 7 * c
    free = rng.random(n) < 0.25
    b[free] = rng.integers(-40, 41, int(free.sum()))
    base = rng.integers(-64, 65, n) * GRID
    xs = [base + v * GRID for v in (a, b, c)]
    t = lambda v: torch.tensor(v, dtype=torch.float64).to(dtype)  # noqa: E731
    return t(base), [t(x) for x in xs]


METHOD_KW = {
    "ties": dict(density=1.0),
    "breadcrumbs_ties": dict(density=0.9, gamma=0.05),
    "dare_ties": dict(density=0.6, seed=11),
    "della": dict(density=0.6, epsilon=0.2, seed=5),
}


@pytest.mark.parametrize("method", sorted(METHOD_KW))
@pytest.mark.parametrize("shape", [(1,), (13,), (257,), (3, 37), (17, 129), (64, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_cancellation_matches_reference(method, shape, dtype):
    rng = np.random.default_rng(hash((method, shape, str(dtype))) & 0xFFFF)
    n = int(np.prod(shape))
    base, xs = _cancelling(rng, n, dtype)
    base = base.reshape(shape)
    xs = [x.reshape(shape) for x in xs]
    _check(base, xs, method, weights=[0.3, 0.1, 0.7], **METHOD_KW[method])


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_exact_cancellation_unnormalised_and_unweighted(method):
    rng = np.random.default_rng(3)
    base, xs = _cancelling(rng, 4099, torch.bfloat16)
    kw = dict(METHOD_KW[method])
    _check(base, xs, method, weights=[0.3, 0.1, 0.7], normalize=False, **kw)
    _check(base, xs, method, weights=[0.3, 0.1, 0.7], consensus_weighting="unweighted", **kw)
