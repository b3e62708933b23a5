"""Task-vector codecs: encode_delta, decode_delta, decode_add and delta_apply (docs/spec/codec.md).

    enc   = encode_delta(delta, "int4", group_size=128)     # delta = x - b, any float dtype
    d_hat = decode_delta(enc)                               # float32, delta's shape
    x_hat = decode_add(enc, base)                           # base + decode(enc), one pass
    delta_apply(x, [enc_0, ..., enc_{S-1}], token_slot, y)  # y[t] += x[t] @ decode(enc_slot[t])^T

Codecs, their fields and options are defined in lfm_engine/reference/codec.py (the plain
torch reference): sign1, int8, int4, int2, nf4, ternary, sparse_int, lowrank, masks.

Backends (a visible table per function, see ops/_dispatch.py):
  cpu        C++ kernels (multi-threaded) for sign1/int8/int4/int2/nf4; the other codecs are
             run by their reference implementation (they are dominated by a sort or an SVD
             that torch already does well) and `backend="cpu"` says so in their docstring.
  cuda       CUDA C++ decode-and-add for sign1/intN (when built with nvcc).
  triton     Triton decode-and-add and delta_apply for sign1/int8/int4/int2/nf4 (GPU, or CPU
             tensors under TRITON_INTERPRET=1).
  reference  plain torch.

The C++ encoder and the reference produce the same codes (same fp32 division, same
round-half-even, same scale rounding); decode is bit-identical for alpha == 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lfm_engine import _tensor
from lfm_engine._native import native
from lfm_engine.ops._dispatch import default_backends, pick_backend
from lfm_engine.reference import codec as ref
from lfm_engine.reference.codec import CODECS, CodecError

NATIVE_CODECS = {"sign1": 0, "int8": 1, "int4": 2, "int2": 3, "nf4": 4}
_NATIVE_OPTIONS = {"sign1": {"per_tensor", "scale_dtype"}, "int8": {"group_size", "scale_dtype"},
                   "int4": {"group_size", "scale_dtype"}, "int2": {"group_size", "scale_dtype"},
                   "nf4": {"group_size", "scale_dtype"}}
# (intN also take scale_search="absmax" natively; "mse" is encoded by the reference, decoded by any backend)


@dataclass
class Encoded:
    """One encoded delta.

    codec: codec name; shape: shape of the delta (masks: of one task); dtype: dtype of the
    tensor the delta came from (what decompress writes back); fields: name -> tensor (the
    codec's stored arrays, see reference/codec.py); options: the JSON-able options needed
    to decode (group_size, scale_dtype, rank, ...).
    """

    codec: str
    shape: tuple
    dtype: torch.dtype
    fields: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = math.prod(self.shape)
        return n * int(self.options.get("tasks", 1))

    @property
    def nbytes(self) -> int:
        """Bytes of all stored fields (metadata excluded)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def ratio(self, dtype: Optional[torch.dtype] = None) -> float:
        """Compression ratio vs the delta stored densely in `dtype` (default: self.dtype)."""
        dt = dtype or self.dtype
        bits = torch.finfo(dt).bits if dt.is_floating_point else torch.iinfo(dt).bits
        return bits / self.bits_per_param if self.nbytes else float("inf")


def _check_tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _tensor.FLOAT_DTYPES:
        raise TypeError(f"{what} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    return t


# ---------------------------------------------------------------------------
# encode


def _encode_native(delta: torch.Tensor, codec: str, options: dict, n_threads: int) -> tuple[dict, dict]:
    if codec in ref.QMAX and options.get("scale_search", "absmax") != "absmax":
        raise CodecError(f"{codec}: scale_search={options['scale_search']!r} runs in the reference encoder "
                         "(backend='reference' or no backend); the C++ encoder uses absmax scales")
    options = {k: v for k, v in options.items() if k != "scale_search"}
    unknown = set(options) - _NATIVE_OPTIONS[codec]
    if unknown:
        raise CodecError(f"{codec}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(accepted: {', '.join(sorted(_NATIVE_OPTIONS[codec]))})")
    sdt = ref._scale_dtype(options.get("scale_dtype", "float16"))
    rows, cols = ref.matrix_shape(delta.shape)
    d = delta.contiguous()
    if codec == "sign1":
        per_tensor = bool(options.get("per_tensor", False))
        data = torch.empty((rows, (cols + 31) // 32), dtype=torch.uint32)
        scales = torch.empty((1,) if per_tensor else (rows,), dtype=sdt)
        native().codec_encode(_tensor.view(d), _tensor.view(data), _tensor.view(scales), 0, 1, per_tensor, n_threads)
        return {"signs": data, "scales": scales}, {"per_tensor": per_tensor, "scale_dtype": str(sdt)[6:]}
    g = ref._check_group(options.get("group_size", 128))
    per = 8 // ref.BITS[codec]
    data = torch.empty((rows, cols if codec == "int8" else (cols + per - 1) // per),
                       dtype=torch.int8 if codec == "int8" else torch.uint8)
    scales = torch.empty((rows, (cols + g - 1) // g), dtype=sdt)
    native().codec_encode(_tensor.view(d), _tensor.view(data), _tensor.view(scales), NATIVE_CODECS[codec], g,
                          False, n_threads)
    return {"q" if codec == "int8" else "packed": data, "scales": scales}, {"group_size": g, "scale_dtype": str(sdt)[6:]}


def _encode_reference(delta, codec, options, n_threads):
    try:
        return ref.encode(delta, codec, **options)
    except TypeError as exc:  # an option the codec does not take
        raise CodecError(f"{codec}: {exc}") from None


ENCODE_BACKENDS = {"cpu": _encode_native, "reference": _encode_reference}


def encode_delta(delta: torch.Tensor, codec: str, *, backend: Optional[str] = None, n_threads: int = 0,
                 dtype: Optional[torch.dtype] = None, **options) -> Encoded:
    """Encode one delta (or, for codec "masks", a stack [K, *shape] of K deltas).

    Args:
        delta: float tensor (float32/float16/bfloat16) on the CPU; NaN/Inf is refused.
        codec: one of sign1, int8, int4, int2, nf4, ternary, sparse_int, lowrank, masks.
        options: codec options (reference/codec.py): group_size, scale_dtype, per_tensor,
            density, bits, method, rank, energy, factor_dtype, mode, merged_codec, ...
        dtype: dtype recorded as the tensor's original dtype (default: delta.dtype).
        backend: "cpu" (C++ for sign1/intN) or "reference"; default cpu.
    Returns:
        Encoded(codec, shape, dtype, fields, options).
    """
    _check_tensor(delta, "delta")
    if codec not in CODECS:
        raise CodecError(f"unknown codec '{codec}' (known: {', '.join(CODECS)})")
    if delta.device.type != "cpu":
        raise ValueError(f"encode_delta: the encoders run on the CPU; delta is on {delta.device}")
    if codec not in NATIVE_CODECS and backend is None:
        backend = "reference"  # the only implementation of this codec (see module docstring)
    if codec in ref.QMAX and options.get("scale_search", "absmax") != "absmax" and backend is None:
        backend = "reference"  # the clip search is an encoder option of the reference only
    # no GPU encoder: a CUDA tensor needs an explicit backend (encoding is offline work)
    name = pick_backend("encode_delta", ENCODE_BACKENDS, delta.device, backend, {"cpu": "cpu"})
    if name == "cpu" and codec not in NATIVE_CODECS:
        raise ValueError(f"encode_delta: backend 'cpu' has no kernel for codec '{codec}' "
                         f"(C++ codecs: {', '.join(NATIVE_CODECS)}); use backend='reference'")
    fields, meta = ENCODE_BACKENDS[name](delta, codec, dict(options), n_threads)
    shape = tuple(delta.shape[1:]) if codec == "masks" else tuple(delta.shape)
    return Encoded(codec, shape, dtype or delta.dtype, fields, meta)


# ---------------------------------------------------------------------------
# decode and decode-and-add


def _native_args(enc: Encoded):
    code = NATIVE_CODECS[enc.codec]
    if enc.codec == "sign1":
        return enc.fields["signs"], enc.fields["scales"], code, 1, bool(enc.options.get("per_tensor", False))
    data = enc.fields["q" if enc.codec == "int8" else "packed"]
    return data, enc.fields["scales"], code, int(enc.options.get("group_size", 128)), False


def _check_fields(enc: Encoded) -> None:
    """Field names/dtypes/shapes as the codec defines them (decoding a 0-sized copy checks)."""
    rows, cols = ref.matrix_shape(enc.shape)
    if enc.codec == "sign1":
        sdt = ref._scale_dtype(enc.options.get("scale_dtype", "float16"))
        ref._need(enc.fields, "signs", torch.uint32, (rows, (cols + 31) // 32), "sign1")
        ref._need(enc.fields, "scales", sdt, (1,) if enc.options.get("per_tensor") else (rows,), "sign1")
    else:
        g = ref._check_group(enc.options.get("group_size", 128))
        sdt = ref._scale_dtype(enc.options.get("scale_dtype", "float16"))
        per = 8 // ref.BITS[enc.codec]
        if enc.codec == "int8":
            ref._need(enc.fields, "q", torch.int8, (rows, cols), "int8")
        else:
            ref._need(enc.fields, "packed", torch.uint8, (rows, (cols + per - 1) // per), enc.codec)
        ref._need(enc.fields, "scales", sdt, (rows, (cols + g - 1) // g), enc.codec)


def _decode_native(enc: Encoded, base, out, alpha: float, n_threads: int) -> None:
    _check_fields(enc)
    data, scales, code, g, per_tensor = _native_args(enc)
    native().codec_decode(_tensor.view(data.contiguous()), _tensor.view(scales.contiguous()),
                          None if base is None else _tensor.view(base), _tensor.view(out), code, g, per_tensor,
                          float(alpha), n_threads, _tensor.current_stream(out))


def _decode_triton(enc: Encoded, base, out, alpha: float, n_threads: int) -> None:
    from lfm_engine.triton.codec import decode_add_triton

    _check_fields(enc)
    decode_add_triton(enc, base, out, alpha)


def _decode_reference(enc: Encoded, base, out, alpha: float, n_threads: int) -> None:
    d = ref.decode({k: v.cpu() for k, v in enc.fields.items()}, enc.shape, enc.codec, enc.options)
    d = d.to(out.device)
    if base is None:
        r = d if alpha == 1.0 else float(alpha) * d
    else:
        r = base.to(torch.float32) + (d if alpha == 1.0 else float(alpha) * d)
    out.copy_(r.to(out.dtype))


DECODE_BACKENDS = {"cpu": _decode_native, "cuda": _decode_native, "triton": _decode_triton,
                   "reference": _decode_reference}


def _pick_decode(enc: Encoded, device: torch.device, backend: Optional[str]) -> str:
    if enc.codec not in NATIVE_CODECS:
        if backend not in (None, "reference"):
            raise ValueError(f"decode: backend '{backend}' has no kernel for codec '{enc.codec}' "
                             f"(kernels exist for {', '.join(NATIVE_CODECS)}); use backend='reference'")
        return "reference"
    return pick_backend("decode", DECODE_BACKENDS, device, backend, default_backends(DECODE_BACKENDS, device_type=device.type))


def decode_delta(enc: Encoded, *, out_dtype=torch.float32, device=None, backend: Optional[str] = None,
                 task: Optional[int] = None, n_threads: int = 0) -> torch.Tensor:
    """The decoded delta d_hat (shape enc.shape; masks: [K, *shape] or one `task`), in out_dtype."""
    if not isinstance(enc, Encoded):
        raise TypeError(f"decode_delta expects an Encoded, got {type(enc).__name__}")
    dt = _tensor.parse_dtype(out_dtype) or torch.float32
    if enc.codec == "masks":
        d = ref.decode(enc.fields, enc.shape, "masks", enc.options, task=task)
        return d.to(dt) if device is None else d.to(device=device, dtype=dt)
    dev = torch.device(device) if device is not None else next(iter(enc.fields.values())).device
    out = torch.empty(enc.shape, dtype=dt, device=dev)
    name = _pick_decode(enc, dev, backend)
    DECODE_BACKENDS[name](enc, None, out, 1.0, n_threads)
    return out


def decode_add(enc: Encoded, base: torch.Tensor, *, alpha: float = 1.0, out: Optional[torch.Tensor] = None,
               out_dtype=None, backend: Optional[str] = None, n_threads: int = 0) -> torch.Tensor:
    """x_hat = base + alpha * decode(enc) in one fused pass (fp32 math, one rounding).

    base: float tensor of enc.shape; out: optional preallocated contiguous output (may be
    `base` itself for an in-place update); out_dtype: default base.dtype (or enc.dtype).
    """
    _check_tensor(base, "base")
    if tuple(base.shape) != tuple(enc.shape):
        raise ValueError(f"decode_add: base has shape {tuple(base.shape)} but the delta has {tuple(enc.shape)}")
    if enc.codec == "masks":
        raise ValueError("decode_add: a 'masks' entry holds K tasks; decode one with decode_delta(enc, task=i)")
    dt = _tensor.parse_dtype(out_dtype) or base.dtype
    if out is None:
        out = torch.empty(base.shape, dtype=dt, device=base.device)
    elif tuple(out.shape) != tuple(base.shape) or not out.is_contiguous() or out.dtype not in _tensor.FLOAT_DTYPES:
        raise ValueError("decode_add: `out` must be a contiguous float tensor of base's shape")
    name = _pick_decode(enc, base.device, backend)
    DECODE_BACKENDS[name](enc, base.contiguous(), out, alpha, n_threads)
    return out


# ---------------------------------------------------------------------------
# batched compressed-delta matmul


def _check_slots(x, deltas, token_slot, y):
    _check_tensor(x, "x")
    _check_tensor(y, "y")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"delta_apply: x must be [T, in] and y [T, out]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if not isinstance(token_slot, torch.Tensor) or token_slot.dtype not in (torch.int32, torch.int64) \
            or token_slot.shape != (x.shape[0],):
        raise ValueError(f"delta_apply: token_slot must be an int32/int64 tensor of shape ({x.shape[0]},)")
    if len(deltas) == 0:
        return None
    codec = deltas[0].codec
    if codec not in NATIVE_CODECS:
        raise ValueError(f"delta_apply: codec '{codec}' is not supported ({', '.join(NATIVE_CODECS)}); "
                         "a lowrank delta is a LoRA adapter: serve it with the LoRA kernels")
    for i, e in enumerate(deltas):
        if e.codec != codec or e.options != deltas[0].options:
            raise ValueError(f"delta_apply: delta {i} has codec/options {e.codec} {e.options}, "
                             f"slot 0 has {codec} {deltas[0].options}; one codec per call")
        if tuple(e.shape) != (y.shape[1], x.shape[1]):
            raise ValueError(f"delta_apply: delta {i} has shape {tuple(e.shape)}, expected "
                             f"[out, in] = {(y.shape[1], x.shape[1])}")
        _check_fields(e)
    if token_slot.numel():
        lo, hi = int(token_slot.min()), int(token_slot.max())
        if lo < -1 or hi >= len(deltas):
            raise IndexError(f"delta_apply: token_slot values must lie in [-1, {len(deltas)}), got [{lo}, {hi}]")
    return codec


def _apply_native(x, deltas, token_slot, y, alpha, n_threads):
    args = [_native_args(e) for e in deltas]
    _, _, code, g, per_tensor = args[0]
    native().delta_apply(_tensor.view(x), [_tensor.view(a[0]) for a in args], [_tensor.view(a[1]) for a in args],
                         _tensor.view(token_slot), _tensor.view(y), code, g, per_tensor, float(alpha), n_threads)


def _apply_triton(x, deltas, token_slot, y, alpha, n_threads):
    from lfm_engine.triton.codec import delta_apply_triton

    delta_apply_triton(x, deltas, token_slot, y, alpha)


def _apply_reference(x, deltas, token_slot, y, alpha, n_threads):
    acc = y.to(torch.float32)
    for s, e in enumerate(deltas):
        rows = (token_slot == s).nonzero().reshape(-1)
        if rows.numel():
            w = ref.decode({k: v.cpu() for k, v in e.fields.items()}, e.shape, e.codec, e.options).to(x.device)
            prod = x[rows].to(torch.float32) @ w.T
            acc[rows] += prod if alpha == 1.0 else float(alpha) * prod
    y.copy_(acc.to(y.dtype))


APPLY_BACKENDS = {"cpu": _apply_native, "triton": _apply_triton, "reference": _apply_reference}

_CODEC_NAMES = {v: k for k, v in NATIVE_CODECS.items()}


@torch.library.custom_op("lfm::delta_apply_packed", mutates_args=("y",))
def delta_apply_packed(x: torch.Tensor, data: list[torch.Tensor], scales: list[torch.Tensor],
                       token_slot: torch.Tensor, y: torch.Tensor, codec: int, group_size: int, per_tensor: bool,
                       alpha: float) -> None:
    """torch.library op behind delta_apply for models (torch.compile / CUDA graphs see a
    mutating op on y): y[t] += alpha * x[t] @ decode(data[s], scales[s])^T, s = token_slot[t].
    data/scales: the codec's fields ("signs"/"q"/"packed" and "scales") per slot; codec:
    0 sign1, 1 int8, 2 int4, 3 int2, 4 nf4. CPU tensors run the C++ kernel, CUDA tensors Triton.
    Arguments are assumed validated (use delta_apply for checked calls)."""
    name = _CODEC_NAMES[int(codec)]
    opts = {"per_tensor": bool(per_tensor)} if name == "sign1" else {"group_size": int(group_size)}
    key = "signs" if name == "sign1" else ("q" if name == "int8" else "packed")
    shape = (y.shape[1], x.shape[1])
    encs = [Encoded(name, shape, x.dtype, {key: d, "scales": s}, dict(opts, scale_dtype=str(s.dtype)[6:]))
            for d, s in zip(data, scales)]
    if x.device.type == "cuda":
        _apply_triton(x, encs, token_slot, y, alpha, 0)
    else:
        _apply_native(x, encs, token_slot, y, alpha, 0)


@delta_apply_packed.register_fake
def _delta_apply_packed_fake(x, data, scales, token_slot, y, codec, group_size, per_tensor, alpha) -> None:
    return None


def delta_apply(x: torch.Tensor, deltas: Sequence[Encoded], token_slot: torch.Tensor, y: torch.Tensor, *,
                alpha: float = 1.0, backend: Optional[str] = None, n_threads: int = 0) -> torch.Tensor:
    """y[t, :] += alpha * x[t, :] @ decode(deltas[token_slot[t]])^T, in place; returns y.

    x [T, in], y [T, out] (float32/float16/bfloat16, contiguous), deltas: S Encoded of
    shape [out, in] with one codec (sign1/int8/int4/int2/nf4) and one set of options,
    token_slot [T] int32/int64 in [-1, S) (-1: the token has no delta, y[t] unchanged).
    No decoded [out, in] matrix is materialised: the CPU kernel decodes one row block at a
    time into cache-resident scratch, the Triton kernel decodes tiles in registers.
    Serving S fine-tunes of one base: y = x @ W_base^T (one dense matmul for all tokens),
    then delta_apply adds each token's own delta.
    """
    codec = _check_slots(x, deltas, token_slot, y)
    if codec is None or x.shape[0] == 0:
        return y
    if not y.is_contiguous():
        raise ValueError("delta_apply: y must be contiguous (it is updated in place)")
    name = pick_backend("delta_apply", APPLY_BACKENDS, x.device, backend, default_backends(APPLY_BACKENDS, device_type=x.device.type))
    if name in ("cpu", "triton") and n_threads == 0 and (name == "cpu") == (x.device.type == "cpu"):
        # through the registered torch op (what a compiled model records)
        args = [_native_args(e) for e in deltas]
        delta_apply_packed(x.contiguous(), [a[0] for a in args], [a[1] for a in args], token_slot.contiguous(), y,
                           args[0][2], args[0][3], args[0][4], float(alpha))
        return y
    APPLY_BACKENDS[name](x.contiguous(), list(deltas), token_slot.contiguous(), y, alpha, n_threads)
    return y
