"""Shared test configuration: the one per-dtype tolerance table, output poisoning,
and the `cuda` marker that skips cleanly without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. It must be switched on
# before any module defines a @triton.jit kernel, hence here, at conftest import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances for comparing a kernel (fp32 accumulation, one rounding to `dtype`)
# with the float64 reference rounded to `dtype`. A looser entry is a reviewed decision.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw):
    dtype = dtype or actual.dtype
    opts = dict(TOLERANCES[dtype])
    opts.update(kw)
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **opts)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or 0xFF bytes for integers) so unwritten elements fail."""
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0xFF)
    return t


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def triton_available() -> bool:
    """Triton kernels can run: on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return has_cuda() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
