"""Budgets and subprocesses for the GPU check: every command runs in its own process group
with a timeout, its output appended to the step's log, and is killed whole when time is up."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


class Budget:
    """The whole check's wall-time budget. `reserve_s` stays for writing the report."""

    def __init__(self, total_s: float, reserve_s: float = 10.0):
        self.total_s = float(total_s)
        self.reserve_s = float(reserve_s)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def grant(self, want_s: float) -> float:
        """Seconds a step or command may run now: what it asks for, within what is left."""
        return max(0.0, min(float(want_s), self.left() - self.reserve_s))


@dataclass
class Proc:
    cmd: list
    rc: Optional[int]          # None: not started or killed at the timeout
    seconds: float
    timed_out: bool
    output: str                # what the command printed (stdout and stderr, interleaved)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def run(cmd: Sequence[str], *, log: Path, timeout: float, cwd: Path, env: Optional[dict] = None,
        echo: bool = True, interrupt_grace: float = 0.0) -> Proc:
    """Run cmd with stdout+stderr appended to `log`; at `timeout` seconds its whole process
    group gets SIGTERM, then SIGKILL 5 s later. A timeout <= 0 does not start it.

    interrupt_grace > 0: at the timeout send SIGINT first and give the command that long to
    finish (pytest then stops like on Ctrl-C and still writes its JUnit report of the tests
    run so far); the caller keeps that grace out of `timeout`."""
    cmd = [str(c) for c in cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        start_at = f.tell()
        f.write(f"\n$ {shlex.join(cmd)}    # cwd {cwd}, timeout {timeout:.0f} s\n".encode())
        f.flush()
        if echo:
            print(f"  $ {_short(cmd)}  (timeout {timeout:.0f} s)", flush=True)
        if timeout <= 0:
            f.write(b"not started: no time left in the budget\n")
            return Proc(cmd, None, 0.0, True, "not started: no time left in the budget")
        t0 = time.monotonic()
        timed_out = False
        try:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(cwd),
                                 env=env, start_new_session=True)
        except OSError as exc:
            f.write(f"could not start: {exc}\n".encode())
            return Proc(cmd, None, 0.0, False, f"could not start: {exc}")
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = None
            if interrupt_grace > 0:
                f.write(f"# time limit reached: SIGINT, {interrupt_grace:.0f} s to wrap up\n".encode())
                f.flush()
                try:
                    os.killpg(p.pid, signal.SIGINT)
                    p.wait(timeout=interrupt_grace)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            _kill_group(p)  # the whole group, also what outlived its leader (xdist workers)
        seconds = time.monotonic() - t0
        f.write(f"# exit {rc if rc is not None else 'killed at the timeout'} after {seconds:.1f} s\n".encode())
    with open(log, "rb") as f:
        f.seek(start_at)
        output = f.read().decode(errors="replace")
    if echo:
        print(f"    -> {'timeout' if timed_out else f'exit {rc}'} in {seconds:.1f} s", flush=True)
    return Proc(cmd, rc, seconds, timed_out, output)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM to the process group this check started (its own session), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _short(cmd: list, width: int = 150) -> str:
    s = shlex.join(cmd)
    return s if len(s) <= width else s[: width - 3] + "..."


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
