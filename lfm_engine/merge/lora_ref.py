"""``model+lora`` references: a model with a PEFT LoRA adapter applied, merged on the fly.

mergekit writes ``base+adapter`` (each a local folder or a hub id) anywhere a model is
named. We never write the adapted model to disk: the reference becomes an *overlay
folder*, a temporary folder of symbolic links to the model's files (so it has its own
path and its own tensor file names, and the planner treats it as a model of its own),
and every tensor read from an overlay passes through :func:`apply`, which adds the
adapter's delta to the weights it targets:

    W' = round(W + s · B @ A)      (fp32 sum, s = lora_alpha / r or / sqrt(r) for rsLoRA,
                                    rounded once to W's dtype; lora_merge.adapter_delta;
                                    transposed for fan_in_fan_out adapters, GPT-2's Conv1D)

Tensors the adapter does not target are passed through unchanged. The adapter's
``modules_to_save`` tensors (modules trained in full, e.g. a new ``lm_head``) replace the
model's tensors of the same name, cast to the model's dtype, as PEFT's
``merge_and_unload`` does (docs/spec/io.md "PEFT LoRA adapter folders"): never
dropped. Every adapter module must name a 2-D weight of the model with the adapter's shape, and every
saved tensor a tensor of the model with its shape (checked by :func:`check`, before
anything is merged). The overlay folders are removed at exit.

Tensors travel as numpy arrays (raw bits for bf16, lfm_engine.io); torch is imported only
when a tensor is actually adapted.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

_lock = threading.Lock()
_overlays: Dict[Tuple[str, str], str] = {}    # (model folder, adapter folder) -> overlay
_adapter_of: Dict[str, str] = {}              # overlay -> adapter folder
_loaded: Dict[str, tuple] = {}                # adapter folder -> (files' stat signature, LoraAdapter, fan_in_fan_out)


def split(ref: str) -> Optional[Tuple[str, str]]:
    """(model ref, adapter ref) of ``model+lora``; None for a plain reference (an existing
    path that contains '+' is a plain folder)."""
    if not isinstance(ref, str) or "+" not in ref or os.path.exists(ref):
        return None
    model, lora = ref.split("+", 1)
    return (model, lora) if model and lora else None


def overlay(model_path: str, lora_path: str) -> str:
    """The overlay folder of a model folder with an adapter folder (made once per pair)."""
    key = (os.path.abspath(model_path), os.path.abspath(lora_path))
    with _lock:
        if key in _overlays:
            return _overlays[key]
        d = tempfile.mkdtemp(prefix="lfm-lora-overlay-")
        for fn in os.listdir(key[0]):
            src = os.path.join(key[0], fn)
            if os.path.isfile(src):
                os.symlink(src, os.path.join(d, fn))
        _overlays[key] = d
        _adapter_of[d] = key[1]
        return d


def _signature(lora_path: str) -> tuple:
    """Identity of the adapter's files: a folder rewritten in place (same path, a later run
    in the same process) is read again, never served from the cache."""
    sig = []
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            st = os.stat(os.path.join(lora_path, fn))
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append(None)
    return tuple(sig)


def _fan_in_fan_out(lora_path: str) -> bool:
    """PEFT's ``fan_in_fan_out``: the targeted weights are stored [in, out] (GPT-2's Conv1D),
    so the delta added to the stored tensor is (s·B·A)ᵀ, as merge_and_unload does."""
    import json
    try:
        with open(os.path.join(lora_path, "adapter_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False  # the reader reports an unreadable config
    return isinstance(cfg, dict) and cfg.get("fan_in_fan_out") is True


def _entry(lora_path: str):
    """(LoraAdapter, fan_in_fan_out) of an adapter folder, re-read when its files change."""
    from lfm_engine.merge.lora_merge import load_peft_adapter
    sig = _signature(lora_path)
    with _lock:
        hit = _loaded.get(lora_path)
        if hit is None or hit[0] != sig:
            _loaded[lora_path] = (sig, load_peft_adapter(lora_path), _fan_in_fan_out(lora_path))
        return _loaded[lora_path][1:]


def check(overlay_path: str, ref: str) -> List[str]:
    """Problems of applying the overlay's adapter to its model (empty when it fits)."""
    from lfm_engine.io.model_folder import CheckpointError, ModelFolder
    lora = _adapter_of.get(overlay_path)
    if lora is None:
        return []
    try:
        ad, fan_in_fan_out = _entry(lora)
    except (OSError, ValueError) as e:
        return [f"'{ref}': the adapter cannot be used: {e}"]
    try:
        tensors = ModelFolder(overlay_path).tensors
    except CheckpointError as e:
        return [f"'{ref}': {e}"]
    errs = []
    for module, (a, b) in sorted(ad.modules.items()):
        info = tensors.get(module + ".weight")
        transposed = fan_in_fan_out and module not in ad.embedding  # Conv1D only, never an embedding
        if info is None:
            errs.append(f"'{ref}': adapter module '{module}' has no weight '{module}.weight' in the model")
        elif tuple(info.shape) != ((a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])):
            made = [a.shape[1], b.shape[0]] if transposed else [b.shape[0], a.shape[1]]
            errs.append(f"'{ref}': adapter module '{module}' makes a {made} delta"
                        f"{' (fan_in_fan_out)' if transposed else ''} but the weight is {list(info.shape)}")
        if len(errs) >= 5:
            errs.append(f"'{ref}': (further adapter modules not checked)")
            return errs
    for name, t in sorted(ad.saved.items()):
        info = tensors.get(name)
        if info is None:
            errs.append(f"'{ref}': the adapter's modules_to_save tensor '{name}' has no counterpart in the model")
        elif tuple(info.shape) != tuple(t.shape):
            errs.append(f"'{ref}': the adapter's modules_to_save tensor '{name}' is {list(t.shape)} but the "
                        f"model's is {list(info.shape)}")
    return errs


def apply(info, arr):
    """``arr`` (the numpy array read for TensorInfo ``info``) with its overlay's adapter
    applied: delta added, or the saved tensor in its place; unchanged when not adapted."""
    lora = _adapter_of.get(os.path.dirname(info.file))
    if lora is None:
        return arr
    ad, fan_in_fan_out = _entry(lora)
    from lfm_engine.io.safetensors import as_numpy, as_torch
    module = info.name[:-len(".weight")] if info.name.endswith(".weight") else None
    if info.name in ad.saved:
        # a modules_to_save tensor replaces the model's; a LoRA module's saved base_layer
        # weight does too, and its delta is then added (as PEFT loads and merges it)
        saved = ad.saved[info.name].to(info.dtype.torch)
        if module not in ad.modules:
            return as_numpy(saved)
        arr = as_numpy(saved)
    if module not in ad.modules:
        return arr
    import torch
    from lfm_engine.io.model_folder import CheckpointError
    from lfm_engine.merge.lora_merge import adapter_delta
    tensor = as_torch(arr, info.dtype)
    delta = adapter_delta(ad, module)
    transposed = fan_in_fan_out and module not in ad.embedding
    out = tensor.float() + (delta.T if transposed else delta)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        # a finite weight made non-finite by the adapter (a NaN or huge lora_alpha): name the adapter
        raise CheckpointError(f"{lora}: applying the adapter to '{info.name}' gives NaN or Inf (scale "
                              f"lora_alpha/r = {ad.scale(module):g}; lora_alpha or the factors are too large)")
    return as_numpy(out.to(tensor.dtype))


@atexit.register
def _cleanup():
    for d in list(_overlays.values()):
        shutil.rmtree(d, ignore_errors=True)
