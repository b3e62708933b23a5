"""Plain-torch reference of the multi-LoRA batched ops (docs/spec/lora.md).

This is the *definition* the CPU, CUDA and Triton backends are tested against:
a Python loop over the slots that occur in the batch, each computing

    u[t, :r_s]          = x[t, :] @ A[s][:r_s, :]^T                 (shrink)
    y[t, off:off+H_out] += scale[s] * u[t, :r_s] @ B[s][:, :r_s]^T   (expand)

for the tokens t that use slot s (token_slot[t] == s). Tokens with slot -1 are left
untouched (their u row is zero). Columns r_s..R_max-1 of u are zero. A rank of 0 means
"this adapter has no weights in this slice" (it contributes nothing).

Precision: the spec asks for fp32; the reference computes in float64 (strictly more
exact), so the kernels' fp32 accumulation error is exactly what the per-dtype
tolerance of tests/conftest.py measures. u is returned as float32 (as every backend),
and y is rounded once to its own dtype: y_new = dtype(float64(y_old) + delta).

No validation happens here: lfm_engine/ops/lora.py checks the arguments before any
backend (this one included) runs.
"""
from __future__ import annotations

from typing import Sequence

import torch


def segments_to_token_slot(seg_start: torch.Tensor, seg_slot: torch.Tensor, T: int | None = None) -> torch.Tensor:
    """token_slot[T] (int32) of the segment form: tokens seg_start[i]..seg_start[i+1]-1 use seg_slot[i].

    Giving T avoids a device->host sync on a GPU (repeat_interleave's output size)."""
    lengths = (seg_start[1:] - seg_start[:-1]).long()
    return torch.repeat_interleave(seg_slot.to(torch.int32), lengths, output_size=T)


def _slot_groups(token_slot: torch.Tensor, ranks: torch.Tensor, device):
    """(slot, rank, indices of its tokens) for every slot the batch uses with rank > 0."""
    slots = token_slot.long().cpu()
    ranks_h = ranks.long().cpu()
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        r = int(ranks_h[s])
        if r == 0:
            continue
        yield s, r, (slots == s).nonzero(as_tuple=True)[0].to(device)


def _shrink64(x: torch.Tensor, A: torch.Tensor, token_slot: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """u [T, R_max] float64: u[t, :r_s] = x[t] @ A[s, :r_s]^T, s = token_slot[t]; zero elsewhere."""
    u = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float64, device=x.device)
    for s, r, idx in _slot_groups(token_slot, ranks, x.device):
        u[idx, :r] = x[idx].double() @ A[s, :r, :].double().t()
    return u


def lora_shrink_reference(x: torch.Tensor, A: torch.Tensor, token_slot: torch.Tensor,
                          ranks: torch.Tensor) -> torch.Tensor:
    """u [T, R_max] float32: u[t, :r_s] = x[t] @ A[s, :r_s]^T, s = token_slot[t]; zero elsewhere."""
    return _shrink64(x, A, token_slot, ranks).float()


def _expand_delta(u: torch.Tensor, B: torch.Tensor, token_slot: torch.Tensor, ranks: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """float64 [T, H_out]: scale[s] * u[t, :r_s] @ B[s, :, :r_s]^T (zero rows for slot -1)."""
    T = u.shape[0]
    H_out = B.shape[1]
    d = torch.zeros(T, H_out, dtype=torch.float64, device=u.device)
    scales_h = scales.double().cpu()
    for s, r, idx in _slot_groups(token_slot, ranks, u.device):
        d[idx] = float(scales_h[s]) * (u[idx, :r].double() @ B[s, :, :r].double().t())
    return d


def lora_expand_reference(u: torch.Tensor, B: torch.Tensor, token_slot: torch.Tensor, ranks: torch.Tensor,
                          scales: torch.Tensor, y: torch.Tensor, y_col_offset: int = 0) -> torch.Tensor:
    """y[:, off:off+H_out] += scale[s] * u[t, :r_s] @ B[s, :, :r_s]^T, in place; returns y."""
    H_out = B.shape[1]
    d = _expand_delta(u, B, token_slot, ranks, scales)
    active = (token_slot.long() >= 0).to(y.device)
    cols = y[:, y_col_offset:y_col_offset + H_out]
    new = (cols.double() + d).to(y.dtype)
    # tokens without adapter keep their bits (no round trip through float64)
    cols.copy_(torch.where(active[:, None], new, cols))
    return y


def lora_apply_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, token_slot: torch.Tensor,
                         ranks: torch.Tensor, scales: torch.Tensor, y: torch.Tensor,
                         y_col_offset: int = 0) -> torch.Tensor:
    """Shrink then expand of one slice (u kept in float64 here; the kernels keep fp32)."""
    u = _shrink64(x, A, token_slot, ranks)
    return lora_expand_reference(u, B, token_slot, ranks, scales, y, y_col_offset)


def lora_apply_slices_reference(x: torch.Tensor, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                                token_slot: torch.Tensor, ranks: Sequence[torch.Tensor],
                                scales: Sequence[torch.Tensor], y: torch.Tensor,
                                offsets: Sequence[int]) -> torch.Tensor:
    """Multi-slice apply: slice i adds into y[:, offsets[i]:offsets[i]+H_out_i]."""
    for A, B, r, sc, off in zip(As, Bs, ranks, scales, offsets):
        lora_apply_reference(x, A, B, token_slot, r, sc, y, off)
    return y
