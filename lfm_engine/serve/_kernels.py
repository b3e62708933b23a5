"""The batched LoRA op the serving layer calls (lfm_engine.ops.lora.lora_apply, spec/lora.md)."""
from __future__ import annotations

try:
    from lfm_engine.ops.lora import lora_apply
except ImportError:  # branch without the LoRA ops yet: plain torch, grouped by slot
    import torch

    def lora_apply(x, A, B, token_slot=None, ranks=None, scales=None, y=None, y_col_offset=0, **_):
        """y[t] += scale[s] * (x[t] @ A[s,:r_s]^T) @ B[s,:,:r_s]^T for s = token_slot[t] >= 0 (fp32 math)."""
        ts = token_slot.to(torch.long)
        for s in torch.unique(ts[ts >= 0]).tolist():
            r = int(ranks[s])
            if r == 0:
                continue
            idx = (ts == s).nonzero().squeeze(1)
            u = x.index_select(0, idx).float() @ A[s, :r].float().t()
            d = (u @ B[s, :, :r].float().t()) * float(scales[s])
            y.index_add_(0, idx, d.to(y.dtype))
        return y

__all__ = ["lora_apply"]
