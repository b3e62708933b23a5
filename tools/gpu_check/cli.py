"""Command line and orchestration of the GPU check (see tools/gpu_check/__init__.py)."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import bench_step, build, report, sanitize, targets, tests_step
from .runner import Budget

STEPS = {"build": build.step, "tests": tests_step.step, "sanitize": sanitize.step, "bench": bench_step.step}
# Seconds per step on the GPU; they sum to the default budget less the report's reserve.
# Time a step does not use is passed on to the next one.
DEFAULT_BUDGETS = {"build": 130, "tests": 130, "sanitize": 80, "bench": 120}
DEFAULT_TOTAL = 470  # the issue: under 8 minutes of wall time
DRY_BUDGETS = {"build": 30, "tests": 90, "sanitize": 5, "bench": 5}


class Interrupted(Exception):
    pass


class Context:
    """What every step gets: the checkout, the interpreter, options, the budget and files."""

    def __init__(self, args, root: Path, out: Path, work: Path, budget: Budget, gpu: dict):
        self.args, self.root, self.out, self.work, self.budget, self.gpu = args, root, out, work, budget, gpu
        self.dry_run = args.dry_run
        self.python = sys.executable
        self.logs = out / "logs"

    def log(self, step: str) -> Path:
        return self.logs / f"{step}.log"

    def env(self, drop=(), **values) -> dict:
        e = {k: v for k, v in os.environ.items() if k not in drop}
        e.update(values)
        e["PYTHONUNBUFFERED"] = "1"
        return e


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="tools/gpu_check.sh",
        description="Build with CUDA, run the GPU tests, compute-sanitizer and the GPU benchmarks; "
                    "write one JSON and one Markdown report (docs/gpu_check.md).")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json, gpu_check.md and logs/ "
                                                "(default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU: no CUDA build (probe the installed package), a few Triton tests in the "
                         "interpreter, no sanitizer or benchmarks; proves the script and its reports")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)} (default: all)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"total wall-time budget in seconds (default {DEFAULT_TOTAL}; dry run 150)")
    ap.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                    help="time limit of one step, e.g. --step-budget tests=200 (repeatable)")
    ap.add_argument("--test-workers", type=int, default=4,
                    help="pytest-xdist workers for the GPU tests when xdist is installed (0 = none)")
    args = ap.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        ap.error(f"unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}")
    budgets = dict(DRY_BUDGETS if args.dry_run else DEFAULT_BUDGETS)
    for item in args.step_budget:
        name, _, secs = item.partition("=")
        if name not in STEPS:
            ap.error(f"--step-budget {item!r}: unknown step {name!r}")
        try:
            budgets[name] = float(secs)
        except ValueError:
            ap.error(f"--step-budget {item!r}: {secs!r} is not a number of seconds")
    args.budgets = budgets
    if args.budget is None:
        args.budget = 150.0 if args.dry_run else float(DEFAULT_TOTAL)
    return args


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(cmd: list, cwd=None, last=False) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    return (lines[-1] if last else lines[0]) if p.returncode == 0 and lines else ""


def machine(root: Path, gpu: dict) -> dict:
    git = ""
    if shutil.which("git") and (root / ".git").exists():
        git = _first_line(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root)
    return {
        "host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()), "python": platform.python_version(),
        "torch": _version("torch"), "triton": _version("triton"), "gpu": gpu,
        "nvcc": _first_line(["nvcc", "--version"], last=True) if shutil.which("nvcc") else "",
        "git": git,
    }


def run_check(args, root: Path, out: Path) -> dict:
    budget = Budget(args.budget)
    gpu = build.detect_gpu()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for name in STEPS:  # fresh logs: a rerun into the same folder does not append to old ones
        (logs / f"{name}.log").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(args, root, out, work, budget, gpu)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = {
        "schema": 1, "tool": "tools/gpu_check.sh", "mode": "dry-run" if args.dry_run else "gpu",
        "command": "tools/gpu_check.sh " + shlex.join(args.argv), "started": started,
        "budget_s": args.budget, "machine": machine(root, gpu), "steps": {}, "targets": [],
        "logs": [],
    }

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    carry = 0.0
    try:
        for name, fn in STEPS.items():
            if name not in args.steps:
                result["steps"][name] = {"status": "skipped", "summary": "not asked for (--steps)", "seconds": 0,
                                         "budget_s": 0, "data": {}}
                continue
            limit = budget.grant(args.budgets[name] + carry)
            print(f"[{name}] time limit {limit:.0f} s ({budget.left():.0f} s left in the budget)", flush=True)
            t0 = time.monotonic()
            entry = {"budget_s": round(limit)}
            try:
                status, summary, data = fn(ctx, limit)
            except Interrupted:
                entry.update(status="interrupted", summary="the check was stopped (SIGTERM)", data={})
                result["steps"][name] = dict(entry, seconds=round(time.monotonic() - t0, 1))
                raise
            except Exception as exc:  # one step's bug must not cost the other steps
                with open(ctx.log(name), "a") as f:
                    f.write("\n" + traceback.format_exc())
                status, summary, data = "error", f"{type(exc).__name__}: {exc}", {}
            used = time.monotonic() - t0
            carry = max(0.0, args.budgets[name] + carry - used)
            entry.update(status=status, summary=summary, data=data, seconds=round(used, 1))
            result["steps"][name] = entry
            print(f"[{name}] {status} in {used:.0f} s: {summary}", flush=True)
            _finish(result, budget, out, ctx)  # after every step: a killed check still leaves its results
    except Interrupted:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        shutil.rmtree(work, ignore_errors=True)
    _finish(result, budget, out, ctx)
    return result


def _finish(result: dict, budget: Budget, out: Path, ctx: Context) -> None:
    result["targets"] = targets.evaluate(result["steps"])
    result["wall_s"] = round(budget.elapsed(), 1)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["logs"] = sorted(str(p.relative_to(out)) for p in ctx.logs.glob("*.log"))
    good = ("ok", "skipped")
    result["exit_status"] = 0 if all(s["status"] in good for s in result["steps"].values()) else 1
    report.write(out, result)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    root = Path(__file__).resolve().parents[2]
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    result = run_check(args, root, out)
    print("\n".join(report.summary_lines(result, out)), flush=True)
    return result["exit_status"]
