"""Step 3: compute-sanitizer on a small case of each CUDA kernel family.

    compute-sanitizer --tool memcheck  ... python tools/gpu_check/sanitize_driver.py --family merge|lora|codec
    compute-sanitizer --tool racecheck --kernel-name kns=k_hist|k_tie_count|k_tie_locate \
        ... python tools/gpu_check/sanitize_driver.py --family merge-select

PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every torch tensor its own cudaMalloc, so an access
past a tensor's end lands outside any allocation and memcheck sees it (with torch's caching
allocator it would land in a neighbouring block of the same pool and pass unseen).
--report-api-errors no: torch's own probing calls can fail by design; an error of one of our
CUDA calls is already an exception in the driver (LFM_CUDA_CHECK -> lfm_status -> ValueError).
A run passes when the sanitizer reports 0 errors / 0 hazards and the driver's results agreed
with the CPU kernel (exit status 0).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .runner import run, tail

RACECHECK_KERNELS = ["k_hist", "k_tie_count", "k_tie_locate"]  # the merge's exact-k selection
RUNS = [("memcheck", "merge"), ("memcheck", "lora"), ("memcheck", "codec"), ("racecheck", "merge-select")]


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]:
        cand = Path(root) / "bin" / "compute-sanitizer" if root else None
        if cand and cand.exists():
            return str(cand)
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = Path(nvcc).resolve().parent / "compute-sanitizer"
        if cand.exists():
            return str(cand)
    return None


def sanitizer_command(tool_path: str, python: str, tool: str, family: str) -> list:
    cmd = [tool_path, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", "--report-api-errors", "no"]
    if tool == "racecheck":
        for k in RACECHECK_KERNELS:
            cmd += ["--kernel-name", f"kns={k}"]
    return cmd + [python, "tools/gpu_check/sanitize_driver.py", "--family", family, "--device", "cuda"]


def parse_output(tool: str, text: str) -> dict:
    """Errors (memcheck) or hazards (racecheck) the sanitizer counted, and the driver's verdict."""
    res = {"errors": None, "driver": None}
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        res["errors"] = int(m[-1])
    if tool == "racecheck":
        m = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
        if m:
            res["hazards"], res["race_errors"], res["race_warnings"] = (int(v) for v in m[-1])
    m = re.findall(r"sanitize_driver: \S+ on \S+: (\d+) cases, (.+)", text)
    if m:
        res["driver"] = f"{m[-1][0]} cases, {m[-1][1].strip()}"
    return res


def step(ctx, time_s: float):
    tool_path = find_sanitizer()
    plan = [sanitizer_command(tool_path or "compute-sanitizer", ctx.python, t, f) for t, f in RUNS]
    data = {"runs": []}
    if ctx.dry_run:
        data["planned"] = plan
        return "skipped", "dry run: compute-sanitizer not run", data
    if not tool_path:
        data["planned"] = plan
        return "failed", "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, next to nvcc)", data
    env = ctx.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1", drop=("TRITON_INTERPRET",))
    deadline = ctx.budget.elapsed() + time_s
    bad = []
    for i, ((tool, family), cmd) in enumerate(zip(RUNS, plan)):
        left = deadline - ctx.budget.elapsed()
        share = min(left, 1.5 * left / (len(RUNS) - i))  # a slow run may take a bit of a later one's share
        p = run(cmd, log=ctx.log("sanitize"), timeout=ctx.budget.grant(share), cwd=ctx.root, env=env)
        res = {"tool": tool, "family": family, "exit": p.rc, "seconds": round(p.seconds, 1),
               "timed_out": p.timed_out, **parse_output(tool, p.output)}
        clean = p.ok and res["errors"] == 0 and (res["driver"] or "").endswith("ok")
        res["status"] = "ok" if clean else ("timeout" if p.timed_out else "failed")
        if not clean:
            res["tail"] = tail(p.output, 15)
            bad.append(f"{tool} {family}")
        data["runs"].append(res)
    parts = []
    for r in data["runs"]:
        what = f"{r['errors']} errors" if r["errors"] is not None else "no summary"
        if r["tool"] == "racecheck" and "hazards" in r:
            what = f"{r['hazards']} hazards"
        parts.append(f"{r['tool']} {r['family']}: {what if not r['timed_out'] else 'timeout'}")
    summary = "; ".join(parts)
    if not bad:
        return "ok", summary, data
    any_timeout = all(r["status"] == "timeout" for r in data["runs"] if r["status"] != "ok")
    return ("timeout" if any_timeout else "failed"), summary, data
