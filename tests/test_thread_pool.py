"""The CPU kernels' workers (csrc/core/thread_pool.cpp): OpenMP team or own pool, same bits.

The pool is chosen once per process (LFM_THREAD_POOL), so every case runs in a fresh
interpreter: the same merge and LoRA calls under "openmp" and "own" must give identical
bytes, a bad value must be a clear error from the kernel call, and a forked child (which has
none of its parent's worker threads) must still run the kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lfm_engine._native import has_native

pytestmark = pytest.mark.skipif(not has_native(), reason="lfm_engine._C is not built")

_KERNELS = textwrap.dedent("""
    import hashlib, json, sys, torch
    import lfm_engine
    from lfm_engine import merge_tensors
    from lfm_engine.ops.lora import lora_apply
    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 300, generator=g).bfloat16()
    others = [base + 0.01 * torch.randn(700, 300, generator=g).bfloat16() for _ in range(3)]
    h = hashlib.sha256()
    for method in ("ties", "dare_ties", "della"):
        out = merge_tensors(base, others, method, density=0.4, backend="cpu", n_threads=2)
        h.update(out.view(torch.int16).numpy().tobytes())
    A = torch.randn(16, 8, 1030, generator=g); B = torch.randn(16, 70, 8, generator=g)
    x = torch.randn(32, 1030, generator=g); y = torch.zeros(32, 70)
    lora_apply(x, A, B, (torch.arange(32) % 16).int(), None, torch.ones(16), y, n_threads=2)
    h.update(y.numpy().tobytes())
    print(json.dumps({"pool": lfm_engine.build_info()["thread_pool"], "digest": h.hexdigest()}))
""")


def _run(code: str, pool: str | None, timeout: float = 120):
    env = dict(os.environ)
    env.pop("LFM_THREAD_POOL", None)
    if pool is not None:
        env["LFM_THREAD_POOL"] = pool
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_openmp_and_own_pool_give_the_same_bits():
    runs = {}
    for pool in ("own", None):
        p = _run(_KERNELS, pool)
        assert p.returncode == 0, p.stderr
        runs[pool] = json.loads(p.stdout.strip().splitlines()[-1])
    assert runs["own"]["pool"] == "own"
    assert runs[None]["pool"] in ("openmp", "own")  # "own" only in a build without OpenMP
    assert runs["own"]["digest"] == runs[None]["digest"]


def test_bad_pool_name_is_a_clear_error():
    p = _run(_KERNELS, "fibers")
    assert p.returncode != 0
    assert "LFM_THREAD_POOL must be 'openmp' or 'own', got 'fibers'" in p.stderr
    assert "Segmentation" not in p.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.parametrize("pool", ["own", None])
def test_forked_child_runs_the_kernels(pool):
    """The parent ran parallel kernels (workers exist); the child has no workers and must not
    wait for them. (The child touches no torch op: torch's own OpenMP team hangs after fork.)"""
    code = textwrap.dedent("""
        import os, sys, torch
        import lfm_engine
        from lfm_engine.ops.lora import lora_apply
        A = torch.randn(16, 8, 1024); B = torch.randn(16, 512, 8); x = torch.randn(32, 1024)
        ts = (torch.arange(32) % 16).int(); sc = torch.ones(16)
        y = torch.zeros(32, 512)
        lora_apply(x, A, B, ts, None, sc, y, n_threads=2)
        y2 = torch.zeros(32, 512)
        pid = os.fork()
        if pid == 0:
            lora_apply(x, A, B, ts, None, sc, y2, n_threads=2)
            os._exit(0 if bool((y2 == y).all()) and lfm_engine.build_info()["thread_pool"] == "serial" else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    p = _run(code, pool, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("child 0"), p.stdout + p.stderr
