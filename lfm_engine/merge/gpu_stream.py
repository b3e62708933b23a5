"""Host -> GPU streaming for model-level merges: pinned staging, two streams, double buffering.

A model merge is a sequence of independent tensor jobs (one output tensor each, from the
base tensor and K fine-tuned tensors). On a GPU the merge kernel is far faster than the
PCIe copies that feed it, so the copies must run back to back while the GPU computes:

    stager thread:  read job j+1 into a free pinned slot (host memcpy), then issue its
                    H2D copy on the copy stream (DMA engine)
    caller thread:  merge job j on the compute stream (after job j's copy event), then
                    its D2H copy into pinned memory; yield results in job order

``stream_jobs`` runs that pipeline with ``depth`` slots (2 = double buffering). A slot's
pinned buffer is refilled only after the compute that consumed it has finished (CUDA
event), so at most ``depth`` jobs are staged ahead and host memory stays bounded by
``depth`` times the largest job. The stager is a thread because the merge call blocks
its caller (the kernels read selection results back to the host); torch's copies and
the native merge release the GIL, so staging and merging overlap. The ``jobs``
iterable is consumed by the stager thread only (a generator reading checkpoint shards
is fine). Results come back in job order as ordinary (pinned) CPU tensors.

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

import queue
import threading
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


class _CudaOps:
    """The CUDA primitives the pipeline uses (a fake with the same methods lets the tests
    run the threaded pipeline on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self):
        return torch.cuda.Stream(device=self.device)

    def use_stream(self, s):
        return torch.cuda.stream(s)

    def use_device(self):
        return torch.cuda.device(self.device)

    def record(self, s):
        ev = torch.cuda.Event()
        ev.record(s)
        return ev

    def wait(self, s, ev) -> None:
        s.wait_event(ev)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def h2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def used_on(self, t: torch.Tensor, s) -> None:
        t.record_stream(s)  # allocated on the copy stream, used on s

    def is_result(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == "cuda"

    def d2h(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def synchronize(self, s) -> None:
        s.synchronize()


class _Slot:
    """One pipeline slot: a growable pinned staging buffer and the event guarding it."""

    def __init__(self) -> None:
        self.pinned: Optional[torch.Tensor] = None
        self.free_event = None  # compute done with this slot's inputs

    def staging(self, ops, nbytes: int) -> torch.Tensor:
        if self.pinned is None or self.pinned.numel() < nbytes:
            # grow by 25% beyond the need so slowly growing tensors do not re-pin every job
            self.pinned = ops.pinned(int(nbytes * 1.25) + 256)
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
                stats: Optional[StreamStats] = None, _ops=None) -> Iterator[Tuple[Any, torch.Tensor]]:
    """Run ``compute(job, device_inputs) -> device tensor`` over ``jobs``, overlapping the
    host->device copies of the next jobs with the compute of the current one.

    jobs: iterable of GpuJob, consumed lazily by the stager thread (up to ``depth`` jobs
        ahead of the compute).
    compute: called on the compute stream with the job and its inputs on ``device``
        (same order, None kept); returns one tensor on ``device``.
    depth: pipeline slots (2 = double buffering; 1 = no overlap).
    Yields (job.key, result) in job order; result is a CPU tensor the caller owns.
    Errors raised by ``compute`` or while staging (e.g. a bad job) propagate to the
    caller after the stager has stopped and in-flight GPU work is drained; closing the
    generator early does the same.
    """
    device = torch.device(device)
    if depth < 1:
        raise ValueError(f"stream_jobs: depth must be >= 1, got {depth}")
    stats = stats if stats is not None else StreamStats()
    if device.type != "cuda" and _ops is None:
        for job in jobs:
            _check_job(job)
            ins = [None if t is None else t.to(device) for t in job.tensors]
            out = compute(job, ins)
            stats.jobs += 1
            yield job.key, out.to("cpu")
        return
    if _ops is None and not torch.cuda.is_available():
        raise RuntimeError("stream_jobs: device 'cuda' requested but torch sees no CUDA device")
    ops = _ops if _ops is not None else _CudaOps(device)
    copy_stream = ops.stream()
    compute_stream = ops.stream()
    slots = [_Slot() for _ in range(depth)]
    free_slots: "queue.Queue[_Slot]" = queue.Queue()
    for sl in slots:
        free_slots.put(sl)
    staged: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    producer = threading.Thread(target=_stage_jobs, name="lfm-gpu-stream-stager", daemon=True,
                                args=(ops, iter(jobs), copy_stream, free_slots, staged, stop, stats))
    producer.start()
    # in flight: (key, pinned host result, event after its D2H copy)
    pending: Deque[Tuple[Any, torch.Tensor, Any]] = deque()
    try:
        with ops.use_device():
            while True:
                item = staged.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                job, dev_inputs, copied, slot = item
                ops.wait(compute_stream, copied)
                with ops.use_stream(compute_stream):
                    for t in dev_inputs:
                        if t is not None:
                            ops.used_on(t, compute_stream)
                    result = compute(job, dev_inputs)
                    if not ops.is_result(result):
                        raise TypeError(f"stream_jobs: compute for job {job.key!r} must return a tensor on "
                                        f"{device}, got {getattr(result, 'device', type(result).__name__)}")
                    host = ops.d2h(result)
                    done = ops.record(compute_stream)
                # the stager refills this slot only after `done` (it synchronizes on it)
                slot.free_event = done
                free_slots.put(slot)
                stats.d2h_bytes += _nbytes(host)
                pending.append((job.key, host, done))
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
    finally:
        stop.set()
        # unblock a stager waiting for room, then drain the GPU before buffers go away
        while producer.is_alive():
            try:
                staged.get_nowait()
            except queue.Empty:
                pass
            free_slots.put(_Slot())
            producer.join(timeout=0.05)
        ops.synchronize(copy_stream)
        ops.synchronize(compute_stream)


_END = object()


def _stage_jobs(ops, it, copy_stream, free_slots, staged, stop, stats) -> None:
    """Stager thread: host memcpy of each job into a free pinned slot, then its H2D copy on
    the copy stream; hands (job, device inputs, copied event, slot) to the consumer. Runs
    ahead of the compute by up to `depth` jobs; torch releases the GIL in the copies and
    the native merge releases it while it runs, so staging overlaps the merges."""
    try:
        with ops.use_device():
            for job in it:
                if stop.is_set():
                    return
                _check_job(job)
                slot = free_slots.get()
                if stop.is_set():
                    return
                # the slot's pinned buffer may still feed the copy of an older job
                if slot.free_event is not None:
                    slot.free_event.synchronize()
                total = sum(_nbytes(t) for t in job.tensors if t is not None)
                buf = slot.staging(ops, total + 64 * len(job.tensors))
                views: List[Optional[torch.Tensor]] = []
                off = 0
                for t in job.tensors:
                    if t is None:
                        views.append(None)
                        continue
                    nb = _nbytes(t)
                    view = buf[off:off + nb].view(t.dtype).view(t.shape) if nb else torch.empty(t.shape, dtype=t.dtype)
                    view.copy_(t)  # host memcpy into pinned memory
                    views.append(view)
                    # keep every view 64-byte aligned for the DMA engine and vector loads
                    off = (off + nb + 63) & ~63
                with ops.use_stream(copy_stream):
                    dev_inputs = [None if v is None else ops.h2d(v) for v in views]
                    copied = ops.record(copy_stream)
                stats.h2d_bytes += total
                staged.put((job, dev_inputs, copied, slot))
        staged.put(_END)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        staged.put(exc)


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
