"""lfm_engine.merge.gpu_stream: the streamed model-level merge (CPU path here, GPU when lent)."""
from __future__ import annotations

import pytest
import torch

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
