"""Torch/numpy tensors <-> the C ABI's lfm_tensor view (passed to _C as a tuple)."""
from __future__ import annotations

import numpy as np
import torch

# Codes of include/lfm/lfm.h: lfm_dtype
DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3,
    torch.int64: 4, torch.uint8: 5, torch.int8: 6, torch.uint32: 7,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE_CPU, DEVICE_CUDA = 0, 1

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype) -> torch.dtype:
    """torch dtype from a torch dtype, numpy dtype or a name like 'bfloat16'/'bf16'."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
        raise ValueError(f"unknown dtype '{dtype}' (use float32, float16 or bfloat16)")
    try:
        return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def view(t: torch.Tensor) -> tuple:
    """The 6-tuple (data_ptr, dtype, device, device_id, shape, strides) _C turns into lfm_tensor."""
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"tensor dtype {t.dtype} is not supported")
    if t.device.type == "cpu":
        dev, dev_id = DEVICE_CPU, 0
    elif t.device.type == "cuda":
        dev, dev_id = DEVICE_CUDA, t.device.index or 0
    else:
        raise ValueError(f"tensors on device '{t.device}' are not supported (cpu or cuda)")
    return (t.data_ptr(), DTYPE_CODES[t.dtype], dev, dev_id, tuple(t.shape), tuple(t.stride()))


def to_torch(x, what: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). Accepts torch tensors and numpy arrays (bf16 needs torch)."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def current_stream(t: torch.Tensor) -> int:
    """cudaStream_t of torch's current stream for t's device (0 on the CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
