"""Safetensors files: the one reader and the one streaming writer (numpy; torch optional).

Reading
-------
:class:`SafetensorsFile` parses a file's header once (:mod:`.safetensors_format`
validates it) and reads tensors with positional reads (``os.preadv``) into fresh numpy
buffers, or into a buffer the caller gives (e.g. page-locked torch memory for a GPU
copy). bfloat16 and fp8 come back as their raw bits (``uint16``/``uint8`` arrays, see
:mod:`.dtypes`); :func:`as_torch` views them as torch tensors without a copy.

We deliberately do not keep a memory map for the data: every page touched through a
map stays mapped and counts in the process's resident set until the map is closed, so
streaming a 15 GB model through a map shows up as ~15 GB of RSS. Positional reads go
through the page cache (which the OS reclaims freely and which is not our RSS) and keep
the resident memory at the tensors actually in flight; the kernel still reads ahead
sequentially, so throughput matches the map.

Writing
-------
:class:`SafetensorsWriter` writes one file tensor by tensor to a temporary sibling name
and renames it into place on :meth:`~SafetensorsWriter.finish` (after an fsync), so a
crash or an error never leaves a complete-looking file. With a *plan* (names, dtypes,
shapes known in advance) the header is written first and tensors stream straight to
disk; without one the data goes to a temporary body file that is appended after the
header at the end. The header is compact JSON with ``__metadata__`` first (as the
safetensors library writes it), padded with spaces so the data section is 8-byte
aligned. :class:`ShardedWriter` splits a planned model into shards of at most
``max_shard_bytes`` (:func:`plan_shards`) and writes ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from lfm_engine.io import dtypes
from lfm_engine.io.dtypes import DType
from lfm_engine.io.safetensors_format import SafetensorsFormatError, TensorInfo, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SAMPLES_PER_TENSOR = 64

__all__ = ["TensorInfo", "SafetensorsFile", "SafetensorsFormatError", "read_array", "map_array", "read_tensor",
           "as_torch", "as_numpy",
           "array_bytes", "SafetensorsWriter", "save_tensors", "ShardLayout", "plan_shards", "ShardedWriter",
           "parse_size", "SAFE_INDEX", "SAFE_SINGLE"]


def read_tensor_infos(path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """(tensors by name, __metadata__) of one file; raises SafetensorsFormatError,
    FileNotFoundError or OSError."""
    entries, meta, _ = read_header(os.fspath(path))
    return entries, meta


def read_array(info: TensorInfo, fd: Optional[int] = None, out=None) -> np.ndarray:
    """Read one tensor with positional reads (GIL released) into a new numpy array of
    ``info.dtype``'s storage type and ``info.shape``, or into ``out`` (any writable
    buffer of ``info.nbytes`` bytes, e.g. ``pinned_tensor.numpy()``; returned viewed)."""
    own = fd is None
    if own:
        fd = os.open(info.file, os.O_RDONLY)
    try:
        buf = np.empty(info.nbytes, dtype=np.uint8) if out is None else \
            np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
        if buf.nbytes != info.nbytes:
            raise ValueError(f"read_array: buffer of {buf.nbytes} bytes for '{info.name}' ({info.nbytes} bytes)")
        if info.nbytes:
            mv = memoryview(buf)
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [mv[done:]], info.start + done)
                if got <= 0:
                    raise SafetensorsFormatError(f"{info.file}: unexpected end of file reading '{info.name}'")
                done += got
        return buf.view(info.dtype.np).reshape(info.shape)
    finally:
        if own:
            os.close(fd)


def map_array(info: TensorInfo, fd: int) -> np.ndarray:
    """The tensor of ``info`` as an array over a private mapping of its bytes in the file
    (no read into a fresh buffer: the pages come from the page cache when the kernel first
    touches them, and the mapping goes when the array does). Copy-on-write, so the file is
    never written. Falls back to :func:`read_array` when the tensor's offset is not a
    multiple of its element size. Raises SafetensorsFormatError when the file is shorter
    than its header says (checked here: a mapping past the end would fault on access).
    A file truncated by another process *while* mapped ends the process with SIGBUS, as
    with any memory-mapped loader (safetensors' own included); read_array does not."""
    end = info.start + info.nbytes
    if end > os.fstat(fd).st_size:
        raise SafetensorsFormatError(f"{info.file}: unexpected end of file reading '{info.name}'")
    if info.nbytes == 0 or info.start % info.dtype.itemsize:
        return read_array(info, fd)
    a0 = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, end - a0, access=mmap.ACCESS_COPY, offset=a0)
    # the array holds the mapping alive (frombuffer keeps a reference to its buffer)
    buf = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.start - a0)
    return buf.view(info.dtype.np).reshape(info.shape)


def read_tensor(info: TensorInfo, fd: Optional[int] = None):
    """:func:`read_array` as a torch tensor of ``info.dtype`` (imports torch)."""
    return as_torch(read_array(info, fd), info.dtype)


def sample_bytes(info: TensorInfo, fd: int, k: int = SAMPLES_PER_TENSOR) -> bytes:
    """Bytes of elements floor(j*n/K), j < K = min(n, k), in the file's dtype (a few small
    positional reads; what a fingerprint hashes instead of the whole tensor)."""
    n, es = info.numel, info.dtype.itemsize
    if n == 0:
        return b""
    kk = min(n, k)
    return b"".join(os.pread(fd, es, info.start + (j * n // kk) * es) for j in range(kk))


def as_torch(arr: np.ndarray, dtype: DType):
    """The torch tensor of a raw numpy array of ``dtype`` (a view: no copy; imports torch)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(dtype.torch) if t.dtype != dtype.torch else t


def as_numpy(t) -> np.ndarray:
    """A CPU torch tensor's raw numpy array (bf16 as uint16; a view when contiguous)."""
    t = t.detach().to("cpu").contiguous()
    dt = dtypes.of(t.dtype)
    if dt.raw:
        import torch

        return t.view(getattr(torch, dt.np.name)).numpy()
    return t.numpy()


def array_bytes(x) -> memoryview:
    """The raw bytes of a contiguous numpy array or (CPU-copied) torch tensor."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return memoryview(x.reshape(-1).view(np.uint8)) if x.size else memoryview(b"")
    t = x.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    import torch

    return memoryview(t.view(torch.uint8).numpy())


def dtype_of(x) -> DType:
    """DType of a torch tensor or a numpy array (a uint16 array is uint16: name bf16 explicitly)."""
    return dtypes.of(x.dtype)


class SafetensorsFile:
    """The tensors of one safetensors file, read one at a time (positional reads)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tensors, self.metadata = read_tensor_infos(self.path)
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list:
        return list(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def info(self, name: str) -> Tuple[DType, Tuple[int, ...]]:
        t = self.tensors[name]
        return t.dtype, t.shape

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None

    def read(self, name: str) -> np.ndarray:
        """A fresh numpy array (raw storage type for bf16/fp8)."""
        return read_array(self._info(name), self._fd)

    def get(self, name: str):
        """A fresh torch tensor of the file's dtype (imports torch)."""
        info = self._info(name)
        return as_torch(read_array(info, self._fd), info.dtype)

    def sample(self, name: str) -> bytes:
        return sample_bytes(self._info(name), self._fd)


# ------------------------------------------------------------------------- writing

def save_tensors(path, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """Write a {name: numpy array or torch tensor} dict as one safetensors file, in dict
    order (temporary name, fsync, rename)."""
    w = SafetensorsWriter(path, plan=[(k, dtype_of(t), t.shape) for k, t in tensors.items()], metadata=metadata)
    try:
        for k, t in tensors.items():
            w.add(k, t)
        return w.finish()
    except BaseException:
        w.abort()
        raise


def _header_bytes(entries: Dict[str, dict], metadata: Optional[dict]) -> bytes:
    header = {"__metadata__": dict(metadata)} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # 8-byte aligned data section, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _nbytes(dtype: DType, shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor; it appears (renamed) on finish().

    plan: optional [(name, dtype, shape)] in write order (dtype: anything
    :func:`lfm_engine.io.dtypes.of` takes); then the header is written at once and each
    add() must follow the plan. Without a plan the bytes go to a body file.
    """

    def __init__(self, path, plan: Optional[Iterable] = None, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.body_path: Optional[Path] = None
        self.entries: Dict[str, dict] = {}
        self.offset = 0
        self.meta = dict(metadata or {})
        self.plan = None
        self.bytes_written = 0
        if plan is not None:
            self.plan = [(n, dtypes.of(dt), tuple(int(s) for s in shape)) for n, dt, shape in plan]
            self._pos = 0
            off = 0
            entries = {}
            for n, dt, shape in self.plan:
                nb = _nbytes(dt, shape)
                entries[n] = {"dtype": dt.tag, "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
            self.f = open(self.tmp, "wb")
            self.f.write(_header_bytes(entries, self.meta))
        else:
            self.body_path = self.tmp.with_name(self.tmp.name + ".body")
            self.f = open(self.body_path, "wb")

    def add(self, name: str, x, dtype=None) -> None:
        """Append tensor ``x`` (numpy array or torch tensor). ``dtype`` names the element
        type when the array holds raw bits (a uint16 array of bf16 data); default: the
        plan's entry when the storage matches, else ``x``'s own dtype."""
        shape = tuple(int(s) for s in x.shape)
        if self.plan is not None:
            if self._pos >= len(self.plan):
                raise RuntimeError(f"writer: unexpected extra tensor '{name}' (beyond the plan)")
            pn, pdt, pshape = self.plan[self._pos]
            dt = self._dtype(x, dtype, pdt)
            if (pn, pdt, pshape) != (name, dt, shape):
                raise RuntimeError(f"writer: expected '{pn}' {pdt} {list(pshape)}, got '{name}' {dt} {list(shape)}")
            self._pos += 1
        else:
            dt = self._dtype(x, dtype, None)
            if name in self.entries or name == "__metadata__":
                raise ValueError(f"writer: duplicate tensor name '{name}'")
        buf = array_bytes(x)
        self.f.write(buf)
        nb = buf.nbytes
        self.entries[name] = {"dtype": dt.tag, "shape": list(shape), "data_offsets": [self.offset, self.offset + nb]}
        self.offset += nb
        self.bytes_written += nb

    @staticmethod
    def _dtype(x, given, planned: Optional[DType]) -> DType:
        if given is not None:
            dt = dtypes.of(given)
            if dt.np != np.dtype(dtype_of(x).storage):
                raise TypeError(f"writer: data of dtype {x.dtype} cannot be stored as {dt}")
            return dt
        if isinstance(x, np.ndarray) and planned is not None and x.dtype == planned.np:
            return planned  # raw bits of the planned type (bf16 as uint16)
        return dtype_of(x)

    def finish(self, metadata: Optional[dict] = None) -> Path:
        """Complete the file (metadata: extra __metadata__ entries, unplanned writers only)."""
        if self.plan is not None:
            if metadata:
                raise ValueError("writer: a planned file's metadata is written first; pass it to the constructor")
            if self._pos != len(self.plan):
                raise RuntimeError(f"writer: only {self._pos} of {len(self.plan)} planned tensors were written")
            self._sync_close(self.f)
        else:
            self.f.close()
            meta = dict(self.meta)
            meta.update(metadata or {})
            with open(self.tmp, "wb") as out, open(self.body_path, "rb") as body:
                out.write(_header_bytes(self.entries, meta))
                shutil.copyfileobj(body, out, 1 << 22)
                self._sync_close(out)
            os.unlink(self.body_path)
        os.replace(self.tmp, self.path)
        return self.path

    @staticmethod
    def _sync_close(f) -> None:
        # fsync before the rename: a rename that reaches the disk before the data would
        # otherwise leave an empty file after a crash
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        for p in (self.tmp, self.body_path):
            if p is not None and os.path.exists(p):
                os.unlink(p)


@dataclass
class ShardLayout:
    """Assignment of output tensors (in write order) to shard files."""
    files: List[str]
    entries: List[List[Tuple[str, DType, Tuple[int, ...]]]]

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(dt, sh) for ents in self.entries for _, dt, sh in ents)


def plan_shards(tensors: Sequence[Tuple[str, object, Tuple[int, ...]]], max_shard_bytes: int) -> ShardLayout:
    """Greedy split in write order: start a new shard when the next tensor would overflow.
    A single tensor larger than the shard size gets a shard of its own; one shard is
    called ``model.safetensors``."""
    groups: List[list] = [[]]
    size = 0
    for name, dt, shape in tensors:
        dt = dtypes.of(dt)
        nb = _nbytes(dt, shape)
        if groups[-1] and size + nb > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dt, tuple(shape)))
        size += nb
    if len(groups) == 1:
        files = [SAFE_SINGLE]
    else:
        k = len(groups)
        files = [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    return ShardLayout(files, groups)


class ShardedWriter:
    """Streams tensors, in the planned order, into safetensors shards under ``folder``.

    ``write(name, x)`` must be called for every planned tensor in order, with the planned
    dtype and shape (checked). ``close()`` checks completeness and writes
    ``model.safetensors.index.json`` (also for a single shard: transformers accepts both).
    """

    def __init__(self, folder: str, layout: ShardLayout, metadata: Optional[dict] = None):
        self.folder = folder
        self.layout = layout
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, ent) for si, ents in enumerate(layout.entries) for ent in ents]
        self._pos = 0
        self._shard = -1
        self._w: Optional[SafetensorsWriter] = None
        self.bytes_written = 0

    def write(self, name: str, x) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"writer: unexpected extra tensor '{name}'")
        si = self._order[self._pos][0]
        if si != self._shard:
            if self._w is not None:
                self._w.finish()
            self._w = SafetensorsWriter(os.path.join(self.folder, self.layout.files[si]),
                                        plan=self.layout.entries[si], metadata=self.metadata)
            self._shard = si
        before = self._w.bytes_written
        self._w.add(name, x)
        self.bytes_written += self._w.bytes_written - before
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer: only {self._pos} of {len(self._order)} tensors were written")
        if self._w is not None:
            self._w.finish()
            self._w = None
        # a shard with no tensors cannot occur (plan_shards never makes one)
        wmap = {name: self.layout.files[si] for si, (name, _, _) in self._order}
        index = {"metadata": {"total_size": self.layout.total_bytes}, "weight_map": wmap}
        with open(os.path.join(self.folder, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', '123' (bytes). Decimal units as HF."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        val = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m:
            raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
        num, unit = float(m.group(1)), m.group(2)
        unit = unit.rstrip("B") if unit not in ("", "B") else ""
        mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
        if unit not in mult:
            raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
        val = int(num * mult[unit])
    if val <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return val
