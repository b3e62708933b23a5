"""Plain-torch, mergekit-style multi-pass merge: the baseline the fused kernels are timed against.

This computes the docs/spec/merge.md task-vector family the way mergekit 0.1.5 does it, as
a careful torch user would write it (no deliberate slowness), so that a speed-up of
the fused kernel over it is an honest one:

- arithmetic in the tensors' own dtype (inputs are cast to the base dtype first), so
  bf16 inputs round after every step;
- one pass per step and per model: delta = x - b, a mask per model (``torch.topk`` on
  |delta| for magnitude, one ``torch.sort`` for breadcrumbs and for DELLA's per-row
  ranks, ``torch.bernoulli`` with a ``torch.Generator`` seeded from params.seed for
  DARE / DELLA), optional rescale, then ``torch.stack`` of the task vectors, the
  weighting, the sign election on the stacked sum, the masked sums, normalize, lambda
  and the final add.

Results agree with the reference up to dtype rounding for the deterministic methods;
random masks differ (torch's generator, not the engine's Philox streams), and
magnitude ties are broken by whatever order torch.topk returns.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lfm_engine.core.merge_methods import (
    RESCALE_INVERSE_DENSITY,
    RESCALE_L1,
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_MAGNITUDE_OUTLIERS,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    MergeParams,
)

__all__ = ["merge_tensors_torch_multipass"]


def _rescale(res: torch.Tensor, delta: torch.Tensor, mode: str, density: float) -> torch.Tensor:
    if mode == RESCALE_L1:
        before = delta.abs().sum()
        after = res.abs().sum()
        if float(before) < 1e-7 or float(after) < 1e-7:
            return res
        return res * (before / after)
    if mode == RESCALE_INVERSE_DENSITY and density > 0:
        return res / density
    return res


def _magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    idx = torch.topk(delta.abs().reshape(-1), k, sorted=False).indices
    mask = torch.zeros_like(delta)
    mask.view(-1)[idx] = 1
    return mask


def _magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.argsort(delta.abs().reshape(-1))
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[n_bot:n_bot + target]] = 1
    return mask


def _della(delta: torch.Tensor, density: float, epsilon: float,
           gen: torch.Generator) -> torch.Tensor:
    rows = 1 if delta.dim() <= 1 else delta.shape[0]
    mat = delta.reshape(rows, -1)
    cols = mat.shape[1]
    order = torch.argsort(mat.abs(), dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=delta.device).expand(rows, cols))
    scale = 2 * epsilon / (cols - 1) if cols > 1 else 0.0
    probs = (density - epsilon) + ranks.to(delta.dtype) * scale
    return torch.bernoulli(probs, generator=gen).reshape(delta.shape)


def _sparsify(delta: torch.Tensor, params: MergeParams, i: int,
              gen: torch.Generator) -> torch.Tensor:
    sp = params.spec.sparsifier
    d = params.densities[i]
    if sp == SPARSIFY_NONE:
        return delta
    if sp == SPARSIFY_MAGNITUDE:
        mask = _magnitude(delta, d)
    elif sp == SPARSIFY_MAGNITUDE_OUTLIERS:
        mask = _magnitude_outliers(delta, d, params.gammas[i])
    elif sp == SPARSIFY_RANDOM:
        if d >= 1:
            return delta
        mask = torch.bernoulli(torch.full_like(delta, d), generator=gen)
    elif sp == SPARSIFY_DELLA:
        mask = _della(delta, d, params.epsilons[i], gen)
    else:
        raise ValueError(f"unknown sparsifier '{sp}'")
    return _rescale(delta * mask, delta, params.rescale, d)


def merge_tensors_torch_multipass(base: Optional[torch.Tensor], others: Sequence[torch.Tensor],
                                  params: MergeParams) -> torch.Tensor:
    """mergekit-style merge of one tensor in the inputs' own dtype (base dtype, or
    others[0]'s for linear without base). Same shape as the inputs, same device."""
    if len(others) != params.n_models or not others:
        raise ValueError(f"params describe {params.n_models} models, got {len(others)} tensors")
    dtype = base.dtype if base is not None else others[0].dtype
    device = others[0].device
    xs = [x.to(dtype) for x in others]
    for i, x in enumerate(xs):
        if x.shape != xs[0].shape or (base is not None and x.shape != base.shape):
            raise ValueError(f"model {i} has shape {tuple(x.shape)}, expected "
                             f"{tuple((base if base is not None else xs[0]).shape)}")
    bshape = (-1,) + (1,) * xs[0].dim()
    weights = torch.tensor(params.weights, dtype=dtype, device=device).reshape(bshape)

    if params.method == "linear":
        mixed = (torch.stack(xs, dim=0) * weights).sum(dim=0)
        if params.normalize:
            wsum = weights.sum(dim=0)
            if float(wsum.abs()) < 1e-8:
                wsum = torch.ones_like(wsum)
            mixed = mixed / wsum
        return mixed.to(dtype)

    if base is None:
        raise ValueError(f"method '{params.method}' needs a base tensor")
    # One generator for the whole call, consumed model after model (mergekit uses the
    # global generator in the same sequential way).
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    deltas = torch.stack([_sparsify(x - base, params, i, gen) for i, x in enumerate(xs)], dim=0)
    weighted = deltas * weights

    if params.spec.consensus:
        votes = weighted if params.consensus_weighting == "weighted" else deltas
        elected = (votes.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = (votes.sign() == elected).to(dtype)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0) if params.disjoint == "weight" else mask.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params.normalize:
        mixed = mixed / divisor
    if params.lam != 1:
        mixed = mixed * params.lam
    return (base + mixed).to(dtype)
