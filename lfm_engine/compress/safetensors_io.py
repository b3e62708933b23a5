"""Streaming safetensors I/O for model folders and .lfmd containers.

- read_header(path): parse and validate a safetensors header (8-byte little-endian
  length, JSON header, data section) with clear errors for truncated/corrupt files.
- SafetensorsFile: lazy access to the tensors of one file (memory-mapped, one tensor
  materialised at a time).
- ModelFolder: a Hugging Face model folder (model.safetensors, or shards listed in
  model.safetensors.index.json, or any *.safetensors files), or one .safetensors file.
- StreamWriter: writes a safetensors file tensor by tensor to a temporary name and
  renames it when complete. With a plan (names, dtypes, shapes known in advance) the
  header is written first and tensors stream straight to disk; without one the tensor
  bytes go to a temporary body file that is appended after the header at the end.
- fingerprint(folder): SHA-256 over the sorted tensor names, dtypes, shapes and a strided
  sample of 64 values per tensor (read straight from the mapped bytes: no tensor is
  loaded), written "sha256:<hex>".
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from lfm_engine.io.safetensors_format import ST_DTYPES as _ST, SafetensorsFormatError  # noqa: F401
from lfm_engine.io.safetensors_format import read_header as _read_header

ST_DTYPES = {tag: dt for tag, (dt, _) in _ST.items()}  # tag -> torch dtype
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
SAMPLES_PER_TENSOR = 64


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise SafetensorsFormatError(f"unknown dtype name '{name}'")
    return dt


def read_header(path) -> tuple[dict, dict, int]:
    """(tensors: name -> {dtype, shape, data_offsets}, metadata, data_start) of a safetensors file,
    validated by lfm_engine.io.safetensors_format.read_header."""
    entries, meta, data_start = _read_header(path)
    header = {n: {"dtype": x.tag, "shape": list(x.shape),
                  "data_offsets": [x.start - data_start, x.end - data_start]} for n, x in entries.items()}
    return header, meta, data_start


class SafetensorsFile:
    """Tensors of one safetensors file, read one at a time from a memory map."""

    def __init__(self, path):
        self.path = Path(path)
        self.header, self.metadata, self.data_start = read_header(self.path)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list:
        return list(self.header)

    def info(self, name: str) -> tuple[torch.dtype, tuple]:
        h = self.header[name]
        return ST_DTYPES[h["dtype"]], tuple(int(s) for s in h["shape"])

    def raw_bytes(self, name: str) -> memoryview:
        b, e = self.header[name]["data_offsets"]
        return memoryview(self._map)[self.data_start + b:self.data_start + e] if e > b else memoryview(b"")

    def get(self, name: str) -> torch.Tensor:
        """A fresh tensor (a copy: the file may be closed afterwards)."""
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        dt, shape = self.info(name)
        buf = self.raw_bytes(name)
        if len(buf) == 0:
            return torch.empty(shape, dtype=dt)
        t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        return t.view(dt).reshape(shape)

    def sample(self, name: str, k: int = SAMPLES_PER_TENSOR) -> bytes:
        """Bytes of elements floor(j*n/K), j < K = min(n, k), in the file's dtype."""
        dt, shape = self.info(name)
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            return b""
        es = torch.empty(0, dtype=dt).element_size()
        kk = min(n, k)
        idx = (np.arange(kk, dtype=np.int64) * n) // kk
        buf = np.frombuffer(self.raw_bytes(name), dtype=np.uint8)
        pos = (idx[:, None] * es + np.arange(es)[None, :]).reshape(-1)
        return buf[pos].tobytes()


class ModelFolder:
    """The safetensors weights of a model folder (or one .safetensors file).

    Folders are opened by lfm_engine.merge.io.ModelFolder (the one folder reader: index
    json authoritative, hub ids and pickle-only folders refused, corrupt headers named);
    this class adds what the container needs: per-file layout, tensor access by name and
    the base fingerprint."""

    def __init__(self, path, what: str = "model"):
        from lfm_engine.merge.io import ModelFolder as _Folder
        from lfm_engine.merge.io import read_safetensors_header

        self.path = Path(path)
        self.what = what
        if self.path.is_file():
            self.tensors, _ = read_safetensors_header(str(self.path))
        else:
            self.tensors = _Folder(str(self.path)).tensors
        self.files = {}
        for info in self.tensors.values():
            if info.file not in self.files:
                self.files[info.file] = SafetensorsFile(info.file)

    def _file(self, name: str) -> "SafetensorsFile":
        return self.files[self.tensors[name].file]

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list:
        return list(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def info(self, name: str) -> tuple[torch.dtype, tuple]:
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get(name)

    def layout(self) -> dict:
        """file name -> [tensor names], in file order."""
        out = {}
        for k, t in self.tensors.items():
            out.setdefault(Path(t.file).name, []).append(k)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(b"lfm-fingerprint/1\0")
        for name in sorted(self.tensors):
            dt, shape = self.info(name)
            h.update(name.encode("utf-8") + b"\0" + TORCH_TO_ST[dt].encode() + b"\0" +
                     json.dumps(list(shape)).encode() + b"\0")
            h.update(self._file(name).sample(name))
        return "sha256:" + h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class StreamWriter:
    """Write a safetensors file tensor by tensor; the file appears (renamed) on finish().

    plan: optional [(name, dtype, shape)] in write order; then the header is written at
    once and each add() must follow the plan. Without a plan, bytes go to a body file.
    """

    def __init__(self, path, plan: Optional[Iterable] = None, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.entries = {}
        self.offset = 0
        self.plan = None
        self.meta = dict(metadata or {})
        if plan is not None:
            self.plan = [(n, dt, tuple(shape)) for n, dt, shape in plan]
            self._pos = 0
            header = {}
            if self.meta:
                header["__metadata__"] = self.meta
            off = 0
            for n, dt, shape in self.plan:
                nb = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
                header[n] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
            self.f = open(self.tmp, "wb")
            self._write_header(self.f, header)
        else:
            self.body_path = self.tmp.with_name(self.tmp.name + ".body")
            self.f = open(self.body_path, "wb")

    @staticmethod
    def _write_header(f, header: dict) -> None:
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((-len(raw)) % 8)  # 8-byte aligned data section, as safetensors writes it
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in TORCH_TO_ST:
            raise TypeError(f"cannot store dtype {t.dtype} in safetensors")
        if self.plan is not None:
            if self._pos >= len(self.plan):
                raise RuntimeError(f"StreamWriter: tensor '{name}' is beyond the plan")
            pn, pdt, pshape = self.plan[self._pos]
            if (pn, pdt, pshape) != (name, t.dtype, tuple(t.shape)):
                raise RuntimeError(f"StreamWriter: got {name} {t.dtype} {tuple(t.shape)}, plan says {pn} {pdt} {pshape}")
            self._pos += 1
        elif name in self.entries or name == "__metadata__":
            raise ValueError(f"StreamWriter: duplicate tensor name '{name}'")
        buf = tensor_bytes(t)
        self.f.write(buf)
        nb = len(buf) * buf.itemsize
        self.entries[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, self.offset + nb]}
        self.offset += nb

    def finish(self, metadata: Optional[dict] = None) -> Path:
        if self.plan is not None:
            if self._pos != len(self.plan):
                raise RuntimeError(f"StreamWriter: {len(self.plan) - self._pos} planned tensors were not written")
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        else:
            self.f.close()
            meta = dict(self.meta)
            meta.update(metadata or {})
            header = {"__metadata__": meta} if meta else {}
            header.update(self.entries)
            with open(self.tmp, "wb") as out, open(self.body_path, "rb") as body:
                self._write_header(out, header)
                shutil.copyfileobj(body, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            os.unlink(self.body_path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        for p in (self.tmp, getattr(self, "body_path", None)):
            if p is not None and os.path.exists(p):
                os.unlink(p)
