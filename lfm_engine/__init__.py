"""lfm_engine: compiled kernels to merge, compress and serve fine-tuned models.

Top-level API:
    merge_tensors(base, others, method="ties", ...)   fused sparsify-and-merge of one tensor
    merge_models(config, out_dir, ...)                mergekit-style model merge, streaming
    lora_shrink / lora_expand / lora_apply(...)       batched multi-LoRA kernels (docs/spec/lora.md)
    encode_delta / decode_delta / delta_apply(...)    task-vector codecs (docs/spec/codec.md)
    compress_model / decompress_model(...)            .lfmd containers of whole fine-tunes
    AdapterPool, attach, Engine                       multi-adapter serving (lfm_engine.serve)
    get_include(), get_library()                      C ABI header folder and liblfm path
    build_info()                                      what this build has (CUDA, SIMD level)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lfm_engine.core.merge_methods import METHODS, MergeConfigError

# The ops (and torch with them) load on first use: `lfm-engine merge` on the CPU never
# imports torch (docs/merge.md "Startup"), and `import lfm_engine` stays cheap.


def merge_models(config_or_path, out_dir, **kwargs):
    """Merge whole models from a mergekit-style config (see lfm_engine.merge.merge_models)."""
    from lfm_engine.merge import merge_models as _merge_models

    return _merge_models(config_or_path, out_dir, **kwargs)

__version__ = "0.1.0"
_PKG = Path(__file__).resolve().parent


def _native_dirs() -> list:
    from lfm_engine._native import has_native, native_dir

    return [native_dir()] if has_native() else []


def compress_model(base_dir, model_dir, out_path, **kwargs):
    """Encode a fine-tune's task vectors into an .lfmd container (see lfm_engine.compress)."""
    from lfm_engine.compress import compress_model as _compress_model

    return _compress_model(base_dir, model_dir, out_path, **kwargs)


def decompress_model(base_dir, path, out_dir, **kwargs):
    """Rebuild a model folder from its base and an .lfmd container (see lfm_engine.compress)."""
    from lfm_engine.compress import decompress_model as _decompress_model

    return _decompress_model(base_dir, path, out_dir, **kwargs)


def get_include() -> str:
    """Folder holding lfm/lfm.h (installed with the package; the repo's include/ in a source tree)."""
    for cand in [d / "include" for d in _native_dirs()] + [_PKG / "include", _PKG.parent / "include"]:
        if (cand / "lfm" / "lfm.h").is_file():
            return str(cand)
    raise FileNotFoundError("lfm/lfm.h not found next to the package; reinstall lfm_engine")


def get_library() -> str:
    """Path of the shared core library liblfm (link against it from C/C++)."""
    for folder in _native_dirs() + [_PKG]:
        for name in ("liblfm.so", "liblfm.dylib", "lfm.dll"):
            p = folder / name
            if p.is_file():
                return str(p)
    raise FileNotFoundError("liblfm not found in the package folder; reinstall lfm_engine")


def build_info() -> dict:
    """{version, abi, cuda, cuda_archs, simd (active level), simd_host} of the compiled core."""
    from lfm_engine._native import native

    return json.loads(native().build_info())


def set_num_threads(n: int) -> None:
    """Worker threads of the CPU kernels (default: LFM_NUM_THREADS or all cores)."""
    from lfm_engine._native import native

    native().set_num_threads(int(n))


def set_simd_level(level: str | None) -> None:
    """Force the CPU kernels' SIMD level: "baseline", "avx2", "avx512" or "neon"; None
    returns to LFM_SIMD / the host's best. Every level gives the same bits (docs/spec/merge.md
    "Arithmetic"); a level this CPU cannot run raises ValueError."""
    from lfm_engine._native import native

    native().set_simd(level or "")


# Names loaded on first use (their modules import torch or are larger).
_LAZY = {
    "merge_tensors": "lfm_engine.ops.merge", "merge_arrays": "lfm_engine.ops.merge",
    "lora_shrink": "lfm_engine.ops.lora", "lora_expand": "lfm_engine.ops.lora",
    "lora_apply": "lfm_engine.ops.lora", "lora_apply_slices": "lfm_engine.ops.lora",
    "encode_delta": "lfm_engine.ops.codec", "decode_delta": "lfm_engine.ops.codec",
    "decode_add": "lfm_engine.ops.codec", "delta_apply": "lfm_engine.ops.codec",
    "AdapterPool": "lfm_engine.serve", "attach": "lfm_engine.serve", "detach": "lfm_engine.serve",
    "Engine": "lfm_engine.serve", "Request": "lfm_engine.serve", "open_adapter": "lfm_engine.serve",
    "AdapterFormatError": "lfm_engine.serve",
    "Encoded": "lfm_engine.ops.codec", "inspect_container": "lfm_engine.compress",
    "LfmdError": "lfm_engine.compress", "FingerprintMismatchError": "lfm_engine.compress",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lfm_engine' has no attribute '{name}'")


__all__ = [
    "METHODS", "MergeConfigError", "merge_models", "compress_model", "decompress_model", "get_include", "get_library", "build_info",
    "set_num_threads", "set_simd_level", "__version__", *_LAZY,
]
del os
