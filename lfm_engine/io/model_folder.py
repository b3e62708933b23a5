"""A Hugging Face model folder's safetensors weights: the one folder reader.

:class:`ModelFolder` opens a folder holding ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (the index is authoritative; without one, every
``*.safetensors`` file is read), or a single ``.safetensors`` file when
``accept_file=True``. Headers are parsed and checked up front (dtype known, shape
consistent with the byte range, ranges inside the file and not overlapping; the
safetensors library is asked for a second opinion on each file), so a corrupt or
truncated file is reported before any work is done. Shard names from the index go
through :func:`lfm_engine.io.names.check_file_name` (bare names only).

Refused with :class:`CheckpointError` naming the problem: hub ids (local folders only),
missing folders, pickle-only checkpoints (``*.bin``, ``*.pt``, ... are never unpickled:
unpickling runs arbitrary code from the file), a broken index, corrupt headers.

Tensor data: :meth:`ModelFolder.read` (numpy, raw bits for bf16), :meth:`ModelFolder.get`
(torch), both positional reads (see :mod:`.safetensors` for why not a memory map);
:meth:`ModelFolder.fingerprint` identifies a base model for the .lfmd containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict, List, Optional

import numpy as np

from lfm_engine.io.names import UnsafeNameError, check_file_name
from lfm_engine.io.safetensors import (SAFE_INDEX, TensorInfo, as_torch, read_array, read_tensor_infos,
                                       sample_bytes)
from lfm_engine.io.safetensors_format import SafetensorsFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A model folder or checkpoint file cannot be used; the message names the file."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A model folder, its weights or a shard its index lists do not exist."""


def read_safetensors_header(path: str):
    """(tensors by name, __metadata__) of one file, problems raised as CheckpointError."""
    try:
        return read_tensor_infos(path)
    except (SafetensorsFormatError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def _cross_check_with_safe_open(path: str, infos: Dict[str, TensorInfo]) -> None:
    """Let the safetensors library validate the header too (it only maps, never touches
    the data pages, so this costs no resident memory; numpy framework: no torch import)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return
    try:
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
    except Exception as e:  # the library's own error types vary across versions
        raise CheckpointError(f"{path}: rejected by the safetensors library ({e})") from None
    if keys != set(infos):
        raise CheckpointError(f"{path}: header parsed inconsistently (tensor names differ)")


def is_hub_id(ref: str) -> bool:
    """'org/name' that is not an existing path looks like a Hugging Face hub id."""
    return (not os.path.exists(ref) and re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", ref) is not None
            and not ref.startswith((".", "/")))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


class ModelFolder:
    """A local HF model folder with safetensors weights; tensors listed by name.

    ``tensors``: name -> :class:`TensorInfo`; ``config``: config.json or None; ``ref``:
    the reference as the user wrote it.
    """

    def __init__(self, path, accept_file: bool = False):
        path = os.fspath(path)
        self.ref = path
        self.path = os.path.abspath(os.path.expanduser(path))
        self.config: Optional[dict] = None
        self._fds: Dict[str, int] = {}
        if accept_file and os.path.isfile(self.path) and self.path.endswith(".safetensors"):
            self.tensors, _ = read_safetensors_header(self.path)
            return
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
        cfg_path = os.path.join(self.path, "config.json")
        if os.path.isfile(cfg_path):
            self.config = _read_json(cfg_path)
        wmap = None
        shard_names = st_files
        if os.path.isfile(index_path):
            try:
                wmap = _read_json(index_path)["weight_map"]
                if not isinstance(wmap, dict):
                    raise TypeError
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid index (no weight_map) ({e!r})") from None
            # shard names come from the file: bare names only (never '../x' or '/etc/x')
            try:
                shard_names = sorted({check_file_name(v, f"{index_path}: weight_map") for v in wmap.values()})
            except UnsafeNameError as e:
                raise CheckpointError(str(e)) from None
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

    # ---------------------------------------------------------------- listing
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> List[str]:
        return list(self.tensors)

    def info(self, name: str):
        """(DType, shape) of one tensor."""
        t = self.tensors[name]
        return t.dtype, tuple(t.shape)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def layout(self) -> Dict[str, List[str]]:
        """file name -> [tensor names], in file order."""
        out: Dict[str, List[str]] = {}
        for k, t in self.tensors.items():
            out.setdefault(os.path.basename(t.file), []).append(k)
        return out

    # ---------------------------------------------------------------- data
    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def read(self, name: str) -> np.ndarray:
        """A fresh numpy array of one tensor (raw bits for bf16/fp8)."""
        info = self.tensors[name]
        return read_array(info, self._fd(info.file))

    def get(self, name: str):
        """A fresh torch tensor of one tensor (imports torch)."""
        return as_torch(self.read(name), self.tensors[name].dtype)

    def sample(self, name: str) -> bytes:
        info = self.tensors[name]
        return sample_bytes(info, self._fd(info.file))

    def fingerprint(self) -> str:
        """SHA-256 over the sorted tensor names, dtype tags, shapes and a strided sample of
        64 values per tensor, written "sha256:<hex>" (identifies a base for .lfmd)."""
        h = hashlib.sha256()
        h.update(b"lfm-fingerprint/1\0")
        for name in sorted(self.tensors):
            dt, shape = self.info(name)
            h.update(name.encode("utf-8") + b"\0" + dt.tag.encode() + b"\0" +
                     json.dumps(list(shape)).encode() + b"\0")
            h.update(self.sample(name))
        return "sha256:" + h.hexdigest()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


__all__ = ["ModelFolder", "CheckpointError", "MissingCheckpointError", "PICKLE_SUFFIXES",
           "read_safetensors_header", "is_hub_id"]
