"""Merge planning: which output tensors, from which inputs, with which parameters.

:func:`build_plan` opens every model folder (headers only), checks architectures
and shapes, and produces one :class:`TensorTask` per output tensor with its
per-tensor parameters fully resolved (gradients and filters evaluated), so a
dry run reports every problem before anything is read or written.

Decisions (where docs/spec/merge.md is silent; mergekit 0.1.5 behaviour where it has one):

* The output layout (tensor names, shapes, config.json) is the base model's; with
  no base (linear, nuslerp without base) it is the first model's. Tensors that only
  other models have are ignored (one warning).
* A tensor missing from some models is merged from the models that have it, with
  a warning; if no non-base model has it, the base's tensor is copied. model_stock
  needs two non-base inputs and falls back to the base; nuslerp/slerp with an
  input missing pass the remaining model through (mergekit's policies).
* Embedding-like tensors (``embed_tokens``, ``lm_head``, ``wte``,
  ``word_embeddings``, ``embed_out``) of different vocabulary sizes are merged on
  their common sub-matrix (the leading rows/columns all inputs have); the rest of
  the output keeps the base (layout) model's values, so the output matches the
  base's config and tokenizer. A warning names the tensor. Any other shape
  mismatch is an error.
* Gradient position t: without slices t = layer/(num_layers − 1) (a 1-layer model
  has t = 1, as mergekit); with slices t runs over each slice's own layers, as in
  mergekit. Tensors outside the layers use t = 0 (the first value). Filters match
  the output tensor name.
* With slices, non-layer tensors whose names look like input embeddings are
  merged from the first slice's sources, all other non-layer tensors (final norm,
  lm_head) from the last slice's sources, as mergekit does.
* The per-model ``weight`` is required for methods that use it (as in mergekit).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lfm_engine.io import dtypes
from lfm_engine.io.dtypes import DType
from lfm_engine.io.model_folder import CheckpointError, ModelFolder
from lfm_engine.io.safetensors import TensorInfo
from lfm_engine.merge import config as C
from lfm_engine.merge import elementwise
from lfm_engine.core.merge_methods import MergeConfigError, resolve_merge_params
from lfm_engine.core.merge_registry import BASE_NEVER, BASE_OPTIONAL, BASE_REQUIRED, METHODS

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
EMBED_RE = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|embed_in)")
PRE_RE = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|embed_in)")
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim")


@dataclass
class Input:
    """One non-base input of one output tensor."""
    folder: str                 # absolute folder path (key of MergePlan.folders)
    info: TensorInfo
    position: int               # 0-based among the non-base inputs, config order
    params: Dict[str, object]   # resolved per-input parameters (weight, density, ...)
    ref: str = ""               # the model as the config names it (for messages)


@dataclass
class TensorTask:
    name: str
    shape: Tuple[int, ...]
    dtype: DType                    # output dtype (lfm_engine.io.dtypes)
    kind: str                       # "merge" or "copy"
    base: Optional[TensorInfo]      # base tensor (merge with a base) / copied tensor
    inputs: List[Input]
    shared: Dict[str, object]       # resolved shared parameters (normalize, t, ...)
    region: Optional[Tuple[int, ...]] = None   # common sub-shape if inputs differ in size
    fill: Optional[TensorInfo] = None   # no-base merge with a region: values outside it
    vocab: Optional[object] = None      # vocabulary re-mapping of the inputs (merge/vocab.py)

    def read_infos(self) -> List[TensorInfo]:
        out = [self.base] if self.base is not None else []
        out += [i.info for i in self.inputs]
        if self.fill is not None:
            out.append(self.fill)
        if self.vocab is not None:
            out += self.vocab.extra
        return out

    @property
    def out_nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class MergePlan:
    config: C.MergeConfig
    folders: Dict[str, ModelFolder]
    tasks: List[TensorTask]
    warnings: List[str]
    layout_path: str
    tokenizer_path: str
    num_layers_out: Optional[int]
    seed: int
    vocabulary: Optional[object] = None   # the merged vocabulary (merge/vocab.py), if any

    @property
    def output_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    @property
    def input_bytes(self) -> int:
        seen = set()
        tot = 0
        for t in self.tasks:
            for ti in t.read_infos():
                key = (ti.file, ti.start)
                if key not in seen:
                    seen.add(key)
                    tot += ti.nbytes
        return tot

    def describe(self) -> str:
        c = self.config
        n_merge = sum(t.kind == "merge" for t in self.tasks)
        lines = [f"method: {c.method}",
                 f"base: {c.base_ref or '(none)'}",
                 f"models: {len(self.folders)} folders",
                 f"output tensors: {len(self.tasks)} ({n_merge} merged, {len(self.tasks) - n_merge} copied)",
                 f"read: {fmt_bytes(self.input_bytes)}, write: {fmt_bytes(self.output_bytes)}",
                 f"tokenizer from: {self.tokenizer_path}",
                 f"seed: {self.seed}"]
        return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


class _Errors:
    """Collects messages, folding repeats of the same problem over many tensors."""

    def __init__(self):
        self.first: Dict[str, str] = {}
        self.count: Dict[str, int] = {}

    def add(self, key: str, msg: str):
        if key not in self.first:
            self.first[key] = msg
            self.count[key] = 0
        self.count[key] += 1

    def messages(self) -> List[str]:
        out = []
        for k, m in self.first.items():
            n = self.count[k]
            out.append(m + (f" (and {n - 1} more tensor{'s' if n > 2 else ''})" if n > 1 else ""))
        return out


def layer_index(name: str) -> Optional[int]:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    m = LAYER_RE.search(name)
    return name[:m.start(1)] + str(new_index) + name[m.end(1):]


def _sort_key(name: str):
    li = layer_index(name)
    if li is None:
        return (0 if PRE_RE.search(name) else 2, 0, name)
    return (1, li, name)


def _num_layers(folder: ModelFolder) -> int:
    cfg = folder.config or {}
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    if isinstance(n, int) and n > 0:
        return n
    idx = [layer_index(n) for n in folder.tensors]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


@dataclass
class _Src:
    """A model's part in one output tensor before tensor lookup."""
    folder: str
    tensor: str
    levels: List[Optional[dict]]    # parameter levels, highest precedence first
    position: int                   # -1 for the base


# one output tensor before lookup: (out_name, t, base _Src or None, [non-base _Src], shared levels)
_Group = Tuple[str, float, Optional[_Src], List[_Src], List[Optional[dict]]]


@dataclass
class _Planning:
    """State shared by build_plan's phases."""
    cfg: C.MergeConfig
    seed: int
    errors: _Errors = field(default_factory=_Errors)
    warnings: List[str] = field(default_factory=list)
    folders: Dict[str, ModelFolder] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)
    layout_path: str = ""
    uses_base: bool = False
    arch_bad: set = field(default_factory=set)
    missing_by_model: Dict[str, List[str]] = field(default_factory=dict)
    mismatch_warn: List[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.cfg.method

    def fail_if_errors(self) -> None:
        if self.errors.first:
            raise C.MergeConfigErrors(self.errors.messages())


def build_plan(cfg: C.MergeConfig, *, seed: Optional[int] = None) -> MergePlan:
    """Open the folders, check them and plan every output tensor; raise MergeConfigErrors.

    Phases: open the folders; layout and architecture checks; tensor groups (from
    ``models:`` or ``slices:``); one task per group (lookup, shapes, fallbacks,
    parameters); warnings; the tokenizer source."""
    st = _Planning(cfg, 0 if seed is None else int(seed))
    _open_folders(st)
    st.fail_if_errors()
    method, base_path = cfg.method, cfg.base_path
    # methods with an optional base use it when one is given; linear and karcher never do
    base_mode = METHODS[method].base
    st.uses_base = base_mode == BASE_REQUIRED or (base_mode == BASE_OPTIONAL and base_path is not None)
    _check_layout(st)
    groups, num_layers_out = _groups_from_models(st) if cfg.models is not None else _groups_from_slices(st)
    out_dtype_cfg = dtypes.from_name(cfg.output_dtype) if cfg.output_dtype else None
    tasks = [t for t in (_plan_group(st, g, out_dtype_cfg) for g in groups) if t is not None]
    _collect_warnings(st)
    tok_path = _tokenizer_path(st, tasks)
    if not tasks and not st.errors.first:
        st.errors.add("empty", "nothing to merge: the plan has no output tensors")
    st.fail_if_errors()
    return MergePlan(cfg, st.folders, tasks, st.warnings, st.layout_path, tok_path, num_layers_out, st.seed)


# ---- phase 1: folders

def _open_folders(st: _Planning) -> None:
    cfg = st.cfg

    def open_folder(ref: str, path: str, where: str) -> None:
        if path in st.folders:
            return
        try:
            st.folders[path] = ModelFolder(path)
            st.folders[path].ref = ref
            st.refs[path] = ref
        except CheckpointError as e:
            st.errors.add(f"open:{path}", f"{where}: {e}")

    if cfg.base_ref:
        open_folder(cfg.base_ref, cfg.base_path, "base_model")
    for m in cfg.models or []:
        open_folder(m.ref, m.path, m.where + ".model")
    for s in cfg.slices or []:
        for src in s.sources:
            open_folder(src.ref, src.path, src.where + ".model")


# ---- phase 2: layout + architecture

def _check_layout(st: _Planning) -> None:
    cfg, folders, refs = st.cfg, st.folders, st.refs
    if cfg.models is not None:
        st.layout_path = cfg.base_path if cfg.base_path else cfg.models[0].path
    else:
        st.layout_path = cfg.base_path if cfg.base_path else cfg.slices[0].sources[0].path
    layout_path = st.layout_path
    layout = folders[layout_path]
    if layout.config is None:
        st.errors.add("cfg:layout", f"{refs[layout_path]}: no config.json (needed for the output model)")
    lcfg = layout.config or {}
    for path, fo in folders.items():
        if path == layout_path or fo.config is None:
            continue
        for k in ARCH_KEYS:
            if k in lcfg and k in fo.config and lcfg[k] != fo.config[k]:
                st.arch_bad.add(path)
                st.errors.add(f"arch:{path}:{k}",
                              f"architecture mismatch: {refs[path]} has {k}={fo.config[k]!r} but "
                              f"{refs[layout_path]} has {k}={lcfg[k]!r}")
        if cfg.slices is None:
            a, b = _num_layers(layout), _num_layers(fo)
            if a != b:
                st.errors.add(f"arch:{path}:layers",
                              f"architecture mismatch: {refs[path]} has {b} layers but "
                              f"{refs[layout_path]} has {a} (use `slices:` to pick layer ranges)")


# ---- phase 3: groups (one per output tensor)

def _groups_from_models(st: _Planning) -> Tuple[List[_Group], int]:
    cfg, gparams, base_path = st.cfg, st.cfg.parameters, st.cfg.base_path
    nonbase = [m for m in cfg.models if not (st.uses_base and m.path == base_path)]
    if METHODS[cfg.method].base == BASE_NEVER:
        nonbase = list(cfg.models)  # the base is an input only when listed (spec: linear)
    layout = st.folders[st.layout_path]
    L = _num_layers(layout)
    groups: List[_Group] = []
    for name in sorted(layout.tensors, key=_sort_key):
        li = layer_index(name)
        t = 0.0 if li is None else (li / (L - 1) if L > 1 else 1.0)
        base = _Src(base_path, name, [gparams], -1) if st.uses_base else None
        srcs = [_Src(m.path, name, [m.parameters, gparams], i) for i, m in enumerate(nonbase)]
        groups.append((name, t, base, srcs, [gparams]))
    return groups, L


def _groups_from_slices(st: _Planning) -> Tuple[List[_Group], int]:
    cfg, gparams, method = st.cfg, st.cfg.parameters, st.cfg.method
    per_slice = []
    for s in cfg.slices:
        sbase_ref = s.base_ref or cfg.base_ref
        sbase_path = C._resolve_path(sbase_ref, os.path.dirname(cfg.origin) if cfg.origin else None) if sbase_ref else None
        base_src = None
        if st.uses_base:
            cands = [src for src in s.sources if src.path == sbase_path]
            if not cands:
                st.errors.add(f"slice:{s.where}",
                              f"{s.where}: the base model ({sbase_ref}) must be one of the slice's "
                              f"sources for method '{method}'")
                per_slice.append(None)
                continue
            base_src = cands[0]
        nonbase = [src for src in s.sources if src is not base_src]
        per_slice.append((s, base_src, nonbase))
    st.fail_if_errors()

    def slice_srcs(entry, name_of):
        s, base_src, nonbase = entry
        base = (_Src(base_src.path, name_of(base_src), [base_src.parameters, s.parameters, gparams], -1)
                if base_src else None)
        srcs = [_Src(src.path, name_of(src), [src.parameters, s.parameters, gparams], i)
                for i, src in enumerate(nonbase)]
        return base, srcs, [s.parameters, gparams]

    groups: List[_Group] = []
    layout = st.folders[st.layout_path]
    non_layer = sorted((n for n in layout.tensors if layer_index(n) is None), key=_sort_key)
    for name in non_layer:
        if PRE_RE.search(name):
            base, srcs, shared = slice_srcs(per_slice[0], lambda src: name)
            groups.append((name, 0.0, base, srcs, shared))
    out_layer = 0
    for entry in per_slice:
        s, base_src, nonbase = entry
        ref_src = base_src or s.sources[0]
        ref_folder = st.folders[ref_src.path]
        n = ref_src.layer_range[1] - ref_src.layer_range[0]
        for src in s.sources:
            nl = _num_layers(st.folders[src.path])
            if src.layer_range[1] > nl:
                st.errors.add(f"range:{src.where}",
                              f"{src.where}.layer_range: {list(src.layer_range)} is beyond the "
                              f"{nl} layers of {src.ref}")
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            src_layer = ref_src.layer_range[0] + j
            names = sorted((nm for nm in ref_folder.tensors if layer_index(nm) == src_layer), key=_sort_key)
            for nm in names:
                out_name = rename_layer(nm, out_layer)

                def name_of(src, nm=nm, j=j):
                    return rename_layer(nm, src.layer_range[0] + j)
                base, srcs, shared = slice_srcs(entry, name_of)
                groups.append((out_name, t, base, srcs, shared))
            out_layer += 1
    for name in non_layer:
        if not PRE_RE.search(name):
            base, srcs, shared = slice_srcs(per_slice[-1], lambda src: name)
            groups.append((name, 0.0, base, srcs, shared))
    return groups, out_layer


# ---- phase 4: one task per group

def _plan_group(st: _Planning, group: _Group, out_dtype_cfg) -> Optional[TensorTask]:
    """The task of one output tensor, or None (reported, or nothing to write)."""
    out_name, t, base, srcs, shared_levels = group
    folders, refs, method = st.folders, st.refs, st.method
    lay_info = None
    if base is not None:
        lay_info = folders[base.folder].tensors.get(base.tensor)
        if lay_info is None:
            st.missing_by_model.setdefault(base.folder, []).append(base.tensor)
            return None
    present = []
    for s in srcs:
        ti = folders[s.folder].tensors.get(s.tensor)
        if ti is None:
            st.missing_by_model.setdefault(s.folder, []).append(s.tensor)
        else:
            present.append((s, ti))
    if lay_info is None:
        # no base: the layout model's tensor defines the output (first present input)
        lay = [ti for s, ti in present if s.folder == st.layout_path] or [ti for _, ti in present]
        if not lay:
            return None
        lay_info = lay[0]
    shape = lay_info.shape
    is_float = lay_info.dtype.is_floating_point
    out_dtype = (out_dtype_cfg or lay_info.dtype) if is_float else lay_info.dtype

    def copy_task(info):
        return TensorTask(out_name, shape, out_dtype if is_float else info.dtype, "copy", info, [], {}, None)

    if not is_float:
        return copy_task(lay_info)
    region_t, ok = _common_region(st, out_name, shape, base, present)
    if not ok:
        return None
    # fallbacks for missing inputs
    need = max(1, METHODS[method].models[0]) if st.uses_base else 1
    if method == "nuslerp" and len(present) == 1:
        return copy_task(present[0][1])
    if st.uses_base and len(present) < need:
        return copy_task(lay_info)

    # parameters
    inputs = []
    for s, ti in present:
        params = {}
        for p in C.INPUT_PARAMS[method]:
            v = C.lookup(p, s.levels, out_name, t)
            if v is None and p == "weight":
                st.errors.add(f"weight:{s.folder}",
                              f"no 'weight' for model {refs[s.folder]} at tensor '{out_name}' "
                              f"(method '{method}' needs one for every model and tensor)")
            params[p] = v
        inputs.append(Input(s.folder, ti, s.position, params, refs[s.folder]))
    shared = {p: C.lookup(p, shared_levels, out_name, t) for p in C.SHARED_PARAMS[method]}
    task = TensorTask(out_name, shape, out_dtype, "merge",
                      folders[base.folder].tensors[base.tensor] if base is not None else None,
                      inputs, shared, region_t,
                      fill=lay_info if (base is None and region_t is not None) else None)
    try:
        validate_task(method, task, st.seed)
    except MergeConfigError as e:
        # the messages name the model by its config reference (model_names passed down)
        st.errors.add(f"param:{e}", f"'{out_name}': {e}")
        return None
    return task


def _common_region(st: _Planning, out_name: str, shape, base, present) -> Tuple[Optional[tuple], bool]:
    """(common sub-shape when an embedding-like input differs in size, else None; False when
    a shape mismatch was reported)."""
    refs = st.refs
    region = list(shape)
    bad = False
    for s, ti in present:
        if ti.shape == shape:
            continue
        if EMBED_RE.search(out_name) and len(ti.shape) == len(shape):
            region = [min(a, b) for a, b in zip(region, ti.shape)]
            st.mismatch_warn.append(f"{out_name}: {refs[s.folder]} has shape {list(ti.shape)}, "
                                    f"{refs[st.layout_path] if base is None else refs[base.folder]} has "
                                    f"{list(shape)}")
        elif s.folder in st.arch_bad:
            bad = True  # already reported as an architecture mismatch
        else:
            st.errors.add(f"shape:{s.folder}",
                          f"shape mismatch for '{out_name}': {refs[s.folder]} has {list(ti.shape)}, "
                          f"{refs[base.folder] if base else refs[st.layout_path]} has {list(shape)}")
            bad = True
    if bad:
        return None, False
    # any input of another size -> every input is cut to the common region
    region_t = tuple(region) if any(ti.shape != shape for _, ti in present) else None
    if region_t is not None and any(r == 0 for r in region_t):
        st.errors.add(f"shape0:{out_name}", f"'{out_name}': inputs have no common sub-matrix")
        return None, False
    return region_t, True


# ---- phase 5: warnings, tokenizer

def _collect_warnings(st: _Planning) -> None:
    refs, layout = st.refs, st.folders[st.layout_path]
    for path, names in st.missing_by_model.items():
        st.warnings.append(f"{refs[path]} lacks {len(names)} tensor(s) (first: '{names[0]}'); "
                           f"they are merged from the models that have them")
    if st.mismatch_warn and st.cfg.tokenizer is None:  # with a tokenizer section: re-mapped
        st.warnings.append(f"{len(st.mismatch_warn)} embedding tensor(s) differ in vocabulary size; "
                           f"merging their common sub-matrix and keeping the "
                           f"base's other rows: " + "; ".join(st.mismatch_warn[:4]))
    for path, fo in st.folders.items():
        if path == st.layout_path or st.cfg.slices is not None:
            continue
        extra = [n for n in fo.tensors if n not in layout.tensors]
        if extra:
            st.warnings.append(f"{refs[path]} has {len(extra)} tensor(s) the output layout lacks "
                               f"(first: '{extra[0]}'); they are ignored")


def _tokenizer_path(st: _Planning, tasks: List[TensorTask]) -> str:
    """The folder whose tokenizer files the output gets when its vocabulary is unchanged:
    the base's (the layout model's), or a `tokenizer_source` model's; merge/vocab.py
    re-maps the embeddings when the vocabulary differs."""
    spec = st.cfg.tokenizer
    return spec.source_path if spec is not None and spec.is_model else st.layout_path


def task_merge_kwargs(method: str, task: TensorTask, seed: int) -> dict:
    """Keyword arguments of lfm_engine.merge_tensors for a fused-family task. Models are
    named by their config reference in every message (``model_names``)."""
    sh = task.shared

    def per(p):
        vals = [i.params.get(p) for i in task.inputs]
        if all(v is None for v in vals):
            return None   # merge_tensors applies the registry default
        dflt = METHODS[method].param(p).default
        return [dflt if v is None else v for v in vals]

    kw = dict(method=method, weights=per("weight"), normalize=_as_bool(sh.get("normalize"), "normalize"),
              seed=seed, name=task.name, model_positions=[i.position for i in task.inputs],
              model_names=[i.ref or os.path.dirname(i.info.file) for i in task.inputs])
    for key, p in (("density", "density"), ("gamma", "gamma"), ("epsilon", "epsilon")):
        if METHODS[method].has(p):
            kw[key] = per(p)
    for key, p in (("rescale", "rescale"), ("lam", "lambda"), ("consensus_weighting", "consensus_weighting"),
                   ("disjoint", "disjoint")):
        if sh.get(p) is not None:
            kw[key] = float(sh[p]) if key == "lam" else sh[p]
    return kw


def _as_bool(v, name):
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    raise MergeConfigError(f"parameter '{name}' must be true or false, got {v!r}")


def validate_task(method: str, task: TensorTask, seed: int) -> None:
    """Check the resolved parameters of one task against the registry (raises MergeConfigError)."""
    spec = METHODS[method]
    if spec.fused:
        kw = task_merge_kwargs(method, task, seed)
        kw.pop("method")
        resolve_merge_params(method, len(task.inputs), **kw)
        return
    spec.shared_values(task.shared)
    for p in spec.params:
        if p.per_model:
            for i in task.inputs:
                p.check(i.params.get(p.name), method, f" of model {i.ref}" if i.ref else "")
    if method == "multislerp" and spec.shared_values(task.shared)["normalize_weights"]:
        if abs(sum(float(i.params["weight"]) for i in task.inputs)) < 1e-12:
            raise MergeConfigError("multislerp: the weights sum to 0 and cannot be normalised")
