"""Safetensors checkpoints on disk: streaming reader and streaming sharded writer.

Reading
-------
:class:`ModelFolder` opens a Hugging Face model folder holding ``model.safetensors``
or shards listed by ``model.safetensors.index.json`` (any ``*.safetensors`` files
are accepted when there is no index). Headers are parsed and checked up front
(dtype known, shape consistent with the byte range, ranges inside the file and not
overlapping), so a corrupt or truncated file is reported before any work is done.

Tensor data is read with positional reads (``os.preadv``) straight into a freshly
allocated torch buffer. We deliberately do not keep a ``safe_open`` memory map for
the data: every page touched through a map stays mapped and counts in the
process's resident set until the map is closed, so streaming a 15 GB model through
``safe_open`` shows up as ~15 GB of RSS. Positional reads go through the page
cache (which the OS reclaims freely and which is not our RSS) and keep the
process's resident memory at the tensors actually in flight. The kernel still
reads ahead sequentially, so throughput matches the map. ``safe_open`` is still
used as a second opinion on each file's header (see :meth:`ModelFolder.open`).

Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused and
never unpickled: unpickling runs arbitrary code from the file.

Writing
-------
:class:`ShardedWriter` writes the output as safetensors shards of at most
``max_shard_bytes`` each plus ``model.safetensors.index.json``. All output
names, dtypes and shapes are known from the merge plan before the first tensor is
computed, so each shard's header is written first and tensors are appended as they
arrive: no shard is ever held in memory. A single tensor larger than the shard
size gets a shard of its own. With a single shard the file is called
``model.safetensors`` (and an index is still written, as transformers accepts
both).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lfm_engine.io.names import UnsafeNameError, check_file_name
from lfm_engine.io.safetensors_format import ST_DTYPES, TORCH_TO_ST, SafetensorsFormatError  # noqa: F401
from lfm_engine.io.safetensors_format import read_header as _read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A model folder or checkpoint file cannot be used; the message names the file."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A model folder, its weights or a shard its index lists do not exist."""


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape, absolute byte range in the file."""
    name: str
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: str) -> Tuple[Dict[str, TensorInfo], dict]:
    """Parse and validate one safetensors file's header. Returns (tensors, metadata)."""
    try:
        entries, meta, _ = _read_header(path)
    except (SafetensorsFormatError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return {n: TensorInfo(n, path, x.dtype, x.shape, x.start, x.end) for n, x in entries.items()}, meta


def read_tensor(info: TensorInfo, fd: Optional[int] = None, pin: bool = False) -> torch.Tensor:
    """Read one tensor with positional reads into a new CPU tensor (GIL released); with
    pin=True into page-locked memory, so a copy to the GPU can run asynchronously."""
    own = fd is None
    if own:
        fd = os.open(info.file, os.O_RDONLY)
    try:
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
        if info.nbytes:
            mv = memoryview(buf.numpy())
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [mv[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: unexpected end of file reading '{info.name}'")
                done += got
        return buf.view(info.dtype).reshape(info.shape)
    finally:
        if own:
            os.close(fd)


def _cross_check_with_safe_open(path: str, infos: Dict[str, TensorInfo]) -> None:
    """Let the safetensors library validate the header too (it only maps, never
    touches the data pages, so this costs no resident memory)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # the library's own error types vary across versions
        raise CheckpointError(f"{path}: rejected by the safetensors library ({e})") from None
    if keys != set(infos):
        raise CheckpointError(f"{path}: header parsed inconsistently (tensor names differ)")


def is_hub_id(ref: str) -> bool:
    """'org/name' that is not an existing path looks like a Hugging Face hub id."""
    return (not os.path.exists(ref) and re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", ref) is not None
            and not ref.startswith((".", "/")))


class ModelFolder:
    """A local HF model folder with safetensors weights; tensors listed by name.

    Raises :class:`CheckpointError` for hub ids, missing folders, pickle-only
    checkpoints, a broken index or corrupt headers.
    """

    def __init__(self, path: str):
        self.ref = path
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(self.path):
            if is_hub_id(path):
                raise CheckpointError(
                    f"'{path}' is not a local folder and looks like a Hugging Face hub id: local folders "
                    f"only (download it first, e.g. `huggingface-cli download {path} "
                    f"--local-dir DIR`, and use DIR)")
            if os.path.exists(self.path):
                raise CheckpointError(f"'{path}' is not a folder (expected a model folder)")
            raise MissingCheckpointError(f"model folder '{path}' does not exist")
        files = sorted(os.listdir(self.path))
        st_files = [f for f in files if f.endswith(".safetensors")]
        index_path = os.path.join(self.path, SAFE_INDEX)
        if not st_files:
            pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise CheckpointError(
                    f"'{path}' holds only pickle checkpoints ({', '.join(pickles[:3])}); they "
                    f"are refused because loading a pickle can run arbitrary code. Convert the "
                    f"model to safetensors first (e.g. load it once in a trusted environment "
                    f"and save_pretrained(..., safe_serialization=True))")
            raise MissingCheckpointError(f"'{path}' contains no *.safetensors weights")
        self.config: Optional[dict] = None
        cfg_path = os.path.join(self.path, "config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    self.config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    wmap = json.load(f)["weight_map"]
                if not isinstance(wmap, dict):
                    raise TypeError
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid index (no weight_map) ({e})") from None
            # shard names come from the file: bare names only (never '../x' or '/etc/x')
            try:
                shard_names = sorted({check_file_name(v, f"{index_path}: weight_map") for v in wmap.values()})
            except UnsafeNameError as e:
                raise CheckpointError(str(e)) from None
        else:
            wmap = None
            shard_names = st_files
        self.tensors: Dict[str, TensorInfo] = {}
        for sh in shard_names:
            sp = os.path.join(self.path, sh)
            if not os.path.isfile(sp):
                raise MissingCheckpointError(f"{index_path}: lists shard '{sh}' which is missing")
            infos, _ = read_safetensors_header(sp)
            _cross_check_with_safe_open(sp, infos)
            for name, ti in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"'{path}': tensor '{name}' appears in two shards")
                if wmap is not None and wmap.get(name) != sh:
                    continue  # not listed for this shard: the index is authoritative
                self.tensors[name] = ti
        if wmap is not None:
            missing = [n for n in wmap if n not in self.tensors]
            if missing:
                raise CheckpointError(
                    f"{index_path}: {len(missing)} tensors listed but not found in their shard "
                    f"(first: '{missing[0]}')")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> List[str]:
        return list(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class ShardLayout:
    """Assignment of output tensors (in write order) to shard files."""
    files: List[str]
    entries: List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]]

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(dt, sh) for ents in self.entries for _, dt, sh in ents)


def _nbytes(dtype, shape) -> int:
    n = dtype_size(dtype)
    for s in shape:
        n *= s
    return n


def plan_shards(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                max_shard_bytes: int) -> ShardLayout:
    """Greedy split in write order: start a new shard when the next tensor would overflow."""
    groups: List[list] = [[]]
    size = 0
    for ent in tensors:
        nb = _nbytes(ent[1], ent[2])
        if groups[-1] and size + nb > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(ent)
        size += nb
    if len(groups) == 1:
        files = [SAFE_SINGLE]
    else:
        k = len(groups)
        files = [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    return ShardLayout(files, groups)


class ShardedWriter:
    """Streams tensors, in the planned order, into safetensors shards under ``folder``.

    ``write(name, tensor)`` must be called for every planned tensor in order, with
    the planned dtype and shape (checked). ``close()`` checks completeness and writes
    ``model.safetensors.index.json``.
    """

    def __init__(self, folder: str, layout: ShardLayout, metadata: Optional[dict] = None):
        self.folder = folder
        self.layout = layout
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, ent) for si, ents in enumerate(layout.entries) for ent in ents]
        self._pos = 0
        self._shard = -1
        self._f = None
        self.bytes_written = 0

    def _finish_file(self):
        # fsync before the folder is renamed into place: a rename that reaches the
        # disk before the data would otherwise leave empty shards after a crash
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def _open_shard(self, si: int):
        if self._f is not None:
            self._finish_file()
        offs = 0
        header = {}
        for name, dt, shape in self.layout.entries[si]:
            nb = _nbytes(dt, shape)
            header[name] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape),
                            "data_offsets": [offs, offs + nb]}
            offs += nb
        header["__metadata__"] = self.metadata
        hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
        hb += b" " * ((8 - len(hb) % 8) % 8)  # data section 8-byte aligned
        self._f = open(os.path.join(self.folder, self.layout.files[si]), "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._shard = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"writer: unexpected extra tensor '{name}'")
        si, (pname, pdt, pshape) = self._order[self._pos]
        if name != pname or tensor.dtype != pdt or tuple(tensor.shape) != tuple(pshape):
            raise RuntimeError(
                f"writer: expected '{pname}' {pdt} {list(pshape)}, got '{name}' "
                f"{tensor.dtype} {list(tensor.shape)}")
        if si != self._shard:
            self._open_shard(si)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.bytes_written += t.numel() * t.element_size()
        self._pos += 1

    def close(self) -> None:
        if self._f is not None:
            self._finish_file()
        if self._pos != len(self._order):
            raise RuntimeError(
                f"writer: only {self._pos} of {len(self._order)} tensors were written")
        # a shard with no tensors cannot occur (plan_shards never makes one)
        wmap = {name: self.layout.files[si] for si, (name, _, _) in self._order}
        index = {"metadata": {"total_size": self.layout.total_bytes}, "weight_map": wmap}
        with open(os.path.join(self.folder, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)

    def abort(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            finally:
                self._f = None
