"""The mergekit-style benchmark baseline (lfm_engine/baselines/torch_merge.py) must compute
the same merge as the reference (up to dtype rounding), or benchmark speed-ups would
compare different work."""
import pytest
import torch

from lfm_engine.core.merge_methods import resolve_merge_params
from lfm_engine.reference.merge import merge_tensors_reference

from lfm_engine.baselines import torch_merge as baseline


def _inputs(shape, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    xs = [(b + 0.02 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    return b.to(dtype), xs


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs",
                                    "breadcrumbs_ties", "linear"])
@pytest.mark.parametrize("peft", [False, True])
def test_deterministic_methods_match_reference_fp32(method, peft):
    b, xs = _inputs((48, 70), 3, torch.float32)
    kw = dict(consensus_weighting="unweighted", disjoint="count") if peft else {}
    p = resolve_merge_params(method, 3, weights=[0.6, 1.0, 0.3], density=0.4, gamma=0.05,
                             lam=0.8, **kw)
    got = baseline.merge_tensors_torch_multipass(b, xs, p)
    ref = merge_tensors_reference(b, xs, p)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear", "della"])
def test_random_methods_keep_the_right_fraction(method):
    shape = (200, 300)
    b = torch.zeros(shape)
    xs = [torch.ones(shape)]
    p = resolve_merge_params(method, 1, density=0.3, epsilon=0.1, rescale=False, seed=5,
                             normalize=False)
    got = baseline.merge_tensors_torch_multipass(b, xs, p)
    assert abs((got != 0).float().mean().item() - 0.3) < 0.01
    # same seed, same masks
    assert torch.equal(got, baseline.merge_tensors_torch_multipass(b, xs, p))


def test_bf16_stays_bf16_and_is_close():
    b, xs = _inputs((64, 64), 2, torch.bfloat16, seed=1)
    p = resolve_merge_params("ties", 2, weights=[1.0, 0.5], density=0.5)
    got = baseline.merge_tensors_torch_multipass(b, xs, p)
    ref = merge_tensors_reference(b, xs, p)
    assert got.dtype == torch.bfloat16
    # bf16 arithmetic at every step: a few ulps of |out| ~ 3
    assert (got.float() - ref.float()).abs().max().item() < 0.05
