"""Reading PEFT LoRA adapter folders unchanged (adapter_config.json + adapter_model.safetensors).

What a folder becomes (`AdapterSpec`): for every adapted module (named as in the base
model, e.g. ``model.layers.0.self_attn.q_proj``) its rank r_m, scale s_m, input and output
width, so that the module's LoRA output is

    y += s_m · (x · A_mᵀ) · B_mᵀ,   A_m: [r_m, H_in],  B_m: [H_out, r_m]

with s_m = alpha_m / r_m, or alpha_m / sqrt(r_m) when ``use_rslora`` is true.
r_m and alpha_m come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the
module name (first matching key, matched as "(any prefix ending in '.')pattern" at the end
of the name, the rule PEFT uses), else from ``r`` / ``lora_alpha``.

Key names: PEFT saves ``base_model.model.<module>.lora_A.weight``; the prefix
``base_model.model.`` is dropped, an adapter-name segment (``lora_A.<name>.weight``, written
by some tools) is accepted. ``fan_in_fan_out`` only concerns the base layer's weight layout
(GPT-2 Conv1D); PEFT stores lora_A/lora_B in nn.Linear layout either way, so it needs no
change here.

Unsupported features raise `AdapterFormatError` naming the feature: DoRA, LoRA bias terms
(``bias`` other than "none", ``lora_bias``), ``modules_to_save``, embedding / lm_head LoRA,
trainable tokens, target_parameters, layer_replication, aLoRA, QALoRA, KaSA, MonteCLoRA,
BD-LoRA, Arrow routing, convolution LoRA, and non-LoRA PEFT types.
The metadata (config and tensor shapes) is checked when the folder is opened, without
reading tensor data; values (NaN/Inf) are checked by `read_weights`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")

# config field -> (test that says the feature is on, feature name for the error)
_UNSUPPORTED = (
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=true)"),
    ("bias", lambda v: v not in (None, "none"), "LoRA bias training (bias other than \"none\")"),
    ("lora_bias", lambda v: bool(v), "LoRA bias on lora_B (lora_bias=true)"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save (fully trained extra modules)"),
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
    """One adapted module: A is [rank, in_features], B is [out_features, rank]."""

    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int
    key_a: str
    key_b: str

    @property
    def numel(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass
class AdapterSpec:
    """Parsed adapter folder: config plus per-module metadata (no tensor data)."""

    folder: str
    weights_path: str
    config: dict
    modules: Dict[str, ModuleLoRA] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def nbytes(self, itemsize: int) -> int:
        """Bytes of this adapter's real (unpadded) A and B at `itemsize` bytes per element."""
        return sum(m.numel for m in self.modules.values()) * itemsize


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern key matches when the module name ends with it, optionally
    # preceded by any dotted prefix; the first key in the dict that matches wins.
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


def _tensor_shapes(weights_path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """{key: (shape, dtype name)} read from the safetensors header (or a weights-only .bin)."""
    if weights_path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            out = {}
            with safe_open(weights_path, framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({e})") from None
    sd = _load_bin(weights_path)
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in sd.items()}


def _load_bin(path: str) -> Dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{path}: cannot read the weights ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterFormatError(f"{path}: expected a state dict of tensors")
    return sd


def open_adapter(folder: str) -> AdapterSpec:
    """Parse and check a PEFT LoRA folder's config and tensor metadata (no tensor data read).

    Raises FileNotFoundError for a missing folder/file and AdapterFormatError for bad
    content or unsupported features (the message names the feature).
    """
    folder = os.fspath(folder)
    cfg = _read_config(folder)
    where = os.path.join(folder, CONFIG_NAME)
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {ptype!r} is not supported (only LORA adapters)")
    for key, is_on, feature in _UNSUPPORTED:
        if key in cfg and is_on(cfg[key]):
            raise AdapterFormatError(f"{where}: {feature} is not supported by lfm_engine.serve")
    try:
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise AdapterFormatError(f"{where}: r and lora_alpha must be numbers") from None
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFormatError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    rslora = bool(cfg.get("use_rslora", False))
    target_modules = cfg.get("target_modules")
    if target_modules is not None and not isinstance(target_modules, (str, list)):
        raise AdapterFormatError(f"{where}: target_modules must be a list or a regex string")

    st_path = os.path.join(folder, SAFETENSORS_NAME)
    bin_path = os.path.join(folder, BIN_NAME)
    weights_path = st_path if os.path.isfile(st_path) else bin_path if os.path.isfile(bin_path) else None
    if weights_path is None:
        raise FileNotFoundError(f"adapter folder {folder!r} has no {SAFETENSORS_NAME} (nor {BIN_NAME})")
    shapes = _tensor_shapes(weights_path)
    if not shapes:
        raise AdapterFormatError(f"{weights_path}: holds no tensors")

    # feature markers first, so the error names the feature rather than a side tensor
    # (PEFT also saves the base embedding when embeddings carry LoRA)
    for key in shapes:
        if "lora_embedding_A" in key or "lora_embedding_B" in key:
            raise AdapterFormatError(f"{weights_path}: embedding LoRA ({key}) is not supported")
        if "lora_magnitude_vector" in key:
            raise AdapterFormatError(f"{weights_path}: DoRA magnitude vector ({key}) is not supported")
    parts: Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]] = {}
    for key, (shape, _dt) in shapes.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = _KEY_RE.match(name)
        if m is None:
            raise AdapterFormatError(
                f"{weights_path}: unexpected tensor {key!r} (a LoRA adapter holds only "
                "<module>.lora_A.weight / <module>.lora_B.weight; modules_to_save and other extras are not supported)")
        if m.group("param") == "bias":
            raise AdapterFormatError(f"{weights_path}: LoRA bias tensor {key!r} (lora_bias) is not supported")
        module = m.group("module")
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_out", "output") or leaf.startswith("embed"):
            raise AdapterFormatError(f"{weights_path}: LoRA on the embedding / lm_head module {module!r} is not supported")
        if len(shape) != 2:
            raise AdapterFormatError(
                f"{weights_path}: {key} has shape {list(shape)}; only Linear LoRA (2-D A and B) is supported "
                "(convolution LoRA is not)")
        slot = parts.setdefault(module, {})
        if m.group("ab") in slot:
            raise AdapterFormatError(f"{weights_path}: module {module!r} has two lora_{m.group('ab')} tensors")
        slot[m.group("ab")] = (key, shape)

    spec = AdapterSpec(folder=folder, weights_path=weights_path, config=cfg)
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterFormatError(f"{weights_path}: module {module!r} lacks its lora_{missing}.weight tensor")
        (ka, sa), (kb, sb) = ab["A"], ab["B"]
        r, h_in = sa
        h_out, r_b = sb
        if r != r_b or r < 1:
            raise AdapterFormatError(
                f"{weights_path}: module {module!r}: lora_A {list(sa)} and lora_B {list(sb)} disagree on the rank")
        if not _targets(target_modules, module):
            raise AdapterFormatError(
                f"{where}: tensors for module {module!r} but target_modules={target_modules!r} does not select it")
        r_cfg = int(_pattern_value(rank_pattern, module, r_default))
        if r_cfg != r:
            raise AdapterFormatError(
                f"{weights_path}: module {module!r} has rank {r} in its tensors but the config says r={r_cfg}")
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        spec.modules[module] = ModuleLoRA(rank=r, alpha=alpha, scale=scale, in_features=h_in,
                                          out_features=h_out, key_a=ka, key_b=kb)
    return spec


def read_weights(spec: AdapterSpec) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A [r, H_in], B [H_out, r])} as CPU tensors in the file's dtype, checked finite."""
    if spec.weights_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(spec.weights_path, device="cpu")
        except Exception as e:
            raise AdapterFormatError(f"{spec.weights_path}: cannot read the tensors ({e})") from None
    else:
        sd = _load_bin(spec.weights_path)
    out = {}
    for module, m in spec.modules.items():
        try:
            a, b = sd[m.key_a], sd[m.key_b]
        except KeyError as e:
            raise AdapterFormatError(f"{spec.weights_path}: tensor {e} changed since the folder was opened") from None
        if tuple(a.shape) != (m.rank, m.in_features) or tuple(b.shape) != (m.out_features, m.rank):
            raise AdapterFormatError(f"{spec.weights_path}: tensors of {module!r} changed since the folder was opened")
        for key, t in ((m.key_a, a), (m.key_b, b)):
            if not t.dtype.is_floating_point:
                raise AdapterFormatError(f"{spec.weights_path}: {key} has non-float dtype {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{spec.weights_path}: {key} contains NaN or Inf")
        out[module] = (a, b)
    return out
