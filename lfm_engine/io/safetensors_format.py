"""The safetensors file format: dtype tags and one validating header parser.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {str: str}}), then
the data section; offsets are relative to the data section. Every reader (model
folders, .lfmd containers, PEFT adapters: lfm_engine/io/safetensors.py) parses headers
here, so a truncated or corrupt file gets the same clear error everywhere. No torch.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Tuple

from lfm_engine.io.dtypes import BY_TAG, DType

MAX_HEADER = 100 << 20  # the format's own limit


class SafetensorsFormatError(ValueError):
    """A safetensors file is truncated, corrupt or not a safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape, absolute byte range [start, end)."""
    name: str
    file: str
    dtype: DType
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed in a safetensors header")


def _json_int(v) -> int:
    """A shape or offset: a JSON integer (not a float such as 1e400, not a bool)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def read_header(path) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int]:
    """(entries by name, __metadata__, data_start) of a safetensors file, validated:
    header length within the file, JSON object, known dtypes, non-negative shapes, byte
    ranges that match shape x itemsize, lie inside the file and do not overlap."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError(f"{path}: not a safetensors file or truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsFormatError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file size {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SafetensorsFormatError(f"{path}: is a directory, not a safetensors file") from None
    try:
        # NaN/Infinity are not JSON (Python accepts them); nesting deep enough to exhaust the
        # parser's recursion is not a header either.
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise SafetensorsFormatError(f"{path}: corrupt safetensors header ({exc})") from None
    except RecursionError:
        raise SafetensorsFormatError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsFormatError(f"{path}: corrupt __metadata__ (must map strings to strings)")
    data_start = 8 + n
    entries: Dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            tag = info["dtype"]
            shape = tuple(_json_int(s) for s in info["shape"])
            b, e = (_json_int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: corrupt header entry for tensor '{name}': {info!r}") from None
        if not isinstance(tag, str) or tag not in BY_TAG:
            raise SafetensorsFormatError(f"{path}: tensor '{name}' has unsupported dtype {tag}")
        dt = BY_TAG[tag]
        isz = dt.itemsize
        count = 1
        for s in shape:
            if s < 0:
                raise SafetensorsFormatError(f"{path}: tensor '{name}' has a negative dimension {list(shape)}")
            count *= s
        if not 0 <= b <= e or e - b != count * isz:
            raise SafetensorsFormatError(
                f"{path}: corrupt header: tensor '{name}' {tag} {list(shape)} has byte range [{b}, {e})")
        if data_start + e > size:
            raise SafetensorsFormatError(
                f"{path}: truncated: tensor '{name}' ends at byte {data_start + e} but the file has {size} bytes")
        entries[name] = TensorInfo(name, path, dt, shape, data_start + b, data_start + e)
    spans = sorted((x.start, x.end, x.name) for x in entries.values())
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsFormatError(f"{path}: corrupt header: tensors '{n0}' and '{n1}' overlap")
    return entries, meta, data_start
