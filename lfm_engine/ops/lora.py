"""Multi-LoRA batched ops: lora_shrink, lora_expand, lora_apply (docs/spec/lora.md).

A batch of T tokens runs through one linear layer; token t uses slot s = token_slot[t]
of the layer's slot table (or no adapter when s = -1):

    shrink:  u[t, :r_s]            = x[t, :] @ A[s, :r_s, :]^T                   (fp32)
    expand:  y[t, off:off+H_out]  += scale[s] * u[t, :r_s] @ B[s, :, :r_s]^T     (in place)
    apply:   both, fused (u never goes to memory on the GPU; a per-worker fp32 tile on the CPU)

Shapes and dtypes:
    x            [T, H_in]                float32 / float16 / bfloat16
    A            [n_slots, R_max, H_in]   float32 / float16 / bfloat16 (rows >= r_s are padding)
    B            [n_slots, H_out, R_max]  float32 / float16 / bfloat16 (cols >= r_s are padding)
    ranks        [n_slots] int32, 0 <= r_s <= R_max (0 = no weights in this slice; None = all R_max)
    scales       [n_slots] float32 (lora_alpha / r_s, or / sqrt(r_s) for rsLoRA)
    token_slot   [T] int32 in [-1, n_slots); -1 = no adapter: y[t] is left untouched (bit for bit)
    u            [T, R_max] float32 (columns >= r_s are zero; rows of slot -1 tokens are zero)
    y            [T, H_y] float, H_y >= off + H_out; only columns off..off+H_out-1 change
Segment form (prefill): pass ``seg_start`` ([S+1] int32, non-decreasing, seg_start[0] = 0,
seg_start[S] = T) and ``seg_slot`` ([S] int32) as keywords instead of ``token_slot``; tokens
seg_start[i]..seg_start[i+1]-1 use seg_slot[i]. Both forms give the same result.

Multi-slice (a fused qkv / gate_up projection in one launch): pass lists ``A=[A_q, A_k, A_v]``
and ``B=[B_q, B_k, B_v]``; ``y_col_offset`` is then a list of column offsets (default: the
slices side by side from column 0), ``ranks``/``scales`` either one table shared by every
slice or a list with one table per slice. Multi-slice ``lora_shrink`` returns u as
[n_slices, T, R_max] and multi-slice ``lora_expand`` takes that. All slices share n_slots
(one slot table); slices' column ranges in y must not overlap. ``lora_apply_slices(x, [(A, B,
offset), ...], ...)`` is the same call with (A, B, offset) triples.

Decisions where the spec is silent:
  * x/y may have a different float dtype from A/B (e.g. an fp32 adapter on a bf16 model);
    every product is accumulated in fp32 and y is rounded once to its own dtype.
  * ranks/scales/token_slot may be Python lists or integer tensors of any int dtype; they
    are converted to int32/float32 on the tensors' device. Float slot tables are a TypeError.
  * ``validate=True`` (default) checks values before launch: slots in [-1, n_slots) (IndexError),
    0 <= ranks <= R_max, finite scales, well-formed segments (ValueError). On a GPU that costs
    one device->host sync; a serving loop that validated its slot table when it built the batch
    passes ``validate=False``. Kernels never read out of bounds either way: they treat an
    out-of-range slot as "no adapter" and clamp ranks to [0, R_max].
  * Shape/dtype/device checks always run (they are free); errors name the argument.
  * x (an input) may be any strided 2-D view: non-row-contiguous x is copied. y is written in
    place so its last dimension must have stride 1 (row stride is free). A, B must be contiguous.

Backends (visible table, ops/_dispatch.py): "cpu" (C++ kernel, multi-threaded, AVX2),
"cuda" (CUDA C++ behind the same C ABI), "triton" (GPU, or CPU under TRITON_INTERPRET=1),
"reference" (reference/lora.py). The ops are torch.library custom ops (``torch.ops.lfm.*``)
with fake kernels, so they run under torch.compile.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from lfm_engine import _tensor
from lfm_engine._native import has_native, native
from lfm_engine.ops._dispatch import default_backends, pick_backend

_FLOATS = _tensor.FLOAT_DTYPES
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_I32_MIN, _I32_MAX = -(2 ** 31), 2 ** 31 - 1


# ---------------------------------------------------------------------------------------
# argument normalisation and checks (shape/dtype/device: always; values: validate=True)
# ---------------------------------------------------------------------------------------

def _err(op: str, msg: str, exc=ValueError):
    raise exc(f"{op}: {msg}")


def _as_index_tensor(op: str, v, name: str, device: torch.device) -> torch.Tensor:
    """int32 tensor on `device` from an int tensor or a Python sequence."""
    if isinstance(v, torch.Tensor):
        if v.dtype not in _INTS:
            _err(op, f"{name} must be an integer tensor (int32), got {v.dtype}", TypeError)
        if v.dim() != 1:
            _err(op, f"{name} must be 1-D, got shape {tuple(v.shape)}")
        if v.device != device:
            _err(op, f"{name} is on {v.device} but x is on {device}")
        if v.dtype == torch.int32:
            return v if v.is_contiguous() else v.contiguous()
        if v.dtype == torch.int64 and v.numel():
            # narrowing must not wrap a huge index into a valid slot (one host sync, only here)
            lo, hi = int(v.min()), int(v.max())
            if lo < _I32_MIN or hi > _I32_MAX:
                _err(op, f"{name} holds {lo if lo < _I32_MIN else hi}, outside the int32 range", IndexError)
        return v.to(torch.int32).contiguous()
    try:
        vals = [int(e) for e in v]
    except (TypeError, ValueError):
        _err(op, f"{name} must be an int32 tensor or a sequence of ints, got {type(v).__name__}", TypeError)
    for e, o in zip(vals, v):
        if isinstance(o, float) and o != int(o):
            _err(op, f"{name} holds a non-integer value {o}", TypeError)
        if e < _I32_MIN or e > _I32_MAX:
            _err(op, f"{name} holds {e}, outside the int32 range", IndexError)
    return torch.tensor(vals, dtype=torch.int32, device=device)


def _as_scale_tensor(op: str, v, name: str, n_slots: int, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if not v.dtype.is_floating_point:
            _err(op, f"{name} must be a float tensor (float32), got {v.dtype}", TypeError)
        if v.device != device:
            _err(op, f"{name} is on {v.device} but x is on {device}")
        t = v if v.dtype == torch.float32 and v.is_contiguous() else v.to(torch.float32).contiguous()
    else:
        t = torch.tensor([float(e) for e in v], dtype=torch.float32, device=device)
    if t.dim() != 1 or t.shape[0] != n_slots:
        _err(op, f"{name} must have shape [n_slots] = [{n_slots}], got {tuple(t.shape)}")
    return t


def _per_slice(op: str, v, n_slices: int, name: str) -> list:
    """One table per slice: a list of n_slices tables, a 2-D tensor, or one shared table."""
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        if v.shape[0] != n_slices:
            _err(op, f"{name} has {v.shape[0]} rows but there are {n_slices} slices")
        return [v[i] for i in range(n_slices)]
    if isinstance(v, (list, tuple)) and len(v) > 0 and (
            isinstance(v[0], torch.Tensor) or isinstance(v[0], (list, tuple))):
        if len(v) != n_slices:
            _err(op, f"{name} holds {len(v)} tables but there are {n_slices} slices")
        return list(v)
    return [v] * n_slices


def _check_float2d(op: str, t, name: str, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        _err(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in _FLOATS:
        _err(op, f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16", TypeError)
    if t.dim() != 2:
        _err(op, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _err(op, f"{name} is on {t.device} but x is on {device}")


def _check_table(op: str, t, name: str, device) -> None:
    if not isinstance(t, torch.Tensor):
        _err(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in _FLOATS:
        _err(op, f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16", TypeError)
    if t.dim() != 3:
        _err(op, f"{name} must be 3-D [n_slots, ...], got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        _err(op, f"{name} must be contiguous (slot tables are stored packed)")
    if t.device != device:
        _err(op, f"{name} is on {t.device} but x is on {device}")


def _batch(op: str, T: int, device, token_slot, seg_start, seg_slot):
    """(token_slot, seg_start, seg_slot) as int32 tensors; exactly one form given."""
    if token_slot is not None:
        if seg_start is not None or seg_slot is not None:
            _err(op, "give either token_slot or (seg_start, seg_slot), not both")
        ts = _as_index_tensor(op, token_slot, "token_slot", device)
        if ts.shape[0] != T:
            _err(op, f"token_slot has {ts.shape[0]} entries but the batch has T = {T} tokens")
        return ts, None, None
    if seg_start is None or seg_slot is None:
        _err(op, "no slot map: give token_slot, or both seg_start= and seg_slot=")
    ss = _as_index_tensor(op, seg_start, "seg_start", device)
    sl = _as_index_tensor(op, seg_slot, "seg_slot", device)
    if ss.shape[0] != sl.shape[0] + 1:
        _err(op, f"seg_start must have S+1 = {sl.shape[0] + 1} entries for {sl.shape[0]} segments, "
                 f"got {ss.shape[0]}")
    return None, ss, sl


def _check_values(op: str, T: int, n_slots: int, ts, ss, sl, ranks: Sequence[torch.Tensor],
                  R_maxes: Sequence[int], scales: Optional[Sequence[torch.Tensor]]) -> None:
    """The value checks of validate=True (one host sync per table on a GPU)."""
    slots = ts if ts is not None else sl
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        name = "token_slot" if ts is not None else "seg_slot"
        if lo < -1 or hi >= n_slots:
            bad = lo if lo < -1 else hi
            pos = int((slots == bad).nonzero()[0, 0])
            _err(op, f"{name}[{pos}] = {bad} is out of range: slots are -1 (no adapter) or "
                     f"0..{n_slots - 1}", IndexError)
    if ss is not None:
        if int(ss[0]) != 0 or int(ss[-1]) != T:
            _err(op, f"seg_start must start at 0 and end at T = {T}, got {int(ss[0])} .. {int(ss[-1])}")
        if ss.numel() > 1 and bool((ss[1:] < ss[:-1]).any()):
            pos = int((ss[1:] < ss[:-1]).nonzero()[0, 0])
            _err(op, f"seg_start must be non-decreasing: seg_start[{pos + 1}] = {int(ss[pos + 1])} < "
                     f"seg_start[{pos}] = {int(ss[pos])}")
    for i, (r, R) in enumerate(zip(ranks, R_maxes)):
        bad = (r < 0) | (r > R)
        if r.numel() and bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            where = f" of slice {i}" if len(ranks) > 1 else ""
            _err(op, f"ranks{where}[{pos}] = {int(r[pos])} is outside 0..R_max = {R}")
    if scales is not None:
        for i, sc in enumerate(scales):
            bad = ~torch.isfinite(sc)
            if sc.numel() and bool(bad.any()):
                pos = int(bad.nonzero()[0, 0])
                where = f" of slice {i}" if len(scales) > 1 else ""
                _err(op, f"scales{where}[{pos}] = {float(sc[pos])} is not finite")


def _offsets(op: str, y_col_offset, H_outs: Sequence[int], H_y: int, multi: bool) -> List[int]:
    n = len(H_outs)
    if y_col_offset is None or (multi and isinstance(y_col_offset, int) and n > 1 and y_col_offset == 0):
        offs, acc = [], 0
        for h in H_outs:
            offs.append(acc)
            acc += h
    elif isinstance(y_col_offset, int):
        offs = [int(y_col_offset)]
    else:
        offs = [int(o) for o in y_col_offset]
    if len(offs) != n:
        _err(op, f"y_col_offset has {len(offs)} entries but there are {n} slices")
    spans = []
    for i, (o, h) in enumerate(zip(offs, H_outs)):
        if o < 0 or o + h > H_y:
            _err(op, f"slice {i} writes columns {o}..{o + h - 1} but y has {H_y} columns", IndexError)
        spans.append((o, o + h, i))
    spans.sort()
    for (a0, a1, i), (b0, b1, j) in zip(spans, spans[1:]):
        if b0 < a1:
            _err(op, f"slices {i} and {j} write overlapping columns of y ({a0}..{a1 - 1} and {b0}..{b1 - 1})")
    return offs


def _as_list(v) -> tuple:
    if isinstance(v, (list, tuple)):
        return list(v), True
    return [v], False


# ---------------------------------------------------------------------------------------
# backends: (op, tensors...) -> fills u or adds into y
# ---------------------------------------------------------------------------------------

def _tok(ts, ss, sl, T=None):
    from lfm_engine.reference.lora import segments_to_token_slot

    return ts if ts is not None else segments_to_token_slot(ss, sl, T)


class _Reference:
    @staticmethod
    def shrink(x, As, ts, ss, sl, ranks, u, n_threads):
        from lfm_engine.reference.lora import lora_shrink_reference

        t = _tok(ts, ss, sl)
        for i, (A, r) in enumerate(zip(As, ranks)):
            u[i].copy_(lora_shrink_reference(x, A, t, r))

    @staticmethod
    def expand(u, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads):
        from lfm_engine.reference.lora import lora_expand_reference

        t = _tok(ts, ss, sl)
        for i, (B, r, sc, off) in enumerate(zip(Bs, ranks, scales, offsets)):
            lora_expand_reference(u[i], B, t, r, sc, y, off)

    @staticmethod
    def apply(x, As, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads):
        from lfm_engine.reference.lora import lora_apply_reference

        t = _tok(ts, ss, sl)
        for A, B, r, sc, off in zip(As, Bs, ranks, scales, offsets):
            lora_apply_reference(x, A, B, t, r, sc, y, off)


def _v(t):
    return None if t is None else _tensor.view(t)


class _Native:
    """The C++ kernels (CPU, or CUDA when built) through the C ABI."""

    @staticmethod
    def shrink(x, As, ts, ss, sl, ranks, u, n_threads, check=True):
        native().lora_shrink(_tensor.view(x), [_tensor.view(a) for a in As], [_tensor.view(r) for r in ranks],
                             _v(ts), _v(ss), _v(sl), _tensor.view(u), int(check), n_threads,
                             _tensor.current_stream(x))

    @staticmethod
    def expand(u, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads, check=True):
        native().lora_expand(_tensor.view(u), [_tensor.view(b) for b in Bs], [_tensor.view(r) for r in ranks],
                             [_tensor.view(s) for s in scales], list(offsets), _v(ts), _v(ss), _v(sl),
                             _tensor.view(y), int(check), n_threads, _tensor.current_stream(y))

    @staticmethod
    def apply(x, As, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads, check=True):
        native().lora_apply(_tensor.view(x), [_tensor.view(a) for a in As], [_tensor.view(b) for b in Bs],
                            [_tensor.view(r) for r in ranks], [_tensor.view(s) for s in scales], list(offsets),
                            _v(ts), _v(ss), _v(sl), _tensor.view(y), int(check), n_threads,
                            _tensor.current_stream(y))


class _Triton:
    @staticmethod
    def shrink(x, As, ts, ss, sl, ranks, u, n_threads):
        from lfm_engine.triton.lora import lora_shrink_triton

        lora_shrink_triton(x, As, _tok(ts, ss, sl, x.shape[0]), ranks, u)

    @staticmethod
    def expand(u, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads):
        from lfm_engine.triton.lora import lora_expand_triton

        lora_expand_triton(u, Bs, _tok(ts, ss, sl, y.shape[0]), ranks, scales, y, offsets)

    @staticmethod
    def apply(x, As, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads):
        from lfm_engine.triton.lora import lora_apply_triton

        lora_apply_triton(x, As, Bs, _tok(ts, ss, sl, x.shape[0]), ranks, scales, y, offsets)


BACKENDS = {"cpu": _Native, "cuda": _Native, "triton": _Triton, "reference": _Reference}


def _native_has_lora() -> bool:
    return has_native() and hasattr(native(), "lora_apply")


_NATIVE_LORA = None


def _default_backends() -> dict:
    """cpu: the C++ kernel (the reference when the core is not built); cuda: the CUDA C++
    kernel when this build has it, else Triton, else the reference."""
    global _NATIVE_LORA
    if _NATIVE_LORA is None:  # asked once: torch.compile cannot trace into the extension
        _NATIVE_LORA = _native_has_lora()
    return default_backends(BACKENDS, native_ok=_NATIVE_LORA)


def _pick(op: str, device: torch.device, backend: Optional[str]) -> str:
    return pick_backend(op, BACKENDS, device, backend, _default_backends())


def _run(op: str, kind: str, backend: str, validate: bool, T: int, n_slots: int, R_maxes, *args):
    """Value checks (if asked) then the backend. Native CPU validates in the C ABI itself."""
    impl = BACKENDS[backend]
    if kind == "shrink":
        x, As, ts, ss, sl, ranks, u, n_threads = args
        scales = None
    elif kind == "expand":
        u_, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads = args
    else:
        x, As, Bs, ts, ss, sl, ranks, scales, y, offsets, n_threads = args
    native_cpu = impl is _Native and backend == "cpu"
    if validate and not native_cpu:
        _check_values(op, T, n_slots, ts, ss, sl, ranks, R_maxes, scales)
    if impl is _Native:
        # CPU: the C ABI checks values itself (cheap); CUDA: checked above when asked.
        getattr(impl, kind)(*args, check=bool(validate and native_cpu))
    else:
        getattr(impl, kind)(*args)


# ---------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile / CUDA graphs see opaque ops with fake kernels)
# ---------------------------------------------------------------------------------------

def _impl_shrink(x, As, token_slot, seg_start, seg_slot, ranks, backend, validate, n_threads):
    T = x.shape[0]
    R = As[0].shape[1]
    u = torch.empty(len(As), T, R, dtype=torch.float32, device=x.device)
    _run("lora_shrink", "shrink", backend, validate, T, As[0].shape[0], [a.shape[1] for a in As],
         x, list(As), token_slot, seg_start, seg_slot, list(ranks), u, n_threads)
    return u


def _impl_expand(u, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate, n_threads):
    _run("lora_expand", "expand", backend, validate, u.shape[1], Bs[0].shape[0], [b.shape[2] for b in Bs],
         u, list(Bs), token_slot, seg_start, seg_slot, list(ranks), list(scales), y, list(offsets), n_threads)


def _impl_apply(x, As, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate,
                n_threads):
    _run("lora_apply", "apply", backend, validate, x.shape[0], As[0].shape[0], [a.shape[1] for a in As],
         x, list(As), list(Bs), token_slot, seg_start, seg_slot, list(ranks), list(scales), y, list(offsets),
         n_threads)


# The custom ops wrap the same implementations. Eager calls skip torch.library's dispatch
# (about 50 us per call, as much as a whole decode-size kernel); under torch.compile the
# public functions call the ops, which the compiler sees as opaque nodes with fake kernels.
@torch.library.custom_op("lfm::lora_shrink", mutates_args=())
def _op_shrink(x: torch.Tensor, As: List[torch.Tensor], token_slot: Optional[torch.Tensor],
               seg_start: Optional[torch.Tensor], seg_slot: Optional[torch.Tensor], ranks: List[torch.Tensor],
               backend: str, validate: bool, n_threads: int) -> torch.Tensor:
    return _impl_shrink(x, As, token_slot, seg_start, seg_slot, ranks, backend, validate, n_threads)


@_op_shrink.register_fake
def _(x, As, token_slot, seg_start, seg_slot, ranks, backend, validate, n_threads):
    return x.new_empty((len(As), x.shape[0], As[0].shape[1]), dtype=torch.float32)


@torch.library.custom_op("lfm::lora_expand", mutates_args=("y",))
def _op_expand(u: torch.Tensor, Bs: List[torch.Tensor], token_slot: Optional[torch.Tensor],
               seg_start: Optional[torch.Tensor], seg_slot: Optional[torch.Tensor], ranks: List[torch.Tensor],
               scales: List[torch.Tensor], y: torch.Tensor, offsets: List[int], backend: str, validate: bool,
               n_threads: int) -> None:
    _impl_expand(u, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate, n_threads)


@_op_expand.register_fake
def _(u, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate, n_threads):
    return None


@torch.library.custom_op("lfm::lora_apply", mutates_args=("y",))
def _op_apply(x: torch.Tensor, As: List[torch.Tensor], Bs: List[torch.Tensor], token_slot: Optional[torch.Tensor],
              seg_start: Optional[torch.Tensor], seg_slot: Optional[torch.Tensor], ranks: List[torch.Tensor],
              scales: List[torch.Tensor], y: torch.Tensor, offsets: List[int], backend: str, validate: bool,
              n_threads: int) -> None:
    _impl_apply(x, As, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate, n_threads)


@_op_apply.register_fake
def _(x, As, Bs, token_slot, seg_start, seg_slot, ranks, scales, y, offsets, backend, validate, n_threads):
    return None


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _prep_x(op, x):
    _check_float2d(op, x, "x")
    # The kernels need unit stride along H_in; the row stride is free.
    return x if x.stride(-1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _prep_y(op, y, T, device):
    _check_float2d(op, y, "y", device)
    if y.shape[0] != T:
        _err(op, f"y has {y.shape[0]} rows but the batch has T = {T} tokens")
    if y.stride(-1) != 1 and y.shape[1] > 1:
        _err(op, "y is updated in place and must have unit stride along its last dimension")


def _prep_ranks(op, ranks, n_slices, n_slots, R_maxes, device):
    if ranks is None:
        return [torch.full((n_slots,), R, dtype=torch.int32, device=device) for R in R_maxes]
    out = []
    for i, r in enumerate(_per_slice(op, ranks, n_slices, "ranks")):
        t = _as_index_tensor(op, r, "ranks", device)
        if t.shape[0] != n_slots:
            _err(op, f"ranks must have shape [n_slots] = [{n_slots}], got {tuple(t.shape)}")
        out.append(t)
    return out


def _prep_scales(op, scales, n_slices, n_slots, device):
    if scales is None:
        _err(op, "scales are required (one float per slot: lora_alpha / r)")
    return [_as_scale_tensor(op, s, "scales", n_slots, device) for s in _per_slice(op, scales, n_slices, "scales")]


def lora_shrink(x, A, token_slot=None, ranks=None, *, seg_start=None, seg_slot=None,
                backend: Optional[str] = None, validate: bool = True, n_threads: int = 0) -> torch.Tensor:
    """u = shrink(x): u[t, :r_s] = x[t] @ A[s, :r_s]^T in fp32, s = token_slot[t] (see module doc).

    Args:
        x: [T, H_in] activations. A: [n_slots, R_max, H_in] slot table, or a list of them
            (multi-slice; all with the same n_slots and R_max).
        token_slot: [T] int32 slot per token (-1 = none); or seg_start=/seg_slot= keywords.
        ranks: [n_slots] int32 real ranks (None = R_max everywhere), or one table per slice.
        backend: "cpu", "cuda", "triton", "reference"; default by device.
        validate: check slot/rank values before launch (see module doc).
        n_threads: CPU worker threads for this call (0 = library default).
    Returns:
        u: float32 [T, R_max], or [n_slices, T, R_max] when A is a list.
    """
    op = "lora_shrink"
    x = _prep_x(op, x)
    As, multi = _as_list(A)
    if not As:
        _err(op, "A is an empty list")
    T, H_in = x.shape
    for i, a in enumerate(As):
        name = f"A[{i}]" if multi else "A"
        _check_table(op, a, name, x.device)
        if a.shape[2] != H_in:
            _err(op, f"{name} has H_in = {a.shape[2]} (shape {tuple(a.shape)}) but x has H_in = {H_in}")
        if a.shape[:2] != As[0].shape[:2]:
            _err(op, f"{name} has [n_slots, R_max] = {list(a.shape[:2])} but A[0] has {list(As[0].shape[:2])}")
    n_slots = As[0].shape[0]
    ts, ss, sl = _batch(op, T, x.device, token_slot, seg_start, seg_slot)
    rk = _prep_ranks(op, ranks, len(As), n_slots, [a.shape[1] for a in As], x.device)
    be = _pick(op, x.device, backend)
    fn = torch.ops.lfm.lora_shrink if _compiling() else _impl_shrink
    u = fn(x, As, ts, ss, sl, rk, be, bool(validate), int(n_threads))
    return u if multi else u[0]


def lora_expand(u, B, token_slot=None, ranks=None, scales=None, y=None, y_col_offset=0, *, seg_start=None,
                seg_slot=None, backend: Optional[str] = None, validate: bool = True, n_threads: int = 0):
    """y[t, off:off+H_out] += scale[s] * u[t, :r_s] @ B[s, :, :r_s]^T in place; returns y.

    Args:
        u: float32 [T, R_max] (or [n_slices, T, R_max] with a list of B).
        B: [n_slots, H_out, R_max] slot table, or a list (multi-slice).
        token_slot / seg_start=, seg_slot=: the slot map (module doc).
        ranks: [n_slots] int32 (None = R_max), scales: [n_slots] float32; or one per slice.
        y: [T, H_y] output, updated in place (unit stride along columns).
        y_col_offset: first column of the slice in y (a list with a list of B; default:
            slices side by side from column 0).
    """
    op = "lora_expand"
    Bs, multi = _as_list(B)
    if not Bs:
        _err(op, "B is an empty list")
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float32:
        _err(op, f"u must be a float32 tensor (the shrink result), got "
                 f"{u.dtype if isinstance(u, torch.Tensor) else type(u).__name__}", TypeError)
    want_dim = 3 if multi else 2
    if u.dim() != want_dim:
        _err(op, f"u must be {want_dim}-D ({'[n_slices, T, R_max]' if multi else '[T, R_max]'}), "
                 f"got shape {tuple(u.shape)}")
    u3 = u if multi else u.unsqueeze(0)
    if u3.shape[0] != len(Bs):
        _err(op, f"u holds {u3.shape[0]} slices but B has {len(Bs)}")
    u3 = u3.contiguous()
    T, R = u3.shape[1], u3.shape[2]
    if y is None:
        _err(op, "y (the output to add into) is required")
    _prep_y(op, y, T, u.device)
    for i, b in enumerate(Bs):
        name = f"B[{i}]" if multi else "B"
        _check_table(op, b, name, u.device)
        if b.shape[2] != R:
            _err(op, f"{name} has R_max = {b.shape[2]} (shape {tuple(b.shape)}) but u has R_max = {R}")
        if b.shape[0] != Bs[0].shape[0]:
            _err(op, f"{name} has {b.shape[0]} slots but B[0] has {Bs[0].shape[0]}")
    n_slots = Bs[0].shape[0]
    ts, ss, sl = _batch(op, T, u.device, token_slot, seg_start, seg_slot)
    rk = _prep_ranks(op, ranks, len(Bs), n_slots, [R] * len(Bs), u.device)
    sc = _prep_scales(op, scales, len(Bs), n_slots, u.device)
    offs = _offsets(op, y_col_offset, [b.shape[1] for b in Bs], y.shape[1], multi)
    be = _pick(op, u.device, backend)
    fn = torch.ops.lfm.lora_expand if _compiling() else _impl_expand
    fn(u3, Bs, ts, ss, sl, rk, sc, y, offs, be, bool(validate), int(n_threads))
    return y


def lora_apply(x, A, B, token_slot=None, ranks=None, scales=None, y=None, y_col_offset=0, *, seg_start=None,
               seg_slot=None, backend: Optional[str] = None, validate: bool = True, n_threads: int = 0):
    """Fused shrink + expand: y[t, off:off+H_out] += scale[s] * (x[t] @ A[s,:r_s]^T) @ B[s,:,:r_s]^T.

    The decode hot path: the fp32 intermediate never goes to memory (GPU) / stays in a
    per-worker cache tile (CPU). Arguments as lora_shrink + lora_expand; A and B may be
    lists (multi-slice, one launch), then y_col_offset is a list (default: side by side).
    Returns y (updated in place).
    """
    op = "lora_apply"
    x = _prep_x(op, x)
    As, multi_a = _as_list(A)
    Bs, multi_b = _as_list(B)
    if multi_a != multi_b or len(As) != len(Bs):
        _err(op, f"A and B must both be tensors or lists of the same length (got {len(As)} A, {len(Bs)} B)")
    if not As:
        _err(op, "A is an empty list")
    multi = multi_a
    T, H_in = x.shape
    if y is None:
        _err(op, "y (the output to add into) is required")
    _prep_y(op, y, T, x.device)
    for i, (a, b) in enumerate(zip(As, Bs)):
        sfx = f"[{i}]" if multi else ""
        _check_table(op, a, "A" + sfx, x.device)
        _check_table(op, b, "B" + sfx, x.device)
        if a.shape[2] != H_in:
            _err(op, f"A{sfx} has H_in = {a.shape[2]} (shape {tuple(a.shape)}) but x has H_in = {H_in}")
        if b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
            _err(op, f"B{sfx} has shape {tuple(b.shape)} but A{sfx} {tuple(a.shape)} needs "
                     f"[{a.shape[0]}, H_out, {a.shape[1]}]")
        if a.shape[0] != As[0].shape[0]:
            _err(op, f"A{sfx} has {a.shape[0]} slots but A[0] has {As[0].shape[0]}")
    n_slots = As[0].shape[0]
    ts, ss, sl = _batch(op, T, x.device, token_slot, seg_start, seg_slot)
    rk = _prep_ranks(op, ranks, len(As), n_slots, [a.shape[1] for a in As], x.device)
    sc = _prep_scales(op, scales, len(As), n_slots, x.device)
    offs = _offsets(op, y_col_offset, [b.shape[1] for b in Bs], y.shape[1], multi)
    be = _pick(op, x.device, backend)
    fn = torch.ops.lfm.lora_apply if _compiling() else _impl_apply
    fn(x, As, Bs, ts, ss, sl, rk, sc, y, offs, be, bool(validate), int(n_threads))
    return y


def lora_prepare(A, B, ranks, scales) -> tuple:
    """Argument bundle of one slot table for `lora_apply_prepared`: the tensors and, for the
    native backend, their C ABI views, built once per table instead of once per call.
    A [n_slots, R_max, H_in], B [n_slots, H_out, R_max] contiguous, ranks int32 [n_slots],
    scales float32 [n_slots], all on one device (not checked here: the caller owns them)."""
    return ([_tensor.view(A)], [_tensor.view(B)], [_tensor.view(ranks)], [_tensor.view(scales)],
            [A], [B], [ranks], [scales])


def _prepared_backend(t: torch.Tensor) -> str:
    """The backend of the *_prepared calls: the device's default, "reference" elsewhere."""
    dev = t.device.type
    return _default_backends()[dev] if dev in ("cpu", "cuda") else "reference"


def lora_apply_prepared(x: torch.Tensor, prepared: tuple, token_slot: torch.Tensor, y: torch.Tensor,
                        offsets: List[int]) -> None:
    """lora_apply for a serving loop that validated everything once: no argument checks.

    x [T, H_in] row-contiguous, y [T, H_y] contiguous (updated in place), token_slot int32 [T]
    with values in [-1, n_slots), prepared: `lora_prepare` bundles (concatenated slice-wise
    for a multi-slice call), offsets: the column offset of each slice in y. Same result as
    lora_apply(x, [A...], [B...], token_slot, [ranks...], [scales...], y, offsets).
    """
    Av, Bv, rv, sv, As, Bs, rk, sc = prepared
    be = _prepared_backend(x)
    if _compiling():
        torch.ops.lfm.lora_apply(x, As, Bs, token_slot, None, None, rk, sc, y, offsets, be, False, 0)
    elif be in ("cpu", "cuda"):
        native().lora_apply(_tensor.view(x), Av, Bv, rv, sv, offsets, _tensor.view(token_slot), None, None,
                            _tensor.view(y), 0, 0, _tensor.current_stream(y))
    else:
        _impl_apply(x, As, Bs, token_slot, None, None, rk, sc, y, offsets, be, False, 0)


def lora_shrink_prepared(x: torch.Tensor, prepared: tuple, token_slot: torch.Tensor, u: torch.Tensor) -> None:
    """lora_shrink into a caller-owned u, for a serving loop that validated everything once.

    x [T, H_in] row-contiguous, prepared: `lora_prepare` bundles (concatenated slice-wise for
    a multi-slice call; every slice with the same R_max), u float32 [n_slices, T, R_max]
    contiguous (fully overwritten). Same result as lora_shrink(x, [A...], token_slot, [ranks...]).
    """
    Av, _Bv, rv, _sv, As, _Bs, rk, _sc = prepared
    be = _prepared_backend(x)
    if be in ("cpu", "cuda") and not _compiling():
        native().lora_shrink(_tensor.view(x), Av, rv, _tensor.view(token_slot), None, None, _tensor.view(u), 0, 0,
                             _tensor.current_stream(x))
    else:
        u.copy_(lora_shrink(x, As, token_slot, rk, backend=be, validate=False))


def lora_expand_prepared(u: torch.Tensor, prepared: tuple, token_slot: torch.Tensor, y: torch.Tensor,
                         offsets: List[int]) -> None:
    """lora_expand for a serving loop that validated everything once: no argument checks.

    u float32 [T, R_max] ([n_slices, T, R_max] for a multi-slice bundle) contiguous, y
    [T, H_y] contiguous (updated in place), offsets: the column offset of each slice in y.
    Same result as lora_expand(u, [B...], token_slot, [ranks...], [scales...], y, offsets).
    """
    _Av, Bv, rv, sv, _As, Bs, rk, sc = prepared
    be = _prepared_backend(y)
    if be in ("cpu", "cuda") and not _compiling():
        native().lora_expand(_tensor.view(u), Bv, rv, sv, offsets, _tensor.view(token_slot), None, None,
                             _tensor.view(y), 0, 0, _tensor.current_stream(y))
    else:
        lora_expand(u, Bs if len(Bs) > 1 else Bs[0], token_slot, rk if len(rk) > 1 else rk[0],
                    sc if len(sc) > 1 else sc[0], y, offsets if len(offsets) > 1 else offsets[0], backend=be,
                    validate=False)


def lora_apply_slices(x, slices: Sequence, token_slot=None, ranks=None, scales=None, y=None, *, seg_start=None,
                      seg_slot=None, backend: Optional[str] = None, validate: bool = True, n_threads: int = 0):
    """lora_apply with a list of (A, B, y_col_offset) triples (fused qkv / gate_up in one launch)."""
    slices = list(slices)
    for i, s in enumerate(slices):
        if not isinstance(s, (list, tuple)) or len(s) != 3:
            _err("lora_apply_slices", f"slice {i} must be a triple (A, B, y_col_offset)")
    return lora_apply(x, [s[0] for s in slices], [s[1] for s in slices], token_slot, ranks, scales, y,
                      [int(s[2]) for s in slices], seg_start=seg_start, seg_slot=seg_slot, backend=backend,
                      validate=validate, n_threads=n_threads)


__all__ = ["lora_shrink", "lora_expand", "lora_apply", "lora_apply_slices", "lora_prepare", "lora_apply_prepared",
           "lora_shrink_prepared", "lora_expand_prepared", "BACKENDS"]
