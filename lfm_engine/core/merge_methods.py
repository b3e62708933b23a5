"""Merge methods, their defaults, and resolution of user parameters.

The method table itself is lfm_engine/core/merge_registry.py; this module turns a
call's parameters into one fully resolved, validated :class:`MergeParams`, which every
backend of the fused family (C++ CPU, CUDA, Triton, the plain-torch reference)
receives, so defaults and checks are never duplicated.

Parameter vocabulary follows mergekit: per-model ``weight``, ``density``,
``gamma`` (breadcrumbs), ``epsilon`` (DELLA); global ``normalize``, ``rescale``,
``lambda`` (``lam`` here, ``lambda`` is a Python keyword).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from lfm_engine.core.merge_registry import (  # noqa: F401  (re-exported: the names callers use)
    DEFAULT_DENSITY,
    DEFAULT_EPSILON,
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    DEFAULT_WEIGHT,
    FUSED_METHODS,
    METHOD_CODES,
    RESCALE_CODES,
    RESCALE_INVERSE_DENSITY,
    RESCALE_L1,
    RESCALE_NONE,
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_MAGNITUDE_OUTLIERS,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    CONSENSUS_WEIGHTING,
    DENSITY,
    DISJOINT,
    EPSILON,
    GAMMA,
    Method,
    MergeConfigError,
)
from lfm_engine.core.merge_registry import METHODS as _ALL

MethodSpec = Method   # the registry entry (older name)
# the methods merge_tensors runs: the fused sparsify-and-merge family (registry order)
METHODS = {m: _ALL[m] for m in FUSED_METHODS}

PerModel = Union[None, float, int, Sequence[float]]


@dataclass(frozen=True)
class MergeParams:
    """Fully resolved parameters of one tensor merge (K = number of models).

    weights, densities, gammas, epsilons: length-K tuples of floats.
    model_positions: length-K tuple, the model's 0-based index among the
    non-base inputs in config order (selects its Philox stream, docs/spec/merge.md "Randomness").
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
    model_names: tuple = ()   # how messages name the models (default "model <index>")

    def model_label(self, i: int) -> str:
        return model_label(i, self.model_names)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def n_models(self) -> int:
        return len(self.weights)


def model_label(i: int, names: Sequence[str] = ()) -> str:
    """How an error names model i: ``model <name>`` when names were passed down (a
    model-level merge passes the config's references), else ``model <i>``."""
    return f"model {names[i]}" if i < len(names) else f"model {i}"


def _per_model(value: PerModel, n: int, p, names: Sequence[str] = ()) -> tuple:
    """K values of per-model parameter ``p`` (a registry Param): default applied, each
    finite and inside p's declared range."""
    pname = p.name
    if value is None:
        value = p.default
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
            raise MergeConfigError(f"parameter '{pname}' of {model_label(i, names)} is not finite ({v})")
    return tuple(vals)


def _check_range(p, vals: tuple, names: Sequence[str]) -> None:
    for i, v in enumerate(vals):
        p.check(v, "", f" of {model_label(i, names)}")


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
    lam: float = DEFAULT_LAMBDA,
    seed: int = 0,
    name: str = "",
    model_positions: Optional[Sequence[int]] = None,
    consensus_weighting: str = CONSENSUS_WEIGHTING.default,
    disjoint: str = DISJOINT.default,
    model_names: Optional[Sequence[str]] = None,
) -> MergeParams:
    """Apply the registry's defaults and check every parameter; raise MergeConfigError naming it.

    ``weights`` defaults to 1.0 per model at tensor level (a model config must give
    them explicitly, as in mergekit); ``density``, ``gamma``, ``epsilon`` default to
    their registry values (lfm_engine/core/merge_registry.py); ``normalize``/``rescale``
    None mean the method's default. ``model_names`` (one per model) name the models in
    messages instead of their index.
    """
    if method not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise MergeConfigError(f"unknown merge method '{method}' (known: {known})")
    spec = METHODS[method]
    if n_models < 1:
        raise MergeConfigError("no models to merge: the model list is empty")
    names = tuple(str(x) for x in model_names) if model_names is not None else ()
    if names and len(names) != n_models:
        raise MergeConfigError(f"model_names has {len(names)} names but there are {n_models} models")
    w = _per_model(weights, n_models, spec.param("weight"), names)
    d = _per_model(density, n_models, DENSITY, names)
    g = _per_model(gamma, n_models, GAMMA, names)
    e = _per_model(epsilon, n_models, EPSILON, names)
    _check_range(DENSITY, d, names)
    if spec.has("gamma"):
        _check_range(GAMMA, g, names)
    if spec.sparsifier == SPARSIFY_DELLA:
        _check_range(EPSILON, e, names)
        for i, (di, ei) in enumerate(zip(d, e)):
            if not (0.0 < di - ei < 1.0 and 0.0 < di + ei < 1.0):
                raise MergeConfigError(
                    f"invalid della epsilon for {model_label(i, names)}: density - epsilon = {di - ei:g} and "
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
    if consensus_weighting not in CONSENSUS_WEIGHTING.choices:
        raise MergeConfigError(
            f"consensus_weighting must be 'weighted' or 'unweighted', got {consensus_weighting!r}")
    if disjoint not in DISJOINT.choices:
        raise MergeConfigError(f"disjoint must be 'weight' or 'count', got {disjoint!r}")
    return MergeParams(
        method=method, weights=w, densities=d, gammas=g, epsilons=e,
        normalize=bool(normalize), rescale=rs, lam=lam, seed=seed, name=str(name),
        model_positions=positions, consensus_weighting=consensus_weighting, disjoint=disjoint,
        model_names=names,
    )
