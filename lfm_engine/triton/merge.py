"""Triton backend of the fused sparsify-and-merge (docs/spec/merge.md), bit-compatible with the CPU kernel.

Entry point: ``merge_triton(base, others, out, params)``; ``lfm_engine.ops.merge`` calls it
for ``backend="triton"``. Shapes: ``base`` (None only for ``linear``), every ``others[i]``
and ``out`` hold the same n elements, contiguous, on one device (CUDA, or the CPU when
``TRITON_INTERPRET=1``). Inputs may mix float32/float16/bfloat16; ``out`` has any of them.

The definition shared with the CPU and CUDA kernels (so masks are bit-identical). Every
host-side decision (which order statistics a cut needs and how their answers and ties
become the cut, the DELLA threshold table, the rescale factors, the merge coefficients and
divisor table) comes from the C++ planner the CPU and CUDA launchers use
(csrc/kernels/merge/merge_plan.h, reached through ``lfm_engine._C``); this module runs the
device passes:

* delta_i = fp32(x_i) - fp32(b), one fp32 rounding; selections use v = bits(|delta_i|)
  as an unsigned integer (non-negative floats order like their bit patterns).
* magnitude: keep the k = max(1, floor(d*n)) largest v, ties at the cut: lower flat
  index first. breadcrumbs: order (v, index) ascending, keep positions
  n_bot .. n_bot+target-1. Both are found by radix select: a histogram of the high 16
  bits of v, then of the low 16 bits among the elements of the chosen high bin (global
  atomic counts, exact integers, so deterministic), and, when only part of the equal
  values at a cut is kept, a tie pass: per-block counts of v == cut, a prefix sum, and a
  block-local cumulative sum that yields the flat index of the n-th tie.
* DARE: keep e iff philox(e) < floor(d * 2^32); DELLA: rows = shape[0] (1-D: one row),
  rank r (0-based) of (v, column) in its row, p = (d - eps) + (2 eps) * (r / (cols - 1))
  evaluated in double on the host into a [K, cols] threshold table, keep iff
  philox(e) < floor(p * 2^32). Philox4x32-10 with key (seed lo, seed hi), counter
  (q lo, q hi, stream, 0), q = e >> 2, word e & 3; the stream ids come from
  ``lfm_engine.reference.philox.stream_id`` (FNV-1a of the tensor name ^ position << 24).
  Rows with cols <= ``SORT_MAX_COLS`` are ranked by an in-register ``tl.sort`` of the
  64-bit keys (v << 32 | column); longer rows use ``torch.sort`` for the order and a
  Triton kernel for the draws.
* rescale "l1": per-block float64 partial sums of |delta| and of the kept |delta|,
  summed in float64; factor = ||delta||_1 / ||delta'||_1 (skipped below 1e-7), used as
  fp32. "inverse_density": 1/d.
* the merge pass (one kernel, reads base and the K models once per block and writes
  ``out``), the CPU kernel's arithmetic step by step: c_i = fp32(w_i f_i) (f_i the
  float64 rescale factor), t_i = keep ? c_i * delta_i : 0 in fp32. Consensus: election
  values e_i = t_i (unweighted: keep ? fp32(f_i) * delta_i : 0); the elected sign is
  that of the float64 sum sum_i kept (w_i) (delta_i * f_i), each product rounded to
  float64 and summed in model order (the reference's operations, exact on every
  backend); e_i agrees when it has that sign;
  mixed = sum agreeing t_i in fp32; normalised by fp32(1 / divisor) of the agreement
  pattern (K <= 8, divisor summed in float64 in model order, |d| < 1e-8 -> 1) or, for
  K > 8, by a float64 per-element divisor. Without consensus mixed = sum_i t_i
  and *= fp32(1 / sum_i w_i). out = b + lam * mixed (linear: mixed), rounded to out's dtype.
  No operation is fused into an FMA (enable_fp_fusion=False; the CPU kernel is built with
  -ffp-contract=off and the CUDA kernel with explicit rounding intrinsics), so outputs
  equal the CPU kernel's bit for bit on every host, except where the L1 factor's float64
  sums differ in summation order (docs/spec/merge.md "Arithmetic").

NaN/Inf in the base or a model (or a task vector overflowing fp32) raises ValueError
naming the tensor and the element, like the CPU kernel. Tensors must have fewer than
2^31 elements (int32 offsets and counts); larger ones raise ValueError.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from lfm_engine._native import native
from lfm_engine.core.merge_methods import (
    METHOD_CODES,
    RESCALE_INVERSE_DENSITY,
    RESCALE_L1,
    SPARSIFY_DELLA,
    SPARSIFY_MAGNITUDE,
    SPARSIFY_MAGNITUDE_OUTLIERS,
    SPARSIFY_NONE,
    SPARSIFY_RANDOM,
    MergeParams,
)
from lfm_engine.reference.philox import keep_threshold, stream_id

BLOCK = 1024            # elements per program in the streaming kernels (multiple of 4)
SORT_MAX_COLS = 16384   # rows up to this many columns are ranked by tl.sort in registers
_NO_LIMIT = (1 << 62)   # "no bound" for the element-index limits of a cut

# sparsifier codes of the kernels
_SP_NONE, _SP_CUT, _SP_RANDOM, _SP_DELLA = 0, 1, 2, 3


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch_opts() -> dict:
    # No FMA contraction on the GPU: b + lam * mixed and w * x + S must round like the
    # CPU kernel's separate multiply and add (-ffp-contract=off). The interpreter (numpy)
    # never fuses.
    return {} if _interpret() else {"enable_fp_fusion": False}


# ------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (any broadcastable shapes); returns the 4 words."""
    M0 = tl.full([], 0xD2511F53, tl.uint32)
    M1 = tl.full([], 0xCD9E8D57, tl.uint32)
    W0 = tl.full([], 0x9E3779B9, tl.uint32)
    W1 = tl.full([], 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(M0, c0)
        lo0 = M0 * c0
        hi1 = tl.umulhi(M1, c2)
        lo1 = M1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def _draw(e, stream, seed_lo, seed_hi):
    """The 32-bit draw (as int64) of flat element e (int64 tensor) of one stream."""
    q = e >> 2
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    # scalars go through an int64 tensor: a kernel argument equal to 1 may arrive as a
    # constexpr (Triton's specialisation), which has no .to()
    z = tl.zeros_like(q)
    c2 = (z + stream).to(tl.uint32)
    c3 = tl.zeros_like(c0)
    k0 = (z + seed_lo).to(tl.uint32)
    k1 = (z + seed_hi).to(tl.uint32)
    r0, r1, r2, r3 = _philox(c0, c1, c2, c3, k0, k1)
    w = e & 3
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r.to(tl.int64)


@triton.jit
def _absbits(delta):
    """bits(|delta|) as int64 (non-negative floats order like these integers)."""
    return (delta.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE: tl.constexpr):
    """(delta, nonfinite flags) for elements offs; delta = fp32(x) - fp32(b)."""
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BASE:
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = x - b
        bad = ((d.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000) | \
              ((b.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000)
    else:
        d = x
        bad = (d.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    return d, bad & m


@triton.jit
def _report_bad(bad_ptr, bad, offs):
    first = tl.min(tl.where(bad, offs.to(tl.int64), 0x7FFFFFFFFFFFFFFF))
    tl.atomic_min(bad_ptr, first)


@triton.jit
def _keep(i, delta, e, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS: tl.constexpr):
    """Keep flags of model i for elements e (int64) with task vector delta."""
    if SPARS == 1:
        v = _absbits(delta)
        lo_v = tl.load(cut_ptr + i * 6 + 0)
        hi_v = tl.load(cut_ptr + i * 6 + 1)
        lo_emin = tl.load(cut_ptr + i * 6 + 2)
        lo_emax = tl.load(cut_ptr + i * 6 + 3)
        hi_emin = tl.load(cut_ptr + i * 6 + 4)
        hi_emax = tl.load(cut_ptr + i * 6 + 5)
        k = (v >= lo_v) & (v <= hi_v)
        k = k & ((v != lo_v) | ((e >= lo_emin) & (e <= lo_emax)))
        k = k & ((v != hi_v) | ((e >= hi_emin) & (e <= hi_emax)))
    elif SPARS == 2:
        thr = tl.load(rnd_ptr + i * 2 + 0)
        stream = tl.load(rnd_ptr + i * 2 + 1)
        k = _draw(e, stream, seed_lo, seed_hi) < thr
    elif SPARS == 3:
        k = tl.load(mask_ptr + i * n + e, mask=e < n, other=0) != 0
    else:
        k = e >= 0
    return k


# ------------------------------------------------------------------------------------
# kernels


@triton.jit
def _hist_kernel(b_ptr, x_ptr, hist_ptr, bad_ptr, n, hb,
                 LOW: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """Radix histogram of v = bits(|delta|): high 16 bits (LOW=False) or, among the
    elements whose high 16 bits equal hb, the low 16 bits (LOW=True)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    _report_bad(bad_ptr, bad, offs)
    v = _absbits(d)
    if LOW:
        sel = m & ((v >> 16) == hb)
        binv = v & 0xFFFF
    else:
        sel = m
        binv = v >> 16
    tl.atomic_add(hist_ptr + binv, tl.full([BLOCK], 1, tl.int32), mask=sel)


@triton.jit
def _tie_count_kernel(b_ptr, x_ptr, cnt_ptr, n, value, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """cnt[block] = number of elements of the block with v == value."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    eq = m & (_absbits(d) == value)
    tl.store(cnt_ptr + pid, tl.sum(eq.to(tl.int32), axis=0))


@triton.jit
def _tie_locate_kernel(b_ptr, x_ptr, res_ptr, n, value, blk, ordinal, HAS_BASE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """res = flat index of the `ordinal`-th (0-based, within block blk) element with v == value."""
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    eq = m & (_absbits(d) == value)
    c = tl.cumsum(eq.to(tl.int32), axis=0)
    hit = eq & (c == ordinal + 1)
    tl.store(res_ptr + tl.zeros([BLOCK], tl.int32), offs.to(tl.int64), mask=hit)


@triton.jit
def _l1_kernel(b_ptr, x_ptr, part_ptr, i, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi,
               SPARS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """part[0, block] = sum |delta| and part[1, block] = sum of kept |delta|, in float64."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    k = _keep(i, d, offs.to(tl.int64), cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS) & m
    a = tl.abs(d).to(tl.float64)
    a = tl.where(m, a, 0.0)
    tl.store(part_ptr + pid, tl.sum(a, axis=0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(tl.where(k, a, 0.0), axis=0))


@triton.jit
def _della_sort_kernel(b_ptr, x_ptr, thr_ptr, mask_ptr, bad_ptr, i, stream, n, rows, cols, seed_lo, seed_hi,
                       HAS_BASE: tl.constexpr, R: tl.constexpr, COLS_P2: tl.constexpr):
    """R rows of model i: rank (v, column) by an in-register sort, draw, store keep bytes."""
    row = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    j = tl.arange(0, COLS_P2)[None, :]
    m = (j < cols) & (row < rows)
    offs = row * cols + j
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    _report_bad(bad_ptr, bad, offs)
    key = (_absbits(d) << 32) | j.to(tl.int64)
    key = tl.where(m, key, 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    key = tl.sort(key, dim=1)
    # sorted position r of a row holds its rank r (0-based), column jr
    jr = key & 0xFFFFFFFF
    thr = tl.load(thr_ptr + j + row * 0, mask=m, other=0)
    e = row.to(tl.int64) * cols + jr
    keep = _draw(e, stream, seed_lo, seed_hi) < thr
    tl.store(mask_ptr + i * n + e, keep.to(tl.uint8), mask=m)


@triton.jit
def _della_apply_kernel(order_ptr, thr_ptr, mask_ptr, i, stream, n, cols, seed_lo, seed_hi,
                        BLOCK: tl.constexpr):
    """Long rows: order[row, r] = column of rank r (from torch.sort); draw and store keep bytes."""
    row = tl.program_id(0)
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = r < cols
    jr = tl.load(order_ptr + row.to(tl.int64) * cols + r, mask=m, other=0)
    thr = tl.load(thr_ptr + r, mask=m, other=0)
    e = row.to(tl.int64) * cols + jr
    keep = _draw(e, stream, seed_lo, seed_hi) < thr
    tl.store(mask_ptr + i * n + e, keep.to(tl.uint8), mask=m)


@triton.jit
def _merge_kernel(b_ptr, xs, out_ptr, coef_ptr, ecoef_ptr, wd_ptr, ff_ptr, dw_ptr, tab_ptr,
                  cut_ptr, rnd_ptr, mask_ptr, bad_ptr,
                  n, seed_lo, seed_hi, inv_plain_div, lam,
                  K: tl.constexpr, SPARS: tl.constexpr, CONSENSUS: tl.constexpr,
                  NORMALIZE: tl.constexpr, UNWEIGHTED: tl.constexpr, TABLE: tl.constexpr,
                  HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """The fused merge pass over one block (see the module docstring for the formula).

    Per model i: coef = fp32(w_i f_i), ecoef = fp32(f_i or w_i f_i) (election value when
    unweighted), wd = w_i and ff = f_i in float64, dw = divisor share (w_i or 1, float64);
    tab = fp32 1/divisor per agreement pattern (K <= 8).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    e = offs.to(tl.int64)
    if HAS_BASE:
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mixed = tl.zeros([BLOCK], tl.float32)
    bad = offs < 0
    if CONSENSUS:
        # first sweep: the elected sign, from the float64 sum sd (exact like the reference's)
        sd = tl.zeros([BLOCK], tl.float64)
        for i in tl.static_range(K):
            d, bd = _load_delta(b_ptr, xs[i], offs, m, HAS_BASE)
            bad = bad | bd
            k = _keep(i, d, e, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS)
            dp = d.to(tl.float64) * tl.load(ff_ptr + i)
            if UNWEIGHTED:
                sd = tl.where(k, sd + dp, sd)
            else:
                sd = tl.where(k, sd + tl.load(wd_ptr + i) * dp, sd)
        pos = sd >= 0.0
        bits = tl.zeros([BLOCK], tl.int32)
        div = tl.zeros([BLOCK], tl.float64)
        for i in tl.static_range(K):
            d, bd = _load_delta(b_ptr, xs[i], offs, m, HAS_BASE)
            k = _keep(i, d, e, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS)
            t = tl.where(k, tl.load(coef_ptr + i) * d, 0.0)
            if UNWEIGHTED:
                ev = tl.where(k, tl.load(ecoef_ptr + i) * d, 0.0)
            else:
                ev = t
            agree = tl.where(pos, ev > 0.0, ev < 0.0)
            mixed = mixed + tl.where(agree, t, 0.0)
            if TABLE:
                bits = bits + tl.where(agree, 1 << i, 0)
            else:
                div = div + tl.where(agree, tl.load(dw_ptr + i), 0.0)
        if TABLE:
            mixed = mixed * tl.load(tab_ptr + bits)
        elif NORMALIZE:
            # |divisor| < 1e-8 -> 1, divided in float64 like the CPU kernel
            mixed = (mixed.to(tl.float64) / tl.where(tl.abs(div) < 1e-8, 1.0, div)).to(tl.float32)
    else:
        for i in tl.static_range(K):
            d, bd = _load_delta(b_ptr, xs[i], offs, m, HAS_BASE)
            bad = bad | bd
            c = tl.load(coef_ptr + i)
            if SPARS != 0:
                k = _keep(i, d, e, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS)
                mixed = mixed + tl.where(k, c * d, 0.0)
            else:
                mixed = mixed + c * d  # two roundings, no FMA (enable_fp_fusion=False)
        if NORMALIZE:
            mixed = mixed * inv_plain_div
    _report_bad(bad_ptr, bad, offs)
    if HAS_BASE:
        o = b + lam * mixed
    else:
        o = mixed
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------
# host orchestration


class _Ctx:
    """Per-call state: inputs, device scratch and the error flag."""

    def __init__(self, base, xs, params: MergeParams):
        self.base = base
        self.xs = xs
        self.p = params
        self.n = xs[0].numel()
        self.dev = xs[0].device
        self.K = len(xs)
        self.has_base = base is not None
        self.nblocks = triton.cdiv(self.n, BLOCK)
        self.bad = torch.full((1,), self.n, dtype=torch.int64, device=self.dev)
        self.seed_lo = params.seed & 0xFFFFFFFF
        self.seed_hi = (params.seed >> 32) & 0xFFFFFFFF
        self.streams = [stream_id(params.name, pos) for pos in params.model_positions]
        self.dummy_i64 = torch.zeros(8, dtype=torch.int64, device=self.dev)
        self.dummy_u8 = torch.zeros(8, dtype=torch.uint8, device=self.dev)

    def bptr(self):
        # a never-read placeholder when there is no base (the HAS_BASE branch is compiled out)
        return self.base if self.has_base else self.xs[0]

    def check_bad(self) -> None:
        e = int(self.bad.item())
        if e >= self.n:
            return
        name = self.p.name
        if self.has_base:
            v = float(self.base.reshape(-1)[e])
            if not math.isfinite(v):
                raise ValueError(f"non-finite value ({v}) in base at element {e} of tensor '{name}'")
        for i, x in enumerate(self.xs):
            v = float(x.reshape(-1)[e])
            if not math.isfinite(v):
                raise ValueError(f"non-finite value ({v}) in {self.p.model_label(i)} at element {e} of tensor '{name}'")
        raise ValueError(f"task vector overflows float32 at element {e} of tensor '{name}'")


def _find_bin(hist: torch.Tensor, pos: int, below: int) -> Tuple[int, int, int]:
    """(bin, count below the bin, count in the bin) of ascending position pos."""
    cum = torch.cumsum(hist.to(torch.int64), 0) + below
    b = int(torch.searchsorted(cum, torch.tensor([pos], dtype=torch.int64, device=cum.device),
                               right=True).item())
    if b >= hist.numel():
        raise RuntimeError("internal: radix select ran past the histogram")
    c = int(hist[b].item())
    return b, int(cum[b].item()) - c, c


def _select_value(ctx: _Ctx, i: int, pos: int) -> Tuple[int, int, int]:
    """Radix select: (v, c_lt, c_eq) of ascending position pos of model i's bits(|delta|)."""
    x = ctx.xs[i]
    hist = torch.zeros(65536, dtype=torch.int32, device=ctx.dev)
    grid = (ctx.nblocks,)
    _hist_kernel[grid](ctx.bptr(), x, hist, ctx.bad, ctx.n, 0, LOW=False, HAS_BASE=ctx.has_base,
                       BLOCK=BLOCK)
    ctx.check_bad()
    hb, below, _ = _find_bin(hist, pos, 0)
    hist.zero_()
    _hist_kernel[grid](ctx.bptr(), x, hist, ctx.bad, ctx.n, hb, LOW=True, HAS_BASE=ctx.has_base,
                       BLOCK=BLOCK)
    lb, c_lt, c_eq = _find_bin(hist, pos, below)
    return (hb << 16) | lb, c_lt, c_eq


def _nth_tie(ctx: _Ctx, i: int, value: int, ordinal: int) -> int:
    """Flat index of the ordinal-th (0-based) element of model i with bits(|delta|) == value."""
    x = ctx.xs[i]
    cnt = torch.empty(ctx.nblocks, dtype=torch.int32, device=ctx.dev)
    _tie_count_kernel[(ctx.nblocks,)](ctx.bptr(), x, cnt, ctx.n, value, HAS_BASE=ctx.has_base, BLOCK=BLOCK)
    cum = torch.cumsum(cnt.to(torch.int64), 0)
    blk = int(torch.searchsorted(cum, torch.tensor([ordinal], dtype=torch.int64, device=ctx.dev),
                                 right=True).item())
    if blk >= ctx.nblocks:
        raise RuntimeError(f"internal: radix select lost a tie (model {i})")
    before = int(cum[blk].item()) - int(cnt[blk].item())
    res = torch.full((1,), -1, dtype=torch.int64, device=ctx.dev)
    _tie_locate_kernel[(1,)](ctx.bptr(), x, res, ctx.n, value, blk, ordinal - before,
                             HAS_BASE=ctx.has_base, BLOCK=BLOCK)
    idx = int(res.item())
    if idx < 0:
        raise RuntimeError(f"internal: radix select lost a tie (model {i})")
    return idx


_CUT_FIELDS = ("lo_v", "hi_v", "lo_emin", "lo_emax", "hi_emin", "hi_emax")


def _cuts(ctx: _Ctx) -> torch.Tensor:
    """[K, 6] int64: lo_v, hi_v, lo_emin, lo_emax, hi_emin, hi_emax per model (see _keep).

    The planning is the C++ planner's (csrc/kernels/merge/merge_plan.h, through _C), the
    one the CPU and CUDA launchers use: which order statistics to select, and how each
    answer (and, when only part of the equal values is kept, the flat index of one tie)
    becomes the cut; only the radix-select and tie passes run here."""
    p, n = ctx.p, ctx.n
    code = METHOD_CODES[p.method]
    C = native()
    cuts, queries = C.merge_plan_cuts(code, n, list(p.densities), list(p.gammas))
    for model, pos, upper in queries:
        v, c_lt, c_eq = _select_value(ctx, model, pos)
        cut, field, ordinal = C.merge_apply_cut_answer(code, n, model, pos, upper, v, c_lt, c_eq, cuts[model])
        if field:
            cut[field] = _nth_tie(ctx, model, v, ordinal)
        cuts[model] = cut
    rows: List[List[int]] = []
    for c in cuts:
        if c["none"]:
            c = dict(c, lo_v=1, hi_v=0)  # empty range
        rows.append([min(int(c[f]), _NO_LIMIT) for f in _CUT_FIELDS])
    return torch.tensor(rows, dtype=torch.int64, device=ctx.dev)


def della_thresholds(cols: int, density: float, epsilon: float) -> torch.Tensor:
    """int64 [cols]: floor(p_r * 2^32), p_r = (d - eps) + (2 eps) * (r / (cols - 1)): the
    C++ planner's table (csrc/kernels/merge/merge_plan.h), computed once for every backend."""
    return torch.tensor(native().merge_della_thresholds(int(cols), float(density), float(epsilon)),
                        dtype=torch.int64)


def _della_masks(ctx: _Ctx, rows: int, cols: int, sort_max_cols: int) -> torch.Tensor:
    """uint8 [K, n]: 1 where model i keeps the element."""
    n = ctx.n
    mask = torch.zeros((ctx.K, n), dtype=torch.uint8, device=ctx.dev)
    cols_p2 = triton.next_power_of_2(max(cols, 1))
    # rows per program: several short rows share one sort (the interpreter pays per op,
    # the GPU wants enough elements per program)
    budget = (1 << 16) if _interpret() else 2048
    R = max(1, min(triton.next_power_of_2(rows), budget // cols_p2))
    for i in range(ctx.K):
        thr = della_thresholds(cols, ctx.p.densities[i], ctx.p.epsilons[i]).to(ctx.dev)
        x = ctx.xs[i]
        if cols <= sort_max_cols:
            _della_sort_kernel[(triton.cdiv(rows, R),)](
                ctx.bptr(), x, thr, mask, ctx.bad, i, ctx.streams[i], n, rows, cols,
                ctx.seed_lo, ctx.seed_hi, HAS_BASE=ctx.has_base, R=R, COLS_P2=cols_p2,
                **({} if _interpret() else {"num_warps": min(16, max(4, (R * cols_p2) // 1024))}))
        else:
            d = x.reshape(rows, cols).to(torch.float32) - ctx.base.reshape(rows, cols).to(torch.float32)
            if not bool(torch.isfinite(d).all()):
                bad = int((~torch.isfinite(d)).reshape(-1).nonzero()[0].item())
                ctx.bad.fill_(bad)
                ctx.check_bad()
            v = (d.abs().view(torch.int32).to(torch.int64) << 32) | torch.arange(cols, device=ctx.dev)
            order = (torch.sort(v, dim=1).values & 0xFFFFFFFF).contiguous()
            del d, v
            grid = (rows, triton.cdiv(cols, BLOCK))
            _della_apply_kernel[grid](order, thr, mask, i, ctx.streams[i], n, cols, ctx.seed_lo, ctx.seed_hi,
                                      BLOCK=BLOCK)
    ctx.check_bad()
    return mask


def merge_triton(base: Optional[torch.Tensor], others: Sequence[torch.Tensor], out: torch.Tensor,
                 params: MergeParams, *, sort_max_cols: Optional[int] = None,
                 return_masks: bool = False):
    """Merge K tensors into ``out`` with Triton kernels (formula: module docstring).

    base: [*S] or None (linear only); others: K tensors [*S]; out: [*S], written in place.
    params: resolved MergeParams (lfm_engine.core.merge_methods.resolve_merge_params).
    sort_max_cols: DELLA rows longer than this are ranked with torch.sort; default
    SORT_MAX_COLS on a GPU, 0 under the interpreter (whose tl.sort is a per-element
    Python loop); tests pass it to exercise both paths. return_masks: also return the keep masks as bool [K, *S]
    (None for methods without a sparsifier), for tests.

    Phases: check the arguments, sparsify (cuts / DARE thresholds / DELLA masks), rescale
    factors, the merge pass's coefficients (the C++ planner's), the merge pass.
    """
    xs = list(others)
    base = _check_args(base, xs, out, params)
    if sort_max_cols is None:
        sort_max_cols = 0 if _interpret() else SORT_MAX_COLS
    if out.numel() == 0:
        return (out, None) if return_masks else out
    flat = [x.reshape(-1) for x in xs]
    ctx = _Ctx(base.reshape(-1) if base is not None else None, flat, params)
    code, cut, rnd, dmask = _sparsify(ctx, out.shape, sort_max_cols)
    factors = _rescale_factors(ctx, code, cut, rnd, dmask)
    co = native().merge_coefficients(METHOD_CODES[params.method], [float(w) for w in params.weights], factors,
                                     bool(params.normalize), params.consensus_weighting == "unweighted",
                                     params.disjoint == "count")
    _merge_pass(ctx, out, co, factors, code, cut, rnd, dmask)
    if not return_masks:
        return out
    return out, _masks(ctx, code, cut, rnd, dmask, out.shape)


def _check_args(base, xs, out, params: MergeParams):
    """The base the method reads (None for linear); ValueError/TypeError naming the input."""
    if len(xs) != params.n_models:
        raise ValueError(f"merge_triton: params describe {params.n_models} models but {len(xs)} tensors were given")
    if not params.spec.uses_base:
        base = None
    elif base is None:
        raise ValueError(f"merge_triton: method '{params.method}' needs a base tensor")
    for what, t in [("base", base)] + [(params.model_label(i), x) for i, x in enumerate(xs)]:
        if t is None:
            continue
        if t.shape != out.shape:
            raise ValueError(f"merge_triton: {what} has shape {tuple(t.shape)}, out has {tuple(out.shape)}")
        if t.device != out.device:
            raise ValueError(f"merge_triton: {what} is on {t.device}, out is on {out.device}")
        if not t.is_contiguous():
            raise ValueError(f"merge_triton: {what} is not contiguous")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"merge_triton: {what} has dtype {t.dtype} (float32, float16, bfloat16)")
    if not out.is_contiguous():
        raise ValueError("merge_triton: out is not contiguous")
    if out.device.type != "cuda" and not _interpret():
        raise ValueError("merge_triton: tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU tensors)")
    if out.numel() >= 2**31:
        raise ValueError(f"merge_triton: tensor of {out.numel()} elements is too large (at most 2^31 - 1); "
                         f"use backend='cuda'")
    return base


def _sparsify(ctx: _Ctx, shape, sort_max_cols: int):
    """(kernel sparsifier code, cut [K, 6], DARE (threshold, stream) [K, 2], DELLA keep bytes [K, n]);
    the tables a sparsifier does not use are dummies."""
    sp = ctx.p.spec.sparsifier
    cut, rnd, dmask = ctx.dummy_i64, ctx.dummy_i64, ctx.dummy_u8
    if sp in (SPARSIFY_MAGNITUDE, SPARSIFY_MAGNITUDE_OUTLIERS):
        return _SP_CUT, _cuts(ctx), rnd, dmask
    if sp == SPARSIFY_RANDOM:
        rnd = torch.tensor([[keep_threshold(d), s] for d, s in zip(ctx.p.densities, ctx.streams)],
                           dtype=torch.int64, device=ctx.dev)
        return _SP_RANDOM, cut, rnd, dmask
    if sp == SPARSIFY_DELLA:
        # rows = shape[0] (1-D: one row), as the reference's della_rows
        rows, cols = (shape[0], ctx.n // shape[0]) if len(shape) >= 2 and shape[0] > 0 else (1, ctx.n)
        return _SP_DELLA, cut, rnd, _della_masks(ctx, rows, cols, sort_max_cols)
    return _SP_NONE, cut, rnd, dmask


def _rescale_factors(ctx: _Ctx, code: int, cut, rnd, dmask) -> List[float]:
    """Per-model rescale factor f_i (1 without a sparsifier or rescale); the rules are the
    C++ planner's (l1: ||delta||_1 / ||delta'||_1 from float64 block sums; 1/density)."""
    p, K = ctx.p, ctx.K
    if code == _SP_NONE or p.rescale not in (RESCALE_L1, RESCALE_INVERSE_DENSITY):
        return [1.0] * K
    C = native()
    if p.rescale == RESCALE_INVERSE_DENSITY:
        return [C.merge_rescale_factor("inverse_density", float(d)) for d in p.densities]
    factors = []
    part = torch.empty((2, ctx.nblocks), dtype=torch.float64, device=ctx.dev)
    for i in range(K):
        _l1_kernel[(ctx.nblocks,)](ctx.bptr(), ctx.xs[i], part, i, cut, rnd, dmask, ctx.n,
                                   ctx.seed_lo, ctx.seed_hi, SPARS=code, HAS_BASE=ctx.has_base, BLOCK=BLOCK)
        ctx.check_bad()
        tot, kept = (float(v) for v in part.sum(dim=1).tolist())
        factors.append(C.merge_rescale_factor("l1", tot, kept))
    return factors


def _merge_pass(ctx: _Ctx, out: torch.Tensor, co: dict, factors: List[float], code: int, cut, rnd, dmask) -> None:
    """The fused merge kernel with the planner's coefficients ``co`` (coef, ecoef, dshare,
    inv_plain_div, table, inv_div; csrc/kernels/merge/merge_plan.h)."""
    p, dev = ctx.p, ctx.dev
    # fp32 values round-trip exactly through Python floats
    coef = torch.tensor(co["coef"], dtype=torch.float32, device=dev)
    ecoef = torch.tensor(co["ecoef"], dtype=torch.float32, device=dev)
    wd = torch.tensor([float(w) for w in p.weights], dtype=torch.float64, device=dev)
    ff = torch.tensor(factors, dtype=torch.float64, device=dev)
    dw = torch.tensor(co["dshare"], dtype=torch.float64, device=dev)
    tab = torch.tensor(co["inv_div"] if co["table"] else [1.0], dtype=torch.float32, device=dev)
    _merge_kernel[(ctx.nblocks,)](
        ctx.bptr(), tuple(ctx.xs), out.reshape(-1), coef, ecoef, wd, ff, dw, tab, cut, rnd, dmask, ctx.bad,
        ctx.n, ctx.seed_lo, ctx.seed_hi, float(co["inv_plain_div"]), float(p.lam),
        K=ctx.K, SPARS=code, CONSENSUS=p.spec.consensus, NORMALIZE=bool(p.normalize),
        UNWEIGHTED=p.consensus_weighting == "unweighted", TABLE=bool(co["table"]),
        HAS_BASE=ctx.has_base, BLOCK=BLOCK, **_launch_opts())
    ctx.check_bad()


@triton.jit
def _mask_kernel(b_ptr, x_ptr, res_ptr, i, cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi,
                 SPARS: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bad = _load_delta(b_ptr, x_ptr, offs, m, HAS_BASE)
    k = _keep(i, d, offs.to(tl.int64), cut_ptr, rnd_ptr, mask_ptr, n, seed_lo, seed_hi, SPARS)
    tl.store(res_ptr + offs, k.to(tl.uint8), mask=m)


def _masks(ctx: _Ctx, code: int, cut, rnd, dmask, shape) -> Optional[torch.Tensor]:
    """bool [K, *shape]: the keep flags the merge pass used (the same _keep code)."""
    if code == _SP_NONE:
        return None
    res = torch.empty((ctx.K, ctx.n), dtype=torch.uint8, device=ctx.dev)
    for i in range(ctx.K):
        _mask_kernel[(ctx.nblocks,)](ctx.bptr(), ctx.xs[i], res[i], i, cut, rnd, dmask, ctx.n,
                                     ctx.seed_lo, ctx.seed_hi, SPARS=code, HAS_BASE=ctx.has_base,
                                     BLOCK=BLOCK)
    return res.bool().reshape((ctx.K,) + tuple(shape))
