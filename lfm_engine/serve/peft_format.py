"""Which PEFT LoRA adapter folders the server runs (the folder format itself is read by
:mod:`lfm_engine.io.peft`, the one reader shared with merge).

The server adds the adapter's LoRA output to the base model's Linear layers,

    y += s_m · (x · A_mᵀ) · B_mᵀ,   A_m: [r_m, H_in],  B_m: [H_out, r_m]

so on top of what the reader refuses it refuses what that form cannot serve
(docs/spec/io.md "PEFT LoRA adapter folders"), with :class:`AdapterFormatError` naming it:

- ``modules_to_save`` (fully trained extra modules, e.g. a new lm_head): serving them
  would need a per-request copy of the module; never served partially either;
- LoRA on the embedding / lm_head modules (``embed*``, ``lm_head``, ``embed_out``,
  ``output``, and PEFT's embedding LoRA ``lora_embedding_A/B``): the served model applies
  adapters to its decoder Linears only.
"""
from __future__ import annotations

import os

from lfm_engine.io.peft import (CONFIG_NAME, AdapterFormatError, AdapterSpec, ModuleLoRA,  # noqa: F401
                                read_weights)
from lfm_engine.io.peft import open_adapter as _open_any

__all__ = ["AdapterFormatError", "AdapterSpec", "ModuleLoRA", "open_adapter", "read_weights"]


def open_adapter(folder) -> AdapterSpec:
    """Parse and check a PEFT LoRA folder for serving (no tensor data read).

    Raises FileNotFoundError for a missing folder/file and AdapterFormatError for bad
    content or features the server does not run (the message names the feature).
    """
    spec = _open_any(folder)
    where = os.path.join(spec.folder, CONFIG_NAME)
    for module, m in spec.modules.items():
        leaf = module.rsplit(".", 1)[-1]
        if m.embedding or leaf in ("lm_head", "embed_out", "output") or leaf.startswith("embed"):
            raise AdapterFormatError(
                f"{spec.weights_path}: LoRA on the embedding / lm_head module {module!r} is not supported "
                "by lfm_engine.serve; merge the adapter into the model instead (lfm-engine merge with "
                "MODEL+ADAPTER)")
    if spec.modules_to_save or spec.saved:
        raise AdapterFormatError(
            f"{where}: modules_to_save (fully trained extra modules: "
            f"{', '.join(spec.modules_to_save or sorted(spec.saved))}) is not supported by lfm_engine.serve; "
            "merge the adapter into the model instead (lfm-engine merge with MODEL+ADAPTER)")
    if not spec.modules:
        raise AdapterFormatError(f"{spec.weights_path}: contains no lora_A/lora_B weights")
    return spec
