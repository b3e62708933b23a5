"""The batched LoRA op the serving layer calls (lfm_engine.ops.lora.lora_apply, spec/lora.md)."""
from __future__ import annotations

from lfm_engine.ops.lora import lora_apply

__all__ = ["lora_apply"]
