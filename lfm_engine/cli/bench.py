"""`lfm-engine bench`: run every benchmark suite at a size that suits this machine.

    lfm-engine bench [--quick | --full] [--only merge,lora,...] [--json FILE] [--plot FILE.png]

Suites are the bench/bench_<name>.py scripts (each has ``main(argv)`` and ``--json``). They
are looked up first in the installed package (lfm_engine/bench_suites/, copied there by the
CMake install rule), then in the source checkout's bench/ folder (``--suites-dir`` names
another folder). Each suite runs in this process, one after the other, prints its own
table, and writes its JSON report into a temporary file; the reports are combined into one
JSON document:

    {"lfm_engine": version, "build": build_info(), "mode": "quick", "date": ..., "machine": ...,
     "suites": {name: {"argv": [...], "seconds": wall time, "status": "ok" | "skipped" | "failed",
                       "reason": why skipped/failed, "report": the suite's own JSON}}}

Sizes (decided here; the suites' defaults are sized for a large machine):
    quick     a few seconds to a minute per suite: one small shape per kernel. The default
              on machines without CUDA.
    standard  the suites' own defaults (7B-layer shapes). The default when CUDA is present.
    full      the suites' defaults plus their optional extra cases (GPU streamed merge).
bench_merge_gpu runs only when CUDA is available; bench_serve needs transformers and peft;
bench_merge_models compares with mergekit-yaml when it is installed.

``--plot FILE.png`` (needs matplotlib: ``pip install "lfm_engine[bench]"``) draws two panels
from the combined JSON: the fraction of the copy bandwidth measured in the same run that each
of our kernels reaches (one pass over its inputs; the lighter bar, where the suite reports
it, counts every pass the kernel streams), and our speed-up over each suite's baselines
(plain torch, PEFT, mergekit) on a log scale.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

SUITE_ORDER = ["merge", "merge_gpu", "lora", "skinny_linear", "codec", "merge_models", "serve", "quality"]

# Arguments per size. None = the suite's own defaults.
PRESETS: Dict[str, Dict[str, Optional[List[str]]]] = {
    "quick": {
        "merge": ["--shapes", "1024x1024", "--reps", "2"],
        "merge_gpu": ["--shapes", "4096x4096", "--reps", "5"],
        "lora": ["--hidden", "1024", "--tokens", "1,16,64", "--prefill", "128x4", "--reps", "3"],
        "skinny_linear": ["--quick"],
        "codec": ["--size", "1024", "--quality-shape", "256", "1024", "--slots", "4", "--tokens", "8"],
        "merge_models": ["--size", "small", "--methods", "ties", "--no-fp32-check"],
        "serve": ["--quick"],
        "quality": ["--quick"],
    },
    "standard": {name: [] for name in SUITE_ORDER},
    "full": {name: ([] if name != "merge_gpu" else ["--stream"]) for name in SUITE_ORDER},
}

# The providers that are "ours" and the baselines each suite compares against (plot panel 2).
OURS = ("ours-cpu", "ours-cuda", "ours-triton", "lfm cpu", "lfm", "lfm-engine", "batched delta")
BASELINES = {
    "merge": ["torch-multipass"],
    "merge_gpu": ["torch-multipass"],
    "lora": ["torch-per-adapter", "torch-gather-bmm"],
    "skinny_linear": ["torch-linear"],
    "codec": ["torch reference", "separate models", "decode+matmul"],
    "merge_models": ["mergekit"],
    "serve": ["peft"],
    "quality": [],
}
# Suites whose bytes are not a bandwidth-bound kernel's traffic: left out of panel 1.
NO_BANDWIDTH = {"merge_models", "serve", "quality"}


class SuiteError(RuntimeError):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="run the benchmark suites (tables, combined JSON, optional PNG plot)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes (default without CUDA)")
    size.add_argument("--standard", dest="mode", action="store_const", const="standard",
                      help="the suites' default 7B-layer sizes (default with CUDA)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="default sizes plus optional extra cases")
    p.add_argument("--only", default=None, metavar="SUITES",
                   help=f"comma list of suites to run (of {','.join(SUITE_ORDER)})")
    p.add_argument("--json", default=None, metavar="FILE", help="write the combined JSON report here")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw bandwidth and speed-up charts (matplotlib)")
    p.add_argument("--markdown", default=None, metavar="FILE.md",
                   help="write the results as Markdown tables with machine and date (e.g. bench/RESULTS.md)")
    p.add_argument("--suite-args", action="append", default=[], metavar="SUITE=ARGS",
                   help="extra arguments for one suite, appended after the preset "
                        "(e.g. --suite-args 'merge=--shapes 256x256 --methods ties')")
    p.add_argument("--suites-dir", default=None, help="folder holding bench_<name>.py (default: auto)")
    p.add_argument("--list", action="store_true", help="list the suites found and the arguments each would get")
    return p


# ----------------------------------------------------------------------------- finding suites


def suite_dirs(explicit: Optional[str] = None) -> List[Path]:
    """Folders searched for bench_<name>.py, in order: --suites-dir, the installed copy
    (lfm_engine/bench_suites), the source checkout's bench/."""
    pkg = Path(__file__).resolve().parent.parent  # lfm_engine/
    if explicit:
        return [Path(explicit)]
    return [pkg / "bench_suites", pkg.parent / "bench"]


def find_suites(explicit: Optional[str] = None) -> Dict[str, Path]:
    """{suite name: file} from the first folder that has any bench_*.py."""
    for d in suite_dirs(explicit):
        files = sorted(d.glob("bench_*.py")) if d.is_dir() else []
        if files:
            found = {f.stem[len("bench_"):]: f for f in files}
            # known suites in their order, then any new ones alphabetically
            return {n: found[n] for n in SUITE_ORDER if n in found} | \
                {n: f for n, f in found.items() if n not in SUITE_ORDER}
    where = ", ".join(str(d) for d in suite_dirs(explicit))
    raise SuiteError(f"no benchmark suites (bench_*.py) found in {where}; reinstall lfm_engine or run from "
                     "the source checkout")


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"lfm_bench_suite_{name}", path)
    if spec is None or spec.loader is None:
        raise SuiteError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    # suites import their shared helpers (benchlib.py) from their own folder
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "main", None)):
        raise SuiteError(f"{path} has no main(argv)")
    return mod


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _skip_reason(name: str) -> Optional[str]:
    """Why a suite cannot run on this machine (None: it can)."""
    if name == "merge_gpu" and not _cuda_available():
        return "no CUDA GPU on this machine"
    if name == "serve":
        missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {' and '.join(missing)} (pip install \"lfm_engine[test]\")"
    if name == "quality":
        from lfm_engine.models import example, finetunes

        if not example.is_cached() or not finetunes.is_built(finetunes.finetunes_dir()):
            return ("needs the example model and its fine-tunes (lfm-engine fetch-example-model; "
                    "python tools/build_example_finetunes.py)")
        missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            return f"needs {' and '.join(missing)} (pip install \"lfm_engine[test]\")"
    return None


def parse_suite_args(specs: List[str], known) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for s in specs:
        name, sep, rest = s.partition("=")
        if not sep or not name:
            raise SuiteError(f"--suite-args expects SUITE=ARGS, got {s!r}")
        if name not in known:
            raise SuiteError(f"--suite-args names unknown suite {name!r} (known: {', '.join(known)})")
        out.setdefault(name, []).extend(shlex.split(rest))
    return out


# ----------------------------------------------------------------------------- running


def run_suite(name: str, path: Path, argv: List[str]) -> dict:
    """Run one suite in this process; its stdout goes to ours. Returns the JSON entry."""
    t0 = time.perf_counter()
    entry = {"argv": list(argv), "file": str(path)}
    reason = _skip_reason(name)
    if reason:
        entry.update(status="skipped", reason=reason, seconds=0.0)
        return entry
    with tempfile.TemporaryDirectory(prefix="lfm_bench_") as tmp:
        jpath = os.path.join(tmp, f"{name}.json")
        try:
            mod = _load_module(name, path)
            rc = mod.main(list(argv) + ["--json", jpath])
        except SystemExit as e:  # argparse errors and sys.exit inside a suite
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # a failing suite must not stop the others
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            return entry
        entry["seconds"] = time.perf_counter() - t0
        if rc not in (0, None):
            entry.update(status="failed", reason=f"exit status {rc}")
        elif not os.path.exists(jpath):
            # bench_merge_gpu exits 0 without numbers when it finds no usable GPU
            entry.update(status="skipped", reason="the suite measured nothing on this machine")
        else:
            with open(jpath) as f:
                entry.update(status="ok", report=json.load(f))
    return entry


def machine_description() -> str:
    """CPU model, cores, OS; and the load average, since other work on the machine skews timings."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    if hasattr(os, "getloadavg"):
        desc += f"; load average at start {os.getloadavg()[0]:.1f}"
    return desc


def default_mode() -> str:
    return "standard" if _cuda_available() else "quick"


def collect(results: dict) -> dict:
    """(bandwidth rows, speed-up rows) for the plot, from the combined JSON."""
    bw, sp = [], []
    for suite, entry in results["suites"].items():
        rep = entry.get("report")
        if not rep or "rows" not in rep:
            continue
        rows = rep["rows"]
        copy_gbps = rep.get("copy_bw_gbps") or 0.0
        by_case: Dict[str, Dict[str, float]] = {}
        for r in rows:
            by_case.setdefault(r["case"], {})[r["provider"]] = r["seconds"]
        for r in rows:
            if r["provider"] not in OURS:
                continue
            label = f"{suite}: {r['case']} [{r['provider']}]"
            if suite not in NO_BANDWIDTH and r.get("nbytes", 0) > 0 and copy_gbps > 0:
                pp = (r.get("extra") or {}).get("per_pass_gbps")
                bw.append(dict(label=label, frac=r["frac_copy"], per_pass=(pp / copy_gbps) if pp else None))
            for b in BASELINES.get(suite, []):
                tb = by_case.get(r["case"], {}).get(b)
                if tb and r["seconds"] > 0:
                    sp.append(dict(label=label, baseline=b, speedup=tb / r["seconds"]))
    return {"bandwidth": bw, "speedup": sp}


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SuiteError('--plot needs matplotlib: pip install "lfm_engine[bench]" (or pip install matplotlib)') \
            from None
    data = collect(results)
    bw, sp = data["bandwidth"], data["speedup"]
    if not bw and not sp:
        raise SuiteError("--plot: no suite produced rows to draw")
    sp_labels = list(dict.fromkeys(s["label"] for s in sp))
    h1 = max(2.0, 0.28 * len(bw) + 1.2)
    h2 = max(2.0, 0.28 * len(sp_labels) + 1.2)
    fig, axes = plt.subplots(2, 1, figsize=(11, h1 + h2), gridspec_kw={"height_ratios": [h1, h2]})
    machine = results.get("machine", "")
    fig.suptitle(f"lfm_engine {results.get('lfm_engine', '')} bench ({results.get('mode')}) — {machine}, "
                 f"{results.get('date', '')}", fontsize=10)
    ax = axes[0]
    if bw:
        y = range(len(bw))
        if any(b["per_pass"] for b in bw):
            ax.barh(list(y), [100 * (b["per_pass"] or 0) for b in bw], color="#a6c8e8",
                    label="all passes streamed / copy")
        ax.barh(list(y), [100 * b["frac"] for b in bw], color="#1f5f9f", height=0.5,
                label="one pass over inputs+output / copy")
        ax.set_yticks(list(y))
        ax.set_yticklabels([b["label"] for b in bw], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="k", lw=0.8, ls="--")
        ax.set_xlabel("% of the copy bandwidth measured in the same run")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no bandwidth rows", ha="center", va="center")
    ax.set_title("Fraction of copy bandwidth per kernel", fontsize=9)
    ax = axes[1]
    if sp:
        baselines = list(dict.fromkeys(s["baseline"] for s in sp))
        colors = plt.get_cmap("tab10")
        per_label: Dict[str, list] = {}
        for s in sp:
            per_label.setdefault(s["label"], []).append(s)
        drawn = set()
        for i, lab in enumerate(sp_labels):
            pts = per_label[lab]
            hgt = 0.8 / len(pts)
            for j, s in enumerate(pts):
                c = baselines.index(s["baseline"])
                # bars grow from 1x: right = faster than the baseline, left = slower
                ax.barh(i - 0.4 + hgt * (j + 0.5), s["speedup"] - 1.0, left=1.0, height=hgt * 0.9,
                        color=colors(c % 10), label=None if s["baseline"] in drawn else f"vs {s['baseline']}")
                drawn.add(s["baseline"])
                ax.text(max(s["speedup"], 1.0) * 1.05, i - 0.4 + hgt * (j + 0.5), f"{s['speedup']:.1f}x",
                        va="center", fontsize=5.5)
        ax.set_yticks(range(len(sp_labels)))
        ax.set_yticklabels(sp_labels, fontsize=7)
        ax.set_ylim(len(sp_labels) - 0.5, -0.5)
        ax.set_xscale("log")
        lo = min(s["speedup"] for s in sp)
        hi = max(s["speedup"] for s in sp)
        ax.set_xlim(min(0.5, lo / 1.5), max(2.0, hi * 3))
        ax.axvline(1, color="k", lw=0.8, ls="--")
        ax.set_xlabel("speed-up (baseline time / our time), log scale")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no baseline rows", ha="center", va="center")
    ax.set_title("Speed-up vs baselines and peers", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    # long case labels: make sure the left margin holds them (about 0.055 in per 7-pt character)
    longest = max(len(x["label"]) for x in bw + sp)
    fig.subplots_adjust(left=max(fig.subplotpars.left, min(0.55, (0.2 + 0.055 * longest) / 11)))
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    """The combined results as Markdown: one table per suite, with the machine and date."""
    b = results.get("build", {})
    lines = [f"# Benchmark results ({results.get('mode')} sizes)", "",
             f"- date: {results.get('date')}",
             f"- machine: {results.get('machine')}",
             f"- lfm_engine {results.get('lfm_engine')} (SIMD {b.get('simd')}, CUDA {'on' if b.get('cuda') else 'off'}), "
             f"Python {results.get('python')}",
             f"- command: `lfm-engine bench --{results.get('mode')}` "
             f"({results.get('seconds', 0.0):.0f} s in all)", "",
             "Columns: time = median wall time; GB/s = the bytes the case must move (inputs read once, "
             "output written once) / time; % copy = that rate / the copy bandwidth measured in the same "
             "run on the same device; speed-up = the baseline's time / this row's time for the same case.", ""]
    for name, e in results["suites"].items():
        lines.append(f"## {name}")
        lines.append("")
        if e["status"] != "ok":
            lines += [f"{e['status']}: {e.get('reason')}", ""]
            continue
        rep = e["report"]
        lines.append(f"`{Path(e['file']).name} {' '.join(e['argv'])}`: {rep.get('title', '')}; device "
                     f"{rep.get('device', '?')}, copy bandwidth {rep.get('copy_bw_gbps', 0.0):.1f} GB/s")
        lines.append("")
        base = BASELINES.get(name, [])
        by_case: Dict[str, Dict[str, float]] = {}
        for r in rep.get("rows", []):
            by_case.setdefault(r["case"], {})[r["provider"]] = r["seconds"]
        lines.append("| case | provider | time ms | GB/s | % copy | " + " | ".join(f"vs {x}" for x in base) + " |")
        lines.append("|---|---|---:|---:|---:|" + "---:|" * len(base))
        for r in rep.get("rows", []):
            gbps = f"{r['gbps']:.2f}" if r.get("nbytes") else "–"
            frac = f"{100 * r['frac_copy']:.1f}%" if r.get("nbytes") else "–"
            sps = []
            for x in base:
                tb = by_case[r["case"]].get(x)
                sps.append(f"{tb / r['seconds']:.1f}x" if tb and r["provider"] in OURS and r["seconds"] > 0 else "")
            lines.append(f"| {r['case']} | {r['provider']} | {r['seconds'] * 1e3:.3f} | {gbps} | {frac} | "
                         + " | ".join(sps) + " |")
        if rep.get("quality"):
            lines += ["", "quality (bits/param vs relative error ||d - d_hat|| / ||d||; ratio vs the bf16 delta):", "",
                      "| codec | options | bits/param | ratio | rel. err |", "|---|---|---:|---:|---:|"]
            for q in rep["quality"]:
                lines.append(f"| {q['codec']} | {json.dumps(q['options'])} | {q['bits_per_param']:.3f} | "
                             f"{q['ratio']:.2f}x | {q['rel_error']:.4f} |")
            lines.append("")
        for key in ("agreement",):
            if rep.get(key):
                lines += ["", f"{key}:", ""]
                for q in rep[key]:
                    lines.append(f"- {json.dumps(q) if isinstance(q, dict) else q}")
                lines.append("")
        if lines[-1] != "":
            lines.append("")
    return "\n".join(lines)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run(args) -> int:
    import lfm_engine

    try:
        suites = find_suites(args.suites_dir)
        if args.only:
            wanted = [s.strip() for s in args.only.split(",") if s.strip()]
            unknown = [s for s in wanted if s not in suites]
            if unknown:
                raise SuiteError(f"--only: unknown suite(s) {', '.join(unknown)} (found: {', '.join(suites)})")
            suites = {n: p for n, p in suites.items() if n in wanted}
        extra = parse_suite_args(args.suite_args, list(find_suites(args.suites_dir)))
        for opt in ("json", "plot", "markdown"):  # fail before an hour of benchmarks, not after
            path = getattr(args, opt)
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise SuiteError(f"--{opt} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise SuiteError('--plot needs matplotlib: pip install "lfm_engine[bench]" (or pip install '
                                 'matplotlib)') from None
    except SuiteError as e:
        print(f"lfm-engine bench: {e}", file=sys.stderr)
        return 2
    mode = args.mode or default_mode()
    argvs = {n: list(PRESETS[mode].get(n) or []) + extra.get(n, []) for n in suites}
    if args.list:
        for n, p in suites.items():
            reason = _skip_reason(n)
            print(f"{n:<14} {p}  {' '.join(argvs[n])}" + (f"   (skipped: {reason})" if reason else ""))
        return 0
    info = lfm_engine.build_info()
    results = {"lfm_engine": lfm_engine.__version__, "build": info, "mode": mode,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": machine_description(),
               "python": platform.python_version(), "suites": {}}
    print(f"lfm-engine bench ({mode}): {', '.join(suites)}  [suites from {next(iter(suites.values())).parent}]")
    print(f"machine: {results['machine']}")
    t0 = time.perf_counter()
    for name, path in suites.items():
        print(f"\n===== {name}: {path.name} {' '.join(argvs[name])}", flush=True)
        entry = run_suite(name, path, argvs[name])
        results["suites"][name] = entry
        if entry["status"] != "ok":
            print(f"----- {name}: {entry['status']} ({entry.get('reason')})", flush=True)
        else:
            print(f"----- {name}: {entry['seconds']:.1f} s", flush=True)
    total = time.perf_counter() - t0
    results["seconds"] = total
    print(f"\n{'suite':<14}{'status':<9}{'seconds':>9}")
    for n, e in results["suites"].items():
        print(f"{n:<14}{e['status']:<9}{e.get('seconds', 0.0):>9.1f}" + (f"  {e['reason']}" if e.get("reason") else ""))
    if args.json:
        _write_json(args.json, results)
        print(f"combined JSON: {args.json}")
    if args.markdown:
        _write_text(args.markdown, markdown(results))
        print(f"markdown: {args.markdown}")
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        except SuiteError as e:
            print(f"lfm-engine bench: {e}", file=sys.stderr)
            return 2
    return 1 if any(e["status"] == "failed" for e in results["suites"].values()) else 0
