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
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lfm_engine import _tensor
from lfm_engine._native import native
from lfm_engine.core.merge_methods import METHOD_CODES, RESCALE_CODES, MergeParams, resolve_merge_params
from lfm_engine.ops._dispatch import default_backends, pick_backend


def _run_native(base: Optional[torch.Tensor], others: Sequence[torch.Tensor], out: torch.Tensor,
                p: MergeParams, n_threads: int = 0) -> None:
    # keywords name lfm_merge_options' fields (include/lfm/merge.h)
    native().merge(
        None if base is None else _tensor.view(base),
        [_tensor.view(x) for x in others],
        _tensor.view(out),
        method=METHOD_CODES[p.method],
        weights=list(p.weights), densities=list(p.densities), gammas=list(p.gammas),
        epsilons=list(p.epsilons), positions=list(p.model_positions),
        normalize=int(p.normalize), rescale=RESCALE_CODES[p.rescale],
        consensus_unweighted=int(p.consensus_weighting == "unweighted"),
        disjoint_count=int(p.disjoint == "count"),
        lam=p.lam, seed=p.seed, name=p.name, n_threads=n_threads, stream=_tensor.current_stream(out),
        model_names=list(p.model_names),
    )


def _run_reference(base, others, out, p: MergeParams, n_threads: int = 0) -> None:
    from lfm_engine.reference.merge import merge_tensors_reference

    out.copy_(merge_tensors_reference(base, others, p, out.dtype))


def _run_triton(base, others, out, p: MergeParams, n_threads: int = 0) -> None:
    from lfm_engine.triton.merge import merge_triton

    merge_triton(base, others, out, p)


BACKENDS = {"cpu": _run_native, "cuda": _run_native, "triton": _run_triton, "reference": _run_reference}


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
    ref = b if b is not None else xs[0]
    for i, x in enumerate(xs):
        if x.dtype not in _tensor.FLOAT_DTYPES:
            raise TypeError(f"merge_tensors: {params.model_label(i)} has dtype {x.dtype}; supported: float32, float16, bfloat16")
        if x.shape != ref.shape:
            raise ValueError(
                f"merge_tensors: {params.model_label(i)} has shape {tuple(x.shape)} but "
                f"{'base' if b is not None else params.model_label(0)} has shape {tuple(ref.shape)}")
        if x.device != ref.device:
            raise ValueError(f"merge_tensors: {params.model_label(i)} is on {x.device} but the base is on {ref.device}")
    if b is not None and b.dtype not in _tensor.FLOAT_DTYPES:
        raise TypeError(f"merge_tensors: base has dtype {b.dtype}; supported: float32, float16, bfloat16")
    dt = _tensor.parse_dtype(out_dtype) or ref.dtype
    if dt not in _tensor.FLOAT_DTYPES:
        raise TypeError(f"merge_tensors: out_dtype {dt} is not supported (float32, float16, bfloat16)")
    # default: the C++ kernel on the CPU; on a GPU the CUDA kernel when built, else Triton
    name_ = pick_backend("merge_tensors", BACKENDS, ref.device, backend, default_backends(BACKENDS))
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
