"""Merge methods, their defaults, and resolution of user parameters.

This is the one place that knows spec/merge.md's method table. Every backend
(C++ CPU, CUDA, Triton, the plain-torch reference) receives a fully resolved,
validated :class:`MergeParams`, so defaults and checks are never duplicated.

Parameter vocabulary follows mergekit: per-model ``weight``, ``density``,
``gamma`` (breadcrumbs), ``epsilon`` (DELLA); global ``normalize``, ``rescale``,
``lambda`` (``lam`` here, ``lambda`` is a Python keyword).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

# sparsifier names (spec/merge.md "Sparsifiers")
SPARSIFY_NONE = "none"
SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"
SPARSIFY_MAGNITUDE_OUTLIERS = "magnitude_outliers"
SPARSIFY_DELLA = "della_magprune"

RESCALE_NONE = "none"
RESCALE_L1 = "l1"                      # spec: L1 norm matching
RESCALE_INVERSE_DENSITY = "inverse_density"  # PEFT / original DARE: kept / density


@dataclass(frozen=True)
class MethodSpec:
    """One row of spec/merge.md's method table."""
    name: str
    sparsifier: str
    consensus: bool
    normalize_default: bool
    rescale_default: bool
    uses_base: bool = True


METHODS = {
    m.name: m
    for m in (
        MethodSpec("task_arithmetic", SPARSIFY_NONE, False, False, False),
        MethodSpec("ties", SPARSIFY_MAGNITUDE, True, True, False),
        MethodSpec("dare_linear", SPARSIFY_RANDOM, False, False, True),
        MethodSpec("dare_ties", SPARSIFY_RANDOM, True, False, True),
        MethodSpec("breadcrumbs", SPARSIFY_MAGNITUDE_OUTLIERS, False, False, False),
        MethodSpec("breadcrumbs_ties", SPARSIFY_MAGNITUDE_OUTLIERS, True, False, False),
        MethodSpec("della_linear", SPARSIFY_DELLA, False, False, True),
        MethodSpec("della", SPARSIFY_DELLA, True, True, True),
        # linear: out = sum w_i x_i (/ sum w_i); the base is not an input.
        MethodSpec("linear", SPARSIFY_NONE, False, True, False, uses_base=False),
    )
}

# Integer codes shared with the C ABI (include/lfm/merge.h: lfm_merge_method).
METHOD_CODES = {
    "task_arithmetic": 0, "ties": 1, "dare_linear": 2, "dare_ties": 3,
    "breadcrumbs": 4, "breadcrumbs_ties": 5, "della_linear": 6, "della": 7,
    "linear": 8,
}
RESCALE_CODES = {RESCALE_NONE: 0, RESCALE_L1: 1, RESCALE_INVERSE_DENSITY: 2}

DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15

PerModel = Union[None, float, int, Sequence[float]]


class MergeConfigError(ValueError):
    """A merge parameter is invalid; the message names the parameter."""


@dataclass(frozen=True)
class MergeParams:
    """Fully resolved parameters of one tensor merge (K = number of models).

    weights, densities, gammas, epsilons: length-K tuples of floats.
    model_positions: length-K tuple, the model's 0-based index among the
    non-base inputs in config order (selects its Philox stream, spec "Randomness").
    consensus_weighting: "weighted" (spec: elect the sign of sum_i w_i*delta'_i) or
    "unweighted" (PEFT: elect on sum_i delta'_i).
    disjoint: "weight" (spec: divide by sum of agreeing weights) or "count"
    (PEFT: divide by the number of agreeing entries).
    """
    method: str
    weights: tuple
    densities: tuple
    gammas: tuple
    epsilons: tuple
    normalize: bool
    rescale: str
    lam: float
    seed: int
    name: str
    model_positions: tuple
    consensus_weighting: str = "weighted"
    disjoint: str = "weight"

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def n_models(self) -> int:
        return len(self.weights)


def _per_model(value: PerModel, n: int, default: Optional[float], pname: str) -> tuple:
    if value is None:
        if default is None:
            raise MergeConfigError(f"parameter '{pname}' is required")
        value = default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = [float(value)] * n
    else:
        try:
            vals = [float(v) for v in value]  # type: ignore[union-attr]
        except TypeError:
            raise MergeConfigError(
                f"parameter '{pname}' must be a number or a list of {n} numbers, got {value!r}"
            ) from None
        if len(vals) != n:
            raise MergeConfigError(
                f"parameter '{pname}' has {len(vals)} values but there are {n} models"
            )
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise MergeConfigError(f"parameter '{pname}' of model {i} is not finite ({v})")
    return tuple(vals)


def _resolve_rescale(rescale, default: bool) -> str:
    if rescale is None:
        return RESCALE_L1 if default else RESCALE_NONE
    if rescale is True:
        return RESCALE_L1
    if rescale is False:
        return RESCALE_NONE
    if isinstance(rescale, str) and rescale in RESCALE_CODES:
        return rescale
    raise MergeConfigError(
        f"parameter 'rescale' must be true, false, 'l1' or 'inverse_density', got {rescale!r}"
    )


def resolve_merge_params(
    method: str,
    n_models: int,
    *,
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    epsilon: PerModel = None,
    normalize: Optional[bool] = None,
    rescale=None,
    lam: float = 1.0,
    seed: int = 0,
    name: str = "",
    model_positions: Optional[Sequence[int]] = None,
    consensus_weighting: str = "weighted",
    disjoint: str = "weight",
) -> MergeParams:
    """Apply spec defaults and check every parameter; raise MergeConfigError naming it.

    ``weights`` defaults to 1.0 per model at tensor level (a model config must give
    them explicitly, as in mergekit). ``density`` defaults to 1.0, ``gamma`` to 0.01,
    ``epsilon`` to 0.15; ``normalize``/``rescale`` None mean the method's default.
    """
    if method not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise MergeConfigError(f"unknown merge method '{method}' (known: {known})")
    spec = METHODS[method]
    if n_models < 1:
        raise MergeConfigError("no models to merge: the model list is empty")
    w = _per_model(weights, n_models, 1.0, "weight")
    d = _per_model(density, n_models, 1.0, "density")
    g = _per_model(gamma, n_models, DEFAULT_GAMMA, "gamma")
    e = _per_model(epsilon, n_models, DEFAULT_EPSILON, "epsilon")
    for i, di in enumerate(d):
        if not 0.0 <= di <= 1.0:
            raise MergeConfigError(f"parameter 'density' of model {i} must lie in [0, 1], got {di}")
    if spec.sparsifier == SPARSIFY_MAGNITUDE_OUTLIERS:
        for i, gi in enumerate(g):
            if not 0.0 <= gi <= 1.0:
                raise MergeConfigError(f"parameter 'gamma' of model {i} must lie in [0, 1], got {gi}")
    if spec.sparsifier == SPARSIFY_DELLA:
        for i, (di, ei) in enumerate(zip(d, e)):
            if ei < 0.0:
                raise MergeConfigError(f"parameter 'epsilon' of model {i} must be >= 0, got {ei}")
            if not (0.0 < di - ei < 1.0 and 0.0 < di + ei < 1.0):
                raise MergeConfigError(
                    f"invalid della epsilon for model {i}: density - epsilon = {di - ei:g} and "
                    f"density + epsilon = {di + ei:g} must both lie in (0, 1)")
    if normalize is None:
        normalize = spec.normalize_default
    if not isinstance(normalize, (bool, int)):
        raise MergeConfigError(f"parameter 'normalize' must be true or false, got {normalize!r}")
    rs = _resolve_rescale(rescale, spec.rescale_default)
    lam = float(lam)
    if not math.isfinite(lam):
        raise MergeConfigError(f"parameter 'lambda' is not finite ({lam})")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise MergeConfigError(f"seed must lie in [0, 2^64), got {seed}")
    if model_positions is None:
        positions = tuple(range(n_models))
    else:
        positions = tuple(int(p) for p in model_positions)
        if len(positions) != n_models or any(p < 0 or p > 255 for p in positions):
            raise MergeConfigError(
                f"model_positions must hold {n_models} integers in [0, 255], got {model_positions!r}")
    if consensus_weighting not in ("weighted", "unweighted"):
        raise MergeConfigError(
            f"consensus_weighting must be 'weighted' or 'unweighted', got {consensus_weighting!r}")
    if disjoint not in ("weight", "count"):
        raise MergeConfigError(f"disjoint must be 'weight' or 'count', got {disjoint!r}")
    return MergeParams(
        method=method, weights=w, densities=d, gammas=g, epsilons=e,
        normalize=bool(normalize), rescale=rs, lam=lam, seed=seed, name=str(name),
        model_positions=positions, consensus_weighting=consensus_weighting, disjoint=disjoint,
    )
