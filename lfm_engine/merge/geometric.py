"""Geometric merge methods in plain torch: slerp, nuslerp, model_stock, multislerp, karcher.

Why torch and not the C++ kernel: these methods need a global reduction over the
whole tensor (or a row) *before* any output element can be computed (norms, a dot
product, pairwise cosines), followed by one scaled sum. Both passes are a single
vectorised torch op each (matrix-vector dot, norm, ``addcmul``) that already runs
at memory bandwidth on all cores and on CUDA; there is no sparsification, sign
election or random mask to fuse, which is where the C++ kernels earn their keep.
The arithmetic is done in float32 (float64 for float64 inputs) and rounded once.

All functions take tensors of one shape and return a float32/float64 tensor of
that shape; the caller casts to the output dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def slerp(t: float, a: torch.Tensor, c: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors treated as flat vectors (docs/spec/merge.md).

    u = a/‖a‖, v = c/‖c‖ (a norm below eps counts as 1), dot = ⟨u, v⟩ clamped to
    [−1, 1]. If |dot| > 0.9995: out = (1−t)·a + t·c; else θ = acos(dot) and
    out = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · c. t = 0 gives a (the base).
    """
    wd = _work_dtype(a)
    af = a.reshape(-1).to(wd)
    cf = c.reshape(-1).to(wd)
    na = torch.linalg.vector_norm(af).item()
    nc = torch.linalg.vector_norm(cf).item()
    na = na if na > eps else 1.0
    nc = nc if nc > eps else 1.0
    dot = max(-1.0, min(1.0, (torch.dot(af, cf).item()) / (na * nc)))
    if abs(dot) > dot_threshold:
        ca, cc = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cc = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    out = af.mul(ca).add_(cf, alpha=cc)
    return out.reshape(a.shape)


def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise slerp along the last dim (rows of [..., n])."""
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= eps * eps
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    s_safe = torch.where(colinear, torch.ones_like(s), s)
    sph = (torch.sin((1.0 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s_safe
    lin = (1.0 - t) * v0 + t * v1
    return torch.where(colinear, lin, sph)


def nuslerp(w0: float, w1: float, x0: torch.Tensor, x1: torch.Tensor,
            base: torch.Tensor = None, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """nuslerp of two models with t = w1/(w0+w1) (t = 0.5 when |w0+w1| < 1e-6).

    With a base, the task vectors x_i − base are interpolated and the base is added
    back. ``flatten`` (default) treats the tensor as one vector; otherwise vectors
    run along the last dimension, or along dim 0 when ``row_wise`` (mergekit's
    naming: for a [out, in] weight, row_wise interpolates the columns). Colinear
    vectors (1 − cos² ≤ 1e-16) are interpolated linearly.
    """
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    wd = _work_dtype(x0)
    v0 = x0.to(wd)
    v1 = x1.to(wd)
    b = None
    if base is not None:
        b = base.to(wd)
        v0 = v0 - b
        v1 = v1 - b
    shape = v0.shape
    if flatten or v0.dim() == 0:
        out = _nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1))
    elif row_wise:
        out = _nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _nuslerp_vectors(t, v0, v1)
    out = out.reshape(shape)
    return out + b if b is not None else out


def model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: o_i = x_i − b, cosθ = mean pairwise cosine of the offsets,
    t = N·cosθ / (1 + (N−1)·cosθ), out = t·mean(x_i) + (1−t)·b = b + t·mean(o_i).

    ``filter_wise``: one cosθ (and t) per row of the last dimension (1-D tensors are
    one row); otherwise one for the whole tensor. Norm products are clamped to
    ≥ 1e-6 and cosines to [−1, 1]; where |1 + (N−1)cosθ| < 1e-6 the base is kept
    (t = 0), as mergekit does.

    Every cosine comes from one Gram matrix G = O·Oᵀ of the stacked offsets O [N, rows, cols]
    (‖o_i‖² = G_ii), so the inputs are read twice (offsets, then G and their mean) instead of
    once per pair and per norm.
    """
    n = len(xs)
    if n < 2:
        raise ValueError("model_stock needs at least two non-base tensors")
    wd = _work_dtype(base)
    shape = base.shape
    b = base.to(wd)
    rows = (b.shape[0] if b.dim() > 1 else 1) if filter_wise else 1
    b = b.reshape(rows, -1)
    offs = torch.empty((n,) + tuple(b.shape), dtype=wd, device=b.device)
    for i, x in enumerate(xs):
        torch.sub(x.to(wd).reshape(b.shape), b, out=offs[i])
    gram = torch.bmm(offs.transpose(0, 1), offs.permute(1, 2, 0))      # [rows, N, N]
    norms = torch.diagonal(gram, dim1=1, dim2=2).clamp(min=0).sqrt()      # [rows, N]
    iu = torch.triu_indices(n, n, offset=1, device=b.device)
    num = gram[:, iu[0], iu[1]]                                          # [rows, pairs]
    cos = (num / (norms[:, iu[0]] * norms[:, iu[1]]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    c = cos.mean(dim=1, keepdim=True)                                   # [rows, 1]
    den = 1.0 + (n - 1) * c
    sing = den.abs() < 1e-6
    t = torch.where(sing, torch.zeros_like(c), n * c / torch.where(sing, torch.ones_like(den), den))
    return torch.addcmul(b, t, offs.mean(dim=0)).reshape(shape)


def multislerp(weights: Sequence[float], xs: Sequence[torch.Tensor], base: torch.Tensor = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Weighted spherical barycentre of K tensors (each one flat vector), mergekit's multislerp.

    With a base, the task vectors v_i = x_i − base are used and the base is added back.
    w = weights (divided by their sum when ``normalize_weights``); u_i = v_i/(‖v_i‖+eps);
    m = Σ w_i u_i, μ = m/‖m‖; tangent g = Σ w_i (u_i − ⟨u_i, μ⟩ μ);
    r = μ cos‖g‖ + g sin‖g‖/‖g‖ (‖g‖ taken + eps); out = (Σ w_i ‖v_i‖) · r.
    One input returns it unchanged. If ‖m‖ < eps (weights cancel on antipodal inputs):
    two inputs fall back to w_0 v_0 + w_1 v_1, more inputs are an error.
    """
    if len(xs) == 1:
        return xs[0].to(_work_dtype(xs[0]))
    wd = _work_dtype(xs[0])
    shape = xs[0].shape
    b = base.to(wd).reshape(-1) if base is not None else None
    vs = [x.to(wd).reshape(-1) for x in xs]
    if b is not None:
        vs = [v - b for v in vs]
    w = [float(x) for x in weights]
    if normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    norms = [torch.linalg.vector_norm(v).item() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    m = torch.zeros_like(units[0])
    for wi, u in zip(w, units):
        m.add_(u, alpha=wi)
    mn = torch.linalg.vector_norm(m).item()
    if mn < eps:
        if len(vs) == 2:
            out = vs[0] * w[0] + vs[1] * w[1]
            return (out + b if b is not None else out).reshape(shape)
        raise ValueError("multislerp: the weighted sum of the unit task vectors is zero "
                         "(antipodal inputs with balancing weights); change the weights")
    mu = m / mn
    g = torch.zeros_like(mu)
    for wi, u in zip(w, units):
        g.add_(u - torch.dot(u, mu) * mu, alpha=wi)
    gn = torch.linalg.vector_norm(g).item() + eps
    r = mu * math.cos(gn) + g * (math.sin(gn) / gn)
    r = r * sum(wi * n for wi, n in zip(w, norms))
    if b is not None:
        r = r + b
    return r.reshape(shape)


def karcher(xs: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Equal-weight Karcher (Riemannian) mean on the unit sphere, rescaled (mergekit's karcher).

    Each tensor is one flat vector, α_i = 1/K. Directions u_i = x_i/‖x_i‖ of the inputs
    with ‖x_i‖ > tol (all zero -> zeros) are averaged: start at the normalised
    α-weighted mean (or u_0 if it vanishes), then up to ``max_iter`` times move along
    the mean log-map g = Σ α'_i θ_i/sin θ_i (u_i − cos θ_i μ) (θ_i = acos⟨μ, u_i⟩;
    terms with θ_i < tol skipped; α' renormalised over the kept inputs):
    μ ← cos‖g‖ μ + sin‖g‖ g/‖g‖, stopping when ‖g‖ < tol. out = (Σ α_i ‖x_i‖) μ.

    The unit vectors are one matrix U [K', n]: an iteration is two matrix-vector products
    (the cosines U·μ and the step Uᵀ·w) and one update of μ.
    """
    if len(xs) == 1:
        return xs[0].to(_work_dtype(xs[0]))
    wd = _work_dtype(xs[0])
    shape = xs[0].shape
    k = len(xs)
    alphas = [1.0 / k] * k
    vs = torch.empty((k, xs[0].numel()), dtype=wd, device=xs[0].device)
    for i, x in enumerate(xs):
        vs[i].copy_(x.reshape(-1))
    norms = torch.linalg.vector_norm(vs, dim=1).tolist()
    keep = [i for i in range(k) if norms[i] > tol]
    if not keep:
        return torch.zeros(shape, dtype=wd, device=xs[0].device)
    units = vs if len(keep) == k else vs[keep]
    units.div_(torch.tensor([norms[i] for i in keep], dtype=wd, device=vs.device).unsqueeze(1))
    a_sum = sum(alphas[i] for i in keep)
    a = [alphas[i] / a_sum for i in keep]
    a_t = torch.tensor(a, dtype=wd, device=vs.device)
    mu = a_t @ units
    mn = torch.linalg.vector_norm(mu).item()
    mu = units[0].clone() if mn < tol else mu.div_(mn)
    for _ in range(int(max_iter)):
        cs = [max(-1.0, min(1.0, c)) for c in (units @ mu).tolist()]
        # g = Σ c_i (u_i − cos θ_i μ), c_i = α'_i θ_i / sin θ_i over the terms with θ_i ≥ tol
        coef, mu_coef = [], 0.0
        for ai, c in zip(a, cs):
            th = math.acos(c)
            f = 0.0 if th < tol else ai * th / math.sin(th)
            coef.append(f)
            mu_coef -= f * c
        g = torch.tensor(coef, dtype=wd, device=vs.device) @ units
        g.add_(mu, alpha=mu_coef)
        gn = torch.linalg.vector_norm(g).item()
        if gn < tol:
            break
        mu = mu.mul_(math.cos(gn)).add_(g, alpha=math.sin(gn) / gn)
        un = torch.linalg.vector_norm(mu).item()
        if un > tol:
            mu.div_(un)
    scale = sum(al * n for al, n in zip(alphas, norms))
    return mu.mul_(scale).reshape(shape)