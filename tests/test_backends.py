"""Every op on every backend this machine can run (the `backend` fixture), and the rule that
an explicit backend (argument or LFM_BACKEND) is honoured or refused, never replaced."""
from __future__ import annotations

import pytest
import torch

import lfm_engine
from conftest import assert_close, has_cuda
from lfm_engine.ops import _dispatch, codec as codec_ops, lora as lora_ops, merge as merge_ops

_TABLES = {"merge_tensors": merge_ops.BACKENDS, "lora_apply": lora_ops.BACKENDS,
           "decode_add": codec_ops.DECODE_BACKENDS, "delta_apply": codec_ops.APPLY_BACKENDS}


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and has_cuda()) else "cpu")


def _runnable(backend: str) -> str | None:
    """Why `backend` cannot run here (None: it can)."""
    from lfm_engine._native import has_native
    if backend in ("cpu", "cuda") and not has_native():
        return "the compiled core is not built"
    if backend == "cuda" and not (has_cuda() and _dispatch.native_has_cuda()):
        return "needs a CUDA GPU and a core built with CUDA"
    return _dispatch.cannot_run(backend, _device_for(backend))


@pytest.fixture(params=_dispatch.KNOWN_BACKENDS)
def backend(request):
    why = _runnable(request.param)
    if why:
        pytest.skip(f"backend {request.param}: {why}")
    return request.param


def _merge(backend, dev):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(33, 17, generator=g)
    xs = [base + 0.1 * torch.randn(33, 17, generator=g) for _ in range(3)]
    kw = dict(weights=[0.5, 0.3, 0.2], density=0.4)
    got = lfm_engine.merge_tensors(base.to(dev), [x.to(dev) for x in xs], "ties", backend=backend, **kw)
    want = lfm_engine.merge_tensors(base, xs, "ties", backend="reference", **kw)
    return got, want


def _lora(backend, dev):
    g = torch.Generator().manual_seed(2)
    T, H_in, H_out, R, S = 9, 24, 20, 8, 3
    x = torch.randn(T, H_in, generator=g)
    A = torch.randn(S, R, H_in, generator=g) * 0.1
    B = torch.randn(S, H_out, R, generator=g) * 0.1
    slots = torch.tensor([0, 1, -1, 2, 2, 0, 1, -1, 0], dtype=torch.int32)
    ranks = torch.tensor([8, 4, 2], dtype=torch.int32)
    scales = torch.tensor([0.5, 1.0, 2.0])
    y0 = torch.randn(T, H_out, generator=g)
    got = lfm_engine.lora_apply(x.to(dev), A.to(dev), B.to(dev), slots.to(dev), ranks.to(dev), scales.to(dev),
                                y0.clone().to(dev), backend=backend)
    want = lfm_engine.lora_apply(x, A, B, slots, ranks, scales, y0.clone(), backend="reference")
    return got, want


def _to(enc, dev):
    """An Encoded with its fields on `dev`."""
    return codec_ops.Encoded(enc.codec, enc.shape, enc.dtype, {k: v.to(dev) for k, v in enc.fields.items()},
                             enc.options)


def _decode_add(backend, dev):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 64, generator=g)
    enc = lfm_engine.encode_delta(0.05 * torch.randn(16, 64, generator=g), "int4", group_size=32)
    got = lfm_engine.decode_add(_to(enc, dev), base.to(dev), backend=backend)
    want = lfm_engine.decode_add(enc, base, backend="reference")
    return got, want


def _delta_apply(backend, dev):
    g = torch.Generator().manual_seed(4)
    encs = [lfm_engine.encode_delta(0.05 * torch.randn(12, 32, generator=g), "int8", group_size=16)
            for _ in range(2)]
    x = torch.randn(5, 32, generator=g)
    slots = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32)
    y0 = torch.randn(5, 12, generator=g)
    got = lfm_engine.delta_apply(x.to(dev), [_to(e, dev) for e in encs], slots.to(dev), y0.clone().to(dev),
                                 backend=backend)
    want = lfm_engine.delta_apply(x, encs, slots, y0.clone(), backend="reference")
    return got, want


_OPS = {"merge_tensors": _merge, "lora_apply": _lora, "decode_add": _decode_add, "delta_apply": _delta_apply}


@pytest.mark.parametrize("op", list(_OPS))
def test_every_op_on_every_available_backend(op, backend):
    if backend not in _TABLES[op]:
        pytest.skip(f"{op} has no {backend} backend")
    got, want = _OPS[op](backend, _device_for(backend))
    assert_close(got, want, torch.float32, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", list(_TABLES))
def test_lfm_backend_that_cannot_run_is_an_error(op, monkeypatch):
    table = _TABLES[op]
    monkeypatch.setenv("LFM_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="LFM_BACKEND=no-such-backend.*knows no backend"):
        _dispatch.pick_backend(op, table, torch.device("cpu"), None, {"cpu": "cpu"})
    if "cuda" in table:
        monkeypatch.setenv("LFM_BACKEND", "cuda")
        with pytest.raises(ValueError, match="LFM_BACKEND=cuda cannot run: the tensors are on cpu"):
            _dispatch.pick_backend(op, table, torch.device("cpu"), None, {"cpu": "cpu"})
    # the argument wins over the environment
    assert _dispatch.pick_backend(op, table, torch.device("cpu"), "reference", {"cpu": "cpu"}) == "reference"
    monkeypatch.setenv("LFM_BACKEND", "reference")
    assert _dispatch.pick_backend(op, table, torch.device("cpu"), None, {"cpu": "cpu"}) == "reference"


def test_lfm_backend_reaches_merge_tensors_and_gpu_stream(monkeypatch):
    base, xs = torch.zeros(8), [torch.ones(8)]
    monkeypatch.setenv("LFM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LFM_BACKEND=cuda"):
        lfm_engine.merge_tensors(base, xs, "task_arithmetic")
    from lfm_engine.merge.gpu_stream import GpuJob, merge_on_device
    monkeypatch.delenv("LFM_BACKEND")
    with pytest.raises(ValueError, match="backend='cuda' cannot run"):
        list(merge_on_device([GpuJob("t", [base, xs[0]], dict(method="task_arithmetic"))], device="cpu",
                             backend="cuda"))


def test_triton_outside_the_interpreter_names_the_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.pick_backend("merge_tensors", merge_ops.BACKENDS, torch.device("cpu"), "triton", {"cpu": "cpu"})
