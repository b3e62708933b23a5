"""Benchmark `lfm-engine merge` against mergekit-yaml on a Llama-shaped fixture.

Builds base + 3 fine-tunes (bf16, random; default ~120M parameters: hidden 1024,
8 layers, intermediate 2816, vocab 8192), then for each method times the whole
command (process start to exit, as a user sees it) of `lfm-engine merge` and, when
installed, `mergekit-yaml` on the same YAML, in the same run. Peak RSS of each
process comes from /usr/bin/time -v (or psutil polling when absent). The I/O floor
is reading every input file once plus writing the output's bytes with fsync,
measured now on the same disk and page-cache state. Outputs are compared with
mergekit's (deterministic methods: share of elements within one bf16 ulp; random
methods: the task-vector norm ratio and correlation, since the masks come from
different generators by design, docs/spec/merge.md).

--devices cpu,cuda also times `lfm-engine merge --device cuda` (provider "lfm-engine cuda": the
tensors are read into pinned memory, copied to the GPU on a side stream and merged there by
the default GPU backend) on the same YAML; "lfm-engine" is the CPU run.

--size 1b is the ~1B-parameter fixture (~8 GB): generated once into --cache and reused,
skipped (exit 0, with a message) when the disk is short. --cold evicts the inputs from the
page cache before every timed run and before the I/O floor, so the floor is the disk's read
bandwidth and every tool reads from the disk.

    python bench/bench_merge_models.py [--size full|small|1b] [--methods ties,...] [--devices cpu,cuda]
                                       [--cold] [--cache DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a source checkout ROOT is the repo (tests/fixtures_models.py, lfm_engine/); in an
# installed package this file is lfm_engine/bench_suites/ and the fixtures come from
# lfm_engine.demo.data (same folder layout; its random_weights has no `scale`).
SOURCE_TREE = os.path.isfile(os.path.join(ROOT, "lfm_engine", "__init__.py"))
if SOURCE_TREE:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)

try:
    from fixtures_models import finetune, llama_config, load_folder, random_weights, write_model  # noqa: E402
except ImportError:
    from lfm_engine.demo.data import finetune, llama_config, load_folder, write_model  # noqa: E402
    from lfm_engine.demo.data import random_weights as _random_weights  # noqa: E402

    def random_weights(cfg, seed, dtype, scale=None):
        return _random_weights(cfg, seed, dtype)
from benchlib import Report, copy_bandwidth  # noqa: E402

SIZES = {
    "full": dict(hidden=1024, layers=8, intermediate=2816, vocab=8192, heads=16, kv_heads=16),
    "small": dict(hidden=256, layers=4, intermediate=704, vocab=2048, heads=8, kv_heads=4),
    # ~1B parameters (issue 12): ~8 GB of bf16 for base + 3 fine-tunes, generated once into
    # the cache folder (--cache) and reused; skipped when the disk is short
    "1b": dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=16, kv_heads=16),
}
CACHED_SIZES = ("1b",)
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "lfm_engine", "bench_merge_models")
METHOD_PARAMS = {
    "ties": [dict(weight=0.4, density=0.5), dict(weight=0.3, density=0.5), dict(weight=0.3, density=0.5)],
    "dare_ties": [dict(weight=0.4, density=0.5), dict(weight=0.3, density=0.5), dict(weight=0.3, density=0.5)],
    "task_arithmetic": [dict(weight=0.4), dict(weight=0.3), dict(weight=0.3)],
    "della": [dict(weight=0.4, density=0.5, epsilon=0.1)] * 3,
    "breadcrumbs_ties": [dict(weight=0.4, density=0.8, gamma=0.05)] * 3,
    # the slerp family (torch path, one finiteness screen per output tensor): as many
    # models as entries here (slerp: the base and one model)
    "slerp": [{}],
    "nuslerp": [dict(weight=0.6), dict(weight=0.4)],
    "multislerp": [dict(weight=0.4), dict(weight=0.3), dict(weight=0.3)],
    "karcher": [{}] * 3,
    "model_stock": [{}] * 3,
}
METHOD_GLOBALS = {"slerp": {"t": 0.4}}
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def n_parameters(size: str) -> int:
    cfg = llama_config(**SIZES[size])
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; mlp; two norms
    return L * per_layer + 2 * v * h + h


def build_fixture(root: str, size: str) -> list:
    """base + 3 fine-tunes under root; a folder holding a complete fixture (its marker
    file, written last) is reused as it is."""
    names = ["base", "ft1", "ft2", "ft3"]
    paths = [os.path.join(root, n) for n in names]
    marker = os.path.join(root, "COMPLETE")
    if os.path.exists(marker):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    cfg = llama_config(**SIZES[size])
    base = random_weights(cfg, 0, torch.bfloat16, scale=0.02)
    write_model(paths[0], cfg, base, shards=2)
    for k in range(3):
        write_model(paths[k + 1], cfg, finetune(base, 10 + k, 0.002), shards=2)
    with open(marker, "w") as f:
        f.write(size + "\n")
    return paths


def evict(paths: list) -> None:
    """Drop the files' pages from the page cache (no root needed: fsync, then
    POSIX_FADV_DONTNEED), so the next read comes from the disk."""
    for p in paths:
        files = folder_files(p) if os.path.isdir(p) else [p]
        for fn in files:
            fd = os.open(fn, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(cmd: list, env=None) -> dict:
    """Run cmd; wall seconds and peak RSS bytes of the process tree's largest process."""
    tv = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    t0 = time.perf_counter()
    if tv:
        p = subprocess.run([tv, "-v"] + cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        rss = int(m.group(1)) * 1024 if m else -1
    else:  # psutil polling fallback
        import psutil
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ps = psutil.Process(proc.pid)
        rss = 0
        while proc.poll() is None:
            try:
                rss = max(rss, ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"seconds": wall, "rss": rss}


def folder_files(path: str) -> list:
    return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]


def io_floor(inputs: list, out_bytes: int, scratch: str) -> float:
    """Seconds to read every input safetensors file once and write out_bytes with fsync."""
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for folder in inputs:
        for fn in folder_files(folder):
            with open(fn, "rb", buffering=0) as f:
                while f.readinto(mv):
                    pass
    with open(os.path.join(scratch, "floor.bin"), "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            f.write(mv[:n])
            left -= n
        os.fsync(f.fileno())
    t = time.perf_counter() - t0
    os.remove(os.path.join(scratch, "floor.bin"))
    return t


def agreement(method: str, ours: dict, mk: dict, base: dict, fts: list, params: list) -> str:
    if set(ours) != set(mk):
        return f"tensor names differ: {sorted(set(ours) ^ set(mk))[:3]}"
    if method in RANDOM_METHODS:
        num = den_a = den_b = 0.0
        for n, b in base.items():
            da = ours[n].double() - b.double()
            db = mk[n].double() - b.double()
            num += float((da * db).sum())
            den_a += float((da * da).sum())
            den_b += float((db * db).sum())
        return (f"task-vector norm ratio {den_a ** 0.5 / den_b ** 0.5:.4f}, "
                f"correlation {num / (den_a * den_b) ** 0.5:.3f} (different RNGs by design)")
    close = total = close_nt = total_nt = 0
    worst = worst_nt = 0.0
    for n in base:
        a, b = ours[n].float(), mk[n].float()
        ulp = torch.clamp(b.abs(), min=2.0 ** -126) * 2.0 ** -7  # one bf16 ulp (upper bound)
        ok = (a - b).abs().le(ulp)
        close += int(ok.sum())
        total += a.numel()
        worst = max(worst, float((a - b).abs().max()))
        tie = tie_elements(method, base[n], [f[n] for f in fts], params)
        close_nt += int((ok & ~tie).sum())
        total_nt += int((~tie).sum())
        if (~tie).any():
            worst_nt = max(worst_nt, float((a - b).abs()[~tie].max()))
    out = f"{100.0 * close / total:.4f}% of elements within 1 bf16 ulp (max |diff| {worst:.2e})"
    if total_nt != total:
        out += (f"; away from exact magnitude ties at the selection boundary "
                f"({100.0 * (total - total_nt) / total:.2f}% of elements): "
                f"{100.0 * close_nt / max(total_nt, 1):.4f}% (max |diff| {worst_nt:.2e})")
    return out


def tie_elements(method: str, b: torch.Tensor, xs: list, params: list) -> torch.Tensor:
    """Elements where some model's |delta| equals its top-k/outlier boundary value: there
    the tie-break rule (spec: lower index wins; mergekit: sort order) decides the mask."""
    tie = torch.zeros(b.numel(), dtype=torch.bool)
    if method not in ("ties", "breadcrumbs_ties", "breadcrumbs"):
        return tie.view(b.shape)
    for x, prm in zip(xs, params):
        mag = (x.double() - b.double()).abs().flatten()
        n = mag.numel()
        srt = mag.sort().values
        from lfm_engine.core.merge_registry import DEFAULT_DENSITY, DEFAULT_GAMMA
        d = prm.get("density", DEFAULT_DENSITY)
        if method == "ties":
            k = max(1, int(d * n))
            bounds = [n - k] if k < n else []
        else:
            target = int(d * n)
            n_top = int(prm.get("gamma", DEFAULT_GAMMA) * n)
            n_bot = max(0, n - target - n_top)
            bounds = [i for i in (n_bot, n_bot + target) if 0 < i < n]
        for i in bounds:
            if srt[i - 1] == srt[i]:
                tie |= mag == srt[i]
    return tie.view(b.shape)


def _family(root: str, n: int, **cfg_kw) -> list:
    """fp32 base + n fine-tunes (what tests/fixtures_models.make_family writes), from the
    fixture functions imported above, so it also works from an installed package."""
    cfg = llama_config(**cfg_kw)
    base = random_weights(cfg, 0, torch.float32)
    paths = [write_model(os.path.join(root, "base"), cfg, base)]
    for k in range(n):
        paths.append(write_model(os.path.join(root, f"ft{k + 1}"), cfg, finetune(base, 100 + k)))
    return paths


def parity(work: str, mk_exe: str) -> list:
    """Tiny fp32 fixture, every method and parameter form we share with mergekit: max |diff|
    of every output tensor between `lfm-engine merge` and mergekit-yaml (dtype float32)."""
    from lfm_engine.merge import merge_models
    P = _family(os.path.join(work, "parity"), 3, layers=4, hidden=32, intermediate=48, vocab=64)
    B, F = P[0], P[1:]
    w3 = lambda **kw: [{"model": f, "parameters": dict(weight=w, **kw)} for f, w in zip(F, (0.2, 0.5, 0.3))]
    grad_t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    cases = {
        "linear": {"merge_method": "linear", "models": w3()},
        "task_arithmetic (gradient weight, lambda)": {
            "merge_method": "task_arithmetic", "base_model": B, "parameters": {"lambda": 0.7},
            "models": [{"model": f, "parameters": {"weight": [0.1, 0.9]}} for f in F]},
        "ties (filters, gradient density)": {
            "merge_method": "ties", "base_model": B,
            "parameters": {"density": [0.3, 0.9]},
            "models": [{"model": f, "parameters": {"weight": [{"filter": "mlp", "value": 0.8},
                                                               {"value": 0.4}]}} for f in F]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": B,
                             "models": w3(density=0.8, gamma=0.05)},
        "slerp (filtered gradient t)": {"merge_method": "slerp", "base_model": B,
                                        "models": [{"model": B}, {"model": F[0]}],
                                        "parameters": {"t": grad_t}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": B, "models": w3()[:2]},
        "nuslerp (row-wise, no base)": {"merge_method": "nuslerp", "models": w3()[:2],
                                        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "model_stock": {"merge_method": "model_stock", "base_model": B, "models": [{"model": f} for f in F]},
        "model_stock (filter_wise)": {"merge_method": "model_stock", "base_model": B,
                                      "models": [{"model": f} for f in F], "parameters": {"filter_wise": True}},
        "multislerp": {"merge_method": "multislerp", "base_model": B, "models": w3()},
        "karcher": {"merge_method": "karcher", "models": [{"model": f} for f in F]},
        "slices (ties, layer ranges)": {
            "merge_method": "ties", "base_model": B, "slices": [{"sources": [
                {"model": B, "layer_range": [0, 3]},
                {"model": F[0], "layer_range": [0, 3], "parameters": {"weight": 0.6, "density": [0.3, 0.9]}},
                {"model": F[1], "layer_range": [1, 4], "parameters": {"weight": 0.5, "density": 0.5}}]}]},
    }
    rows = []
    for i, (label, cfg) in enumerate(cases.items()):
        cfg = dict(cfg, dtype="float32")
        cp = os.path.join(work, f"parity_{i}.yml")
        with open(cp, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        o, m = os.path.join(work, f"po_{i}"), os.path.join(work, f"pm_{i}")
        merge_models(cp, o, quiet=True)
        p = subprocess.run([mk_exe, cp, m, "--no-copy-tokenizer", "--quiet"], capture_output=True, text=True)
        if p.returncode:
            rows.append((label, "mergekit failed: " + p.stderr.strip().splitlines()[-1][:80]))
            continue
        a, b = load_folder(o), load_folder(m)
        if set(a) != set(b):
            rows.append((label, f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"))
            continue
        diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
        rows.append((label, f"{len(a)} tensors, max |diff| {diff:.1e}"))
        shutil.rmtree(o, ignore_errors=True)
        shutil.rmtree(m, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--methods", default=",".join(METHOD_PARAMS))
    ap.add_argument("--workdir", default=None, help="fixture folder (default: a temp folder)")
    ap.add_argument("--devices", default="cpu",
                    help="comma list of cpu, cuda: `lfm-engine merge --device D` for each (default cpu)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--reps", type=int, default=3,
                    help="runs of lfm-engine and of the I/O floor per method, the median reported "
                         "(mergekit runs once: it takes 15-300 s)")
    ap.add_argument("--cache", default=DEFAULT_CACHE,
                    help=f"where the {', '.join(CACHED_SIZES)} fixture is generated once and reused")
    ap.add_argument("--cold", action="store_true",
                    help="evict the inputs from the page cache before every timed run and the I/O "
                         "floor (posix_fadvise DONTNEED): the disk's read bandwidth is then the floor")
    ap.add_argument("--no-fp32-check", action="store_true",
                    help="skip the extra (untimed) mergekit run in fp32 used to check agreement")
    ap.add_argument("--json", default=None)
    ap.add_argument("--parity", action="store_true",
                    help="only compare outputs with mergekit on a tiny fp32 fixture, every method")
    args = ap.parse_args(argv)
    if args.parity:
        mk = shutil.which("mergekit-yaml")
        if not mk:
            print("mergekit-yaml is not installed")
            return 1
        work = tempfile.mkdtemp(prefix="lfm_parity_")
        try:
            print(f"{'config':<44} result vs mergekit (dtype float32)")
            for label, res in parity(work, mk):
                print(f"{label:<44} {res}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    unknown = [m for m in args.methods.split(",") if m not in METHOD_PARAMS]
    if unknown or not args.methods:
        print(f"bench_merge_models: --methods takes a comma list of {', '.join(METHOD_PARAMS)}; "
              f"unknown: {', '.join(unknown) or '(empty)'}", file=sys.stderr)
        return 2
    devices = [d for d in args.devices.split(",") if d]
    bad = [d for d in devices if d not in ("cpu", "cuda")]
    if bad or not devices:
        print(f"bench_merge_models: --devices takes cpu and/or cuda, got {args.devices!r}", file=sys.stderr)
        return 2
    if "cuda" in devices and not torch.cuda.is_available():
        print("bench_merge_models: no CUDA GPU here; --devices cuda skipped", file=sys.stderr)
        devices.remove("cuda")
        if not devices:
            return 0
    work = args.workdir or tempfile.mkdtemp(prefix="lfm_bench_merge_")
    os.makedirs(work, exist_ok=True)
    n_params = n_parameters(args.size)
    cached = args.size in CACHED_SIZES
    models_dir = os.path.join(args.cache, args.size) if cached else os.path.join(work, "models")
    fixture_bytes = 4 * 2 * n_params
    # the fixture (unless cached already), one output of ours and one of mergekit's, 10% spare
    need = (0 if os.path.exists(os.path.join(models_dir, "COMPLETE")) else fixture_bytes) + 2 * 2 * n_params
    os.makedirs(models_dir, exist_ok=True)
    free = min(shutil.disk_usage(models_dir).free, shutil.disk_usage(work).free)
    if free < 1.1 * need:
        print(f"bench_merge_models: skipped: the {args.size} fixture needs {need / 1e9:.1f} GB of disk, "
              f"{free / 1e9:.1f} GB free", file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    try:
        t0 = time.perf_counter()
        paths = build_fixture(models_dir, args.size)
        print(f"# fixture: {n_params / 1e6:.1f}M parameters x 4 models (bf16), "
              f"{'in ' + models_dir if cached else 'built'} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        mk_exe = None if args.no_mergekit else shutil.which("mergekit-yaml")
        # the whole models in memory only to compare outputs with mergekit's; not for the
        # cached (~1B) fixture, whose four models would not fit next to mergekit's run
        compare = mk_exe is not None and not cached
        base = load_folder(paths[0]) if compare else None
        fts = [load_folder(p) for p in paths[1:]] if compare else None
        cli_mod = "lfm_engine.cli"
        env = dict(os.environ)
        if SOURCE_TREE:  # run the checkout's lfm_engine; an installed one needs no path
            env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        # time the command as an installed package runs: pip writes the bytecode at install
        # time, while a source tree run under PYTHONDONTWRITEBYTECODE (or read-only) compiles
        # every module at every start (~50 ms of the ~0.2 s startup on the 2-core VM)
        import compileall
        import lfm_engine

        compileall.compile_dir(os.path.dirname(lfm_engine.__file__), quiet=2)  # read-only: as it is
        report = Report(f"lfm-engine merge vs mergekit-yaml ({args.size} fixture, "
                        f"{'cold page cache, ' if args.cold else ''}"
                        f"{n_params / 1e6:.0f}M params x 4, bf16)", "cpu", copy_bandwidth())
        rss_rows = []
        startup_rows = []
        notes = []
        for method in args.methods.split(","):
            cfg = {"merge_method": method, "base_model": paths[0],
                   "models": [{"model": p, "parameters": prm}
                              for p, prm in zip(paths[1:], METHOD_PARAMS[method])],
                   "dtype": "bfloat16"}
            if method in METHOD_GLOBALS:
                cfg["parameters"] = METHOD_GLOBALS[method]
            cfg_path = os.path.join(work, f"{method}.yml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            out = os.path.join(work, f"out_{method}")
            shutil.rmtree(out, ignore_errors=True)
            # startup to first tensor: process start, imports, config, every header and the
            # plan -- all a merge does before it reads its first tensor (a dry run stops there)
            start = min(timed([sys.executable, "-m", cli_mod, "merge", cfg_path, out, "--quiet", "--dry-run"],
                              env)["seconds"] for _ in range(3))
            startup_rows.append((method, start))
            runs = {}
            for dev in devices:
                if dev != devices[0]:
                    shutil.rmtree(out, ignore_errors=True)
                tries = []
                for _ in range(args.reps):  # the median run (one 1.5 s run varies +-15 % here)
                    shutil.rmtree(out, ignore_errors=True)
                    if args.cold:
                        evict(paths)
                    tries.append(timed([sys.executable, "-m", cli_mod, "merge", cfg_path, out, "--quiet", "--seed",
                                        "0"] + (["--device", "cuda"] if dev == "cuda" else []), env))
                tries.sort(key=lambda r: r["seconds"])
                runs[dev] = dict(tries[len(tries) // 2], rss=max(r["rss"] for r in tries))
            files = folder_files(out)
            out_bytes = sum(os.path.getsize(f) for f in files)
            in_bytes = sum(os.path.getsize(f) for p in paths for f in folder_files(p))
            moved = in_bytes + out_bytes
            floors = []
            for _ in range(args.reps):
                if args.cold:
                    evict(paths)
                floors.append(io_floor(paths, out_bytes, work))
            floor = sorted(floors)[len(floors) // 2]
            report.add(method, "io-floor", floor, moved)
            for dev, run in runs.items():
                prov = "lfm-engine" if dev == "cpu" else "lfm-engine cuda"
                report.add(method, prov, run["seconds"], moved, rss=run["rss"])
                rss_rows.append((method, prov, run["seconds"], run["rss"], run["seconds"] / floor))
            if mk_exe:
                out_mk = os.path.join(work, f"mk_{method}")
                shutil.rmtree(out_mk, ignore_errors=True)
                if args.cold:
                    evict(paths)
                mk = timed([mk_exe, cfg_path, out_mk, "--no-copy-tokenizer", "--quiet",
                            "--random-seed", "0", "--no-write-model-card"])
                report.add(method, "mergekit", mk["seconds"], moved, rss=mk["rss"])
                rss_rows.append((method, "mergekit", mk["seconds"], mk["rss"], mk["seconds"] / floor))
                if not compare:
                    notes.append(f"{method}: outputs not compared with mergekit's on the {args.size} fixture "
                                 f"(memory); see the full fixture's agreement")
                    shutil.rmtree(out_mk, ignore_errors=True)
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                ours_t = load_folder(out)
                notes.append(f"{method} vs mergekit (dtype bfloat16, its arithmetic in bf16): "
                             f"{agreement(method, ours_t, load_folder(out_mk), base, fts, METHOD_PARAMS[method])}")
                shutil.rmtree(out_mk, ignore_errors=True)
                if method not in RANDOM_METHODS and not args.no_fp32_check:
                    # mergekit computing in fp32 (rounding once, like us): masks should match
                    cfg32 = dict(cfg, dtype="float32", out_dtype="bfloat16")
                    c32 = os.path.join(work, f"{method}_fp32.yml")
                    with open(c32, "w") as f:
                        yaml.safe_dump(cfg32, f, sort_keys=False)
                    timed([mk_exe, c32, out_mk, "--no-copy-tokenizer", "--quiet", "--random-seed", "0",
                           "--no-write-model-card"])
                    notes.append(f"{method} vs mergekit (dtype float32, out_dtype bfloat16): "
                                 f"{agreement(method, ours_t, load_folder(out_mk), base, fts, METHOD_PARAMS[method])}")
                    shutil.rmtree(out_mk, ignore_errors=True)
                del ours_t
            shutil.rmtree(out, ignore_errors=True)
        print(report.table(baseline="mergekit" if mk_exe else "io-floor"))
        print()
        print(f"{'method':<18} {'provider':<16} {'wall s':>8} {'peak RSS MB':>12} {'x I/O floor':>12}")
        for m, prov, s, rss, xf in rss_rows:
            print(f"{m:<18} {prov:<16} {s:8.2f} {rss / 1e6:12.0f} {xf:12.2f}")
        print(f"\n{'method':<18} startup to first tensor (dry run, best of 3), s")
        for m, st in startup_rows:
            print(f"{m:<18} {st:8.3f}")
        if notes:
            print("\n# agreement with mergekit")
            for n in notes:
                print(n)
        else:
            print("\n# mergekit-yaml not installed: no comparison")
        if args.json:
            js = report.to_json()
            js["rss"] = [dict(method=m, provider=p, seconds=s, peak_rss=r, x_io_floor=x)
                         for m, p, s, r, x in rss_rows]
            js["agreement"] = notes
            js["startup"] = [dict(method=m, seconds=st) for m, st in startup_rows]
            with open(args.json, "w") as f:
                json.dump(js, f, indent=2)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
