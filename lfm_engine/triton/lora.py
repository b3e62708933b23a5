"""Triton kernels of the multi-LoRA ops (docs/spec/lora.md), launched by ops/lora.py.

Token-slot form only: the segment form is turned into token_slot on the device first
(repeat_interleave; O(T) and no host sync). Per slice one launch (Triton cannot index a
Python list of tensors inside a kernel); the CUDA C++ backend does all slices in one launch.

Kernels (program = one token x one block):
  _shrink_kernel  grid (T,):          u[t, :] = x[t] . A[s, :r_s]^T   (zeros beyond r_s / slot -1)
  _expand_kernel  grid (T, H_out/BN): y[t, off + n] += scale[s] * u[t, :r_s] . B[s, n, :r_s]^T
  _apply_kernel   grid (T, H_out/BN): both fused; each program recomputes the (cheap, r_s x H_in)
                  shrink of its token so u never leaves registers. Used while T * blocks is small
                  (decode); larger batches run shrink + expand through an fp32 [T, R_max] buffer,
                  which costs far less than recomputing the shrink per output block.
Only rows/columns j < r_s of A/B are loaded (masked loads): bytes follow each adapter's real
rank; the register tile is R_max wide. Accumulation in fp32, y rounded once to its dtype.
Out-of-range slots are treated as "no adapter" and ranks are clamped to [0, R_max], so a
launch without validation never reads out of bounds.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_rank(ts_ptr, ranks_ptr, t, n_slots, R):
    slot = tl.load(ts_ptr + t)
    valid = (slot >= 0) & (slot < n_slots)
    slot_c = tl.where(valid, slot, 0)
    rank = tl.load(ranks_ptr + slot_c)
    rank = tl.minimum(tl.maximum(rank, 0), R)
    rank = tl.where(valid, rank, 0)
    return slot_c.to(tl.int64), rank, valid


@triton.jit
def _shrink_row(x_ptr, a_ptr, t, slot, rank, H_in, x_ld, R, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    a_base = a_ptr + slot * R * H_in
    for k0 in range(0, H_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        km = offs_k < H_in
        xv = tl.load(x_ptr + t.to(tl.int64) * x_ld + offs_k, mask=km & (rank > 0), other=0.0).to(tl.float32)
        am = (offs_r[:, None] < rank) & km[None, :]
        av = tl.load(a_base + offs_r[:, None] * H_in + offs_k[None, :], mask=am, other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    return acc


@triton.jit
def _expand_block(acc, b_ptr, y_ptr, t, slot, rank, scale, H_out, R, y_ld, y_off, pid_n,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < H_out
    bm = nm[:, None] & (offs_r[None, :] < rank)
    bv = tl.load(b_ptr + slot * H_out * R + offs_n[:, None] * R + offs_r[None, :], mask=bm, other=0.0)
    d = tl.sum(bv.to(tl.float32) * acc[None, :], axis=1) * scale
    yp = y_ptr + t.to(tl.int64) * y_ld + y_off + offs_n
    wm = nm & (rank > 0)  # tokens without adapter: y is not even rewritten
    yv = tl.load(yp, mask=wm, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + d).to(yv.dtype), mask=wm)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, ts_ptr, ranks_ptr, u_ptr, H_in, x_ld, n_slots, R,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot, rank, valid = _slot_rank(ts_ptr, ranks_ptr, t, n_slots, R)
    acc = _shrink_row(x_ptr, a_ptr, t, slot, rank, H_in, x_ld, R, BLOCK_R, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    tl.store(u_ptr + t.to(tl.int64) * R + offs_r, acc, mask=offs_r < R)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, ts_ptr, ranks_ptr, scales_ptr, y_ptr, H_out, y_ld, y_off, n_slots, R,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, rank, valid = _slot_rank(ts_ptr, ranks_ptr, t, n_slots, R)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.load(u_ptr + t.to(tl.int64) * R + offs_r, mask=offs_r < rank, other=0.0)
    scale = tl.load(scales_ptr + slot)
    _expand_block(acc, b_ptr, y_ptr, t, slot, rank, scale, H_out, R, y_ld, y_off, pid_n, BLOCK_R, BLOCK_N)


@triton.jit
def _apply_kernel(x_ptr, a_ptr, b_ptr, ts_ptr, ranks_ptr, scales_ptr, y_ptr, H_in, H_out, x_ld, y_ld, y_off,
                  n_slots, R, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, rank, valid = _slot_rank(ts_ptr, ranks_ptr, t, n_slots, R)
    acc = _shrink_row(x_ptr, a_ptr, t, slot, rank, H_in, x_ld, R, BLOCK_R, BLOCK_K)
    scale = tl.load(scales_ptr + slot)
    _expand_block(acc, b_ptr, y_ptr, t, slot, rank, scale, H_out, R, y_ld, y_off, pid_n, BLOCK_R, BLOCK_N)


def _blocks(R: int):
    BLOCK_R = max(16, triton.next_power_of_2(max(R, 1)))
    # keep the [BLOCK_R, BLOCK_K] / [BLOCK_N, BLOCK_R] register tiles near 4K elements
    BLOCK_K = max(16, min(128, 4096 // BLOCK_R))
    BLOCK_N = max(16, min(64, 4096 // BLOCK_R))
    return BLOCK_R, BLOCK_K, BLOCK_N


def _row_ld(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def lora_shrink_triton(x: torch.Tensor, As: Sequence[torch.Tensor], token_slot: torch.Tensor,
                       ranks: Sequence[torch.Tensor], u: torch.Tensor) -> None:
    """u[i] (float32 [T, R_max]) = shrink of slice i; fully written."""
    T, H_in = x.shape
    if T == 0:
        return
    for i, (A, rk) in enumerate(zip(As, ranks)):
        n_slots, R = A.shape[0], A.shape[1]
        if R == 0:
            continue
        if n_slots == 0:  # no slot table: every token is "no adapter" (and nothing may be loaded)
            u[i].zero_()
            continue
        BR, BK, _ = _blocks(R)
        _shrink_kernel[(T,)](x, A, token_slot, rk, u[i], H_in, _row_ld(x), n_slots, R, BLOCK_R=BR, BLOCK_K=BK)


def lora_expand_triton(u: torch.Tensor, Bs: Sequence[torch.Tensor], token_slot: torch.Tensor,
                       ranks: Sequence[torch.Tensor], scales: Sequence[torch.Tensor], y: torch.Tensor,
                       offsets: Sequence[int]) -> None:
    T = y.shape[0]
    if T == 0:
        return
    for i, (B, rk, sc, off) in enumerate(zip(Bs, ranks, scales, offsets)):
        n_slots, H_out, R = B.shape
        if R == 0 or H_out == 0 or n_slots == 0:
            continue
        BR, _, BN = _blocks(R)
        grid = (T, triton.cdiv(H_out, BN))
        _expand_kernel[grid](u[i].contiguous(), B, token_slot, rk, sc, y, H_out, _row_ld(y), int(off), n_slots, R,
                             BLOCK_R=BR, BLOCK_N=BN)


# Fused apply while T * output blocks stays below this; beyond, shrink + expand is cheaper.
FUSED_MAX_PROGRAMS = 4096


def lora_apply_triton(x: torch.Tensor, As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                      token_slot: torch.Tensor, ranks: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                      y: torch.Tensor, offsets: Sequence[int]) -> None:
    T, H_in = x.shape
    if T == 0:
        return
    for A, B, rk, sc, off in zip(As, Bs, ranks, scales, offsets):
        n_slots, H_out, R = B.shape
        if R == 0 or H_out == 0 or n_slots == 0:
            continue
        BR, BK, BN = _blocks(R)
        n_blocks = triton.cdiv(H_out, BN)
        if T * n_blocks <= FUSED_MAX_PROGRAMS:
            _apply_kernel[(T, n_blocks)](x, A, B, token_slot, rk, sc, y, H_in, H_out, _row_ld(x), _row_ld(y),
                                         int(off), n_slots, R, BLOCK_R=BR, BLOCK_K=BK, BLOCK_N=BN)
        else:
            u = torch.empty(T, R, dtype=torch.float32, device=x.device)
            _shrink_kernel[(T,)](x, A, token_slot, rk, u, H_in, _row_ld(x), n_slots, R, BLOCK_R=BR, BLOCK_K=BK)
            _expand_kernel[(T, n_blocks)](u, B, token_slot, rk, sc, y, H_out, _row_ld(y), int(off), n_slots, R,
                                          BLOCK_R=BR, BLOCK_N=BN)
