"""Plain-torch reference of the task-vector merge family and linear (docs/spec/merge.md).

This is the *definition* the CPU, CUDA and Triton backends are tested against. It
favours clarity over speed (stable sorts, float64 everywhere after selection), but
stays vectorised so tests can use tensors of a few million elements.

Shapes: ``base`` and every ``others[i]`` have the same shape (any ndim, contiguous or
not); "flat index" always means the row-major index in that logical shape. K =
len(others) = params.n_models. The result has the same shape.

Definitions (docs/spec/merge.md, plus the decisions the spec leaves open, marked *):

1. Task vector, in float32*:  delta_i = float32(x_i) - float32(b), one fp32 rounding.
   Every backend uses exactly this, so the selections below see the same |delta_i|
   bits and masks are bit-identical across backends. (Inputs may be fp32, fp16, bf16
   or fp64 and may differ from each other; fp64 inputs are rounded to fp32 first.)
2. Sparsify each delta_i on its own, by the method's sparsifier, with the model's
   density d, gamma g, epsilon eps. The keep decision is made on the float32 |delta_i|:
   - magnitude: d >= 1 keeps all, d <= 0 keeps nothing, otherwise keep exactly the
     k = max(1, floor(d*n)) entries of largest |delta|; ties at the k-th value: lower
     flat index wins. floor(d*n) is one IEEE double multiply, then floor*.
   - magnitude_outliers: target = floor(d*n), n_top = floor(g*n),
     n_bot = max(0, n - target - n_top); order entries by (|delta|, flat index)
     ascending, keep order positions n_bot .. n_bot+target-1. (d = 1 gives target = n,
     n_bot = 0: keeps all.)
   - random (DARE): keep e iff draw(e) < floor(d * 2^32) (philox.py), stream
     stream_id(params.name, params.model_positions[i]), key params.seed.
   - della_magprune: rows* are the whole tensor for ndim <= 1, else the view
     [shape[0], n / shape[0]] (one row per output feature of a Linear weight). Within a
     row rank by (|delta|, column) ascending, rank 1..cols; rank_norm =
     (rank - 1) / (cols - 1) in double (0 when cols == 1); p = (d - eps) +
     (2.0 * eps) * rank_norm, evaluated in double in exactly that order*; keep e iff
     draw(e) < floor(p * 2^32), e the flat index in the whole tensor, same stream rule
     as DARE.
   - none (task_arithmetic, linear): density, gamma, epsilon and rescale are unused*.
3. From here on everything is float64: delta'_i = float64(delta_i) * keep_i, then
   rescale (only for methods with a sparsifier*):
   - "l1": delta'_i *= (||delta_i||_1 / ||delta'_i||_1), the ratio formed first, both
     norms float64 sums; skipped when either norm < 1e-7.
   - "inverse_density": delta'_i *= (1.0 / d_i); skipped when d_i == 0.
   - "none": nothing.
4. t_i = w_i * delta'_i.
5. Consensus (ties, dare_ties, breadcrumbs_ties, della):
   consensus_weighting "weighted": S = sum_i t_i, and entry i takes part where
   sign(t_i) == s; "unweighted" (PEFT): S = sum_i delta'_i, entry i takes part where
   sign(delta'_i) == s. s = +1 where S >= 0 else -1, sign(0) = 0 (zeros never take
   part). mixed = sum_i m_i t_i; divisor = sum_i m_i w_i (disjoint "weight") or
   sum_i m_i (disjoint "count"); |divisor| < 1e-8 -> 1*. (The spec says divisor == 0
   -> 1; with negative weights the agreeing weights can cancel to ~1e-17, and dividing
   by that explodes the entry, so the same 1e-8 guard as without consensus applies.)
   Without consensus: mixed = sum_i t_i, divisor = sum_i w_i (a scalar; ``disjoint``
   is unused*), |divisor| < 1e-8 -> 1. All sums run over i = 0 .. K-1 in order.
6. If params.normalize: mixed = mixed / divisor.
7. out = float64(b) + lam * mixed, rounded once (correctly, round-to-nearest-even,
   directly from float64*) to out_dtype.

linear: out = (sum_i w_i * x_i) / W with W = sum_i w_i when normalize (|W| < 1e-8 ->
W = 1), else sum_i w_i * x_i; computed in float64 from the inputs, rounded once.
``base`` may be None and, if given, is not an input (spec: put it among ``others``
to include it); lam is unused*.

out_dtype defaults to base.dtype (linear without a base: others[0].dtype).

Bad input raises ValueError/TypeError naming the problem: base missing for a method
that needs it, wrong number of models, shape/device mismatch, non-floating dtypes, and
NaN or infinite input values* (a checkpoint with non-finite weights is corrupt; merging
it would silently produce garbage, and the sparsifiers' order is undefined on NaN).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from lfm_engine.core.merge_methods import (
    RESCALE_INVERSE_DENSITY,
    RESCALE_L1,
    RESCALE_NONE,
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_MAGNITUDE_OUTLIERS,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    MergeParams,
)
from lfm_engine.reference.philox import keep_mask_np, keep_threshold, philox_draws, stream_id

__all__ = [
    "merge_tensors_reference",
    "task_vector",
    "sparsify_mask",
    "magnitude_mask",
    "magnitude_outliers_mask",
    "random_mask",
    "della_mask",
    "della_keep_probabilities",
    "della_rows",
    "round_from_float64",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_L1_SKIP = 1e-7
_DIVISOR_EPS = 1e-8


# ---------------------------------------------------------------------------
# rounding


def round_from_float64(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` once, round-to-nearest-even.

    torch converts float64 to fp16/bf16 through float32, which rounds twice (e.g.
    1 + 2^-8 + 2^-40 becomes bf16 1.0 instead of 1.0078125). To round once we first
    round to float32 *to odd* (truncate toward zero, set the last bit when inexact):
    float32 keeps >= 2 more bits than fp16/bf16, so the final RNE step is then exact.
    """
    if x.dtype != torch.float64:
        raise TypeError(f"round_from_float64 expects float64, got {x.dtype}")
    if dtype == torch.float64:
        return x.clone()
    f = x.to(torch.float32)
    if dtype == torch.float32:
        return f
    f64 = f.to(torch.float64)
    # Truncate toward zero: where RNE rounded away from zero, step one float toward 0.
    away = f64.abs() > x.abs()
    f = torch.where(away, torch.nextafter(f, torch.zeros_like(f)), f)
    inexact = f.to(torch.float64) != x
    bits = f.view(torch.int32)
    bits = torch.where(inexact & torch.isfinite(f), bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


# ---------------------------------------------------------------------------
# task vector and sparsifiers (all on float32 deltas; masks are bool, same shape)


def task_vector(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """delta = float32(x) - float32(base): the engine's task vector (one fp32 rounding)."""
    return x.to(torch.float32) - base.to(torch.float32)


def _floor_mul(d: float, n: int) -> int:
    """floor(d * n) with one IEEE double multiply (what every backend computes)."""
    return int(math.floor(float(d) * float(n)))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, floor(d*n)) largest |delta|; ties: lower flat index wins."""
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool)
    if density <= 0.0 or n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    k = min(n, max(1, _floor_mul(density, n)))
    key = -delta.reshape(-1).abs()  # exact negation; ascending stable sort = largest first,
    order = torch.sort(key, stable=True).indices  # equal values in index order
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(delta.shape)


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the n_bot smallest and the largest n - n_bot - target |delta|."""
    n = delta.numel()
    target = n if density >= 1.0 else max(0, _floor_mul(density, n))
    n_top = max(0, _floor_mul(gamma, n))
    n_bot = max(0, n - target - n_top)
    mask = torch.zeros(n, dtype=torch.bool)
    if target > 0:
        order = torch.sort(delta.reshape(-1).abs(), stable=True).indices  # (|delta|, index)
        mask[order[n_bot:n_bot + target]] = True
    return mask.reshape(delta.shape)


def random_mask(shape, density: float, seed: int, stream: int) -> torch.Tensor:
    """DARE: keep e iff draw(e) < floor(d * 2^32)."""
    n = math.prod(shape)
    thr = keep_threshold(density)
    if thr >= 1 << 32:
        return torch.ones(shape, dtype=torch.bool)
    if thr <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    keep = keep_mask_np(philox_draws(seed, stream, n), thr)
    return torch.from_numpy(keep).reshape(shape)


def della_rows(shape) -> tuple:
    """(rows, cols) of the DELLA ranking view: ndim <= 1 -> (1, n), else (shape[0], n/shape[0])."""
    n = math.prod(shape)
    if len(shape) <= 1 or shape[0] == 0:
        return 1, n
    return shape[0], n // shape[0]


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """float64 tensor (shape of delta): p = (d - eps) + (2.0*eps) * (rank - 1)/(cols - 1)."""
    rows, cols = della_rows(tuple(delta.shape))
    a = delta.reshape(rows, cols).abs()
    order = torch.sort(a, dim=1, stable=True).indices  # (|delta|, column) ascending
    ranks = torch.empty((rows, cols), dtype=torch.int64)
    ranks.scatter_(1, order, torch.arange(1, cols + 1, dtype=torch.int64).expand(rows, cols))
    if cols > 1:
        rank_norm = (ranks - 1).to(torch.float64) / float(cols - 1)
    else:
        rank_norm = torch.zeros((rows, cols), dtype=torch.float64)
    lo = float(density) - float(epsilon)
    span = 2.0 * float(epsilon)
    return (lo + span * rank_norm).reshape(delta.shape)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, seed: int,
               stream: int) -> torch.Tensor:
    """DELLA MAGPRUNE: keep e iff draw(e) < floor(p(e) * 2^32)."""
    n = delta.numel()
    if n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool)
    p = della_keep_probabilities(delta, density, epsilon).reshape(-1)
    # p lies in (0, 1) (checked by resolve_merge_params); clamp so a hand-built
    # MergeParams cannot make thresholds leave [0, 2^32].
    thr = torch.floor(p.clamp(0.0, 1.0) * 4294967296.0).to(torch.int64).numpy()
    keep = keep_mask_np(philox_draws(seed, stream, n), thr)
    return torch.from_numpy(keep).reshape(delta.shape)


def sparsify_mask(delta: torch.Tensor, params: MergeParams, i: int) -> Optional[torch.Tensor]:
    """The keep mask of model i's float32 task vector, or None when nothing is dropped."""
    sp = params.spec.sparsifier
    d = params.densities[i]
    if sp == SPARSIFY_NONE:
        return None
    if sp == SPARSIFY_MAGNITUDE:
        return magnitude_mask(delta, d)
    if sp == SPARSIFY_MAGNITUDE_OUTLIERS:
        return magnitude_outliers_mask(delta, d, params.gammas[i])
    sid = stream_id(params.name, params.model_positions[i])
    if sp == SPARSIFY_RANDOM:
        return random_mask(tuple(delta.shape), d, params.seed, sid)
    if sp == SPARSIFY_DELLA:
        return della_mask(delta, d, params.epsilons[i], params.seed, sid)
    raise ValueError(f"unknown sparsifier '{sp}'")


# ---------------------------------------------------------------------------
# validation


def _check_inputs(base: Optional[torch.Tensor], others: Sequence[torch.Tensor],
                  params: MergeParams, out_dtype) -> tuple:
    if not isinstance(params, MergeParams):
        raise TypeError(
            f"params must be a MergeParams (use resolve_merge_params), got {type(params).__name__}")
    if isinstance(others, torch.Tensor) or not isinstance(others, (list, tuple)):
        raise TypeError("others must be a list or tuple of tensors")
    if len(others) == 0:
        raise ValueError("no models to merge: 'others' is empty")
    if len(others) != params.n_models:
        raise ValueError(
            f"params describe {params.n_models} models but {len(others)} tensors were given")
    uses_base = params.spec.uses_base
    if base is None and uses_base:
        raise ValueError(f"method '{params.method}' needs a base tensor, got None")
    named = ([("base", base)] if base is not None else []) + \
        [(params.model_label(i), x) for i, x in enumerate(others)]
    ref_name, ref = named[0]
    for label, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} is not a tensor ({type(t).__name__})")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{label} has dtype {t.dtype}; expected float16, bfloat16, "
                            "float32 or float64")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{label} has shape {tuple(t.shape)} but {ref_name} has "
                             f"{tuple(ref.shape)}")
        if t.device != ref.device:
            raise ValueError(f"{label} is on {t.device} but {ref_name} is on {ref.device}")
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).reshape(-1).nonzero()[0])
            raise ValueError(f"{label} holds a non-finite value (NaN or inf) at flat index {bad}")
    if out_dtype is None:
        out_dtype = ref.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    return out_dtype, ref


# ---------------------------------------------------------------------------
# merge


def _linear(others: Sequence[torch.Tensor], params: MergeParams) -> torch.Tensor:
    acc = torch.zeros(others[0].shape, dtype=torch.float64)
    for w, x in zip(params.weights, others):
        acc += float(w) * x.to(torch.float64)
    if params.normalize:
        wsum = 0.0
        for w in params.weights:
            wsum += float(w)
        if abs(wsum) < _DIVISOR_EPS:
            wsum = 1.0
        acc = acc / wsum
    return acc


def _rescale(kept: torch.Tensor, delta: torch.Tensor, params: MergeParams, i: int) -> torch.Tensor:
    if params.rescale == RESCALE_L1:
        full = float(delta.to(torch.float64).abs().sum())
        now = float(kept.abs().sum())
        if full >= _L1_SKIP and now >= _L1_SKIP:
            return kept * (full / now)
        return kept
    if params.rescale == RESCALE_INVERSE_DENSITY:
        d = float(params.densities[i])
        return kept * (1.0 / d) if d != 0.0 else kept
    if params.rescale == RESCALE_NONE:
        return kept
    raise ValueError(f"unknown rescale '{params.rescale}'")


def _task_family(base: torch.Tensor, others: Sequence[torch.Tensor],
                 params: MergeParams) -> torch.Tensor:
    spec = params.spec
    K = len(others)
    kept: List[torch.Tensor] = []  # delta'_i, float64
    for i, x in enumerate(others):
        delta = task_vector(x, base)
        mask = sparsify_mask(delta, params, i)
        d64 = delta.to(torch.float64)
        if mask is not None:
            d64 = torch.where(mask, d64, torch.zeros((), dtype=torch.float64))
            d64 = _rescale(d64, delta, params, i)
        kept.append(d64)
    weights = [float(w) for w in params.weights]
    t = [w * dk for w, dk in zip(weights, kept)]

    if spec.consensus:
        votes = t if params.consensus_weighting == "weighted" else kept
        S = votes[0].clone()
        for i in range(1, K):
            S += votes[i]
        one = torch.ones((), dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float64)
        elected = torch.where(S >= 0, one, -one)
        mixed = torch.zeros_like(S)
        divisor = torch.zeros_like(S)
        for i in range(K):
            m = torch.sign(votes[i]) == elected  # sign(0) = 0 never equals +-1
            mixed += torch.where(m, t[i], zero)
            share = weights[i] if params.disjoint == "weight" else 1.0
            divisor += torch.where(m, torch.tensor(share, dtype=torch.float64), zero)
        divisor = torch.where(divisor.abs() < _DIVISOR_EPS, one, divisor)
    else:
        mixed = t[0].clone()
        for i in range(1, K):
            mixed += t[i]
        wsum = 0.0
        for w in weights:
            wsum += w
        divisor = 1.0 if abs(wsum) < _DIVISOR_EPS else wsum

    if params.normalize:
        mixed = mixed / divisor
    return base.to(torch.float64) + float(params.lam) * mixed


def merge_tensors_reference(base: Optional[torch.Tensor], others: Sequence[torch.Tensor],
                            params: MergeParams, out_dtype: Optional[torch.dtype] = None
                            ) -> torch.Tensor:
    """Merge one tensor exactly as docs/spec/merge.md defines it (see the module docstring).

    base: tensor of shape S (None only for ``linear``); others: K tensors of shape S;
    params: from ``resolve_merge_params`` (K models); out_dtype: default base.dtype
    (linear without base: others[0].dtype). Returns a new tensor of shape S and
    out_dtype on the inputs' device.
    """
    out_dtype, ref = _check_inputs(base, others, params, out_dtype)
    device = ref.device
    base_c = base.detach().cpu() if base is not None else None
    others_c = [x.detach().cpu() for x in others]
    if ref.numel() == 0:
        return torch.empty(ref.shape, dtype=out_dtype, device=device)
    if params.method == "linear":
        out64 = _linear(others_c, params)
    else:
        out64 = _task_family(base_c, others_c, params)
    return round_from_float64(out64, out_dtype).to(device)
