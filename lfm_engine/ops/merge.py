"""merge_tensors: fused sparsify-and-merge of task vectors (docs/spec/merge.md).

    out = base + lam * combine_i(w_i * sparsify(x_i - base))

with the method's sparsifier (magnitude top-k, DARE random, breadcrumbs outliers,
DELLA rank-probability), optional L1 rescale, TIES sign consensus and normalisation;
``linear`` is sum_i w_i x_i (/ sum_i w_i). All of base, others[i] hold the same shape
and may mix float32/float16/bfloat16; the result has ``out_dtype`` (default: the base's).

Backends (a visible table, see ops/_dispatch.py):
  cpu        the C++ kernel (multi-threaded; bit-identical for any thread count)
  cuda       the CUDA C++ kernel behind the same C ABI (when built with nvcc)
  triton     Triton kernels (GPU, or CPU tensors under TRITON_INTERPRET=1)
  reference  lfm_engine/reference/merge.py: the spec in plain torch, float64

NaN policy: a NaN or Inf in the base or any model is an error (ValueError naming the
model and element) in every backend; merging never produces NaN silently.

:func:`merge_arrays` is the same op on raw numpy buffers (bf16 as uint16 arrays, the
dtype named beside each array): it calls the C++ kernel without importing torch, which
is how ``lfm-engine merge`` runs on the CPU (torch only for the reference/triton backends).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from lfm_engine import _tensor
from lfm_engine._native import native
from lfm_engine.core.merge_methods import METHOD_CODES, RESCALE_CODES, MergeParams, resolve_merge_params
from lfm_engine.io import dtypes as _dt
from lfm_engine.ops._dispatch import CPU_DEVICE, default_backends, pick_backend


def _run_native(base, others, out, p: MergeParams, n_threads: int = 0) -> None:
    _call_native(None if base is None else _tensor.view(base), [_tensor.view(x) for x in others],
                 _tensor.view(out), p, n_threads, _tensor.current_stream(out))


def _call_native(base_view, other_views, out_view, p: MergeParams, n_threads: int, stream: int) -> int:
    """_C.merge on lfm_tensor views (torch tensors' or numpy arrays', see _tensor.py).

    Returns how many NaN/Inf the kernel wrote to the output (finite inputs whose merged
    values overflow the output dtype), counted while writing; -1 on CUDA (not counted)."""
    # keywords name lfm_merge_options' fields (include/lfm/merge.h)
    return native().merge(
        base_view, other_views, out_view,
        method=METHOD_CODES[p.method],
        weights=list(p.weights), densities=list(p.densities), gammas=list(p.gammas),
        epsilons=list(p.epsilons), positions=list(p.model_positions),
        normalize=int(p.normalize), rescale=RESCALE_CODES[p.rescale],
        consensus_unweighted=int(p.consensus_weighting == "unweighted"),
        disjoint_count=int(p.disjoint == "count"),
        lam=p.lam, seed=p.seed, name=p.name, n_threads=n_threads, stream=stream,
        model_names=list(p.model_names),
    )


def _run_reference(base, others, out, p: MergeParams, n_threads: int = 0) -> None:
    from lfm_engine.reference.merge import merge_tensors_reference

    out.copy_(merge_tensors_reference(base, others, p, out.dtype))


def _run_triton(base, others, out, p: MergeParams, n_threads: int = 0) -> None:
    from lfm_engine.triton.merge import merge_triton

    merge_triton(base, others, out, p)


BACKENDS = {"cpu": _run_native, "cuda": _run_native, "triton": _run_triton, "reference": _run_reference}


_FLOAT_NAMES = tuple(d.name for d in _dt.KERNEL_FLOATS)


def _is_float(dtype) -> bool:
    return str(dtype).replace("torch.", "") in _FLOAT_NAMES


def _check_inputs(base: Optional[tuple], others: Sequence[tuple], label) -> None:
    """Each of base/others is (shape, dtype, device); raise naming the first problem
    (``label(i)`` names model i, see MergeParams.model_label)."""
    ref = base if base is not None else others[0]
    for i, (shape, dtype, device) in enumerate(others):
        if not _is_float(dtype):
            raise TypeError(f"merge_tensors: {label(i)} has dtype {dtype}; supported: float32, float16, bfloat16")
        if shape != ref[0]:
            raise ValueError(
                f"merge_tensors: {label(i)} has shape {shape} but "
                f"{'base' if base is not None else label(0)} has shape {ref[0]}")
        if device != ref[2]:
            raise ValueError(f"merge_tensors: {label(i)} is on {device} but the base is on {ref[2]}")
    if base is not None and not _is_float(base[1]):
        raise TypeError(f"merge_tensors: base has dtype {base[1]}; supported: float32, float16, bfloat16")


def _check_out_dtype(dt) -> None:
    if not _is_float(dt):
        raise TypeError(f"merge_tensors: out_dtype {dt} is not supported (float32, float16, bfloat16)")


def merge_tensors(
    base,
    others: Sequence,
    method: str = "ties",
    *,
    weights=None,
    density=None,
    gamma=None,
    epsilon=None,
    normalize: Optional[bool] = None,
    rescale=None,
    lam: float = 1.0,
    seed: int = 0,
    name: str = "",
    out_dtype=None,
    backend: Optional[str] = None,
    model_positions: Optional[Sequence[int]] = None,
    consensus_weighting: str = "weighted",
    disjoint: str = "weight",
    n_threads: int = 0,
    out=None,
    model_names: Optional[Sequence[str]] = None,
):
    """Merge one tensor of K fine-tuned models into their base.

    Args:
        base: the base tensor b (torch.Tensor or numpy array); may be None for "linear".
        others: the K fine-tuned tensors x_i, each of b's shape.
        method: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
            breadcrumbs_ties, della, della_linear or linear.
        weights, density, gamma, epsilon: per model, a scalar or a list of K values;
            None = the registry's default (docs/merge.md's method table).
        normalize, rescale: None = the method's default; rescale True/"l1" (L1 norm
            matching), "inverse_density" (PEFT's 1/density), False.
        lam: lambda, out = b + lam * mixed.
        seed, name, model_positions: key the DARE/DELLA random streams (docs/spec/merge.md "Randomness");
            name is the output tensor name.
        consensus_weighting, disjoint: "unweighted"/"count" reproduce PEFT's variants.
        out_dtype: output dtype (torch dtype or name); default the base's dtype.
        backend: "cpu", "cuda", "triton" or "reference"; default by device.
        n_threads: CPU worker threads for this call (0 = library default).
        out: optional preallocated output tensor (contiguous, same shape).
        model_names: one name per model, used by every error message instead of
            "model <index>" (a model-level merge passes the config's references).
    Returns:
        the merged tensor, torch or numpy like `base` (or like others[0] without a base).
    """
    if others is None or len(others) == 0:
        raise ValueError("merge_tensors: no models to merge: `others` is empty")
    params = resolve_merge_params(
        method, len(others), weights=weights, density=density, gamma=gamma, epsilon=epsilon,
        normalize=normalize, rescale=rescale, lam=lam, seed=seed, name=name,
        model_positions=model_positions, consensus_weighting=consensus_weighting, disjoint=disjoint,
        model_names=model_names,
    )
    xs = []
    was_numpy = False
    for i, x in enumerate(others):
        t, is_np = _tensor.to_torch(x, params.model_label(i))
        xs.append(t)
        was_numpy = was_numpy or is_np
    if base is not None and params.spec.uses_base:
        b, is_np = _tensor.to_torch(base, "base")
        was_numpy = was_numpy or is_np
    elif base is None and params.spec.uses_base:
        raise ValueError(f"merge_tensors: method '{method}' needs a base tensor")
    else:
        b = None
    import torch

    ref = b if b is not None else xs[0]
    _check_inputs(None if b is None else (tuple(b.shape), b.dtype, b.device),
                  [(tuple(x.shape), x.dtype, x.device) for x in xs], params.model_label)
    dt = _tensor.parse_dtype(out_dtype) or ref.dtype
    _check_out_dtype(dt)
    # default: the C++ kernel on the CPU; on a GPU the CUDA kernel when built, else Triton
    name_ = pick_backend("merge_tensors", BACKENDS, ref.device, backend,
                         default_backends(BACKENDS, device_type=ref.device.type))
    # The kernels take contiguous inputs; a strided view is copied here (documented cost).
    xs = [x.contiguous() for x in xs]
    b = b.contiguous() if b is not None else None
    if out is None:
        result = torch.empty(ref.shape, dtype=dt, device=ref.device)
    else:
        result = out
        if result.shape != ref.shape or result.dtype != dt or not result.is_contiguous():
            raise ValueError("merge_tensors: `out` must be contiguous with the inputs' shape and out_dtype")
    BACKENDS[name_](b, xs, result, params, n_threads)
    return result.numpy() if was_numpy and result.device.type == "cpu" and dt != torch.bfloat16 else result


Array = Tuple[np.ndarray, "_dt.DType"]


def merge_arrays(base: Optional[Array], others: Sequence[Array], method: str = "ties", *,
                 out_dtype, n_threads: int = 0, backend: Optional[str] = None, **params) -> np.ndarray:
    """:func:`merge_tensors` on CPU numpy buffers, without torch on the native path.

    ``base`` and each of ``others`` are ``(array, dtype)``: the array holds the raw bits of
    ``dtype`` (a :class:`lfm_engine.io.dtypes.DType` or name; bfloat16 as a uint16 array).
    ``params``: merge_tensors' keyword arguments (weights, density, seed, name, ...).
    Returns a new C-contiguous array of ``out_dtype``'s storage type (uint16 for bf16),
    the same bits merge_tensors computes. The reference/triton backends (by ``backend``
    or LFM_BACKEND) run through torch.
    """
    return merge_arrays_counted(base, others, method, out_dtype=out_dtype, n_threads=n_threads,
                                backend=backend, **params)[0]


def merge_arrays_counted(base: Optional[Array], others: Sequence[Array], method: str = "ties", *,
                         out_dtype, n_threads: int = 0, backend: Optional[str] = None,
                         **params) -> Tuple[np.ndarray, Optional[int]]:
    """:func:`merge_arrays`, and how many NaN/Inf it wrote (an overflow of ``out_dtype``;
    NaN/Inf inputs are refused by name): counted by the native kernel while it writes, so
    no second sweep over the output; None from the torch-run backends (not counted)."""
    if others is None or len(others) == 0:
        raise ValueError("merge_tensors: no models to merge: `others` is empty")
    p = resolve_merge_params(method, len(others), **params)
    if base is None and p.spec.uses_base:
        raise ValueError(f"merge_tensors: method '{method}' needs a base tensor")
    b = (base[0], _dt.of(base[1])) if base is not None and p.spec.uses_base else None
    xs = [(x, _dt.of(d)) for x, d in others]
    _check_inputs(None if b is None else (tuple(b[0].shape), b[1], "cpu"),
                  [(tuple(x.shape), d, "cpu") for x, d in xs], p.model_label)
    out_dt = _dt.of(out_dtype)
    _check_out_dtype(out_dt)
    shape = tuple((b or xs[0])[0].shape)
    name_ = pick_backend("merge_tensors", BACKENDS, CPU_DEVICE, backend, default_backends(BACKENDS, device_type="cpu"))
    if name_ != "cpu":
        from lfm_engine.io.safetensors import as_numpy, as_torch

        res = merge_tensors(None if b is None else as_torch(*b), [as_torch(x, d) for x, d in xs], method,
                            out_dtype=out_dt.torch, n_threads=n_threads, backend=name_, **params)
        return as_numpy(res), None
    b = None if b is None else (np.ascontiguousarray(b[0]), b[1])
    xs = [(np.ascontiguousarray(x), d) for x, d in xs]
    out = np.empty(shape, dtype=out_dt.np)
    n_bad = _call_native(None if b is None else _tensor.array_view(*b), [_tensor.array_view(x, d) for x, d in xs],
                         _tensor.array_view(out, out_dt), p, n_threads, 0)
    return out, n_bad
