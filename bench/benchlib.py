"""Shared benchmark helpers: timing, copy bandwidth of this machine, tables and JSON.

Every bench/bench_<op>.py reports, in one run: our time, the baselines' times, bytes
moved, GB/s and the fraction of the machine's copy bandwidth measured in that run.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


# The merge benchmarks' methods and their parameters (bench_merge.py, bench_merge_gpu.py).
MERGE_BENCH_METHODS = ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties", "della", "linear"]


def merge_bench_kwargs(method: str) -> dict:
    """density 0.2 for the sparsifying methods, 0.5 +- 0.1 for DELLA, nothing otherwise."""
    if method.startswith("della"):
        return dict(density=0.5, epsilon=0.1)
    if method in ("task_arithmetic", "linear"):
        return {}
    return dict(density=0.2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_time(fn: Callable[[], object], *, warmup: int = 2, reps: int = 10, flush_l2: bool = True) -> float:
    """Median GPU time of fn() in seconds, one pair of CUDA events around each call.

    Before each timed call a 256 MB buffer is zeroed, which evicts the inputs of the previous
    call from L2 (50-60 MB on an H100/H200): a kernel is timed reading device memory, as in a
    model where other layers run in between, not re-reading a warm cache. The zeroing is
    queued before the start event, so it is not counted, and it keeps the GPU busy while the
    CPU queues fn's launches (a tiny kernel's launch cost is then mostly hidden, as in a
    CUDA graph). fn's host-side work that the GPU waits for is still counted.
    """
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 1, reps: int = 5,
            min_time: float = 0.0) -> float:
    """Median time of fn() in seconds: wall time on the CPU, gpu_time() (CUDA events, L2
    flushed before each call) on a CUDA device."""
    if device.startswith("cuda"):
        return gpu_time(fn, warmup=max(1, warmup), reps=max(1, reps))
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), measured now on `device`."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, reps=reps)
    return 2 * n * 4 / t


@dataclass
class Row:
    case: str
    provider: str
    seconds: float
    nbytes: int
    extra: dict = field(default_factory=dict)

    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("nan")


@dataclass
class Report:
    title: str
    device: str
    copy_bw: float  # bytes/s
    rows: list = field(default_factory=list)

    def add(self, case: str, provider: str, seconds: float, nbytes: int, **extra) -> Row:
        r = Row(case, provider, seconds, nbytes, extra)
        self.rows.append(r)
        return r

    def table(self, baseline: Optional[str] = None) -> str:
        """Text table; `speedup` is vs the `baseline` provider of the same case."""
        base = {r.case: r.seconds for r in self.rows if r.provider == baseline} if baseline else {}
        lines = [
            f"# {self.title}",
            f"# device: {self.device}; copy bandwidth measured now: {self.copy_bw / 1e9:.1f} GB/s",
            f"{'case':<34} {'provider':<16} {'time ms':>10} {'GB/s':>8} {'% copy':>7} {'speedup':>8}",
        ]
        for r in self.rows:
            sp = base.get(r.case)
            spd = f"{sp / r.seconds:7.1f}x" if sp and r.seconds > 0 else "       -"
            frac = 100.0 * r.nbytes / r.seconds / self.copy_bw if r.seconds > 0 else float("nan")
            lines.append(f"{r.case:<34} {r.provider:<16} {r.seconds * 1e3:10.3f} {r.gbps():8.2f} "
                         f"{frac:6.1f}% {spd}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "title": self.title, "device": self.device, "copy_bw_gbps": self.copy_bw / 1e9,
            "machine": platform.platform(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "rows": [dict(asdict(r), gbps=r.gbps(), frac_copy=r.nbytes / r.seconds / self.copy_bw)
                     for r in self.rows],
        }

    def write_json(self, path: Optional[str]) -> None:
        if path:
            with open(path, "w") as f:
                json.dump(self.to_json(), f, indent=2)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
