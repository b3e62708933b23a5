"""Step 2: the GPU tests, on the device, without -x so one failure does not hide the rest.

On the GPU: `pytest tests -k "cuda or triton or test_merge_gpu"` selects every test marked
`cuda` (-k matches marker names too), every Triton test (their names say triton) and the
whole of tests/test_merge_gpu.py. TRITON_INTERPRET is removed from the environment, so
Triton compiles for the GPU; bf16 `tl.dot` runs in test_triton_delta_apply_bf16_gpu
(tests/test_codec.py). pytest-xdist (-n) and pytest-timeout are used when installed.
`python -P` keeps the checkout's uncompiled lfm_engine off sys.path: the tests import
the package step 1 installed.

The dry run: a handful of Triton tests under TRITON_INTERPRET=1 on the CPU plus the
cuda-marked checks that then skip, so the step's plumbing (selection, JUnit parsing,
skip accounting) is exercised in CI in a few seconds.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from .runner import run

GPU_KEYWORDS = "cuda or triton or test_merge_gpu"
DRY_FILES = ["tests/test_merge_gpu.py", "tests/test_codec.py", "tests/test_lora.py"]
DRY_KEYWORDS = ("test_triton_philox_matches_reference or test_triton_linear_without_base or "
                "test_triton_multi_slice_and_segments or (test_triton_decode_add and int4) or "
                "test_masks_via_merge or test_gpu_masks_bit_identical or test_triton_delta_apply_bf16_gpu")
# Test names whose results the targets read (tools/gpu_check/targets.py).
MASKS_TEST = "test_gpu_masks_bit_identical_every_method"
GRACE_S = 20.0
BF16_DOT_TEST = "test_triton_delta_apply_bf16_gpu"


def pytest_command(ctx, junit: Path) -> list:
    cmd = [ctx.python] + (["-P"] if sys.version_info >= (3, 11) else []) + [
        "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--junitxml", str(junit)]
    if ctx.dry_run:
        return cmd + ["-k", DRY_KEYWORDS] + DRY_FILES
    if ctx.args.test_workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(ctx.args.test_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "100"]  # one hung test must not take the whole step
    return cmd + ["-k", GPU_KEYWORDS, "tests"]


def parse_junit(path: Path) -> dict:
    """Counts, failures (node id + first line), skip reasons and the slowest tests."""
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        mod = tc.get("classname", "")
        file = mod.replace(".", "/") + ".py" if mod else tc.get("file", "")
        node = f"{file}::{tc.get('name')}"
        outcome, msg = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                msg = (el.get("message") or el.text or "").strip()
                break
        cases.append({"id": node, "name": tc.get("name", ""), "outcome": outcome,
                      "seconds": float(tc.get("time", 0) or 0), "message": msg.splitlines()[0][:300] if msg else ""})
    counts = Counter(c["outcome"] for c in cases)
    skips = Counter(c["message"] for c in cases if c["outcome"] == "skipped")
    return {
        "counts": {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
        "failures": [{k: c[k] for k in ("id", "outcome", "message")} for c in cases if c["outcome"] in ("failed", "error")],
        "skip_reasons": dict(skips.most_common()),
        "slowest": [{"id": c["id"], "seconds": round(c["seconds"], 1)}
                    for c in sorted(cases, key=lambda c: -c["seconds"])[:5]],
        "named": {name: _named(cases, name) for name in (MASKS_TEST, BF16_DOT_TEST)},
    }


def _named(cases: list, name: str) -> dict:
    """Outcome counts of the test function `name` (all its parameter sets)."""
    mine = [c for c in cases if c["name"].split("[")[0] == name]
    c = Counter(x["outcome"] for x in mine)
    return {"passed": c.get("passed", 0), "failed": c.get("failed", 0) + c.get("error", 0),
            "skipped": c.get("skipped", 0),
            "messages": sorted({x["message"] for x in mine if x["outcome"] != "passed"})[:3]}


def step(ctx, time_s: float):
    junit = ctx.work / "junit.xml"
    cmd = pytest_command(ctx, junit)
    if ctx.dry_run:  # the CPU path even on a GPU machine: interpreter on CPU tensors, cuda tests skip
        env = ctx.env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env = ctx.env(drop=("TRITON_INTERPRET",))
        workers = ctx.args.test_workers if "-n" in cmd else 1
        if workers > 1:  # share the cores between the xdist workers' torch and lfm_engine CPU pools
            per = str(max(1, (os.cpu_count() or 4) // workers))
            env.update(OMP_NUM_THREADS=per, LFM_NUM_THREADS=per)
    # at the time limit pytest gets SIGINT and GRACE_S to write the JUnit report of what ran
    p = run(cmd, log=ctx.log("tests"), timeout=ctx.budget.grant(time_s - GRACE_S), cwd=ctx.root, env=env,
            interrupt_grace=GRACE_S)
    data = {"command": cmd, "exit": p.rc, "seconds": round(p.seconds, 1)}
    if not junit.exists():
        why = "timed out" if p.timed_out else f"pytest exited {p.rc}"
        last = re.findall(r"^=+ (.*(?:passed|failed|error).*) =+$", p.output, re.M)
        return ("timeout" if p.timed_out else "failed"), (f"{why} before writing its JUnit report"
                                                          + (f" ({last[-1]})" if last else "")), data
    data.update(parse_junit(junit))
    n = data["counts"]
    summary = f"{n['passed']} passed, {n['failed']} failed, {n['error']} errors, {n['skipped']} skipped"
    if data["skip_reasons"]:
        top = next(iter(data["skip_reasons"]))
        summary += f" (most skipped: {top[:60]!r})"
    if p.timed_out:
        return "timeout", summary + "; stopped at the step's time limit", data
    if p.rc == 0 and n["passed"] > 0:
        return "ok", summary, data
    return "failed", summary + (f"; pytest exit {p.rc}" if not (n["failed"] or n["error"]) else ""), data
