"""The merge-method registry: one declaration per method, read by everything else.

Each :class:`Method` says what a merge method is (sparsifier, sign consensus, its
normalize/rescale defaults, whether it reads a base, how many non-base models it
takes), which parameters it reads (name, default, valid range, per model or shared),
which backends implement it and where it comes from. Readers:

* the config parser (``lfm_engine/merge/config.py``): accepted parameter names per
  level, required weights and bases, model counts;
* the tensor-level resolver (``lfm_engine/core/merge_methods.py``) and the planner and
  runner (``lfm_engine/merge/plan.py``, ``runner.py``): defaults and range checks;
* the CLI's ``lfm-engine merge --help`` (the method list);
* ``tools/gen_merge_tables.py``, which writes the method table of ``docs/merge.md`` and
  the C table ``csrc/kernels/merge/merge_methods_table.h`` the C ABI validates with
  (``tests/test_merge_registry.py`` fails when either is stale, and compares the
  compiled core's table, exported through ``_C.merge_method_table()``, with this one).

Adding a method: one ``Method(...)`` below, its kernel (a fused C++ sparsifier, or a
torch function in ``lfm_engine/merge/{geometric,elementwise}.py`` registered in
``runner._torch_method``), its tests, then ``python tools/gen_merge_tables.py``.

This module imports only the standard library, so the generator can load it
without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


class MergeConfigError(ValueError):
    """A merge parameter is invalid; the message names the parameter."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()   # a parameter default meaning "must be given"

# sparsifier names (docs/spec/merge.md "Sparsifiers")
SPARSIFY_NONE = "none"
SPARSIFY_MAGNITUDE = "magnitude"
SPARSIFY_RANDOM = "random"
SPARSIFY_MAGNITUDE_OUTLIERS = "magnitude_outliers"
SPARSIFY_DELLA = "della_magprune"

RESCALE_NONE = "none"
RESCALE_L1 = "l1"                              # spec: L1 norm matching
RESCALE_INVERSE_DENSITY = "inverse_density"    # PEFT / original DARE: kept / density

# how a method treats `base_model:`
BASE_REQUIRED = "required"   # the output is base-relative; a base must be given
BASE_OPTIONAL = "optional"   # task vectors against the base when one is given
BASE_NEVER = "never"         # the base is an ordinary input when listed, never subtracted

FUSED_BACKENDS = ("cpu", "cuda", "triton", "reference")   # lfm_engine.ops.merge's table
TORCH_BACKENDS = ("torch",)                                # torch ops on the tensors' device


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    kind: "float", "int", "bool" or "choice" (one of ``choices``; "rescale" also takes
    true/false). Range [lo, hi], an end open when ``lo_open``/``hi_open``; None = unbounded.
    per_model: read per input model (any level of the config) rather than shared
    (global or slice level). default: REQUIRED = must be given; None = absent is
    meaningful (the method's own behaviour, documented in ``doc``).
    config_required: a model config must give it although tensor-level calls default it
    (mergekit's rule for ``weight``).
    """
    name: str
    default: Any
    kind: str = "float"
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    per_model: bool = False
    config_required: bool = False
    choices: Tuple[str, ...] = ()
    doc: str = ""

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")

    def range_text(self) -> str:
        """The valid values, as the docs and the error messages write them."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return ", ".join(repr(c) if not isinstance(c, bool) else str(c).lower() for c in self.choices)
        if self.kind == "int" and self.lo is not None and self.hi is None:
            return f"an integer >= {_num(self.lo)}"
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo == 0 and self.lo_open and self.hi is None:
            return "a positive number"
        if self.lo is not None and self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return "a finite number"

    def _range_message(self, v, where: str) -> str:
        if self.lo is not None and self.hi is not None:
            return f"parameter '{self.name}'{where} must lie in {self.range_text()}, got {v!r}"
        return f"parameter '{self.name}'{where} must be {self.range_text()}, got {v!r}"

    def check(self, v, method: str, where: str = ""):
        """``v`` with the default applied, checked against the declared range.

        Returns the value as its kind (float/int/bool/str); None only for an absent
        parameter whose default is None. Raises MergeConfigError naming the parameter
        (``where``: e.g. " of model 2")."""
        if v is None:
            if self.default is REQUIRED:
                raise MergeConfigError(f"parameter '{self.name}' is required for {method}")
            v = self.default
            if v is None:
                return None
        if self.kind == "bool":
            if not isinstance(v, (bool, int)) or isinstance(v, float) or v not in (0, 1):
                raise MergeConfigError(f"parameter '{self.name}'{where} must be true or false, got {v!r}")
            return bool(v)
        if self.kind == "choice":
            if v not in self.choices:
                raise MergeConfigError(f"parameter '{self.name}'{where} must be {self.range_text()}, got {v!r}")
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeConfigError(f"parameter '{self.name}'{where} must be a finite number, got {v!r}")
        if self.kind == "int" and int(v) != v:
            raise MergeConfigError(self._range_message(v, where))
        lo_bad = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        hi_bad = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if lo_bad or hi_bad:
            raise MergeConfigError(self._range_message(v, where))
        return int(v) if self.kind == "int" else float(v)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Method:
    """One merge method (a row of docs/merge.md's table).

    models: (min, max) non-base models it merges (max None = any).
    code: its lfm_merge_method value in the C ABI (include/lfm/merge.h); None for the
    methods that run in torch.
    """
    name: str
    summary: str
    paper: str
    params: Tuple[Param, ...]
    backends: Tuple[str, ...]
    base: str = BASE_REQUIRED
    sparsifier: str = SPARSIFY_NONE
    consensus: bool = False
    normalize_default: bool = False
    rescale_default: bool = False
    models: Tuple[int, Optional[int]] = (1, None)
    code: Optional[int] = None
    _by_name: Dict[str, Param] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    @property
    def fused(self) -> bool:
        """Runs in the fused sparsify-and-merge kernels (C++/CUDA/Triton)."""
        return self.code is not None

    @property
    def uses_base(self) -> bool:
        """A tensor-level merge reads the base (linear: never)."""
        return self.base == BASE_REQUIRED

    @property
    def input_params(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params if p.per_model)

    @property
    def shared_params(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.params if not p.per_model)

    def param(self, name: str) -> Param:
        return self._by_name[name]

    def has(self, name: str) -> bool:
        return name in self._by_name

    def shared_values(self, shared: dict) -> dict:
        """Every shared parameter with its default applied and its range checked."""
        return {p.name: p.check(shared.get(p.name), self.name) for p in self.params if not p.per_model}

    def model_count_error(self, n: int) -> Optional[str]:
        lo, hi = self.models
        if hi == lo and n != lo:
            if lo == 1:
                return (f"{self.name} merges the base with exactly one other model, "
                        f"got {n} non-base models")
            return f"{self.name} needs exactly {_count(lo)} non-base models, got {n}"
        if n < lo:
            return f"{self.name} needs at least {_count(lo)} non-base model{'s' if lo > 1 else ''}, got {n}"
        if hi is not None and n > hi:
            return f"{self.name} takes at most {_count(hi)} non-base models, got {n}"
        return None


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


# ---------------------------------------------------------------------------- parameters
# The fused family's parameters; each default lives here and nowhere else.
WEIGHT = Param("weight", 1.0, per_model=True, config_required=True,
               doc="w_i; tensor-level calls default to 1, a model config must give it (as mergekit)")
DENSITY = Param("density", 1.0, lo=0.0, hi=1.0, per_model=True, doc="fraction of the task vector kept")
GAMMA = Param("gamma", 0.01, lo=0.0, hi=1.0, per_model=True,
              doc="breadcrumbs: fraction of the largest |delta| dropped")
EPSILON = Param("epsilon", 0.15, lo=0.0, per_model=True,
                doc="DELLA: keep probabilities span density -/+ epsilon (both in (0, 1))")
LAMBDA = Param("lambda", 1.0, doc="out = base + lambda * mixed")
INT8_MASK = Param("int8_mask", False, kind="bool", doc="accepted for mergekit; masks are never stored as floats")
CONSENSUS_WEIGHTING = Param("consensus_weighting", "weighted", kind="choice", choices=("weighted", "unweighted"),
                            doc="elect the sign of sum w_i d'_i (weighted) or of sum d'_i (PEFT)")
DISJOINT = Param("disjoint", "weight", kind="choice", choices=("weight", "count"),
                 doc="divide by the agreeing weights' sum (weight) or their count (PEFT)")

DEFAULT_WEIGHT = WEIGHT.default
DEFAULT_DENSITY = DENSITY.default
DEFAULT_GAMMA = GAMMA.default
DEFAULT_EPSILON = EPSILON.default
DEFAULT_LAMBDA = LAMBDA.default


def _normalize(default: bool) -> Param:
    return Param("normalize", default, kind="bool", doc="divide by the (agreeing) weights' sum")


def _rescale(default: bool) -> Param:
    return Param("rescale", RESCALE_L1 if default else RESCALE_NONE, kind="choice",
                 choices=(True, False, RESCALE_L1, RESCALE_INVERSE_DENSITY),
                 doc="L1 norm matching (true/l1), 1/density (inverse_density) or none")


def _fused(name, code, sparsifier, consensus, normalize, rescale, summary, paper) -> Method:
    extra = {SPARSIFY_MAGNITUDE_OUTLIERS: (GAMMA,), SPARSIFY_DELLA: (EPSILON,)}.get(sparsifier, ())
    params = (WEIGHT, DENSITY) + extra + (_normalize(normalize), _rescale(rescale), LAMBDA, INT8_MASK,
                                          CONSENSUS_WEIGHTING, DISJOINT)
    return Method(name, summary, paper, params, FUSED_BACKENDS, sparsifier=sparsifier, consensus=consensus,
                  normalize_default=normalize, rescale_default=rescale, code=code)


_TA = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708"
_DARE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
_BC = "Davari & Belilovsky 2024, Model Breadcrumbs, arXiv:2312.06795"
_DELLA = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617"
_MERGEKIT = "Goddard et al. 2024, Arcee's MergeKit, arXiv:2403.13257"

METHODS: Dict[str, Method] = {m.name: m for m in (
    _fused("task_arithmetic", 0, SPARSIFY_NONE, False, False, False,
           "b + λ Σ w_i δ_i", _TA),
    _fused("ties", 1, SPARSIFY_MAGNITUDE, True, True, False,
           "magnitude top-k, sign election, disjoint mean", _TIES),
    _fused("dare_linear", 2, SPARSIFY_RANDOM, False, False, True,
           "random keep (prob. = density), rescaled sum", _DARE),
    _fused("dare_ties", 3, SPARSIFY_RANDOM, True, False, True,
           "random keep, sign election", _DARE),
    _fused("breadcrumbs", 4, SPARSIFY_MAGNITUDE_OUTLIERS, False, False, False,
           "drop the γ·n largest and the smallest |δ|, keep density·n", _BC),
    _fused("breadcrumbs_ties", 5, SPARSIFY_MAGNITUDE_OUTLIERS, True, False, False,
           "breadcrumbs with sign election", _BC),
    _fused("della_linear", 6, SPARSIFY_DELLA, False, False, True,
           "per-row rank-based keep probability", _DELLA),
    _fused("della", 7, SPARSIFY_DELLA, True, True, True,
           "della_linear with sign election", _DELLA),
    # linear: out = sum w_i x_i (/ sum w_i); the base is not an input unless listed
    Method("linear", "Σ w_i x_i / Σ w_i", "Wortsman et al. 2022, Model soups, arXiv:2203.05482",
           (WEIGHT, _normalize(True)), FUSED_BACKENDS, base=BASE_NEVER, normalize_default=True, code=8),
    Method("slerp", "spherical interpolation of the base and one model", "Shoemake 1985, Animating rotation "
           "with quaternion curves (SIGGRAPH)",
           (Param("t", REQUIRED, lo=0.0, hi=1.0, doc="0 = the base, 1 = the model"),),
           TORCH_BACKENDS, models=(1, 1)),
    Method("nuslerp", "slerp of two models' task vectors, t = w_1 / (w_0 + w_1)", _MERGEKIT,
           (Param("weight", REQUIRED, per_model=True, config_required=True),
            Param("nuslerp_flatten", True, kind="bool", doc="one vector per tensor (else per row)"),
            Param("nuslerp_row_wise", False, kind="bool", doc="vectors along dim 0 when not flattened")),
           TORCH_BACKENDS, base=BASE_OPTIONAL, models=(2, 2)),
    Method("model_stock", "t·mean(x_i) + (1 − t)·b from the task vectors' mean cosine",
           "Jang et al. 2024, Model Stock, arXiv:2403.19522",
           (Param("filter_wise", False, kind="bool", doc="one t per row"),),
           TORCH_BACKENDS, models=(2, None)),
    Method("multislerp", "weighted spherical barycentre of the task vectors", _MERGEKIT,
           (Param("weight", REQUIRED, per_model=True, config_required=True),
            Param("normalize_weights", True, kind="bool"),
            Param("eps", 1e-8, lo=0.0, lo_open=True)),
           TORCH_BACKENDS, base=BASE_OPTIONAL, models=(1, None)),
    Method("karcher", "Riemannian (Karcher) mean on the sphere, rescaled", _MERGEKIT,
           (Param("max_iter", 10, kind="int", lo=1), Param("tol", 1e-5, lo=0.0, lo_open=True)),
           TORCH_BACKENDS, base=BASE_NEVER),
    Method("passthrough", "copies one input (times scale)", _MERGEKIT,
           (Param("scale", None, per_model=True, doc="absent: the tensor unchanged"),),
           TORCH_BACKENDS, base=BASE_NEVER, models=(1, 1)),
    Method("sce", "select by cross-model variance, weight by energy, erase minority signs",
           "Wan et al. 2024, FuseChat, arXiv:2408.07990",
           (Param("select_topk", 1.0, lo=0.0, hi=1.0), Param("int8_mask", False, kind="bool")),
           TORCH_BACKENDS),
    Method("nearswap", "take the model's value where it is within t of the base", _MERGEKIT,
           (Param("t", REQUIRED, lo=0.0),), TORCH_BACKENDS, models=(1, 1)),
    Method("arcee_fusion", "keep the changes whose KL-weighted importance is an outlier", _MERGEKIT,
           (), TORCH_BACKENDS, models=(1, 1)),
    Method("ram", "average each element over the models that change it", _MERGEKIT,
           (Param("epsilon", 1e-5, lo=0.0),), TORCH_BACKENDS),
    Method("ramplus_tl", "ram with the uniquely changed elements scaled up", _MERGEKIT,
           (Param("r", 0.1, lo=0.0), Param("alpha", 0.2, lo=0.0), Param("epsilon", 1e-5, lo=0.0)),
           TORCH_BACKENDS),
)}

ALL_METHODS: Tuple[str, ...] = tuple(METHODS)
FUSED_METHODS: Tuple[str, ...] = tuple(m for m in METHODS if METHODS[m].fused)
TORCH_METHODS: Tuple[str, ...] = tuple(m for m in METHODS if not METHODS[m].fused)

# Integer codes shared with the C ABI (include/lfm/merge.h: lfm_merge_method, lfm_rescale).
METHOD_CODES: Dict[str, int] = {m: METHODS[m].code for m in FUSED_METHODS}
RESCALE_CODES = {RESCALE_NONE: 0, RESCALE_L1: 1, RESCALE_INVERSE_DENSITY: 2}


def get(method: str) -> Method:
    """The registry entry of ``method``; MergeConfigError listing the known ones."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise MergeConfigError(f"unknown merge method '{method}' (known: {', '.join(sorted(METHODS))})") from None
