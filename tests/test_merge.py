"""The C++ CPU merge kernel against the plain-torch reference (docs/spec/merge.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lfm_engine
from lfm_engine import merge_tensors
from lfm_engine.core.merge_methods import METHODS, resolve_merge_params
from lfm_engine.reference import merge as ref
from lfm_engine.reference.philox import stream_id

from conftest import assert_close

TASK_METHODS = [m for m in METHODS if m != "linear"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, k, dtype=torch.float32, scale=0.05, seed=0, base_dtype=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(base_dtype or dtype)
    others = [(base.float() + scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return base, others


def params_for(method, k, **kw):
    if method in ("della", "della_linear"):
        kw.setdefault("density", 0.5)
        kw.setdefault("epsilon", 0.1)
    else:
        kw.setdefault("density", 0.3)
    return kw


def run_both(base, others, method, out_dtype=None, **kw):
    ours = merge_tensors(base, others, method, out_dtype=out_dtype, backend="cpu", **kw)
    expect = merge_tensors(base, others, method, out_dtype=out_dtype, backend="reference", **kw)
    return ours, expect


def kept_mask(base, x, method, **kw):
    """Which elements the kernel keeps for a single model (K=1, w=1, no rescale/normalize)."""
    out = merge_tensors(base, [x], method, weights=1.0, rescale=False, normalize=False,
                        backend="cpu", **kw)
    return out.float() != base.float()


def ref_mask(base, x, method, **kw):
    p = resolve_merge_params(method, 1, weights=1.0, rescale=False, normalize=False, **kw)
    delta = ref.task_vector(x, base)
    m = ref.sparsify_mask(delta, p, 0)
    return torch.ones_like(delta, dtype=torch.bool) if m is None else m


# ---------------------------------------------------------------- agreement with reference
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (33, 129)])
def test_matches_reference(method, dtype, shape):
    base, others = make_inputs(shape, 3, dtype)
    kw = params_for(method, 3, weights=[0.7, 1.0, 0.4], name="model.layers.0.mlp.up_proj.weight", seed=7)
    ours, expect = run_both(base, others, method, **kw)
    assert ours.dtype == dtype and ours.shape == base.shape
    assert_close(ours, expect, dtype)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "task_arithmetic"])
def test_model_counts(k, method):
    base, others = make_inputs((65, 31), k, seed=k)
    w = [(-1) ** i * (0.3 + 0.1 * i) for i in range(k)]  # negative weights included
    ours, expect = run_both(base, others, method, **params_for(method, k, weights=w, name="t"))
    assert_close(ours, expect, torch.float32)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs"])
def test_densities(method, density):
    base, others = make_inputs((4097,), 2, seed=3)
    ours, expect = run_both(base, others, method, density=density, gamma=0.005, name="x")
    assert_close(ours, expect, torch.float32)


def test_mixed_input_dtypes_and_out_dtype():
    base, _ = make_inputs((300, 17), 1, torch.bfloat16)
    others = [(base.float() + 0.1 * torch.randn(300, 17)).to(dt) for dt in DTYPES]
    for out_dtype in DTYPES:
        ours, expect = run_both(base, others, "ties", out_dtype=out_dtype, density=0.4)
        assert ours.dtype == out_dtype
        assert_close(ours, expect, out_dtype)


def test_numpy_in_numpy_out():
    base, others = make_inputs((50, 8), 2)
    out = merge_tensors(base.numpy(), [x.numpy() for x in others], "task_arithmetic", weights=[0.5, 0.5])
    assert isinstance(out, np.ndarray)
    expect = merge_tensors(base, others, "task_arithmetic", weights=[0.5, 0.5], backend="reference")
    np.testing.assert_allclose(out, expect.numpy(), atol=1e-6)


# ---------------------------------------------------------------- exact selection
def test_magnitude_ties_keep_lower_index():
    # bf16 deltas with many equal magnitudes at the threshold
    n = 4097
    base = torch.zeros(n, dtype=torch.bfloat16)
    vals = torch.tensor([0.25, -0.25, 0.5, 0.125], dtype=torch.bfloat16)
    x = vals[torch.arange(n) % 4]
    for density in (0.1, 0.3, 0.37, 0.6, 0.9):
        got = kept_mask(base, x, "ties", density=density)
        exp = ref_mask(base, x, "ties", density=density)
        assert torch.equal(got, exp), density
        assert int(got.sum()) == max(1, int(np.floor(density * n)))


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.0), (0.2, 0.3), (0.9, 0.2), (0.05, 0.01)])
def test_breadcrumbs_cuts_with_ties(density, gamma):
    n = 5000
    base = torch.zeros(n)
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(-6, 7, (n,), generator=g) / 4.0)  # few distinct magnitudes: ties at both cuts
    got = kept_mask(base, x, "breadcrumbs", density=density, gamma=gamma)
    exp = ref_mask(base, x, "breadcrumbs", density=density, gamma=gamma) & (x != 0)
    assert torch.equal(got, exp)


def test_exactly_k_kept_on_real_shape_bf16():
    base, (x,) = make_inputs((512, 384), 1, torch.bfloat16, scale=0.01)
    for d in (0.01, 0.2, 0.5):
        got = kept_mask(base, x, "ties", density=d)
        nz = (x.float() - base.float()) != 0
        k = max(1, int(np.floor(d * x.numel())))
        assert int(got.sum()) == min(k, int(nz.sum()))
        assert torch.equal(got, ref_mask(base, x, "ties", density=d) & nz)


# ---------------------------------------------------------------- randomness
def _della_rows(cols: int) -> torch.Tensor:
    """Rows of every kind della_keep_row (csrc/kernels/merge/della_rank.h) meets: smooth
    values, a few distinct values (ties straddling the bins' ranks), exact zeros, one
    huge outlier (a wide range: coarse bins), every value equal, zeros and one value
    (both sorted instead), and a row with most elements tied at one value."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(cols, generator=g),
            torch.randint(-6, 7, (cols,), generator=g) / 4.0,
            torch.where(torch.rand(cols, generator=g) < 0.3, 0.0, torch.randn(cols, generator=g)),
            torch.cat([torch.randn(cols - 1, generator=g) * 1e-3, torch.tensor([1e30])]),
            torch.full((cols,), 0.5),
            torch.where(torch.arange(cols) % 3 == 0, 0.0, -0.25),
            torch.where(torch.rand(cols, generator=g) < 0.8, 0.125, torch.randn(cols, generator=g))]
    return torch.stack(rows)


@pytest.mark.parametrize("cols", [255, 256, 258, 1000, 1027, 4096])  # 258, 1027: a ragged 16-lane tail
@pytest.mark.parametrize("density,epsilon", [(0.4, 0.2), (0.5, 0.01), (0.9, 0.09)])
def test_della_row_histogram_masks_bit_identical(cols, density, epsilon):
    x = _della_rows(cols)
    base = torch.zeros_like(x)
    kw = dict(density=density, epsilon=epsilon, seed=77, name="model.layers.1.mlp.down_proj.weight")
    got = kept_mask(base, x, "della_linear", **kw)
    exp = ref_mask(base, x, "della_linear", **kw) & (x != 0)
    assert torch.equal(got, exp)


@pytest.mark.parametrize("cols", [1027, 4096])
def test_della_row_ranks_of_tied_members_in_column_order(cols):
    """Many rows of four tied values: each value's members rank in column order, and a wide
    epsilon makes the thresholds differ across a bin, so a member put at the wrong rank
    flips its decision somewhere in the 256 rows."""
    g = torch.Generator().manual_seed(9)
    x = torch.randint(1, 5, (256, cols), generator=g) / 8.0
    base = torch.zeros_like(x)
    kw = dict(density=0.5, epsilon=0.45, seed=78, name="model.layers.1.mlp.down_proj.weight")
    assert torch.equal(kept_mask(base, x, "della_linear", **kw), ref_mask(base, x, "della_linear", **kw))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_masks_bit_identical_to_reference(method):
    base, (x,) = make_inputs((37, 211), 1, scale=1.0)
    kw = dict(density=0.4, seed=123456789012345, name="model.layers.3.self_attn.q_proj.weight")
    if method == "della_linear":
        kw["epsilon"] = 0.2
    got = kept_mask(base, x, method, **kw)
    exp = ref_mask(base, x, method, **kw)
    assert torch.equal(got, exp)
    frac = got.float().mean().item()
    assert abs(frac - 0.4) < 0.03


def test_masks_depend_on_name_position_and_seed():
    base, (x,) = make_inputs((4096,), 1, scale=1.0)
    a = kept_mask(base, x, "dare_linear", density=0.5, seed=1, name="a")
    assert torch.equal(a, kept_mask(base, x, "dare_linear", density=0.5, seed=1, name="a"))
    assert not torch.equal(a, kept_mask(base, x, "dare_linear", density=0.5, seed=2, name="a"))
    assert not torch.equal(a, kept_mask(base, x, "dare_linear", density=0.5, seed=1, name="b"))
    assert not torch.equal(a, kept_mask(base, x, "dare_linear", density=0.5, seed=1, name="a",
                                        model_positions=[1]))
    assert stream_id("a", 1) != stream_id("a", 0)


@pytest.mark.parametrize("method", list(METHODS))
def test_thread_count_bit_identical(method):
    base, others = make_inputs((3, 40000), 3, torch.bfloat16)
    kw = params_for(method, 3, weights=[1.0, 0.5, 0.8], name="w", seed=5)
    one = merge_tensors(base, others, method, n_threads=1, **kw)
    two = merge_tensors(base, others, method, n_threads=2, **kw)
    many = merge_tensors(base, others, method, n_threads=7, **kw)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))
    assert torch.equal(one.view(torch.int16), many.view(torch.int16))


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("rescale", [False, True, "inverse_density"])
@pytest.mark.parametrize("normalize", [False, True])
def test_rescale_and_normalize_options(rescale, normalize):
    base, others = make_inputs((999,), 3)
    ours, expect = run_both(base, others, "dare_ties", density=0.5, rescale=rescale, normalize=normalize,
                            weights=[1.0, 0.3, 0.6], lam=0.8, name="n")
    assert_close(ours, expect, torch.float32)


@pytest.mark.parametrize("cw,dj", [("unweighted", "count"), ("unweighted", "weight"), ("weighted", "count")])
def test_peft_variants(cw, dj):
    base, others = make_inputs((2000,), 4)
    ours, expect = run_both(base, others, "ties", density=0.3, consensus_weighting=cw, disjoint=dj,
                            weights=[1.0, -0.5, 0.7, 0.2])
    assert_close(ours, expect, torch.float32)


def test_linear_without_base():
    _, others = make_inputs((100,), 3)
    ours = merge_tensors(None, others, "linear", weights=[1, 2, 3])
    expect = (others[0] + 2 * others[1] + 3 * others[2]) / 6
    assert_close(ours, expect, torch.float32)


def test_non_contiguous_inputs_are_handled():
    base, others = make_inputs((64, 48), 2)
    bt, ot = base.t(), [x.t() for x in others]
    assert not bt.is_contiguous()
    ours = merge_tensors(bt, ot, "ties", density=0.3)
    expect = merge_tensors(bt.contiguous(), [x.contiguous() for x in ot], "ties", density=0.3, backend="reference")
    assert_close(ours, expect, torch.float32)


def test_empty_tensor():
    base, others = make_inputs((0, 5), 2)
    assert merge_tensors(base, others, "ties").shape == (0, 5)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    base, others = make_inputs((10, 4), 2)
    with pytest.raises(ValueError, match="empty"):
        merge_tensors(base, [], "ties")
    with pytest.raises(ValueError, match="shape"):
        merge_tensors(base, [others[0], others[1][:5]], "ties")
    with pytest.raises(TypeError, match="dtype"):
        merge_tensors(base, [others[0].to(torch.int32)], "ties")
    with pytest.raises(ValueError, match="density"):
        merge_tensors(base, others, "ties", density=1.5)
    with pytest.raises(ValueError, match="density"):
        merge_tensors(base, others, "ties", density=[0.5, -0.1])
    with pytest.raises(ValueError, match="della epsilon"):
        merge_tensors(base, others, "della", density=0.1, epsilon=0.2)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_tensors(base, others, "tie")
    with pytest.raises(ValueError, match="weight"):
        merge_tensors(base, others, "ties", weights=[1.0])
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensors(None, others, "ties")
    with pytest.raises(ValueError, match="backend"):
        merge_tensors(base, others, "ties", backend="cuda")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("where", ["base", "model"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_policy_non_finite_input_is_an_error(backend, where, bad):
    base, others = make_inputs((100,), 2)
    (base if where == "base" else others[1])[17] = bad
    match = "base" if where == "base" else "model 1"
    for method in ("ties", "task_arithmetic", "dare_linear", "della"):
        kw = params_for(method, 2)
        with pytest.raises(ValueError, match=match):
            merge_tensors(base, others, method, backend=backend, **kw)


def test_c_abi_refuses_non_contiguous_views():
    # The Python API copies strided inputs; the C ABI itself refuses them clearly.
    from lfm_engine._native import native
    from lfm_engine._tensor import view

    base, others = make_inputs((8, 6), 1)
    bt = base.t()
    out = torch.empty(6, 8)
    with pytest.raises(ValueError, match="not contiguous"):
        native().merge(view(bt), [view(others[0].t())], view(out), method=1)


def test_build_info_and_headers():
    info = lfm_engine.build_info()
    assert info["abi"] == 1 and "simd" in info
    import os

    assert os.path.isfile(os.path.join(lfm_engine.get_include(), "lfm", "lfm.h"))


@pytest.mark.slow
def test_7b_layer_shape_bf16():
    """One 4096 x 11008 bf16 TIES merge (a 7B MLP weight) against the reference."""
    base, others = make_inputs((4096, 11008), 2, torch.bfloat16, scale=0.01)
    ours = merge_tensors(base, others, "ties", density=0.2, name="model.layers.0.mlp.up_proj.weight")
    expect = merge_tensors(base, others, "ties", density=0.2, name="model.layers.0.mlp.up_proj.weight",
                           backend="reference")
    assert_close(ours, expect, torch.bfloat16)


@pytest.mark.parametrize("cw", ["weighted", "unweighted"])
def test_sign_election_exact_where_float32_cannot_decide(cw):
    """0.7*0.0625 and 0.4*0.109375 are equal in float32 but not in float64: the kernel
    must elect the reference's (float64) sign, not float32's."""
    base = torch.zeros(3)
    xs = [torch.tensor([0.0625, 1.0, -2.0]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([-0.109375, 1.0, 2.0])]
    w = [0.7, 1.0, 0.4] if cw == "weighted" else [1.0, 1.0, 1.0]
    if cw == "unweighted":
        xs[0][0], xs[2][0] = 0.1, -0.1  # sum 0.1 + (-0.1) is exactly 0 in both: sign +
    ours, expect = run_both(base, xs, "ties", density=1.0, weights=w, consensus_weighting=cw)
    assert_close(ours, expect, torch.float32)


@pytest.mark.parametrize("kind", ["gaussian_fp32", "quantized_bf16", "constant"])
@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.2)), ("ties", dict(density=0.97)),
                                       ("breadcrumbs", dict(density=0.3, gamma=0.05))])
def test_large_tensor_selection_paths(kind, method, kw):
    """n >= 2^18 takes the sample-and-bracket selection (and its radix fallback when the
    bracket holds too many equal values): masks must still equal the reference exactly."""
    n = 1 << 18
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=g)
    if kind == "gaussian_fp32":
        x = base + 0.01 * torch.randn(n, generator=g)
    elif kind == "quantized_bf16":
        base = (torch.round(base * 4) / 4).to(torch.bfloat16)
        x = (base.float() + torch.round(torch.randn(n, generator=g) * 8) / 256).to(torch.bfloat16)
    else:  # every |delta| equal: the bracket holds everything, the radix passes decide
        x = base + torch.where(torch.rand(n, generator=g) < 0.5, 0.125, -0.125)
    got = kept_mask(base, x, method, **kw)
    nz = (x.float() - base.float()) != 0
    assert torch.equal(got, ref_mask(base, x, method, **kw) & nz)
