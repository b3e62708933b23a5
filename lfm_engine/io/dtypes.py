"""Element types: the one table of dtype names, safetensors tags, sizes and C ABI codes.

Every layer names an element type the same way through :class:`DType`:

- ``name``: the canonical lower-case name (``"bfloat16"``), what config.json's
  ``torch_dtype``, the .lfmd entries and the YAML ``dtype:``/``out_dtype:`` keys carry;
- ``tag``: the safetensors header tag (``"BF16"``);
- ``itemsize``: bytes per element;
- ``storage``: the numpy dtype that holds the raw bits. numpy has no bfloat16 or fp8,
  so those are stored as the unsigned integer of the same width (``uint16``/``uint8``):
  a reader returns such arrays unchanged and the C core, which takes raw buffers plus a
  dtype code, reads them as bf16;
- ``code``: the ``lfm_dtype`` of include/lfm/lfm.h (None when the C core has none).

torch is never imported here; :attr:`DType.torch` imports it on first use, so the
torch-free paths (``lfm-engine merge`` on the CPU) can name and size every dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type (see the module docstring for the fields)."""
    name: str
    tag: str
    itemsize: int
    kind: str                  # "float", "int", "uint" or "bool"
    storage: str               # numpy dtype string of the raw bits (little-endian)
    code: Optional[int] = None  # lfm_dtype of include/lfm/lfm.h

    @property
    def is_floating_point(self) -> bool:
        return self.kind == "float"

    @property
    def raw(self) -> bool:
        """numpy has no such type: arrays hold the raw bits as unsigned integers."""
        return self.kind == "float" and self.storage[-2] == "u"

    @property
    def np(self) -> np.dtype:
        """numpy dtype of the raw storage (uint16 for bfloat16)."""
        return np.dtype(self.storage)

    @property
    def torch(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    def __str__(self) -> str:
        return self.name


_ALL = (
    DType("float64", "F64", 8, "float", "<f8"),
    DType("float32", "F32", 4, "float", "<f4", 0),
    DType("float16", "F16", 2, "float", "<f2", 1),
    DType("bfloat16", "BF16", 2, "float", "<u2", 2),
    DType("float8_e4m3fn", "F8_E4M3", 1, "float", "u1"),
    DType("float8_e5m2", "F8_E5M2", 1, "float", "u1"),
    DType("int64", "I64", 8, "int", "<i8", 4),
    DType("int32", "I32", 4, "int", "<i4", 3),
    DType("int16", "I16", 2, "int", "<i2"),
    DType("int8", "I8", 1, "int", "i1", 6),
    DType("uint64", "U64", 8, "uint", "<u8"),
    DType("uint32", "U32", 4, "uint", "<u4", 7),
    DType("uint16", "U16", 2, "uint", "<u2"),
    DType("uint8", "U8", 1, "uint", "u1", 5),
    DType("bool", "BOOL", 1, "bool", "?"),
)
BY_NAME: Dict[str, DType] = {d.name: d for d in _ALL}
BY_TAG: Dict[str, DType] = {d.tag: d for d in _ALL}
BY_CODE: Dict[int, DType] = {d.code: d for d in _ALL if d.code is not None}
FLOAT32, FLOAT16, BFLOAT16, FLOAT64 = (BY_NAME[n] for n in ("float32", "float16", "bfloat16", "float64"))
# the float types the kernels compute on (inputs may mix them; outputs are one of them)
KERNEL_FLOATS = (FLOAT32, FLOAT16, BFLOAT16)

# spellings users write (YAML dtype:, --dtype, out_dtype=) -> canonical name
ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
           "bf16": "bfloat16", "fp64": "float64", "double": "float64"}
# numpy dtypes with a direct meaning (uint16 stays uint16: bf16 data must be named)
_NUMPY = {np.dtype(d.storage): d for d in _ALL
          if d.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")}


class UnknownDTypeError(ValueError):
    """A dtype name, tag or object that this table does not know."""


def from_tag(tag: str) -> DType:
    """DType of a safetensors tag ("BF16")."""
    try:
        return BY_TAG[tag]
    except (KeyError, TypeError):
        raise UnknownDTypeError(f"unknown safetensors dtype {tag!r}") from None


def from_name(name: str, allowed=None) -> DType:
    """DType of a user-written name: canonical ("bfloat16"), alias ("bf16", "half") or
    "torch.bfloat16"; case-insensitive. ``allowed``: DTypes accepted (error otherwise)."""
    key = str(name).lower().replace("torch.", "")
    d = BY_NAME.get(ALIASES.get(key, key))
    if d is None or (allowed is not None and d not in allowed):
        choices = ", ".join(x.name for x in (allowed or _ALL))
        raise UnknownDTypeError(f"unknown dtype '{name}' (use {choices})")
    return d


def of(x, allowed=None) -> DType:
    """DType of a DType, a name, a torch dtype or a numpy dtype (numpy uint16 is uint16;
    bf16 data held as uint16 must be named explicitly)."""
    if isinstance(x, DType):
        d = x
    elif isinstance(x, str):
        return from_name(x, allowed)
    elif type(x).__module__ == "torch" and type(x).__name__ == "dtype":
        return from_name(str(x), allowed)
    else:
        try:
            d = _NUMPY[np.dtype(x)]
        except (TypeError, KeyError):
            raise UnknownDTypeError(f"unknown dtype {x!r}") from None
    if allowed is not None and d not in allowed:
        raise UnknownDTypeError(f"dtype {d.name} is not supported (use {', '.join(a.name for a in allowed)})")
    return d


def _to_float32(a: np.ndarray, src: DType) -> np.ndarray:
    if src is BFLOAT16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)  # float16 exactly; float64 rounded once (as torch's casts)


def _from_float32(f: np.ndarray, dst: DType, nan_bits: int) -> np.ndarray:
    if dst is BFLOAT16:
        # round to nearest even on the upper 16 bits; NaN becomes `nan_bits`
        u = f.view(np.uint32)
        r = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
        return np.where(np.isnan(f), np.uint16(nan_bits), r)
    return f.astype(dst.np)


# exponent field of each raw float storage: all ones means Inf or NaN
_EXP_BITS = {"bfloat16": 0x7F80, "float8_e5m2": 0x7C}


def all_finite(a: np.ndarray, dt: DType, chunk: int = 1 << 22) -> bool:
    """Whether every element of `a` (raw storage of `dt`, see DType.raw) is finite; integer
    types are always finite. float8_e4m3fn has no Inf: only its NaN (0x7F/0xFF) counts.
    Checked in chunks so the temporaries stay small."""
    if not dt.is_floating_point:
        return True
    flat = a.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        if not dt.raw:
            ok = np.isfinite(part).all()
        elif dt.name == "float8_e4m3fn":
            ok = not ((part & 0x7F) == 0x7F).any()
        else:
            e = _EXP_BITS[dt.name]
            ok = not ((part & e) == e).any()
        if not ok:
            return False
    return True


def convert(a: np.ndarray, src: DType, dst: DType, copy: bool = False) -> np.ndarray:
    """Raw array of ``src`` -> raw array of ``dst``, the bits torch's ``Tensor.to(dst)``
    writes: float types through float32 (float64 rounds to float32 first, as torch's
    CPU casts do), bfloat16 by round-to-nearest-even. Equal types return ``a`` (a copy
    when ``copy``); conversions outside float64/32/16/bfloat16 go through torch."""
    if src == dst:
        return a.copy() if copy else a
    floats = (FLOAT64, FLOAT32, FLOAT16, BFLOAT16)
    if src in floats and dst in floats:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the IEEE cast
            f = a if src is FLOAT32 else _to_float32(a, src)
            if dst is FLOAT64:
                return f.astype(np.float64)
            # torch's CPU casts write NaN as 0xFFFF from float32/64, as 0x7FC0 from float16
            return _from_float32(f, dst, 0x7FC0 if src is FLOAT16 else 0xFFFF)
    import torch  # e.g. fp8: torch knows the rounding

    t = torch.from_numpy(np.ascontiguousarray(a)).view(src.torch).to(dst.torch)
    return t.view(getattr(torch, dst.np.name)).numpy() if dst.raw else t.numpy()
