"""lfm_engine.merge.gpu_stream: the streamed model-level merge (CPU path here, GPU when lent)."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from lfm_engine.merge import gpu_stream
from lfm_engine.merge.gpu_stream import GpuJob, StreamStats, merge_on_device, stream_jobs
from lfm_engine.ops.merge import merge_tensors


def _jobs(shapes, K=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    out = []
    for j, shape in enumerate(shapes):
        b = torch.randn(shape, generator=g).to(dtype)
        xs = [(b.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)]
        kw = dict(method="ties", weights=[1.0, 0.5, 0.3][:K], density=0.4, name=f"layer.{j}.weight")
        out.append(GpuJob(f"layer.{j}.weight", [b] + xs, kw))
    return out


def _expected(job, backend):
    kw = dict(job.kwargs)
    method = kw.pop("method")
    return merge_tensors(job.tensors[0], list(job.tensors[1:]), method, backend=backend, **kw)


def test_merge_on_device_cpu_path_matches_direct_calls():
    jobs = _jobs([(16, 33), (7,), (5, 4, 3)])
    stats = StreamStats()
    got = list(merge_on_device(iter(jobs), device="cpu", backend="cpu", stats=stats))
    assert [k for k, _ in got] == [j.key for j in jobs]
    for (key, t), job in zip(got, jobs):
        assert t.device.type == "cpu"
        assert torch.equal(t, _expected(job, "cpu")), key
    assert stats.jobs == 3


def test_stream_jobs_rejects_bad_jobs():
    with pytest.raises(TypeError, match="GpuJob"):
        list(stream_jobs([("a", [torch.zeros(2)])], lambda j, i: i[0], device="cpu"))
    with pytest.raises(ValueError, match="depth"):
        list(stream_jobs([], lambda j, i: i[0], device="cpu", depth=0))
    with pytest.raises(ValueError, match="base slot"):
        list(merge_on_device([GpuJob("x", [torch.zeros(2)])], device="cpu", backend="cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_stream_jobs_gpu_matches_direct_gpu_merge(depth):
    jobs = _jobs([(256, 1024), (3, 5), (1000,), (512, 512), (128, 64)], dtype=torch.bfloat16)
    stats = StreamStats()
    got = list(merge_on_device(jobs, device="cuda", depth=depth, stats=stats))
    assert [k for k, _ in got] == [j.key for j in jobs]
    for (key, t), job in zip(got, jobs):
        want = _expected(GpuJob(job.key, [x.cuda() for x in job.tensors], job.kwargs), None).cpu()
        assert t.device.type == "cpu" and torch.equal(t, want), key
    assert stats.jobs == len(jobs)
    assert stats.h2d_bytes == sum(x.numel() * x.element_size() for j in jobs for x in j.tensors)


# ---------------------------------------------------------------------------------
# The threaded pipeline itself, on the CPU: a fake of the CUDA primitives (streams and
# events that complete at once, "device" = CPU) runs the same stager/consumer code.



class _Ev:
    def synchronize(self):
        pass


class _FakeOps:
    def __init__(self):
        self.log = []
        self.lock = threading.Lock()

    def _note(self, what):
        with self.lock:
            self.log.append(what)

    def stream(self):
        return object()

    def use_stream(self, s):
        return contextlib.nullcontext()

    def use_device(self):
        return contextlib.nullcontext()

    def record(self, s):
        return _Ev()

    def wait(self, s, ev):
        pass

    def pinned(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def h2d(self, t):
        self._note(("h2d", threading.current_thread().name))
        return t.clone()

    def used_on(self, t, s):
        pass

    def is_result(self, t):
        return isinstance(t, torch.Tensor)

    def d2h(self, t):
        return t.clone()

    def synchronize(self, s):
        pass


def _threads_named(name):
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipeline_order_and_staging_thread(depth):
    jobs = _jobs([(16, 33), (7,), (5, 4, 3), (9, 9), (2, 2)])
    ops = _FakeOps()

    def compute(job, ins):
        time.sleep(0.01)  # let the stager run ahead
        kw = dict(job.kwargs)
        return merge_tensors(ins[0], ins[1:], kw.pop("method"), backend="cpu", **kw)

    stats = StreamStats()
    got = list(stream_jobs(jobs, compute, device="cuda", depth=depth, stats=stats, _ops=ops))
    assert [k for k, _ in got] == [j.key for j in jobs]
    for (key, t), job in zip(got, jobs):
        assert torch.equal(t, _expected(job, "cpu")), key
    assert stats.jobs == 5
    assert stats.h2d_bytes == sum(x.numel() * x.element_size() for j in jobs for x in j.tensors)
    assert {name for what, name in ops.log} == {"lfm-gpu-stream-stager"}  # copies come from the stager
    time.sleep(0.05)
    assert not _threads_named("lfm-gpu-stream-stager")


def test_pipeline_propagates_errors_and_stops_the_stager():
    jobs = _jobs([(4, 4)] * 6)

    jobs[2] = gpu_stream.GpuJob("bad", jobs[2].tensors, jobs[2].kwargs)

    def compute2(job, ins):
        if job.key == "bad":
            raise RuntimeError("boom in job 2")
        return ins[0].clone()

    seen = []
    with pytest.raises(RuntimeError, match="boom in job 2"):
        for key, _ in stream_jobs(jobs, compute2, device="cuda", depth=2, _ops=_FakeOps()):
            seen.append(key)
    assert len(seen) <= 2
    time.sleep(0.05)
    assert not _threads_named("lfm-gpu-stream-stager")

    # a bad job found by the stager reaches the caller too
    bad_jobs = [jobs[0], gpu_stream.GpuJob("gpu-input", ["not a tensor"])]
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        list(stream_jobs(bad_jobs, lambda j, i: i[0].clone(), device="cuda", _ops=_FakeOps()))
    # closing the generator early stops the stager
    gen = stream_jobs(_jobs([(4, 4)] * 8), lambda j, i: i[0].clone(), device="cuda", depth=2, _ops=_FakeOps())
    next(gen)
    gen.close()
    time.sleep(0.05)
    assert not _threads_named("lfm-gpu-stream-stager")
