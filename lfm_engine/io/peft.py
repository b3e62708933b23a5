"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors): the one reader.

Used by merge (``model+lora`` references, :mod:`lfm_engine.merge.lora_merge`) and by serve
(:mod:`lfm_engine.serve.peft_format` adds what the server refuses). The rules are written
in docs/spec/io.md "PEFT LoRA adapter folders"; in short:

What a folder becomes (:class:`AdapterSpec`): for every adapted module (named as in the
base model, e.g. ``model.layers.0.self_attn.q_proj``) its rank r_m, scale s_m, input and
output width, so that the module's weight changes by

    delta_m = s_m · B_m @ A_m,   A_m: [r_m, H_in],  B_m: [H_out, r_m]

with s_m = alpha_m / r_m, or alpha_m / sqrt(r_m) when ``use_rslora`` is true. Embedding
LoRA (PEFT's ``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B``
[embedding_dim, r], saved without a ``.weight`` suffix) is the transpose: the embedding
table [num_embeddings, embedding_dim] changes by s_m · (B_m @ A_m)ᵀ; such a module has
``embedding=True``, in_features = num_embeddings and out_features = embedding_dim. r_m and
alpha_m come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module
name (first matching key, matched as ``(.*\\.)?(KEY)$`` against the name, PEFT's rule: the
key is grouped, so an alternation ``q_proj|v_proj`` applies to both), else from ``r`` /
``lora_alpha`` (PEFT's defaults 8 and 8 when absent).

``modules_to_save`` (modules trained in full, e.g. ``lm_head`` or ``embed_tokens``): their
tensors are listed in :attr:`AdapterSpec.saved` (model tensor name -> key), never
dropped. A consumer either applies them (merge: the saved tensor replaces the model's,
as PEFT's ``merge_and_unload`` does) or refuses the adapter (serve). PEFT also saves
``<module>.base_layer.weight`` of a LoRA module (with embedding LoRA, ``save_embedding_layers``):
it is listed in ``saved`` as ``<module>.weight`` too, and the module's LoRA delta is added
on top of it, as PEFT loads it. A tensor that is neither a LoRA factor nor part of a listed
module is an error.

Key names: PEFT saves ``base_model.model.<module>.lora_A.weight``; the prefix
``base_model.model.`` is dropped, an adapter-name segment (``lora_A.<name>.weight``) is
accepted. Refused with :class:`AdapterFormatError` naming the feature: DoRA, LoRA bias
terms, trainable tokens, target_parameters,
layer_replication, aLoRA, QALoRA, KaSA, MonteCLoRA, BD-LoRA, Arrow routing, convolution
LoRA and non-LoRA PEFT types. Metadata (config and tensor shapes) is checked when the
folder is opened, without reading tensor data; values by :func:`read_weights`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Tuple

from lfm_engine.io.safetensors import SafetensorsFile, read_tensor_infos
from lfm_engine.io.safetensors_format import SafetensorsFormatError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
DEFAULT_R = 8
DEFAULT_ALPHA = 8.0

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
# embedding LoRA factors are nn.Parameters in a ParameterDict: no .weight suffix
_EMB_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
# a modules_to_save tensor as older PEFT versions saved it: <module>.modules_to_save.<adapter>.<param>
_SAVED_RE = re.compile(r"^(?P<module>.+)\.modules_to_save\.[^.]+\.(?P<param>[^.]+)$")
# the base weight of a LoRA module, which PEFT saves with embedding LoRA (save_embedding_layers)
_BASE_LAYER_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")

# config field -> (test that says the feature is on, feature name for the error)
_UNSUPPORTED = (
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=true)"),
    ("bias", lambda v: v not in (None, "none"), "LoRA bias training (bias other than \"none\")"),
    ("lora_bias", lambda v: bool(v), "LoRA bias on lora_B (lora_bias=true)"),
    ("trainable_token_indices", lambda v: bool(v), "trainable_token_indices (trainable tokens)"),
    ("target_parameters", lambda v: bool(v), "target_parameters (LoRA on nn.Parameter)"),
    ("layer_replication", lambda v: bool(v), "layer_replication"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA (alora_invocation_tokens)"),
    ("use_qalora", lambda v: bool(v), "QALoRA (use_qalora=true)"),
    ("kasa_config", lambda v: bool(v), "KaSA (kasa_config)"),
    ("monteclora_config", lambda v: bool(v), "MonteCLoRA (monteclora_config)"),
    ("use_bdlora", lambda v: bool(v), "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", lambda v: bool(v), "Arrow routing (arrow_config)"),
)


class AdapterFormatError(ValueError):
    """A PEFT adapter folder that is malformed or uses a feature this engine does not run."""


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted module: A is [rank, in_features], B is [out_features, rank].

    ``embedding``: PEFT's embedding LoRA; in_features is the number of embeddings, the
    table's change is s · (B @ A)ᵀ [in_features, out_features] (see the module docstring)."""

    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    key_a: str
    key_b: str
    embedding: bool = False

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass
class AdapterSpec:
    """Parsed adapter folder: config plus per-module metadata (no tensor data).

    ``saved``: modules_to_save tensors, model tensor name (``lm_head.weight``) ->
    (file key, shape)."""

    folder: str
    weights_path: str
    config: dict
    modules: Dict[str, ModuleLoRA] = field(default_factory=dict)
    saved: Dict[str, Tuple[str, Tuple[int, ...]]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def modules_to_save(self) -> list:
        """The config's modules_to_save (empty when none)."""
        return list(self.config.get("modules_to_save") or [])

    def nbytes(self, itemsize: int) -> int:
        """Bytes of this adapter's real (unpadded) A and B at `itemsize` bytes per element."""
        return sum(m.numel for m in self.modules.values()) * itemsize


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches when the module name ends with it, optionally
    preceded by any dotted prefix (``(.*\\.)?(KEY)$``); the first matching key wins."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise AdapterFormatError(f"invalid regex {key!r} in rank_pattern/alpha_pattern: {e}") from None
    return default


def _targets(target_modules, module: str) -> bool:
    """Whether PEFT's target_modules selects `module` (list: exact or dotted suffix; str: full regex)."""
    if target_modules is None:
        return True  # some tools omit it; the saved tensors then define the targets
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error as e:
            raise AdapterFormatError(f"target_modules regex {target_modules!r} is invalid: {e}") from None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _in_modules(names, module: str) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter folder {folder!r} does not exist or is not a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: a PEFT adapter folder holds {CONFIG_NAME} and "
                                f"{SAFETENSORS_NAME}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: cannot parse JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _tensor_shapes(weights_path: str) -> Dict[str, Tuple[int, ...]]:
    """{key: shape} from the safetensors header (or a weights-only .bin)."""
    if weights_path.endswith(".safetensors"):
        try:
            infos, _ = read_tensor_infos(weights_path)
        except (SafetensorsFormatError, OSError) as e:
            raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({e})") from None
        return {k: tuple(v.shape) for k, v in infos.items()}
    return {k: tuple(v.shape) for k, v in _load_bin(weights_path).items()}


def _load_bin(path: str) -> dict:
    """A PEFT adapter_model.bin through torch's weights-only unpickler (no code runs)."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{path}: cannot read the weights ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterFormatError(f"{path}: expected a state dict of tensors")
    return sd


def _check_config(cfg: dict, where: str) -> None:
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {ptype!r} is not supported (only LORA adapters)")
    for key, is_on, feature in _UNSUPPORTED:
        if key in cfg and is_on(cfg[key]):
            raise AdapterFormatError(f"{where}: {feature} is not supported")
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise AdapterFormatError(f"{where}: modules_to_save must be a list of module names")


def open_adapter(folder) -> AdapterSpec:
    """Parse and check a PEFT LoRA folder's config and tensor metadata (no tensor data read).

    Raises FileNotFoundError for a missing folder/file and AdapterFormatError for bad
    content or unsupported features (the message names the feature).
    """
    folder = os.fspath(folder)
    cfg = _read_config(folder)
    where = os.path.join(folder, CONFIG_NAME)
    _check_config(cfg, where)
    try:
        r_default = int(cfg.get("r", DEFAULT_R))
        alpha_default = float(cfg.get("lora_alpha", DEFAULT_ALPHA))
    except (TypeError, ValueError, OverflowError):
        raise AdapterFormatError(f"{where}: r and lora_alpha must be numbers") from None
    if not math.isfinite(alpha_default):
        raise AdapterFormatError(f"{where}: lora_alpha must be a finite number, got {alpha_default}")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFormatError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    rslora = bool(cfg.get("use_rslora", False))
    target_modules = cfg.get("target_modules")
    if target_modules is not None and not (isinstance(target_modules, str) or (
            isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules))):
        raise AdapterFormatError(f"{where}: target_modules must be a list of module names or a regex string, "
                                 f"got {target_modules!r}")
    to_save = cfg.get("modules_to_save") or []

    st_path = os.path.join(folder, SAFETENSORS_NAME)
    bin_path = os.path.join(folder, BIN_NAME)
    weights_path = st_path if os.path.isfile(st_path) else bin_path if os.path.isfile(bin_path) else None
    if weights_path is None:
        raise FileNotFoundError(f"adapter folder {folder!r} has no {SAFETENSORS_NAME} (nor {BIN_NAME})")
    shapes = _tensor_shapes(weights_path)
    if not shapes:
        raise AdapterFormatError(f"{weights_path}: holds no tensors")

    # feature markers first, so the error names the feature rather than a side tensor
    for key in shapes:
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(f"{weights_path}: DoRA magnitude vector ({key}) is not supported")
    spec = AdapterSpec(folder=folder, weights_path=weights_path, config=cfg)
    parts: Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]] = {}
    kinds: Dict[str, set] = {}  # module -> {False: Linear LoRA keys, True: embedding LoRA keys}
    base_layers: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        bl = _BASE_LAYER_RE.match(name)
        if bl is not None:
            base_layers[bl.group("module")] = (key, shape)
            continue
        m, emb = _KEY_RE.match(name), False
        if m is None:
            m, emb = _EMB_KEY_RE.match(name), True
        if m is None:
            sv = _SAVED_RE.match(name)
            if sv is not None:
                name = f"{sv.group('module')}.{sv.group('param')}"
            if "." in name and _in_modules(to_save, name.rsplit(".", 1)[0]):
                spec.saved[name] = (key, shape)
                continue
            raise AdapterFormatError(
                f"{weights_path}: unexpected tensor {key!r}: a LoRA adapter holds "
                "<module>.lora_A.weight / <module>.lora_B.weight (embeddings: <module>.lora_embedding_A/B), "
                "and full tensors only of the modules its config lists in modules_to_save")
        if not emb and m.group("param") == "bias":
            raise AdapterFormatError(f"{weights_path}: LoRA bias tensor {key!r} (lora_bias) is not supported")
        module = m.group("module")
        if len(shape) != 2:
            raise AdapterFormatError(
                f"{weights_path}: {key} has shape {list(shape)}; only Linear and embedding LoRA (2-D A and B) "
                "are supported (convolution LoRA is not)")
        kinds.setdefault(module, set()).add(emb)
        if len(kinds[module]) > 1:
            raise AdapterFormatError(f"{weights_path}: module {module!r} has both Linear LoRA (lora_A/lora_B) "
                                     "and embedding LoRA (lora_embedding_A/B) tensors")
        slot = parts.setdefault(module, {})
        if m.group("ab") in slot:
            raise AdapterFormatError(f"{weights_path}: module {module!r} has two lora_{m.group('ab')} tensors")
        slot[m.group("ab")] = (key, shape)
    if not parts and not spec.saved:
        raise AdapterFormatError(f"{weights_path}: contains no lora_A/lora_B weights")
    for module, (key, shape) in sorted(base_layers.items()):
        # the module's weight before its LoRA (PEFT loads it over the model's): kept as a
        # saved tensor that replaces the model's, the LoRA delta then added on top
        if module not in parts:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}: a base_layer weight of a "
                                     "module that carries no LoRA")
        spec.saved[module + ".weight"] = (key, shape)

    for module, ab in sorted(parts.items()):
        emb = True in kinds[module]
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            what = f"lora_embedding_{missing}" if emb else f"lora_{missing}.weight"
            raise AdapterFormatError(f"{weights_path}: module {module!r} lacks its {what} tensor")
        (ka, sa), (kb, sb) = ab["A"], ab["B"]
        r, h_in = sa
        h_out, r_b = sb
        if r != r_b or r < 1:
            raise AdapterFormatError(
                f"{weights_path}: module {module!r}: lora_A {list(sa)} and lora_B {list(sb)} disagree on the rank")
        if not _targets(target_modules, module):
            raise AdapterFormatError(
                f"{where}: tensors for module {module!r} but target_modules={target_modules!r} does not select it")
        try:
            r_cfg = int(pattern_value(rank_pattern, module, r_default))
            alpha = float(pattern_value(alpha_pattern, module, alpha_default))
        except (TypeError, ValueError, OverflowError):
            raise AdapterFormatError(f"{where}: rank_pattern/alpha_pattern values must be numbers") from None
        if not math.isfinite(alpha):
            raise AdapterFormatError(f"{where}: the lora_alpha of module {module!r} must be finite, got {alpha}")
        if r_cfg != r:
            raise AdapterFormatError(
                f"{weights_path}: module {module!r} has rank {r} in its tensors but the config says r={r_cfg}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        spec.modules[module] = ModuleLoRA(rank=r, alpha=alpha, scale=scale, in_features=h_in,
                                          out_features=h_out, key_a=ka, key_b=kb, embedding=emb)
    return spec


def _tensors(spec: AdapterSpec, keys) -> dict:
    """{key: CPU torch tensor} of the adapter file."""
    if not spec.weights_path.endswith(".safetensors"):
        sd = _load_bin(spec.weights_path)
        return {k: sd[k] for k in keys if k in sd}
    try:
        with SafetensorsFile(spec.weights_path) as f:
            return {k: f.get(k) for k in keys if k in f}
    except (SafetensorsFormatError, OSError) as e:
        raise AdapterFormatError(f"{spec.weights_path}: cannot read the tensors ({e})") from None


def _check_finite(spec: AdapterSpec, key: str, t) -> None:
    import torch

    if not t.dtype.is_floating_point:
        raise AdapterFormatError(f"{spec.weights_path}: {key} has non-float dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise AdapterFormatError(f"{spec.weights_path}: {key} contains NaN or Inf")


def read_weights(spec: AdapterSpec) -> dict:
    """{module: (A [r, H_in], B [H_out, r])} as CPU torch tensors in the file's dtype, checked finite."""
    sd = _tensors(spec, [k for m in spec.modules.values() for k in (m.key_a, m.key_b)])
    out = {}
    for module, m in spec.modules.items():
        try:
            a, b = sd[m.key_a], sd[m.key_b]
        except KeyError as e:
            raise AdapterFormatError(f"{spec.weights_path}: tensor {e} changed since the folder was opened") from None
        if tuple(a.shape) != (m.rank, m.in_features) or tuple(b.shape) != (m.out_features, m.rank):
            raise AdapterFormatError(f"{spec.weights_path}: tensors of {module!r} changed since the folder was opened")
        for key, t in ((m.key_a, a), (m.key_b, b)):
            _check_finite(spec, key, t)
        out[module] = (a, b)
    return out


def read_saved(spec: AdapterSpec) -> dict:
    """{model tensor name: CPU torch tensor} of the modules_to_save tensors, checked finite."""
    sd = _tensors(spec, [k for k, _ in spec.saved.values()])
    out = {}
    for name, (key, shape) in spec.saved.items():
        t = sd.get(key)
        if t is None or tuple(t.shape) != shape:
            raise AdapterFormatError(f"{spec.weights_path}: tensor {key!r} changed since the folder was opened")
        if t.dtype.is_floating_point:
            _check_finite(spec, key, t)
        out[name] = t
    return out
