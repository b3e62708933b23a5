"""skinny_linear: y = x @ W^T (+ bias) for a few rows of x (docs/spec/skinny_linear.md).

The base matmul of a small decode batch. A platform GEMM (MKL sgemm) with M = 8 rows costs
about 2x its M = 1 call on the CPU (1.6-3.9x per shape); this kernel reads W once and keeps
the M rows of x in cache, so M rows cost about what one does while the CPU is bound by the
read of W. Served models use it through attach()'s LoRALinear (serve/attach.py).

Shapes and dtypes:
    x       [..., K]  float32 / float16 / bfloat16, at most MAX_M = 16 rows in all
    weight  [N, K]    float32 / float16 / bfloat16, contiguous (the nn.Linear layout)
    bias    [N] or None, any of the three float dtypes
    y       [..., N]  in x's dtype (fp32 products and sums, bias added in fp32, rounded once)
Accuracy: the summation order is the kernel's, not torch's; every element is within
(K + 2) * 2^-24 * (sum_k |x w| + |bias|) of the exact result before the final rounding.

Backends (visible table, ops/_dispatch.py): "cpu" (C++ kernel, multi-threaded over N,
AVX-512 / AVX2 / baseline picked at run time, LFM_SIMD forces a level) and "reference"
(reference/skinny_linear.py, float64). CPU tensors only: on a GPU the vendor GEMM is the
right call. The op is a torch.library custom op (``torch.ops.lfm.skinny_linear``) with a
fake kernel, so compiled models trace it without a graph break.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from lfm_engine import _tensor
from lfm_engine._native import has_native, native
from lfm_engine.ops._dispatch import default_backends, pick_backend
from lfm_engine.reference.skinny_linear import skinny_linear_reference

MAX_M = 16  # = LFM_SKINNY_LINEAR_MAX_M (include/lfm/skinny_linear.h); checked at import below


def _run_native(x2, weight, bias, n_threads):
    y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype)
    native().skinny_linear(_tensor.view(x2), _tensor.view(weight), None if bias is None else _tensor.view(bias),
                           _tensor.view(y), n_threads)
    return y


def _run_reference(x2, weight, bias, n_threads):
    return skinny_linear_reference(x2, weight, bias)


BACKENDS = {"cpu": _run_native, "reference": _run_reference}


def native_available() -> bool:
    """The compiled core has the kernel (and agrees on MAX_M)."""
    if not (has_native() and hasattr(native(), "skinny_linear")):
        return False
    if int(native().SKINNY_LINEAR_MAX_M) != MAX_M:  # a stale build: use torch, say why
        warnings.warn(f"lfm_engine._C has SKINNY_LINEAR_MAX_M = {native().SKINNY_LINEAR_MAX_M} but "
                      f"ops/skinny_linear.py has {MAX_M}: the skinny kernel is not used; rebuild the extension")
        return False
    return True


@torch.library.custom_op("lfm::skinny_linear", mutates_args=())
def skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], n_threads: int) -> torch.Tensor:
    """The registered op: x [M, K] (M <= MAX_M, unit column stride), weight [N, K] contiguous,
    bias [N] or None, all CPU -> y [M, N] in x's dtype. Arguments are assumed valid (the C
    ABI still checks them and raises a clear error)."""
    return _run_native(x, weight, bias, n_threads)


@skinny_linear_op.register_fake
def _(x, weight, bias, n_threads):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_rows(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The serving hot path: x2 [M, K] with M <= MAX_M, unit column stride, CPU; no Python checks.
    Eager calls go straight to the C ABI (torch.library's dispatch costs tens of microseconds);
    under torch.compile the custom op is what the graph records."""
    if torch.compiler.is_compiling():
        return skinny_linear_op(x2, weight, bias, 0)
    return _run_native(x2, weight, bias, 0)


def _check(x, weight, bias):
    op = "skinny_linear"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _tensor.FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device}; the skinny kernel runs on the CPU only "
                             "(on a GPU use torch.nn.functional.linear)")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., K], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x has K = {x.shape[-1]} columns but weight has shape {tuple(weight.shape)} ([N, K])")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected [N] = [{weight.shape[0]}]")
    M = math.prod(x.shape[:-1])
    if M > MAX_M:
        raise ValueError(f"{op}: x has {M} rows; the skinny kernel takes at most {MAX_M} "
                         "(use torch.nn.functional.linear for larger batches)")
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous (it is streamed row by row); pass weight.contiguous()")
    if bias is not None and not bias.is_contiguous():
        raise ValueError(f"{op}: bias must be contiguous")
    return M


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None, n_threads: int = 0) -> torch.Tensor:
    """y = x @ weight^T (+ bias) for x [..., K] with at most MAX_M rows; returns [..., N] in x's dtype.

    Same call as torch.nn.functional.linear (without autograd). Errors name the argument:
    more than MAX_M rows, a non-contiguous weight, a GPU tensor, an unsupported dtype.
    x may be any strided view (it is read once into an fp32 block).
    """
    M = _check(x, weight, bias)
    name = pick_backend("skinny_linear", BACKENDS, x.device, backend, default_backends(BACKENDS, _NATIVE_OK, device_type=x.device.type))
    x2 = x.reshape(M, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = BACKENDS[name](x2, weight, bias, int(n_threads))
    return y.reshape(*x.shape[:-1], weight.shape[0])


_NATIVE_OK = native_available()
