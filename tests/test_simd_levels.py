"""Every SIMD level the host runs gives the same bits (docs/spec/merge.md, "Election
arithmetic" and "Output arithmetic": nothing is fused, so no level may differ).

The library reads LFM_SIMD once, so each level runs in its own interpreter: a child
process merges every method on tie-heavy and exactly cancelling data (random, random
with K = 9 > 8, odd sizes, bf16/fp16/fp32) and prints a SHA-256 of all output bytes; the
digests of all levels must be equal. Also: an unknown or unrunnable LFM_SIMD is an error
that names the value, never a silent fallback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lfm_engine

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import hashlib, json, sys
import numpy as np, torch
import lfm_engine
from lfm_engine import merge_tensors
from lfm_engine.merge_params import METHODS

h = hashlib.sha256()
rng = np.random.default_rng(1234)
G = 1.0 / 256.0
cases = []
for n, dt, K in [(4099, torch.bfloat16, 3), (1000, torch.float16, 3), (257, torch.float32, 9), (13, torch.bfloat16, 2)]:
    base = rng.integers(-64, 65, n) * G
    if K == 3:  # exact cancellation 0.3a + 0.1b + 0.7c = 0 on most elements
        a = rng.integers(-6, 7, n); c = rng.integers(-6, 7, n); b = -3 * a - 7 * c
        ds = [a, b, c]; w = [0.3, 0.1, 0.7]
    else:  # tie-heavy small integers
        ds = [rng.integers(-3, 4, n) for _ in range(K)]; w = [0.3 + 0.1 * i for i in range(K)]
    t = lambda v: torch.tensor(v, dtype=torch.float64).to(dt)
    cases.append((t(base), [t(base + d * G) for d in ds], w))
    cases.append((t(rng.standard_normal(n) * 0.02),
                  [t(rng.standard_normal(n) * 0.02) for _ in range(K)], w))
for method in sorted(METHODS):
    for base, xs, w in cases:
        kw = dict(weights=w, seed=7, name="t")
        if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
            kw["density"] = 0.5
        if method.startswith("della"):
            kw["epsilon"] = 0.2
        out = merge_tensors(None if method == "linear" else base, xs, method, backend="cpu", **kw)
        h.update(method.encode()); h.update(out.view(torch.uint8).numpy().tobytes())
print(json.dumps({"simd": lfm_engine.build_info()["simd"], "digest": h.hexdigest()}))
"""


def _levels():
    host = lfm_engine.build_info().get("simd_host", "")
    order = {"baseline": ["baseline"], "avx2": ["baseline", "avx2"], "avx512": ["baseline", "avx2", "avx512"],
             "neon": ["neon"]}
    return order.get(host, [])


def _run(level, code):
    env = dict(os.environ, LFM_SIMD=level, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LFM_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_every_level_gives_the_same_bits():
    levels = _levels()
    if len(levels) < 2:
        pytest.skip(f"this host runs only {levels}: nothing to compare")
    digests = {}
    for level in levels:
        res = _run(level, CHILD)
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["simd"] == level  # the level really was forced
        digests[level] = got["digest"]
    assert len(set(digests.values())) == 1, digests


CHECK_ERR = r"""
import torch, lfm_engine
info = lfm_engine.build_info()
assert info["simd"] == "invalid", info
try:
    lfm_engine.merge_tensors(torch.zeros(4), [torch.ones(4)], "task_arithmetic", backend="cpu")
except Exception as e:
    print("ERR", type(e).__name__, e)
else:
    print("NO ERROR")
"""


@pytest.mark.parametrize("value", ["bogus", "AVX2", "neon" if sys.platform != "darwin" else "avx512"])
def test_bad_level_is_an_error_naming_it(value):
    if value == "neon" and lfm_engine.build_info().get("simd_host") == "neon":
        pytest.skip("neon runs here")
    res = _run(value, CHECK_ERR)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERR" in res.stdout and f"LFM_SIMD" in res.stdout and value in res.stdout, res.stdout
