"""GPU merge backends (Triton, CUDA C++) against the CPU kernel and the reference.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 is set
below before Triton is imported) on small CPU tensors, fp32/fp16. Tests marked `cuda`
run the CUDA C++ kernel and Triton on a GPU, including bf16 and a 4096 x 11008
(7B-layer) shape, and skip cleanly without one.

What is compared: the keep masks must be bit-identical to the reference's (and so to
the CPU kernel's); the merged outputs must equal the CPU kernel's bit for bit, except
with L1 rescale, where the float64 norm sums may differ in summation order (then the
fp32 factor may differ by one ulp, and the output by a rounding step).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import poison  # noqa: E402

triton = pytest.importorskip("triton")

from lfm_engine.core.merge_methods import resolve_merge_params  # noqa: E402
from lfm_engine.ops.merge import merge_tensors  # noqa: E402
from lfm_engine.reference.merge import sparsify_mask, task_vector  # noqa: E402

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties", "della_linear", "della", "linear"]
L1_METHODS = {"dare_linear", "dare_ties", "della_linear", "della"}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _kwargs(method: str, K: int) -> dict:
    kw = dict(weights=[1.0, 0.5, -0.7, 0.3][:K], seed=1234567890123, name="model.layers.3.mlp.up_proj.weight")
    if method != "task_arithmetic" and method != "linear":
        kw["density"] = [0.5, 0.3, 0.9, 0.01][:K]
    if method.startswith("breadcrumbs"):
        kw["gamma"] = [0.01, 0.1, 0.0, 0.2][:K]
    if method.startswith("della"):
        kw["density"] = [0.5, 0.3, 0.8, 0.2][:K]
        kw["epsilon"] = [0.05, 0.1, 0.15, 0.1][:K]
    return kw


def _inputs(shape, K, dtype, ties=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    xs = []
    for _ in range(K):
        d = 0.02 * torch.randn(shape, generator=g)
        if ties:  # few distinct magnitudes: many equal |delta| at every cut
            d = torch.round(d * 100) / 100
            b = torch.round(b * 4) / 4  # exactly representable base keeps delta levels exact
        xs.append(b + d)
    return b.to(dtype).to(device), [x.to(dtype).to(device) for x in xs]


def _run(backend, b, xs, method, out_dtype=None, **kw):
    return merge_tensors(b, xs, method, backend=backend, out_dtype=out_dtype, **kw)


# One rounding step of each output dtype: the CPU kernel's FMA loops exist only on
# x86-64-v3 CPUs (baseline x86-64 rounds twice), and the L1 factor's float64 sums may be
# ordered differently, so an output may differ from the CPU kernel's by one rounding.
_ONE_ROUNDING = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _check_outputs(method, got, want, rescale_l1=False):
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    if torch.equal(got, want):
        return
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=_ONE_ROUNDING[got.dtype],
                               msg=lambda m: f"{method}: output differs from the CPU kernel beyond one rounding: {m}")
    # a different mask would show as large differences in a few elements; rounding
    # differences stay rare
    frac = (got != want).float().mean().item()
    assert frac < (0.05 if rescale_l1 else 0.01), f"{method}: {frac:.3%} of the outputs differ"


def _check_masks(b, xs, method, masks, **kw):
    params = resolve_merge_params(method, len(xs), weights=kw.get("weights"), density=kw.get("density"),
                                  gamma=kw.get("gamma"), epsilon=kw.get("epsilon"), seed=kw.get("seed", 0),
                                  name=kw.get("name", ""))
    for i, x in enumerate(xs):
        want = sparsify_mask(task_vector(x.cpu(), b.cpu()), params, i)
        if want is None:
            assert masks is None
            continue
        got = masks[i].cpu()
        assert torch.equal(got, want), f"{method}: mask of model {i} differs ({int((got != want).sum())} elements)"


# ---------------------------------------------------------------------------------
# Triton (interpreter on CPU tensors, or the GPU)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_cpu_kernel(method, dtype):
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((37, 129), 3, dtype, ties=method in ("ties", "breadcrumbs"))
    kw = _kwargs(method, 3)
    want = _run("cpu", b, xs, method, **kw)
    b_d, xs_d = b.to(DEV), [x.to(DEV) for x in xs]
    out = poison(torch.empty_like(b_d))
    params = resolve_merge_params(method, 3, **{k: v for k, v in kw.items()})
    got, masks = merge_triton(b_d, xs_d, out, params, return_masks=True)
    _check_outputs(method, got, want, method in L1_METHODS)
    if method != "linear":
        _check_masks(b, xs, method, masks, **kw)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_triton_exact_k_ties_odd_sizes(method, n):
    """1-D tensors of odd sizes, quantised deltas: the cut falls inside runs of ties."""
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((n,), 2, torch.float32, ties=True, seed=n)
    kw = dict(weights=[0.6, 0.4], density=[0.37, 0.81], seed=5, name="t")
    if method.startswith("breadcrumbs"):
        kw["gamma"] = [0.13, 0.02]
    want = _run("cpu", b, xs, method, **kw)
    params = resolve_merge_params(method, 2, **kw)
    got, masks = merge_triton(b.to(DEV), [x.to(DEV) for x in xs], torch.empty(n, device=DEV), params,
                              return_masks=True)
    _check_outputs(method, got, want, False)
    _check_masks(b, xs, method, masks, **kw)
    if method == "ties" and n > 1:  # exactly k kept
        assert int(masks[0].sum()) == max(1, int(0.37 * n))


@pytest.mark.parametrize("density,gamma", [(0.0, 0.01), (1.0, 0.0), (1.0, 0.5), (0.5, 0.0), (0.5, 0.6)])
def test_triton_density_edges(density, gamma):
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((9, 11), 2, torch.float32, ties=True, seed=3)
    for method in ("ties", "breadcrumbs_ties", "dare_ties"):
        kw = dict(density=density, seed=9, name="edge")
        if method.startswith("breadcrumbs"):
            kw["gamma"] = gamma
        want = _run("cpu", b, xs, method, **kw)
        params = resolve_merge_params(method, 2, **kw)
        got, masks = merge_triton(b.to(DEV), [x.to(DEV) for x in xs], torch.empty_like(b, device=DEV),
                                  params, return_masks=True)
        _check_outputs(method, got, want, method == "dare_ties")
        _check_masks(b, xs, method, masks, **kw)


def test_triton_della_sort_kernel_path():
    """DELLA ranks by the in-register tl.sort kernel (short rows) equal the torch.sort path."""
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((3, 13), 2, torch.float32, ties=True, seed=11)
    kw = dict(weights=[1.0, 0.5], density=[0.5, 0.4], epsilon=[0.2, 0.1], seed=77, name="d")
    params = resolve_merge_params("della", 2, **kw)
    got_sort, m_sort = merge_triton(b.to(DEV), [x.to(DEV) for x in xs], torch.empty_like(b, device=DEV),
                                    params, sort_max_cols=64, return_masks=True)
    got_torch, m_torch = merge_triton(b.to(DEV), [x.to(DEV) for x in xs], torch.empty_like(b, device=DEV),
                                      params, sort_max_cols=0, return_masks=True)
    assert torch.equal(m_sort, m_torch)
    assert torch.equal(got_sort, got_torch)
    _check_masks(b, xs, "della", m_sort, **kw)
    _check_outputs("della", got_sort, _run("cpu", b, xs, "della", **kw), True)


def test_triton_della_1d_is_one_row():
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((300,), 2, torch.float16, seed=4)
    kw = dict(density=0.6, epsilon=0.2, seed=1, name="model.norm.weight")
    params = resolve_merge_params("della_linear", 2, **kw)
    got, masks = merge_triton(b.to(DEV), [x.to(DEV) for x in xs], torch.empty_like(b, device=DEV), params,
                              return_masks=True)
    _check_masks(b, xs, "della_linear", masks, **kw)
    _check_outputs("della_linear", got, _run("cpu", b, xs, "della_linear", **kw), True)


def test_triton_peft_variants_and_mixed_dtypes():
    """consensus_weighting=unweighted, disjoint=count, rescale=inverse_density; fp16 and
    fp32 inputs mixed, fp16 output, a model position other than the index."""
    b, xs = _inputs((40, 33), 3, torch.float32, seed=8)
    xs[1] = xs[1].half()
    kw = dict(weights=[0.9, 1.1, 0.4], density=0.4, seed=3, name="x", rescale="inverse_density",
              consensus_weighting="unweighted", disjoint="count", model_positions=[2, 0, 5],
              out_dtype=torch.float16, lam=0.8)
    for method in ("dare_ties", "ties"):
        want = _run("cpu", b, xs, method, **kw)
        got = _run("triton", b.to(DEV), [x.to(DEV) for x in xs], method, **kw)
        assert got.dtype == torch.float16
        assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("disjoint,unweighted", [("weight", False), ("count", True)])
def test_triton_many_models_float64_divisors(disjoint, unweighted):
    """K = 10 > 8: divisors summed in float64 per element instead of the pattern table."""
    b, xs = _inputs((11, 23), 10, torch.float16, seed=12)
    w = [1.0, -0.5, 0.7, 0.2, 1.3, -0.9, 0.4, 0.6, 0.8, 0.1]
    kw = dict(weights=w, density=0.5, seed=2, name="k10", disjoint=disjoint,
              consensus_weighting="unweighted" if unweighted else "weighted")
    for method in ("ties", "dare_ties"):
        want = _run("cpu", b, xs, method, **kw)
        got = _run("triton", b.to(DEV), [x.to(DEV) for x in xs], method, **kw)
        _check_outputs(method, got, want, method == "dare_ties")


def test_triton_linear_without_base():
    _, xs = _inputs((5, 7), 3, torch.float32)
    for normalize in (True, False):
        want = merge_tensors(None, xs, "linear", weights=[0.2, 0.3, 0.5], normalize=normalize, backend="cpu")
        got = merge_tensors(None, [x.to(DEV) for x in xs], "linear", weights=[0.2, 0.3, 0.5],
                            normalize=normalize, backend="triton")
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "della"])
def test_triton_nonfinite_is_an_error(method):
    b, xs = _inputs((6, 10), 2, torch.float32)
    xs[1][2, 3] = float("nan")
    kw = dict(density=0.5, epsilon=0.1) if method != "task_arithmetic" else {}
    with pytest.raises(ValueError, match=r"model 1 at element 23"):
        _run("triton", b.to(DEV), [x.to(DEV) for x in xs], method, **kw)
    b[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"base at element 0"):
        _run("triton", b.to(DEV), [x.to(DEV) for x in xs], method, **kw)


def test_triton_rejects_bad_input():
    from lfm_engine.triton.merge import merge_triton

    b, xs = _inputs((4, 4), 2, torch.float32)
    params = resolve_merge_params("ties", 2, density=0.5)
    with pytest.raises(ValueError, match="model 1 has shape"):
        merge_triton(b.to(DEV), [xs[0].to(DEV), xs[1][:2].to(DEV)], torch.empty_like(b, device=DEV), params)
    with pytest.raises(ValueError, match="describe 2 models"):
        merge_triton(b.to(DEV), [xs[0].to(DEV)], torch.empty_like(b, device=DEV), params)
    with pytest.raises(ValueError, match="not contiguous"):
        merge_triton(b.to(DEV), [xs[0].to(DEV), xs[1].t().to(DEV)], torch.empty_like(b, device=DEV), params)


def test_triton_philox_matches_reference():
    """The Triton Philox draws equal the reference numpy Philox (via a DARE mask at d = 0.5)."""
    from lfm_engine.reference.philox import keep_threshold, philox_draws, stream_id

    b, xs = _inputs((1001,), 1, torch.float32)
    kw = dict(density=0.5, seed=(1 << 63) + 12345, name="model.embed_tokens.weight", model_positions=[7])
    from lfm_engine.triton.merge import merge_triton

    params = resolve_merge_params("dare_linear", 1, **kw)
    _, masks = merge_triton(b.to(DEV), [xs[0].to(DEV)], torch.empty_like(b, device=DEV), params, return_masks=True)
    draws = philox_draws(kw["seed"], stream_id(kw["name"], 7), 1001)
    want = torch.from_numpy(draws.astype("int64") < keep_threshold(0.5))
    assert torch.equal(masks[0].cpu(), want)


# ---------------------------------------------------------------------------------
# On a GPU: CUDA C++ and Triton against the CPU kernel (skipped without a GPU)


from lfm_engine.ops._dispatch import native_has_cuda as _native_has_cuda  # noqa: E402


GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_cpu_kernel(backend, dtype, method):
    if backend == "cuda" and not _native_has_cuda():
        pytest.skip("lfm_engine was built without CUDA")
    b, xs = _inputs((257, 1031), 3, dtype, ties=method in ("ties", "breadcrumbs"))
    kw = _kwargs(method, 3)
    want = _run("cpu", b, xs, method, **kw)
    got = _run(backend, b.cuda(), [x.cuda() for x in xs], method, **kw)
    _check_outputs(method, got, want, method in L1_METHODS)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_gpu_7b_layer_masks_bit_identical(method):
    """4096 x 11008 bf16 (a 7B MLP weight), 3 models: CPU, CUDA and Triton agree."""
    b, xs = _inputs((4096, 11008), 3, torch.bfloat16, seed=1)
    kw = _kwargs(method, 3)
    want = _run("cpu", b, xs, method, **kw)
    backends = ["triton"] + (["cuda"] if _native_has_cuda() else [])
    for backend in backends:
        got = _run(backend, b.cuda(), [x.cuda() for x in xs], method, **kw)
        _check_outputs(method, got, want, method in L1_METHODS)
    from lfm_engine.triton.merge import merge_triton

    params = resolve_merge_params(method, 3, **kw)
    _, masks = merge_triton(b.cuda(), [x.cuda() for x in xs], torch.empty_like(b, device="cuda"), params,
                            return_masks=True)
    # the reference masks on a slice-free full check would take minutes; check model 0
    want_m = sparsify_mask(task_vector(xs[0], b), params, 0)
    assert torch.equal(masks[0].cpu(), want_m)


MASK_METHODS = [m for m in METHODS if m not in ("task_arithmetic", "linear")]


def _masks_via_merge(backend, xs, method, kw, device):
    """Each model's keep mask as a backend's fused kernel decides it, read off its output.

    The CPU and CUDA kernels do not return their masks. Sparsification is per model
    (docs/spec/merge.md), so model i's mask in the K-model merge is the mask of a one-model merge
    with model i's density/gamma/epsilon and position (its random stream), with a zero base
    and weight 1: then out = scale * mask * x_i (scale > 0: DARE/DELLA rescale, L1 factor)
    and mask = (out != 0) wherever x_i != 0. Output float32, so nothing underflows."""
    out = []
    zero = torch.zeros_like(xs[0], device=device)
    for i, x in enumerate(xs):
        one = dict(weights=[1.0], seed=kw["seed"], name=kw["name"], model_positions=[i], out_dtype=torch.float32)
        for key in ("density", "gamma", "epsilon"):
            if key in kw:
                one[key] = [kw[key][i]]
        out.append(merge_tensors(zero, [x.to(device)], method, backend=backend, **one).cpu() != 0)
    return torch.stack(out)


def _zero_base_inputs(shape, dtype, method, seed):
    _, xs = _inputs(shape, 3, dtype, ties=method in ("ties", "breadcrumbs", "breadcrumbs_ties"), seed=seed)
    return torch.zeros_like(xs[0]), xs


@pytest.mark.parametrize("method", MASK_METHODS)
def test_masks_via_merge_equal_reference_masks(method):
    """The single-model readout above gives the reference's mask of every model of a K-model merge."""
    b, xs = _zero_base_inputs((33, 129), torch.float32, method, seed=3)
    kw = _kwargs(method, 3)
    got = _masks_via_merge("cpu", xs, method, kw, "cpu")
    params = resolve_merge_params(method, 3, **kw)
    for i, x in enumerate(xs):
        want = sparsify_mask(task_vector(x, b), params, i) & (x != 0)
        assert torch.equal(got[i], want), f"{method}: model {i}: {int((got[i] != want).sum())} elements differ"


@pytest.mark.cuda
@pytest.mark.parametrize("method", MASK_METHODS)
def test_gpu_masks_bit_identical_every_method(method):
    """bf16, 512 x 4099, K = 3 (quantised deltas for the exact-k methods: ties at every cut):
    every model's mask is the same on the CPU kernel, the CUDA kernel and Triton, and Triton's
    own masks of the K-model merge equal the reference's."""
    if not _native_has_cuda():
        pytest.skip("lfm_engine was built without CUDA")
    b, xs = _zero_base_inputs((512, 4099), torch.bfloat16, method, seed=5)
    kw = _kwargs(method, 3)
    masks = {be: _masks_via_merge(be, xs, method, kw, dev)
             for be, dev in (("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))}
    for be in ("cuda", "triton"):
        diff = masks[be] != masks["cpu"]
        assert not diff.any(), f"{method}: {be} masks differ from the CPU kernel's in {int(diff.sum())} elements " \
                               f"(per model: {diff.flatten(1).sum(1).tolist()})"
    from lfm_engine.triton.merge import merge_triton

    params = resolve_merge_params(method, 3, **kw)
    _, tri = merge_triton(b.cuda(), [x.cuda() for x in xs], torch.empty_like(b, device="cuda"), params,
                          return_masks=True)
    want = sparsify_mask(task_vector(xs[0], b), params, 0)
    assert torch.equal(tri[0].cpu(), want), f"{method}: Triton's K-model mask of model 0 differs from the reference"
    assert torch.equal(tri.cpu() & torch.stack([x != 0 for x in xs]), masks["cpu"])


@pytest.mark.cuda
def test_cuda_nonfinite_and_long_della_rows():
    if not _native_has_cuda():
        pytest.skip("lfm_engine was built without CUDA")
    b, xs = _inputs((2, 40000), 2, torch.float16, seed=2)  # rows longer than any in-register sort
    kw = dict(density=0.5, epsilon=0.2, seed=4, name="long")
    want = _run("cpu", b, xs, "della", **kw)
    for backend in GPU_BACKENDS:
        got = _run(backend, b.cuda(), [x.cuda() for x in xs], "della", **kw)
        _check_outputs("della", got, want, True)
    xs[0][1, 5] = float("inf")
    with pytest.raises(ValueError, match="model 0 at element 40005"):
        _run("cuda", b.cuda(), [x.cuda() for x in xs], "ties", density=0.5)
