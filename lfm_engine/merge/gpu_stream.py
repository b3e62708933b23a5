"""Host -> GPU streaming for model-level merges: pinned staging, two streams, double buffering.

A model merge is a sequence of independent tensor jobs (one output tensor each, from the
base tensor and K fine-tuned tensors). On a GPU the merge kernel is far faster than the
PCIe copies that feed it, so the copies must run back to back while the GPU computes:

    host thread:  read job j+1 into pinned buffer slot (j+1) % depth     (memcpy)
    copy stream:  H2D copy of slot (j+1) % depth                          (DMA engine)
    compute:      merge job j on the device, D2H copy of its result      (SMs + DMA)

``stream_jobs`` runs that pipeline with ``depth`` slots (2 = double buffering): a slot's
pinned and device buffers are reused only after the compute stream has finished with
them (CUDA events), so at most ``depth`` jobs are in flight and memory stays bounded by
``depth`` times the largest job. Results come back in job order as ordinary CPU tensors.

How ``lfm-engine merge --device cuda`` uses it (lfm_engine/merge/runner.py):

    from lfm_engine.merge.gpu_stream import GpuJob, merge_on_device

    jobs = (GpuJob(name, [base_t, *model_ts], dict(method="ties", weights=..., density=...,
                                                   name=name, seed=seed, out_dtype=dt))
            for name, base_t, model_ts in tensors_in_plan_order())
    for name, merged_cpu in merge_on_device(jobs, device="cuda", backend=None):
        writer.write(name, merged_cpu)

``merge_on_device`` calls ``lfm_engine.ops.merge.merge_tensors`` per job with the job's
keyword arguments (base = tensors[0], others = tensors[1:], or base None when the job sets
``base=None``...), see its docstring. ``stream_jobs`` is the generic pipeline for any
compute function. With device="cpu" both run the same jobs synchronously (no streams),
which keeps the code path testable on machines without a GPU.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch


@dataclass
class GpuJob:
    """One unit of work: a key (e.g. the output tensor name), its host input tensors
    (any dtype/shape, each may be None) and free-form keyword arguments for the compute
    function."""
    key: Any
    tensors: Sequence[Optional[torch.Tensor]]
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamStats:
    """Filled in while stream_jobs runs: bytes moved and jobs done."""
    jobs: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0


class _Slot:
    """One pipeline slot: a growable pinned staging buffer and the events guarding it."""

    def __init__(self) -> None:
        self.pinned: Optional[torch.Tensor] = None
        self.free_event: Optional[torch.cuda.Event] = None  # compute done with this slot

    def staging(self, nbytes: int) -> torch.Tensor:
        if self.pinned is None or self.pinned.numel() < nbytes:
            # grow by 25% beyond the need so slowly growing tensors do not re-pin every job
            self.pinned = torch.empty(int(nbytes * 1.25) + 256, dtype=torch.uint8, pin_memory=True)
        return self.pinned


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_job(job: GpuJob) -> None:
    if not isinstance(job, GpuJob):
        raise TypeError(f"stream_jobs: jobs must be GpuJob instances, got {type(job).__name__}")
    for i, t in enumerate(job.tensors):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"stream_jobs: job {job.key!r}: input {i} is a {type(t).__name__}, not a torch.Tensor")
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"stream_jobs: job {job.key!r}: input {i} is on {t.device}; inputs must be host tensors")


def stream_jobs(jobs: Iterable[GpuJob],
                compute: Callable[[GpuJob, List[Optional[torch.Tensor]]], torch.Tensor],
                device: str | torch.device = "cuda", depth: int = 2,
                stats: Optional[StreamStats] = None) -> Iterator[Tuple[Any, torch.Tensor]]:
    """Run ``compute(job, device_inputs) -> device tensor`` over ``jobs``, overlapping the
    host->device copies of the next jobs with the compute of the current one.

    jobs: iterable of GpuJob (consumed lazily: job j+depth-1 is read while job j computes).
    compute: called on the compute stream with the job and its inputs on ``device``
        (same order, None kept); returns one tensor on ``device``.
    depth: pipeline slots (2 = double buffering; 1 = no overlap).
    Yields (job.key, result) in job order; result is a CPU tensor the caller owns.
    Errors raised by ``compute`` propagate after in-flight work is drained.
    """
    device = torch.device(device)
    if depth < 1:
        raise ValueError(f"stream_jobs: depth must be >= 1, got {depth}")
    stats = stats if stats is not None else StreamStats()
    if device.type != "cuda":
        for job in jobs:
            _check_job(job)
            ins = [None if t is None else t.to(device) for t in job.tensors]
            out = compute(job, ins)
            stats.jobs += 1
            yield job.key, out.to("cpu")
        return
    if not torch.cuda.is_available():
        raise RuntimeError("stream_jobs: device 'cuda' requested but torch sees no CUDA device")

    copy_stream = torch.cuda.Stream(device=device)
    compute_stream = torch.cuda.Stream(device=device)
    slots = [_Slot() for _ in range(depth)]
    # in flight: (key, pinned host result, event after its D2H copy)
    pending: Deque[Tuple[Any, torch.Tensor, torch.cuda.Event]] = deque()
    it = iter(jobs)
    j = 0
    with torch.cuda.device(device):
        for job in it:
            _check_job(job)
            slot = slots[j % depth]
            # the slot's pinned buffer may still feed a copy of job j - depth
            if slot.free_event is not None:
                slot.free_event.synchronize()
            total = sum(_nbytes(t) for t in job.tensors if t is not None)
            buf = slot.staging(total)
            dev_inputs: List[Optional[torch.Tensor]] = []
            off = 0
            staged = []
            for t in job.tensors:
                if t is None:
                    staged.append(None)
                    continue
                nb = _nbytes(t)
                view = buf[off:off + nb].view(t.dtype).view(t.shape) if nb else torch.empty(t.shape, dtype=t.dtype)
                view.copy_(t)  # host memcpy into pinned memory (overlaps earlier GPU work)
                staged.append(view)
                off += nb
                # keep later views 64-byte aligned for the DMA engine and vector loads
                off = (off + 63) & ~63
            if off > buf.numel():
                raise RuntimeError("internal: staging buffer overflow")
            with torch.cuda.stream(copy_stream):
                for v in staged:
                    dev_inputs.append(None if v is None else v.to(device, non_blocking=True))
                copied = torch.cuda.Event()
                copied.record(copy_stream)
            stats.h2d_bytes += total
            compute_stream.wait_event(copied)
            with torch.cuda.stream(compute_stream):
                for t in dev_inputs:
                    if t is not None:
                        t.record_stream(compute_stream)  # allocated on copy_stream, used here
                result = compute(job, dev_inputs)
                if not isinstance(result, torch.Tensor) or result.device.type != "cuda":
                    raise TypeError(f"stream_jobs: compute for job {job.key!r} must return a CUDA tensor")
                host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                host.copy_(result, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute_stream)
            # the copy stream may refill this slot only once compute has consumed it
            slot.free_event = done
            stats.d2h_bytes += _nbytes(host)
            pending.append((job.key, host, done))
            j += 1
            # hand back finished results without stalling the pipeline
            while len(pending) >= depth:
                key, host_res, ev = pending.popleft()
                ev.synchronize()
                stats.jobs += 1
                yield key, host_res
        while pending:
            key, host_res, ev = pending.popleft()
            ev.synchronize()
            stats.jobs += 1
            yield key, host_res


def merge_on_device(jobs: Iterable[GpuJob], device: str | torch.device = "cuda",
                    backend: Optional[str] = None, depth: int = 2,
                    stats: Optional[StreamStats] = None) -> Iterator[Tuple[Any, torch.Tensor]]:
    """Merge tensor jobs on ``device`` with ``merge_tensors``, streamed by ``stream_jobs``.

    Each job: tensors = [base, x_1, ..., x_K] (base may be None for "linear"); kwargs are
    passed to ``lfm_engine.ops.merge.merge_tensors`` (method, weights, density, gamma,
    epsilon, normalize, rescale, lam, seed, name, out_dtype, model_positions, ...).
    backend: "cuda" or "triton" (None: the default for the device, or $LFM_BACKEND).
    Yields (job.key, merged CPU tensor) in job order.
    """
    from lfm_engine.ops.merge import merge_tensors

    def compute(job: GpuJob, ins: List[Optional[torch.Tensor]]) -> torch.Tensor:
        if len(ins) < 2:
            raise ValueError(f"merge_on_device: job {job.key!r} needs a base slot and at least one model")
        kwargs = dict(job.kwargs)
        method = kwargs.pop("method", "ties")
        return merge_tensors(ins[0], ins[1:], method, backend=backend, **kwargs)

    return stream_jobs(jobs, compute, device=device, depth=depth, stats=stats)
