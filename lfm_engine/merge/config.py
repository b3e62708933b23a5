"""mergekit-style YAML merge configurations: parsing, validation, parameter lookup.

Accepted vocabulary (mergekit's, docs/spec/merge.md)::

    merge_method: ties                 # one of ALL_METHODS
    base_model: path/to/base           # local folder, hub id org/name[@rev], or MODEL+LORA
    models:                            # or `slices:` (not both)
      - model: path/to/ft1
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    slices:
      - sources:
          - model: path/to/a
            layer_range: [0, 16]
            parameters: {...}
        parameters: {...}
        base_model: path/to/a           # optional, per-slice base
    parameters: {normalize: true, lambda: 1.0, ...}   # global
    dtype: bfloat16                    # output dtype unless out_dtype is given
    out_dtype: bfloat16
    tokenizer_source: union            # union | base | a model: merged vocabulary (.vocab)
    tokenizer: {source: union, tokens: {...}, pad_to_multiple_of: 64}   # newer spelling
    chat_template: chatml              # a name, `auto` or a Jinja template (.chat_template)

Several YAML documents (mergekit-multi) are run by :mod:`.stages`; this parser takes
one. Parameters some other method uses are dropped with one warning per name; numeric
strings (``1e-8``) are numbers; the YAML itself is read with bounds
(:mod:`.yaml_load`). Definitions and decisions: docs/spec/merge.md.

A parameter value is a scalar, a gradient list of numbers (interpolated
piecewise-linearly at t), or a list of ``{filter, value}`` entries (first entry
whose filter is a substring of the tensor name wins; an entry without filter, or
with filter ``*``, matches everything; ``value`` may itself be a gradient).
Precedence, highest first: slice-source, slice, model, global. A level whose
filter list matches nothing for a tensor does not define the parameter for that
tensor, and the next level is consulted (mergekit does the same).

Every problem found is collected and raised together as one
:class:`MergeConfigErrors` (a :class:`MergeConfigError` carrying ``.errors``), each
message naming the key path (``models[1].parameters.densty``) or the file.

Relative model paths are resolved against the current directory first (as
mergekit does) and, failing that, against the folder of the YAML file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from lfm_engine.core import merge_registry as R
from lfm_engine.core.merge_registry import ALL_METHODS, FUSED_METHODS, METHODS, MergeConfigError, TORCH_METHODS
from lfm_engine.io import dtypes as _dt
from lfm_engine.merge import chat_template, hub, lora_ref, vocab_config
from lfm_engine.merge.yaml_load import YamlLimitError, load_documents

# Everything below is read from the method registry (lfm_engine/core/merge_registry.py).
TASK_METHODS = tuple(m for m in FUSED_METHODS if METHODS[m].uses_base)   # fused task-vector family
# parameters read per input model (may appear at any level) and shared ones
# (global or slice level only), by method
INPUT_PARAMS: Dict[str, tuple] = {m: METHODS[m].input_params for m in ALL_METHODS}
SHARED_PARAMS: Dict[str, tuple] = {m: METHODS[m].shared_params for m in ALL_METHODS}
# every parameter name some method reads: one a method does not use is ignored with a
# warning (mergekit ignores it silently), any other name is an error
KNOWN_PARAMS = frozenset(p for d in (INPUT_PARAMS, SHARED_PARAMS) for ps in d.values() for p in ps)
NUMERIC_PARAMS = frozenset(p.name for m in METHODS.values() for p in m.params if p.numeric)
# methods whose per-model `weight` must be given explicitly (as in mergekit)
WEIGHT_REQUIRED = tuple(m for m in ALL_METHODS if METHODS[m].has("weight")
                        and METHODS[m].param("weight").config_required)
BASE_REQUIRED = tuple(m for m in ALL_METHODS if METHODS[m].base == R.BASE_REQUIRED)
EMBED_SLERP = "embed_slerp"   # accepted, no effect (see _Parse.unused_warnings)

# YAML dtype:/out_dtype: spellings -> canonical name (the one table: lfm_engine/io/dtypes.py)
DTYPES = {**{d.name: d.name for d in _dt.KERNEL_FLOATS + (_dt.FLOAT64,)},
          **{a: n for a, n in _dt.ALIASES.items() if n in ("float32", "float16", "bfloat16", "float64")}}

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
             "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
_UNSUPPORTED_TOP = {
    "modules": "multi-module (`modules:`) configs are not supported; use `models:` or `slices:`",
}
# keys only mergekit-moe configs have (mergekit/moe/config.py)
MOE_KEYS = ("gate_mode", "experts", "experts_per_token", "shared_experts", "residual_scale",
            "architecture")


class MergeConfigErrors(MergeConfigError):
    """All problems found in a merge configuration (``.errors``: list of messages)."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        self.partial: Optional["MergeConfig"] = None  # set by parse_config, see there
        n = len(self.errors)
        head = f"{n} problem{'s' if n != 1 else ''} in the merge configuration:"
        super().__init__("\n".join([head] + [f"  - {e}" for e in self.errors]))


Setting = Any  # scalar | list[number] | list[{filter, value}]


@dataclass
class Source:
    """One input: a model folder, optionally a layer range, its own parameters."""
    ref: str                         # as written in the YAML
    path: str                        # absolute path
    parameters: Dict[str, Setting]
    where: str                       # key path for messages, e.g. "models[2]"
    layer_range: Optional[tuple] = None


@dataclass
class Slice:
    sources: List[Source]
    parameters: Dict[str, Setting]
    base_ref: Optional[str]
    where: str


@dataclass
class MergeConfig:
    method: str
    base_ref: Optional[str]
    base_path: Optional[str]
    models: Optional[List[Source]]
    slices: Optional[List[Slice]]
    parameters: Dict[str, Setting]
    dtype: Optional[str]
    out_dtype: Optional[str]
    tokenizer_source: Optional[str]     # None (copy the base's files), "union", "base" or a model ref
    raw: dict
    yaml_text: str
    origin: Optional[str] = None
    warnings: List[str] = field(default_factory=list)   # e.g. parameters the method ignores
    chat_template: Optional[str] = None   # a name, `auto` or a literal (see .chat_template)
    tokenizer: Optional[vocab_config.TokenizerSpec] = None   # the vocabulary to build (.vocab)

    @property
    def output_dtype(self) -> Optional[str]:
        return self.out_dtype or self.dtype


# --------------------------------------------------------------------------- values

def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_NUMERIC_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def as_number(value):
    """A numeric string (YAML 1.1 reads ``1e-8`` and ``5e-1`` as strings) as a float;
    anything else unchanged. Integral values written with an exponent (``1e3``) become ints."""
    if isinstance(value, str) and _NUMERIC_RE.fullmatch(value.strip()):
        f = float(value)
        if "." not in value and f.is_integer() and abs(f) < 2**63:
            return int(f)
        return f
    return value


def coerce_numbers(value):
    """``as_number`` applied through a setting (scalars, gradient lists, filter entries)."""
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: (coerce_numbers(v) if k == "value" else v) for k, v in value.items()}
    return as_number(value)


def check_setting(value, where: str, errors: List[str]) -> None:
    """Validate the shape of a parameter setting (not its range)."""
    if isinstance(value, (int, float, bool, str)):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            errors.append(f"{where}: empty list")
            return
        if all(isinstance(v, (int, float, bool, str)) for v in value):
            if len(value) > 1 and not all(_is_num(v) for v in value):
                errors.append(f"{where}: a gradient list must hold numbers, got {value!r}")
            return
        for i, ent in enumerate(value):
            if not isinstance(ent, dict):
                errors.append(f"{where}[{i}]: expected a number or {{filter, value}}, got {ent!r}")
                continue
            for k in ent:
                if k not in ("filter", "value"):
                    errors.append(f"{where}[{i}]: unknown key '{k}'"
                                  + vocab_config.suggest(k, ("filter", "value")))
            if "value" not in ent:
                errors.append(f"{where}[{i}]: missing 'value'")
            else:
                v = ent["value"]
                if isinstance(v, (dict,)) or (isinstance(v, list) and not all(_is_num(x) for x in v)):
                    errors.append(f"{where}[{i}].value: must be a scalar or a list of numbers")
                elif isinstance(v, list) and not v:
                    errors.append(f"{where}[{i}].value: empty list")
            if "filter" in ent and ent["filter"] is not None and not isinstance(ent["filter"], str):
                errors.append(f"{where}[{i}].filter: must be a string")
        return
    errors.append(f"{where}: unsupported value {value!r}")


def _gradient(values: Sequence[float], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    scaled = min(max(t, 0.0), 1.0) * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1.0 - frac) * float(values[i0]) + frac * float(values[i1])


def evaluate_setting(value: Setting, tensor_name: str, t: float):
    """Value of a setting for one tensor at gradient position t; None if no filter matches."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if all(isinstance(v, (int, float, bool, str)) for v in value):
            return _gradient(value, t) if all(_is_num(v) for v in value) else value[0]
        for ent in value:
            filt = ent.get("filter")
            if filt is None or filt == "*" or filt in tensor_name:
                return evaluate_setting(ent["value"], tensor_name, t)
        return None
    return value


def lookup(name: str, levels: Sequence[Optional[dict]], tensor_name: str, t: float):
    """First level (highest precedence first) that yields a value for ``name``."""
    for lvl in levels:
        if lvl and name in lvl:
            v = evaluate_setting(lvl[name], tensor_name, t)
            if v is not None:
                return v
    return None


# --------------------------------------------------------------------------- parsing

def _check_keys(mapping: dict, allowed, where: str, errors: List[str]) -> None:
    """Report every key of `mapping` outside `allowed` as '<where>.<key>: unknown key'."""
    for k in mapping:
        if k not in allowed:
            errors.append(f"{where}.{k}: unknown key" + vocab_config.suggest(k, allowed))


def _resolve_path(ref: str, origin_dir: Optional[str]) -> str:
    """Absolute folder of a model reference: a local path (against the current directory,
    then the config's folder), else a hub id's snapshot in the Hugging Face cache (see
    :mod:`.hub`); an unresolvable reference gives a path that does not exist, which the
    files phase reports (with the hub's reason for hub ids)."""
    parts = lora_ref.split(ref)
    if parts is not None:
        model, lora = (_resolve_path(x, origin_dir) for x in parts)
        if os.path.isdir(model) and os.path.isdir(lora):
            return lora_ref.overlay(model, lora)
        return os.path.abspath(ref)   # reported by _quick_folder_check
    p = os.path.expanduser(ref)
    if os.path.isabs(p) or os.path.exists(p):
        return os.path.abspath(p)
    if origin_dir is not None and os.path.exists(os.path.join(origin_dir, p)):
        return os.path.abspath(os.path.join(origin_dir, p))
    if hub.parse_hub_ref(ref) is not None:
        try:
            return hub.resolve(ref)
        except hub.HubError:
            pass  # reported by _quick_folder_check
    return os.path.abspath(p)


class _Parse:
    """State shared by the parsing phases: the messages and what they need to know."""

    def __init__(self, origin: Optional[str]):
        self.errors: List[str] = []
        self.unused: Dict[str, List[str]] = {}      # parameter -> where it was given
        self.origin_dir = os.path.dirname(origin) if origin else None
        self.method: Optional[str] = None
        self.int8_mask: List[str] = []               # where int8_mask was given
        self.embed_slerp: List[str] = []             # where embed_slerp was given

    def unused_warnings(self) -> List[str]:
        out = []
        if self.embed_slerp:
            out.append(f"embed_slerp (given in {', '.join(self.embed_slerp[:3])}) has no effect: as in "
                       f"mergekit 0.1.5, the re-mapped embed_tokens/lm_head rows are merged by the "
                       f"config's method itself (slerp for slerp); older mergekit used it to slerp "
                       f"embeddings that it otherwise averaged")
        if self.int8_mask:
            out.append(f"int8_mask (given in {', '.join(self.int8_mask[:3])}) has no effect: it only "
                       f"changes mergekit's mask storage; masks here are never materialised as floats")
        for k, wheres in self.unused.items():
            more = f" and {len(wheres) - 3} more" if len(wheres) > 3 else ""
            out.append(f"parameter '{k}' is not used by method '{self.method}' and is ignored "
                       f"(given in {', '.join(wheres[:3])}{more})")
        return out


def _check_params(params, where: str, level: str, st: _Parse) -> dict:
    """Validate one `parameters:` mapping; numeric strings become numbers.

    A name no method knows is an error (with a suggestion); a name another method
    uses is dropped with one warning per name (as mergekit, which ignores it); a
    shared parameter below slice level is an error saying where it belongs.
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        st.errors.append(f"{where}: must be a mapping of parameter names to values")
        return {}
    method = st.method
    inp = INPUT_PARAMS.get(method, ()) if method else ()
    sh = SHARED_PARAMS.get(method, ()) if method else ()
    allowed = set(inp) | (set(sh) if level in ("global", "slice") else set())
    out = {}
    for k, v in params.items():
        if k == EMBED_SLERP:
            # older mergekit's switch for the embeddings of a tokenizer merge; accepted with
            # a note wherever mergekit 0.1.5 accepts (and ignores) it: global or slice level
            if level not in ("global", "slice"):
                st.errors.append(f"{where}.{k}: set it under the top-level (or slice) `parameters:`")
            elif not isinstance(v, bool):
                st.errors.append(f"{where}.{k}: must be true or false, got {v!r}")
            else:
                st.embed_slerp.append(f"{where}.{k}")
            continue
        if method is not None and k not in allowed:
            if k in sh:
                st.errors.append(f"{where}.{k}: '{k}' is a global parameter of '{method}'; "
                                 f"set it under the top-level (or slice) `parameters:`")
            elif k in KNOWN_PARAMS:
                st.unused.setdefault(k, []).append(f"{where}.{k}")
            else:
                known = sorted(allowed) or ["(none)"]
                st.errors.append(f"{where}.{k}: unknown parameter for method '{method}'"
                                 + vocab_config.suggest(k, set(inp) | set(sh) | KNOWN_PARAMS)
                                 + f" (accepted here: {', '.join(known)})")
            continue
        v = coerce_numbers(v)
        check_setting(v, f"{where}.{k}", st.errors)
        if k == "int8_mask":
            st.int8_mask.append(f"{where}.{k}")
        if k in NUMERIC_PARAMS:
            bad = [x for x in _scalars(v) if not _is_num(x)]
            if bad:
                st.errors.append(f"{where}.{k}: must be a number, got {bad[0]!r}")
        out[k] = v
    return out


def _scalars(value):
    """The scalar values a setting can evaluate to (filter entries' values included)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                if not isinstance(v.get("value"), dict):
                    yield from _scalars(v.get("value", 0.0))  # a missing value is reported elsewhere
            else:
                yield from _scalars(v)
    else:
        yield value


def _parse_model_ref(entry, where: str, errors: List[str]) -> Optional[str]:
    if isinstance(entry, dict):
        errors.append(f"{where}: expected a path string, got a mapping")
        return None
    if not isinstance(entry, str) or not entry.strip():
        errors.append(f"{where}: expected a model folder path, got {entry!r}")
        return None
    if "+" in entry and not os.path.exists(entry) and lora_ref.split(entry) is None:
        errors.append(f"{where}: '{entry}': expected MODEL+LORA with both parts given")
        return None
    return entry


# ---- phase 1: text -> one mapping

def _load_raw(config) -> Tuple[dict, str, Optional[str]]:
    """(mapping, YAML text, absolute config path or None) of a path, YAML text or dict."""
    if isinstance(config, dict):
        return config, yaml.safe_dump(config, sort_keys=False), None
    s = os.fspath(config)
    origin = None
    if "\n" not in s and (s.endswith((".yml", ".yaml")) or os.path.isfile(s)):
        if not os.path.isfile(s):
            raise MergeConfigErrors([f"config file '{s}' does not exist"])
        origin = os.path.abspath(s)
        try:
            with open(s, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MergeConfigErrors([f"{s}: cannot read the config: {e}"]) from None
    else:
        text = s
    name = origin or "config"
    try:
        docs = load_documents(text)
    except YamlLimitError as e:
        raise MergeConfigErrors([f"{name}: refused: {e}"]) from None
    except yaml.YAMLError as e:
        raise MergeConfigErrors([f"{name}: invalid YAML: {e}"]) from None
    if len(docs) > 1:
        raise MergeConfigErrors([_multi_document_message(name, docs)])
    raw = docs[0] if docs else None
    if not isinstance(raw, dict):
        raise MergeConfigErrors(["the configuration must be a YAML mapping (merge_method: ..., models: ...)"])
    return raw, text, origin


def _multi_document_message(name: str, docs: list) -> str:
    stages = [str(d.get("name")) if isinstance(d, dict) and d.get("name") is not None
              else f"#{i + 1} (unnamed)" for i, d in enumerate(docs)]
    return (f"{name}: holds {len(docs)} YAML documents (stages: {', '.join(stages)}): multi-stage "
            f"configs (mergekit-multi) are not supported yet; run each stage as its own "
            f"`lfm-engine merge` with a single-document config, later stages naming the "
            f"earlier outputs' folders")


# ---- phase 2: top-level keys, method, dtypes, tokenizer

def _check_top(raw: dict, st: _Parse) -> None:
    moe = [k for k in MOE_KEYS if k in raw]
    if moe:
        raise MergeConfigErrors([
            f"this is a mergekit-moe config (keys: {', '.join(moe)}); use `lfm-engine moe "
            f"CONFIG OUT_DIR` (`lfm-engine merge` takes mergekit-yaml configs)"])
    for k in raw:
        if k in _UNSUPPORTED_TOP:
            st.errors.append(f"{k}: {_UNSUPPORTED_TOP[k]}")
        elif k not in _TOP_KEYS:
            st.errors.append(f"{k}: unknown key" + vocab_config.suggest(k, _TOP_KEYS + tuple(_UNSUPPORTED_TOP)))
    method = raw.get("merge_method")
    if method is None:
        st.errors.append("merge_method: missing (one of: " + ", ".join(ALL_METHODS) + ")")
    elif not isinstance(method, str) or method not in ALL_METHODS:
        st.errors.append(f"merge_method: unknown method '{method}'" + vocab_config.suggest(method, ALL_METHODS)
                         + " (supported: " + ", ".join(ALL_METHODS) + ")")
        method = None
    st.method = method


def _parse_dtypes(raw: dict, errors: List[str]) -> Dict[str, Optional[str]]:
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        v = raw.get(key)
        if v is None:
            dtypes[key] = None
        elif not isinstance(v, str) or v.lower() not in DTYPES:
            errors.append(f"{key}: unknown dtype {v!r}" + vocab_config.suggest(str(v), DTYPES)
                          + " (use bfloat16, float16 or float32)")
            dtypes[key] = None
        else:
            dtypes[key] = DTYPES[v.lower()]
    return dtypes


# ---- phase 3: models / slices

def _entries(value, key: str, expected: str, st: _Parse, shorthand: Optional[str] = None):
    """(where, mapping) for each entry of the list under `key`, reporting a missing or
    empty list and non-mapping entries (a bare string is ``{shorthand: string}``)."""
    if not isinstance(value, list) or not value:
        st.errors.append(f"{key}: must be a non-empty list")
        return
    for i, ent in enumerate(value):
        where = f"{key}[{i}]"
        if shorthand and isinstance(ent, str):
            ent = {shorthand: ent}
        if not isinstance(ent, dict):
            st.errors.append(f"{where}: expected a mapping with {expected}")
            continue
        yield where, ent


def _parse_models(ml, st: _Parse) -> List[Source]:
    models = []
    for where, ent in _entries(ml, "models", "'model' and 'parameters'", st, shorthand="model"):
        _check_keys(ent, ("model", "parameters"), where, st.errors)
        ref = _parse_model_ref(ent.get("model"), f"{where}.model", st.errors)
        params = _check_params(ent.get("parameters"), f"{where}.parameters", "model", st)
        if ref is not None:
            models.append(Source(ref, _resolve_path(ref, st.origin_dir), params, where))
    return models


def _parse_layer_range(lr, where: str, errors: List[str]) -> Optional[tuple]:
    if isinstance(lr, list):
        lr = [as_number(x) for x in lr]
        lr = [int(x) if isinstance(x, float) and x.is_integer() else x for x in lr]
    if (not isinstance(lr, list) or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            or lr[0] < 0 or lr[1] <= lr[0]):
        errors.append(f"{where}: must be [start, end) with 0 <= start < end integers, got {lr!r}")
        return None
    return tuple(lr)


def _parse_slices(sl, st: _Parse) -> List[Slice]:
    slices = []
    for where, s in _entries(sl, "slices", "'sources'", st):
        _check_keys(s, ("sources", "parameters", "base_model"), where, st.errors)
        sparams = _check_params(s.get("parameters"), f"{where}.parameters", "slice", st)
        sbase = s.get("base_model")
        if sbase is not None:
            sbase = _parse_model_ref(sbase, f"{where}.base_model", st.errors)
        srcs = []
        lengths = []
        for w2, src in _entries(s.get("sources"), f"{where}.sources", "'model' and 'layer_range'", st):
            _check_keys(src, ("model", "layer_range", "parameters"), w2, st.errors)
            ref = _parse_model_ref(src.get("model"), f"{w2}.model", st.errors)
            params = _check_params(src.get("parameters"), f"{w2}.parameters", "source", st)
            lr = _parse_layer_range(src.get("layer_range"), f"{w2}.layer_range", st.errors)
            if lr:
                lengths.append(lr[1] - lr[0])
            if ref is not None:
                srcs.append(Source(ref, _resolve_path(ref, st.origin_dir), params, w2, lr))
        if len(set(lengths)) > 1:
            st.errors.append(f"{where}.sources: all sources of a slice must span the same number "
                             f"of layers, got {lengths}")
        slices.append(Slice(srcs, sparams, sbase, where))
    return slices


# ---- phase 4: method structure (how many models, which need a base or weights)

def _check_structure(method: str, base_ref, base_path, models, slices, gparams, errors) -> None:
    if method in BASE_REQUIRED and base_ref is None and not (
            slices and all(s.base_ref for s in slices)):
        errors.append(f"base_model: method '{method}' needs a base model")
    spec = METHODS[method]
    if models is not None and spec.base != R.BASE_NEVER:
        nonbase = [m for m in models if base_ref is None or m.path != base_path]
        problem = spec.model_count_error(len(nonbase))
        if problem:
            errors.append(f"models: {problem}")
    if method == "passthrough":
        # one input per output tensor (mergekit: InputContract(max_inputs=1)); the layers
        # of a frankenmerge come from `slices:`, one source each
        if models is not None:
            inputs = {m.path for m in models} | ({base_path} if base_path else set())
            if len(inputs) != 1:
                errors.append(f"models: passthrough copies exactly one model, got {len(inputs)} "
                              f"(with base_model); use `slices:` with one source per slice")
        for s in slices or []:
            if len(s.sources) != 1:
                errors.append(f"{s.where}.sources: passthrough takes exactly one source per "
                              f"slice, got {len(s.sources)}")
    if method in WEIGHT_REQUIRED and models is not None:
        for m in models:
            if method != "linear" and base_ref is not None and m.path == base_path:
                continue  # the base's parameters are unused by base-relative methods
            if "weight" not in m.parameters and "weight" not in gparams:
                errors.append(f"{m.where}.parameters.weight: missing (method '{method}' "
                              f"needs a weight for every model)")


# ---- phase 5: files (existence, formats, layer counts)

def _check_files(base_ref, base_path, models, slices, tok, st: _Parse, tok_where: str = "tokenizer_source") -> bool:
    """Check every referenced folder; True when all of them open and hold their layers."""
    from lfm_engine.io.model_folder import CheckpointError
    refs = []
    if base_ref:
        refs.append((base_ref, base_path, "base_model"))
    for m in models or []:
        refs.append((m.ref, m.path, m.where + ".model"))
    for s in slices or []:
        for src in s.sources:
            refs.append((src.ref, src.path, src.where + ".model"))
        if s.base_ref:
            refs.append((s.base_ref, _resolve_path(s.base_ref, st.origin_dir), s.where + ".base_model"))
    n_before = len(st.errors)
    if tok not in (None,) + vocab_config.SOURCES:
        _check_tokenizer_folder(tok, _resolve_path(tok, st.origin_dir), tok_where, st.errors)
    seen = set()
    for ref, path, where in refs:
        if path in seen:
            continue
        seen.add(path)
        try:
            _quick_folder_check(ref, path)
        except CheckpointError as e:
            st.errors.append(f"{where}: {e}")
            continue
        st.errors += [f"{where}: {m}" for m in lora_ref.check(path, ref)]
    if len(st.errors) == n_before:
        # every size taken from the config is bounded by what the folders hold, so a
        # `layer_range: [0, 1e9]` is an error here instead of a billion planned layers
        layers: Dict[str, int] = {}
        for s in slices or []:
            for src in s.sources:
                if src.layer_range is None:
                    continue
                if src.path not in layers:
                    layers[src.path] = folder_num_layers(src.path)
                nl = layers[src.path]
                if src.layer_range[1] > nl:
                    st.errors.append(f"{src.where}.layer_range: {list(src.layer_range)} is beyond "
                                     f"the {nl} layers of {src.ref}")
    return len(st.errors) == n_before


def _config_models(base_ref, base_path, models, slices) -> List[tuple]:
    """(ref, resolved path) of every model the config merges."""
    out = [(base_ref, base_path)] if base_ref else []
    out += [(m.ref, m.path) for m in models or []]
    out += [(src.ref, src.path) for s in slices or [] for src in s.sources]
    return out


def _check_tokenizer_folder(ref: str, path: str, where: str, errors: List[str]) -> None:
    """A `tokenizer_source` model only lends its tokenizer: it needs tokenizer files, not
    weights."""
    if not os.path.isdir(path) and hub.parse_hub_ref(ref) is not None:
        try:
            path = hub.resolve(ref)
        except hub.HubError as e:
            errors.append(f"{where}: {e}")
            return
    if not os.path.isdir(path):
        errors.append(f"{where}: model folder '{ref}' does not exist")
    elif not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_MARKERS):
        errors.append(f"{where}: '{ref}' has no tokenizer ({', '.join(TOKENIZER_MARKERS)})")


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def folder_num_layers(path: str) -> int:
    """Layer count of a model folder: config.json's num_hidden_layers (n_layer,
    num_layers), else one more than the highest layer index among its tensor names."""
    import json
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg, dict):
        for k in ("num_hidden_layers", "n_layer", "num_layers"):
            n = cfg.get(k)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    from lfm_engine.io.model_folder import ModelFolder
    from lfm_engine.merge.plan import layer_index
    idx = [layer_index(n) for n in ModelFolder(path).tensors]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def parse_config(config: Union[str, dict, "os.PathLike"], *, check_files: bool = True) -> MergeConfig:
    """Parse a YAML file path, YAML text or an already-loaded dict; raise MergeConfigErrors.

    Phases: (1) load one bounded YAML document, (2) top-level keys, method, dtypes,
    tokenizer, (3) models or slices with their parameters, (4) the method's
    structure (model count, base, weights), (5) with ``check_files`` the folders
    (existence, hub ids, pickle/GGUF-only checkpoints, layer ranges within the
    layers the folders hold). Shape/architecture checks need the tensor headers and
    are done by :func:`lfm_engine.merge.plan.build_plan`.
    """
    raw, text, origin = _load_raw(config)
    st = _Parse(origin)
    _check_top(raw, st)
    method = st.method
    gparams = _check_params(raw.get("parameters"), "parameters", "global", st)
    base_ref = raw.get("base_model")
    if base_ref is not None:
        base_ref = _parse_model_ref(base_ref, "base_model", st.errors)
    dtypes = _parse_dtypes(raw, st.errors)
    n_errors = len(st.errors)
    tok_spec = vocab_config.parse(raw, st.errors)
    tok_ok = len(st.errors) == n_errors
    chat = raw.get("chat_template")
    if chat is not None and chat_template.check(chat):
        st.errors.append(chat_template.check(chat))
        chat = None

    models = slices = None
    if raw.get("models") is not None and raw.get("slices") is not None:
        st.errors.append("models, slices: give either `models:` or `slices:`, not both")
    if raw.get("models") is not None:
        models = _parse_models(raw["models"], st)
    elif raw.get("slices") is not None:
        slices = _parse_slices(raw["slices"], st)
    else:
        st.errors.append("models: missing (give `models:` or `slices:`)")
    base_path = _resolve_path(base_ref, st.origin_dir) if base_ref else None
    if tok_spec is not None:
        vocab_config.resolve_models(tok_spec, _config_models(base_ref, base_path, models, slices),
                                    lambda r: _resolve_path(r, st.origin_dir), st.errors)
        if not tok_ok:
            tok_spec = None   # a partial plan (see below) goes on without the broken section
    tok = tok_spec.source if tok_spec else None

    if method is not None:
        _check_structure(method, base_ref, base_path, models, slices, gparams, st.errors)
        if method == "karcher" and base_ref and models is not None \
                and all(m.path != base_path for m in models):
            # mergekit adds a base that is not listed to the inputs (last), so the Karcher
            # mean runs over the models and the base (docs/spec/merge.md "karcher")
            models.append(Source(base_ref, base_path, {}, "base_model"))

    files_ok = (_check_files(base_ref, base_path, models, slices, tok, st, tok_spec.where if tok_spec else "")
                if check_files else False)
    cfg = MergeConfig(method=method, base_ref=base_ref, base_path=base_path, models=models,
                      slices=slices, parameters=gparams, dtype=dtypes["dtype"],
                      out_dtype=dtypes["out_dtype"], tokenizer_source=tok, raw=raw,
                      yaml_text=text, origin=origin, warnings=st.unused_warnings(),
                      chat_template=chat, tokenizer=tok_spec)
    if st.errors:
        err = MergeConfigErrors(st.errors)
        # What could still be planned, so a caller can add the tensor-level problems
        # (shapes, architectures, per-tensor parameter values) to the same report.
        usable = method is not None and (models or slices) and (base_ref is None or base_path)
        err.partial = cfg if (usable and files_ok) else None
        raise err
    return cfg


def _quick_folder_check(ref: str, path: str) -> None:
    """Existence / hub id / pickle- or GGUF-only checks without reading headers."""
    from lfm_engine.io.model_folder import PICKLE_SUFFIXES, CheckpointError
    parts = lora_ref.split(ref)
    if parts is not None and not os.path.isdir(path):
        # name the part that is missing (the overlay exists once both parts resolve)
        for part, what in zip(parts, ("model", "LoRA adapter")):
            if not os.path.isdir(_resolve_path(part, None)):
                try:
                    _quick_folder_check(part, _resolve_path(part, None))
                except CheckpointError as e:
                    raise CheckpointError(f"'{ref}': the {what}: {e}") from None
        raise CheckpointError(f"'{ref}': cannot be resolved")
    if parts is not None:
        path_l = _resolve_path(parts[1], None)
        if not os.path.isfile(os.path.join(path_l, "adapter_config.json")):
            raise CheckpointError(f"'{ref}': the LoRA adapter folder '{parts[1]}' has no "
                                  f"adapter_config.json (a PEFT adapter folder is expected)")
    if ref.lower().endswith(".gguf") or (os.path.isfile(path) and path.lower().endswith(".gguf")):
        raise CheckpointError(_GGUF_MSG.format(ref=ref))
    if not os.path.isdir(path):
        if hub.parse_hub_ref(ref) is not None:
            try:
                hub.resolve(ref)
            except hub.HubError as e:
                raise CheckpointError(str(e)) from None
        raise CheckpointError(f"model folder '{ref}' does not exist")
    files = os.listdir(path)
    if not any(f.endswith(".safetensors") for f in files):
        pk = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pk:
            raise CheckpointError(
                f"'{ref}' holds only pickle checkpoints ({', '.join(pk[:3])}); they are refused "
                f"because loading a pickle can run arbitrary code. Convert the model to "
                f"safetensors first (e.g. `AutoModelForCausalLM.from_pretrained(DIR)."
                f"save_pretrained(NEW_DIR, safe_serialization=True)` in transformers, on a "
                f"checkpoint you trust)")
        if any(f.lower().endswith(".gguf") for f in files):
            raise CheckpointError(_GGUF_MSG.format(ref=ref))
        raise CheckpointError(f"'{ref}' contains no *.safetensors weights")


_GGUF_MSG = ("'{ref}' is a GGUF checkpoint: GGUF (llama.cpp, often quantized) is not a merge "
             "input; merge the original Hugging Face safetensors model, or convert the GGUF back "
             "with transformers (`AutoModelForCausalLM.from_pretrained(DIR, gguf_file=FILE)."
             "save_pretrained(NEW_DIR)`, which dequantizes)")
