"""mergekit's newer base-relative methods in torch: sce, nearswap, arcee_fusion, ram, ramplus_tl.

Definitions read from mergekit 0.1.5 (merge_methods/{sce,nearswap,arcee_fusion,ram}.py)
and written out in docs/spec/merge.md. Why torch and not the fused C++ sweep: each
needs a statistic over the whole tensor or across the models before any output
element is known (a top-k over the cross-model variance and per-model mean squares
for sce, three order statistics of a KL-weighted importance for arcee_fusion,
per-model overlap counts for ramplus_tl), and none has the sparsify/elect/sum shape
the fused kernel implements. Each is a handful of vectorised passes over K+1 tensors.
torch is imported inside the functions: the planner imports this module, and planning
must not load torch (docs/merge.md "Startup").

Shapes: ``base`` and every ``xs[i]`` have one shape; the result is a float32 tensor
(float64 for float64 inputs) of that shape, rounded by the caller. Task vectors
τ_i = x_i − base.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from lfm_engine.core.merge_registry import METHODS as _REGISTRY

METHODS = ("sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")   # implemented here


def _wd(x: torch.Tensor) -> torch.dtype:
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def shared_values(method: str, shared: dict) -> dict:
    """The method's shared parameters with the registry's defaults applied and checked
    (MergeConfigError)."""
    return _REGISTRY[method].shared_values(shared)


def sce(base: torch.Tensor, xs: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE (select, calculate, erase).

    Select: if select_topk < 1, keep the k = ⌊select_topk · nnz(v)⌋ elements with the
    largest cross-model variance v = Var_i τ_i (population variance; ties as
    torch.topk), zero the rest in every τ_i (select_topk ≤ 0 keeps none).
    Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²) (1/K each when that sum < 1e-6).
    Erase: m_i = [sign τ_i = s] with s = +1 where Σ_i τ_i ≥ 0 else −1 (a zero τ_i
    element never agrees). out = base + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6).
    """
    import torch

    wd = _wd(base)
    b = base.to(wd)
    if not xs:
        return b
    tv = torch.stack([x.to(wd) - b for x in xs])
    if select_topk < 1:
        var = tv.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
        keep = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
        if k > 0:
            keep[torch.topk(var.abs().reshape(-1), k, largest=True).indices] = True
        tv = tv * keep.view(var.shape).to(wd)
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    ws = float(w.sum())
    w = torch.full_like(w, 1.0 / w.numel()) if abs(ws) < 1e-6 else w / ws
    majority = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).to(wd)
    agree = (tv.sign() == majority).to(wd)
    ew = agree * w.view(-1, *([1] * (tv.dim() - 1)))
    return b + (tv * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


def nearswap(t: float, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NearSwap: w = clamp(t / max(|base − x|, 1e-6), 0, 1) per element;
    out = w·x + (1 − w)·base (elements closer than t take the model's value)."""
    import torch

    wd = _wd(base)
    a, c = base.to(wd), x.to(wd)
    w = (t / (a - c).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * c + (1.0 - w) * a


def _order_stat(flat: torch.Tensor, q: float) -> torch.Tensor:
    """sorted(flat)[⌊q·(n−1)⌋] (mergekit's index rule, no interpolation)."""
    import torch

    return torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values


def arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion: importance I = |x − base| · KL(p‖q) with p = softmax(x), q =
    softmax(base) along the last dim (each + 1e-8; one KL per row, broadcast over
    the row); threshold θ = Q(0.5) + 1.5·(Q(0.75) − Q(0.25)) with Q(q) the
    ⌊q(n−1)⌋-th smallest of I over the whole tensor; out = base + (x − base)·[I ≥ θ].

    mergekit estimates Q from 10⁶ elements sampled with replacement when the tensor
    is larger (unseeded, so not reproducible); we always use the exact order
    statistics. I is computed in float64 (mergekit: the input dtype), so elements
    within float32 rounding of θ may be selected differently from mergekit.
    """
    import torch

    wd = _wd(base)
    b, p_ = base.to(wd), x.to(wd)
    # the importance in float64: the KL of two nearly equal softmaxes is a sum of
    # cancelling terms whose float32 value is off by percents, which moves the threshold
    b64, x64 = b.double(), p_.double()
    p = torch.softmax(x64, dim=-1) + 1e-8
    q = torch.softmax(b64, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    imp = ((x64 - b64).abs() * kl).reshape(-1)
    q1, med, q3 = (_order_stat(imp, v) for v in (0.25, 0.5, 0.75))
    mask = (imp >= med + 1.5 * (q3 - q1)).view(b.shape).to(wd)
    del b64, x64, p, q
    return b + (p_ - b) * mask


def ram(base: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float = 1e-5,
        plus: bool = False, r: float = 0.1, alpha: float = 0.2) -> torch.Tensor:
    """RAM (reinforced agent merging) and, with ``plus``, RAM+ tensor-local.

    n_i = [|τ_i| > ε] per element, c = Σ_i n_i; z_i = τ_i·n_i. RAM:
    out = base + Σ_i z_i / max(c, 1) (an element only one model changes keeps that
    change; shared ones are averaged over the models that change them).
    RAM+: per model ρ_i = #(n_i ∧ c > 1) / max(#(n_i ∧ c = 1), ε),
    λ_i = 1 + r·clamp(ρ_i, 0, α); the unique elements are scaled by λ_i:
    out = base + Σ_i z_i (λ_i [c = 1] + [c > 1] / max(c, 1)).
    """
    import torch

    wd = _wd(base)
    b = base.to(wd)
    if not xs:
        return b
    tv = torch.stack([x.to(wd) - b for x in xs]).reshape(len(xs), -1)
    nz = tv.abs() > epsilon
    c = nz.sum(dim=0, keepdim=True)
    z = tv * nz.to(wd)
    if not plus:
        merged = z.sum(dim=0) / c.clamp(min=1).to(wd).squeeze(0)
        return b + merged.view(b.shape)
    overlap, unique = c > 1, c == 1
    shared_n = (nz & overlap).sum(dim=1).to(wd)
    unique_n = (nz & unique).sum(dim=1).to(wd)
    lam = 1.0 + r * (shared_n / unique_n.clamp(min=epsilon)).clamp(0.0, alpha)
    merged = (z * unique.to(wd) * lam.unsqueeze(-1)).sum(dim=0) \
        + (z * overlap.to(wd) / c.clamp(min=1).to(wd)).sum(dim=0)
    return b + merged.view(b.shape)


def merge(method: str, base: torch.Tensor, xs: Sequence[torch.Tensor], shared: dict,
          _checked: Optional[dict] = None) -> torch.Tensor:
    """One output tensor of ``method`` from the base and the non-base inputs."""
    p = _checked if _checked is not None else shared_values(method, shared)
    if method == "sce":
        return sce(base, xs, p["select_topk"])
    if method == "nearswap":
        return nearswap(p["t"], base, xs[0])
    if method == "arcee_fusion":
        return arcee_fusion(base, xs[0])
    if method == "ram":
        return ram(base, xs, p["epsilon"])
    if method == "ramplus_tl":
        return ram(base, xs, p["epsilon"], plus=True, r=p["r"], alpha=p["alpha"])
    raise ValueError(f"unknown method {method!r}")  # pragma: no cover
