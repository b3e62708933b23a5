"""Step 4: the GPU benchmarks at fixed sizes, each next to torch on the same device and the
device's copy bandwidth measured in the same run (bench/*.py; their JSON reports are kept
whole in the check's JSON). Each suite has its own time limit; one failing suite does not
stop the next.
"""
from __future__ import annotations

import json

from .runner import run, tail

# (name, script, arguments, seconds). The sizes are the issue's.
SUITES = [
    ("merge_gpu", "bench/bench_merge_gpu.py",
     ["--shapes", "11008x4096", "--k", "3", "--methods", "ties,dare_ties,task_arithmetic,breadcrumbs_ties,della,linear",
      "--reps", "10"], 40),
    ("lora", "bench/bench_lora.py",
     ["--device", "cuda", "--hidden", "4096", "--rank", "16", "--tokens", "1,16,64,256",
      "--mixes", "distinct,uniform,shared", "--ops", "shrink,expand,apply", "--prefill", "", "--reps", "20"], 35),
    ("codec", "bench/bench_codec.py",
     ["--device", "cuda", "--size", "8192", "--skip", "quality", "serving", "--reps", "20"], 25),
    ("merge_models", "bench/bench_merge_models.py",
     ["--size", "full", "--methods", "ties,dare_ties,della", "--devices", "cpu,cuda", "--no-mergekit"], 45),
]


def command(ctx, script: str, args: list, json_path) -> list:
    return [ctx.python, script] + args + ["--json", str(json_path)]


def step(ctx, time_s: float):
    data = {"suites": {}}
    if ctx.dry_run:
        data["planned"] = {name: command(ctx, script, args, f"<work>/{name}.json") for name, script, args, _ in SUITES}
        return "skipped", "dry run: benchmarks not run", data
    env = ctx.env(drop=("TRITON_INTERPRET",))
    deadline = ctx.budget.elapsed() + time_s
    total_want = sum(s[3] for s in SUITES)
    failed = []
    for name, script, args, want in SUITES:
        jpath = ctx.work / f"bench_{name}.json"
        left = deadline - ctx.budget.elapsed()
        # each suite gets its share of what is left (time saved by earlier suites is passed on)
        share = left * want / total_want
        total_want -= want
        cmd = command(ctx, script, args, jpath)
        p = run(cmd, log=ctx.log("bench"), timeout=ctx.budget.grant(share), cwd=ctx.root, env=env)
        entry = {"command": cmd, "exit": p.rc, "seconds": round(p.seconds, 1), "timed_out": p.timed_out}
        if p.ok and jpath.exists():
            entry["status"] = "ok"
            entry["report"] = json.loads(jpath.read_text())
        else:
            entry["status"] = "timeout" if p.timed_out else "failed"
            entry["tail"] = tail(p.output, 15)
            lines = [ln for ln in p.output.splitlines() if ln.strip() and not ln.startswith(("$ ", "# exit"))]
            entry["why"] = ("no JSON report; " if p.ok else "") + (lines[-1].strip()[:120] if lines else "no output")
            failed.append(name)
        data["suites"][name] = entry
    summary = ", ".join(f"{n} {e['status']} ({e['seconds']:.0f} s)" + (f" [{e['why']}]" if "why" in e else "")
                        for n, e in data["suites"].items())
    if not failed:
        return "ok", summary, data
    timeouts = [n for n in failed if data["suites"][n]["status"] == "timeout"]
    return ("timeout" if len(timeouts) == len(failed) else "failed"), summary, data
