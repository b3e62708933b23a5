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

Tensors the adapter does not target are passed through unchanged. Every adapter module
must name a 2-D weight of the model with the adapter's shape (checked by
:func:`check`, before anything is merged); a finite weight that the adapter makes NaN or
Inf is an error naming the adapter. The overlay folders are removed at exit.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

import torch

_lock = threading.Lock()
_overlays: Dict[Tuple[str, str], str] = {}    # (model folder, adapter folder) -> overlay
_adapter_of: Dict[str, str] = {}              # overlay -> adapter folder
_loaded: Dict[str, Tuple[tuple, object]] = {}  # adapter folder -> (files' stat signature, LoraAdapter)


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


def _adapter(lora_path: str):
    from lfm_engine.merge.lora_merge import load_peft_adapter
    sig = _signature(lora_path)
    with _lock:
        hit = _loaded.get(lora_path)
        if hit is None or hit[0] != sig:
            _loaded[lora_path] = (sig, load_peft_adapter(lora_path))
        return _loaded[lora_path][1]


def check(overlay_path: str, ref: str) -> List[str]:
    """Problems of applying the overlay's adapter to its model (empty when it fits)."""
    from lfm_engine.merge.io import CheckpointError, ModelFolder
    lora = _adapter_of.get(overlay_path)
    if lora is None:
        return []
    try:
        ad = _adapter(lora)
    except (OSError, ValueError) as e:
        return [f"'{ref}': the adapter cannot be used: {e}"]
    try:
        tensors = ModelFolder(overlay_path).tensors
    except CheckpointError as e:
        return [f"'{ref}': {e}"]
    errs = []
    for module, (a, b) in sorted(ad.modules.items()):
        info = tensors.get(module + ".weight")
        if info is None:
            errs.append(f"'{ref}': adapter module '{module}' has no weight '{module}.weight' in the model")
        elif tuple(info.shape) != ((a.shape[1], b.shape[0]) if ad.fan_in_fan_out else (b.shape[0], a.shape[1])):
            made = [a.shape[1], b.shape[0]] if ad.fan_in_fan_out else [b.shape[0], a.shape[1]]
            errs.append(f"'{ref}': adapter module '{module}' makes a {made} delta"
                        f"{' (fan_in_fan_out)' if ad.fan_in_fan_out else ''} but the weight is {list(info.shape)}")
        if len(errs) >= 5:
            errs.append(f"'{ref}': (further adapter modules not checked)")
            break
    return errs


def apply(info, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (read for TensorInfo ``info``) with its overlay's adapter delta added."""
    lora = _adapter_of.get(os.path.dirname(info.file))
    if lora is None or not info.name.endswith(".weight"):
        return tensor
    ad = _adapter(lora)
    module = info.name[:-len(".weight")]
    if module not in ad.modules:
        return tensor
    from lfm_engine.merge.io import CheckpointError
    from lfm_engine.merge.lora_merge import adapter_delta
    out = tensor.float() + adapter_delta(ad, module)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        # a finite weight made non-finite by the adapter: name the adapter, not the weight
        raise CheckpointError(f"{lora}: applying the adapter to '{info.name}' gives NaN or Inf (scale "
                              f"lora_alpha/r = {ad.scale(module):g}; lora_alpha or the factors are too large)")
    return out.to(tensor.dtype)


@atexit.register
def _cleanup():
    for d in list(_overlays.values()):
        shutil.rmtree(d, ignore_errors=True)
