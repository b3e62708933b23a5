"""Step 5: one JSON document, one Markdown summary (both written to a temporary name and
renamed, so a reader never sees half a file) and the one-screen summary printed last."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"
MARK = {"met": "MET", "not met": "NOT MET", "not measured": "not measured"}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / JSON_NAME, json.dumps(result, indent=1, default=str) + "\n")
    write_atomic(out / MD_NAME, markdown(result))


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def _machine_line(m: dict) -> str:
    g = m.get("gpu") or {}
    gpu = f"{g.get('name')} (cc {g.get('compute_cap')}, driver {g.get('driver')}, {g.get('memory')})" if g else "no GPU"
    return (f"{gpu}; {m.get('cpus')} CPUs, load {m.get('load')}; Python {m.get('python')}, torch {m.get('torch')}, "
            f"triton {m.get('triton')}; nvcc {m.get('nvcc') or '-'}")


def markdown(r: dict) -> str:
    L = [f"# GPU check ({r['mode']})", "",
         f"- date: {r['started']} (wall {r.get('wall_s', '-')} s of a {r['budget_s']:.0f} s budget)",
         f"- machine: {_machine_line(r['machine'])}",
         f"- checkout: {r['machine'].get('git') or 'unknown'}",
         f"- command: `{r['command']}`", "",
         "## Steps", "", "| step | status | seconds | time limit | summary |", "|---|---|---:|---:|---|"]
    for name, s in r["steps"].items():
        L.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('budget_s', 0):.0f} | "
                 f"{s['summary'].replace('|', '/')} |")
    L += ["", "## Targets (issue 16)", "", "| target | status | evidence |", "|---|---|---|"]
    for t in r.get("targets", []):
        L.append(f"| {t['text']} | {MARK[t['status']]} | {t['evidence'].replace('|', '/')} |")
    tests = r["steps"].get("tests", {}).get("data", {})
    if tests.get("counts"):
        L += ["", "## Tests", "", f"`{shlex.join(tests['command'])}`", "",
              ", ".join(f"{k}: {v}" for k, v in tests["counts"].items())]
        for f in tests.get("failures", []):
            L.append(f"- {f['outcome']}: `{f['id']}`: {f['message']}")
        if tests.get("skip_reasons"):
            L += ["", "Skipped, by reason:"] + [f"- {n} x {why}" for why, n in tests["skip_reasons"].items()]
        if tests.get("slowest"):
            L += ["", "Slowest: " + ", ".join(f"`{s['id']}` {s['seconds']} s" for s in tests["slowest"])]
    san = r["steps"].get("sanitize", {}).get("data", {})
    if san.get("runs"):
        L += ["", "## compute-sanitizer", "", "| tool | family | status | errors | hazards | driver | s |",
              "|---|---|---|---:|---:|---|---:|"]
        for x in san["runs"]:
            L.append(f"| {x['tool']} | {x['family']} | {x['status']} | {x.get('errors')} | {x.get('hazards', '-')} | "
                     f"{x.get('driver')} | {x['seconds']} |")
    suites = r["steps"].get("bench", {}).get("data", {}).get("suites", {})
    for name, e in suites.items():
        L += ["", f"## Benchmark {name} ({e['status']}, {e['seconds']} s)", "", f"`{shlex.join(e['command'])}`", ""]
        rep = e.get("report")
        if not rep:
            L += ["```", e.get("tail", ""), "```"]
            continue
        L += [f"{rep['title']}; device {rep['device']}; copy bandwidth measured in the run: "
              f"{rep['copy_bw_gbps']:.1f} GB/s", "",
              "| case | provider | time ms | GB/s | % copy | % copy per pass |", "|---|---|---:|---:|---:|---:|"]
        for row in rep["rows"]:
            pp = row.get("extra", {}).get("per_pass_gbps")
            L.append(f"| {row['case']} | {row['provider']} | {1e3 * row['seconds']:.3f} | {row['gbps']:.1f} | "
                     f"{_pct(row['frac_copy'])} | {_pct(pp / rep['copy_bw_gbps']) if pp else ''} |")
    L += ["", "Logs: " + ", ".join(f"`{p}`" for p in r.get("logs", [])), ""]
    return "\n".join(L)


def summary_lines(r: dict, out: Path) -> list:
    """The one-screen summary printed last (the device tool returns the end of the output)."""
    L = ["", "=" * 100,
         f"GPU check ({r['mode']}): {_machine_line(r['machine'])}",
         f"wall {r.get('wall_s', 0):.0f} s of {r['budget_s']:.0f} s; exit status {r.get('exit_status')}",
         f"{'step':<9} {'status':<9} {'s':>5}  summary"]
    for name, s in r["steps"].items():
        L.append(f"{name:<9} {s['status']:<9} {s.get('seconds', 0):5.0f}  {s['summary'][:160]}")
    tests = r["steps"].get("tests", {}).get("data", {})
    dot = tests.get("named", {}).get("test_triton_delta_apply_bf16_gpu")
    if dot:
        L.append(f"bf16 tl.dot on the device (test_triton_delta_apply_bf16_gpu): {dot['passed']} passed, "
                 f"{dot['failed']} failed, {dot['skipped']} skipped {'; '.join(dot['messages'])[:80]}")
    for f in tests.get("failures", [])[:6]:
        L.append(f"  FAIL {f['id'][:90]}: {f['message'][:100]}")
    if len(tests.get("failures", [])) > 6:
        L.append(f"  ... {len(tests['failures']) - 6} more failures in {out / MD_NAME}")
    suites = r["steps"].get("bench", {}).get("data", {}).get("suites", {})
    for name, e in suites.items():
        rep = e.get("report")
        if rep:
            L.append(f"bench {name}: copy bandwidth {rep['copy_bw_gbps']:.0f} GB/s on {rep['device']}")
    L.append("targets:")
    for t in r.get("targets", []):
        L.append(f"  [{MARK[t['status']]:^12}] {t['text']}")
        L.append(f"  {'':14} {t['evidence'][:200]}")
    L.append(f"written: {out / JSON_NAME}, {out / MD_NAME}, logs in {out / 'logs'}")
    return L
