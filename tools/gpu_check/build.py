"""Step 1: build and install lfm_engine with CUDA for this machine's GPU architecture only.

    LFM_ENABLE_CUDA=ON pip install --no-build-isolation --no-deps -v \
        --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=<cc> .

<cc> is nvidia-smi's compute capability without the dot (9.0 -> 90). One architecture
instead of the default "80;90" halves nvcc's work. After the install, a probe imports the
installed package from a folder outside the checkout and reads lfm_engine.build_info():
the step passes only if it reports CUDA kernels built for <cc>.
The dry run builds nothing: it records the command it would run and probes the package
that is installed now.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from .runner import run

PROBE = ("import json, lfm_engine; from lfm_engine._native import native; "
         "print('PROBE ' + json.dumps({'file': lfm_engine.__file__, 'build_info': json.loads(native().build_info())}))")


def detect_gpu() -> dict:
    """{name, compute_cap, driver, memory} of GPU 0 from nvidia-smi; {} without one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        return {}
    parts = [p.strip() for p in lines[0].split(",")]
    gpu = dict(zip(["name", "compute_cap", "driver", "memory"], parts))
    if not re.fullmatch(r"\d+\.\d+", gpu.get("compute_cap", "")):  # an nvidia-smi without that field
        try:
            q = subprocess.run([sys.executable, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                               capture_output=True, text=True, timeout=60)
            gpu["compute_cap"] = q.stdout.strip() if q.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            gpu["compute_cap"] = ""
    return gpu


def cuda_arch(compute_cap: str) -> str:
    """'9.0' -> '90' (the CMAKE_CUDA_ARCHITECTURES spelling); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", compute_cap or "")
    if not m:
        raise ValueError(f"cannot read a compute capability from {compute_cap!r}")
    return m.group(1) + m.group(2)


def pip_command(python: str, arch: str) -> list:
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
            f"--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES={arch}", "."]


def probe(ctx, timeout: float) -> dict:
    """build_info of the lfm_engine that a fresh interpreter imports outside the checkout."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_probe_") as cwd:
        p = run([ctx.python, "-c", PROBE], log=ctx.log("build"), timeout=timeout, cwd=cwd, env=ctx.env())
    for line in p.output.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise RuntimeError("the installed lfm_engine did not import: " + " | ".join(p.output.strip().splitlines()[-3:]))


def step(ctx, time_s: float):
    gpu = ctx.gpu
    data = {"gpu": gpu}
    if ctx.dry_run:
        arch = cuda_arch(gpu["compute_cap"]) if gpu.get("compute_cap") else "<compute capability>"
        data["command"] = pip_command(ctx.python, arch)
        info = probe(ctx, time_s)
        data["installed"] = info
        bi = info["build_info"]
        return "ok", (f"dry run: CUDA build skipped; installed lfm_engine imports "
                      f"(cuda={bi.get('cuda')}, simd={bi.get('simd')})"), data
    if not gpu.get("compute_cap"):
        return "failed", "nvidia-smi reports no GPU: nothing to build for", data
    arch = cuda_arch(gpu["compute_cap"])
    cmd = pip_command(ctx.python, arch)
    data["command"] = cmd
    env = ctx.env(LFM_ENABLE_CUDA="ON", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
    p = run(cmd, log=ctx.log("build"), timeout=ctx.budget.grant(time_s - 20), cwd=ctx.root, env=env)
    data["build_seconds"] = round(p.seconds, 1)
    print(f"  build time: {p.seconds:.1f} s", flush=True)
    if not p.ok:
        why = "timed out" if p.timed_out else f"pip exited {p.rc}"
        return ("timeout" if p.timed_out else "failed"), f"CUDA build for sm_{arch} {why} after {p.seconds:.0f} s", data
    info = probe(ctx, ctx.budget.grant(20))
    data["installed"] = info
    bi = info["build_info"]
    archs = [a.strip() for a in str(bi.get("cuda_archs", "")).split(",") if a.strip()]
    if not bi.get("cuda") or arch not in archs:
        return "failed", (f"built in {p.seconds:.0f} s but the installed lfm_engine reports cuda={bi.get('cuda')} "
                          f"archs={bi.get('cuda_archs')!r} (wanted {arch})"), data
    return "ok", f"CUDA sm_{arch} build in {p.seconds:.0f} s; installed lfm_engine {bi.get('version')} cuda archs {archs}", data
