"""Torch tensors and numpy arrays <-> the C ABI's lfm_tensor view (passed to _C as a tuple).

The view is the 6-tuple (data_ptr, lfm_dtype code, device, device_id, shape, strides in
elements). Dtype names and codes come from the one table, :mod:`lfm_engine.io.dtypes`.
torch is imported on first use only (``array_view`` and the dtype table need none), so
the numpy path of the merge never loads it; ``DTYPE_CODES`` and ``FLOAT_DTYPES`` (torch
dtypes) are built when first read.
"""
from __future__ import annotations

import numpy as np

from lfm_engine.io import dtypes as _dt

DEVICE_CPU, DEVICE_CUDA = 0, 1


def __getattr__(name):
    # torch-keyed tables, built on first use (importing torch) and then kept as globals
    if name == "DTYPE_CODES":
        value = {d.torch: c for c, d in _dt.BY_CODE.items()}
    elif name == "FLOAT_DTYPES":
        value = tuple(d.torch for d in _dt.KERNEL_FLOATS)
    else:
        raise AttributeError(f"module 'lfm_engine._tensor' has no attribute '{name}'")
    globals()[name] = value
    return value


def parse_dtype(dtype):
    """torch dtype from a torch dtype, numpy dtype or a name like 'bfloat16'/'bf16' (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):  # names: the float types the kernels write
        return _dt.from_name(dtype, allowed=_dt.KERNEL_FLOATS).torch
    return dtype if type(dtype).__module__ == "torch" else _dt.of(dtype).torch


def view(t) -> tuple:
    """The 6-tuple (data_ptr, dtype, device, device_id, shape, strides) of a torch tensor."""
    codes = globals().get("DTYPE_CODES") or __getattr__("DTYPE_CODES")
    code = codes.get(t.dtype)
    if code is None:
        raise TypeError(f"tensor dtype {t.dtype} is not supported")
    if t.device.type == "cpu":
        dev, dev_id = DEVICE_CPU, 0
    elif t.device.type == "cuda":
        dev, dev_id = DEVICE_CUDA, t.device.index or 0
    else:
        raise ValueError(f"tensors on device '{t.device}' are not supported (cpu or cuda)")
    return (t.data_ptr(), code, dev, dev_id, tuple(t.shape), tuple(t.stride()))


def array_view(a: np.ndarray, dtype: _dt.DType) -> tuple:
    """The 6-tuple of a CPU numpy array whose bits are ``dtype`` (bf16: a uint16 array)."""
    if dtype.code is None:
        raise TypeError(f"dtype {dtype} is not supported by the C core")
    if a.dtype.itemsize != dtype.itemsize:
        raise TypeError(f"array of {a.dtype} cannot hold {dtype}")
    return (a.ctypes.data, dtype.code, DEVICE_CPU, 0, tuple(a.shape),
            tuple(s // a.dtype.itemsize for s in a.strides))


def to_torch(x, what: str):
    """(tensor, was_numpy). Accepts torch tensors and numpy arrays (bf16 needs torch)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def current_stream(t) -> int:
    """cudaStream_t of torch's current stream for t's device (0 on the CPU)."""
    if t.device.type != "cuda":
        return 0
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream
