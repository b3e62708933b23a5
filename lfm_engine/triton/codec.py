"""Triton kernels for task-vector codecs: fused decode-and-add and batched delta_apply.

Layouts are those of include/lfm/codec.h / reference/codec.py (sign1 words are passed as
int32: only single bits are extracted, so the sign of the word does not matter).

decode_add:  out[r, c] = base[r, c] + alpha * q[r, c] * s[r, c // g]   (fp32 math; for nf4
  q is the code book entry of the nibble, read from a 16-float table on the device)
delta_apply: y[t, :] += alpha * x[t, :] @ W_slot(t)^T, W decoded tile by tile in registers:
  tokens are grouped by slot on the host (a stable sort), each program takes a tile of
  BLOCK_T tokens of one slot and BLOCK_N output rows, and loops over the input dim in
  BLOCK_K steps: load the x tile, decode the [BLOCK_N, BLOCK_K] weight tile from the packed
  codes and scales, tl.dot into an fp32 accumulator. No decoded matrix is materialised.
  The slots' packed tensors are stacked into one [S, ...] tensor per call (they are the
  compressed bytes, ~1/16 of a bf16 matrix for sign1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CODE = {"sign1": 0, "int8": 1, "int4": 2, "int2": 3, "nf4": 4}
_BOOKS: dict = {}  # device -> the NF4 code book as a float32 tensor


def _book(device) -> torch.Tensor:
    """The NF4 code book (reference/codec.py NF4_LEVELS) on `device`, made once per device."""
    key = str(device)
    t = _BOOKS.get(key)
    if t is None:
        from lfm_engine.reference.codec import NF4_LEVELS

        t = _BOOKS[key] = NF4_LEVELS.to(device)
    return t


@triton.jit
def _decode_tile(data_ptr, scale_ptr, book_ptr, rows, cols, row_stride, n_groups, group,
                 CODEC: tl.constexpr, PER_TENSOR: tl.constexpr):
    """q * s for a tile given by broadcastable index tensors rows [R, 1], cols [1, C]."""
    if CODEC == 0:
        word = tl.load(data_ptr + rows * row_stride + cols // 32)
        bit = (word >> (cols % 32)) & 1
        q = 1.0 - 2.0 * bit.to(tl.float32)
        if PER_TENSOR:
            s = tl.load(scale_ptr + rows * 0).to(tl.float32)
        else:
            s = tl.load(scale_ptr + rows).to(tl.float32)
    else:
        if CODEC == 1:
            q = tl.load(data_ptr + rows * row_stride + cols).to(tl.float32)
        elif CODEC == 2:
            b = tl.load(data_ptr + rows * row_stride + cols // 2).to(tl.int32)
            v = (b >> ((cols % 2) * 4)) & 15
            q = (v - ((v >> 3) << 4)).to(tl.float32)
        elif CODEC == 4:
            b = tl.load(data_ptr + rows * row_stride + cols // 2).to(tl.int32)
            q = tl.load(book_ptr + ((b >> ((cols % 2) * 4)) & 15))
        else:
            b = tl.load(data_ptr + rows * row_stride + cols // 4).to(tl.int32)
            v = (b >> ((cols % 4) * 2)) & 3
            q = (v - ((v >> 1) << 2)).to(tl.float32)
        s = tl.load(scale_ptr + rows * n_groups + cols // group).to(tl.float32)
    return q * s


@triton.jit
def _decode_add_kernel(data_ptr, scale_ptr, book_ptr, base_ptr, out_ptr, n_rows, n_cols, row_stride, n_groups, group, alpha,
                       CODEC: tl.constexpr, PER_TENSOR: tl.constexpr, HAS_BASE: tl.constexpr, UNIT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    m = (r < n_rows) & (c < n_cols)
    rr = tl.where(m, r, 0)
    cc = tl.where(m, c, 0)
    d = _decode_tile(data_ptr, scale_ptr, book_ptr, rr, cc, row_stride, n_groups, group, CODEC, PER_TENSOR)
    if not UNIT:
        d = alpha * d
    if HAS_BASE:
        d = tl.load(base_ptr + r * n_cols + c, mask=m, other=0.0).to(tl.float32) + d
    tl.store(out_ptr + r * n_cols + c, d.to(out_ptr.dtype.element_ty), mask=m)


def _matrix(shape):
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return int(shape[0]), n


def _payload(enc):
    if enc.codec == "sign1":
        return enc.fields["signs"].view(torch.int32), enc.fields["scales"], 1, 1
    g = int(enc.options.get("group_size", 128))
    data = enc.fields["q" if enc.codec == "int8" else "packed"]
    return data, enc.fields["scales"], g, enc.fields["scales"].shape[-1]


def decode_add_triton(enc, base, out, alpha: float = 1.0) -> None:
    """out = base + alpha * decode(enc) (base may be None: out = alpha * decode(enc))."""
    rows, cols = _matrix(enc.shape)
    data, scales, g, ng = _payload(enc)
    row_stride = data.shape[-1] if data.ndim else 1
    BLOCK_R, BLOCK_C = 8, 256
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
    if rows == 0 or cols == 0:
        return
    _decode_add_kernel[grid](data, scales, _book(out.device), base if base is not None else out, out, rows, cols, row_stride, ng, g,
                             float(alpha), CODEC=CODE[enc.codec], PER_TENSOR=bool(enc.options.get("per_tensor")),
                             HAS_BASE=base is not None, UNIT=float(alpha) == 1.0, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)


@triton.jit
def _delta_apply_kernel(x_ptr, y_ptr, data_ptr, scale_ptr, book_ptr, tile_slot_ptr, tile_start_ptr, tile_count_ptr, order_ptr,
                        n_in, n_out, row_stride, slot_data_stride, slot_scale_stride, n_groups, group, alpha,
                        CODEC: tl.constexpr, PER_TENSOR: tl.constexpr, FP32_DOT: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    count = tl.load(tile_count_ptr + tile)
    ti = tl.arange(0, BLOCK_T)
    tmask = ti < count
    tok = tl.load(order_ptr + start + ti, mask=tmask, other=0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_out
    nn = tl.where(nmask, n, 0)
    d_ptr = data_ptr + slot.to(tl.int64) * slot_data_stride
    s_ptr = scale_ptr + slot.to(tl.int64) * slot_scale_stride
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)  # a builtin (tl.zeros is a jit helper)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < n_in
        kk = tl.where(kmask, k, 0)
        xt = tl.load(x_ptr + tok[:, None].to(tl.int64) * n_in + k[None, :], mask=tmask[:, None] & kmask[None, :],
                     other=0.0)
        w = _decode_tile(d_ptr, s_ptr, book_ptr, nn[:, None], kk[None, :], row_stride, n_groups, group, CODEC, PER_TENSOR)
        w = tl.where(kmask[None, :], w, 0.0)
        if FP32_DOT:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    ym = tmask[:, None] & nmask[None, :]
    yp = y_ptr + tok[:, None].to(tl.int64) * n_out + n[None, :]
    yv = tl.load(yp, mask=ym, other=0.0).to(tl.float32) + alpha * acc
    tl.store(yp, yv.to(y_ptr.dtype.element_ty), mask=ym)


def delta_apply_triton(x, deltas, token_slot, y, alpha: float = 1.0) -> None:
    """y[t] += alpha * x[t] @ decode(deltas[token_slot[t]])^T (validated by ops/codec.py)."""
    T, n_in = x.shape
    n_out = y.shape[1]
    codec = deltas[0].codec
    pays = [_payload(e) for e in deltas]
    data = torch.stack([p[0] for p in pays])
    scales = torch.stack([p[1] for p in pays])
    g, ng = pays[0][2], pays[0][3]
    row_stride = data.shape[-1]
    # Group tokens by slot (stable) and cut each slot's run into tiles of BLOCK_T tokens.
    BLOCK_T, BLOCK_N, BLOCK_K = 16, 32, 64
    slot = token_slot.to(torch.int64)
    order = torch.sort(slot, stable=True).indices
    counts = torch.bincount(slot[slot >= 0], minlength=len(deltas)).tolist()
    first = int((slot < 0).sum())
    tile_slot, tile_start, tile_count = [], [], []
    pos = first
    for s, c in enumerate(counts):
        for off in range(0, c, BLOCK_T):
            tile_slot.append(s)
            tile_start.append(pos + off)
            tile_count.append(min(BLOCK_T, c - off))
        pos += c
    if not tile_slot:
        return
    dev = x.device
    ts = torch.tensor(tile_slot, dtype=torch.int32, device=dev)
    tst = torch.tensor(tile_start, dtype=torch.int32, device=dev)
    tc = torch.tensor(tile_count, dtype=torch.int32, device=dev)
    order = order.to(torch.int32)
    grid = (len(tile_slot), triton.cdiv(n_out, BLOCK_N))
    _delta_apply_kernel[grid](x, y, data, scales, _book(dev), ts, tst, tc, order, n_in, n_out, row_stride,
                              data[0].numel(), scales[0].numel(), ng, g, float(alpha),
                              CODEC=CODE[codec], PER_TENSOR=bool(deltas[0].options.get("per_tensor")),
                              FP32_DOT=x.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
