"""Open client-supplied adapter folders with bounded work: in a worker process, with a timeout.

A PEFT config's ``target_modules`` / ``rank_pattern`` are regular expressions, and Python's
``re`` holds the GIL and cannot be interrupted: one catastrophic pattern matched against
the module names would freeze the HTTP loop and the engine in the same process. So the
server reads the folder (`peft_format.open_adapter`: config, patterns, tensor metadata) in a
separate process and waits at most ``timeout`` seconds; a worker past its time is killed
(and replaced on the next call) and the folder is refused with AdapterFormatError. The
resulting AdapterSpec (plain data) comes back pickled and the pool loads it without
matching anything again.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Optional

from .peft_format import AdapterFormatError, AdapterSpec


def _worker(conn) -> None:  # runs in the child process
    from .peft_format import open_adapter

    while True:
        try:
            folder = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", open_adapter(folder)))
        except BaseException as e:  # noqa: BLE001 - sent back to the server as is
            conn.send(("err", (type(e).__name__, str(e))))


class AdapterChecker:
    """One worker process, used one folder at a time (a lock); start() warms it up."""

    def __init__(self, timeout: float = 10.0):
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._proc: Optional[mp.Process] = None
        self._conn = None

    def start(self) -> None:
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._proc is None or not self._proc.is_alive():
            ctx = mp.get_context("spawn")  # no fork of a process with threads and torch state
            parent, child = ctx.Pipe()
            self._proc = ctx.Process(target=_worker, args=(child,), name="lfm-adapter-check", daemon=True)
            self._proc.start()
            child.close()
            self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        self._proc = self._conn = None

    def open(self, folder: str, first_call_grace: float = 60.0) -> AdapterSpec:
        """open_adapter(folder) in the worker. Raises what it raised (FileNotFoundError,
        AdapterFormatError, ...) or AdapterFormatError when it took longer than `timeout`."""
        with self._lock:
            fresh = self._proc is None or not self._proc.is_alive()
            self._ensure()
            self._conn.send(folder)
            # a fresh worker first imports torch: that start-up time is not the folder's fault
            if not self._conn.poll(self.timeout + (first_call_grace if fresh else 0.0)):
                self._kill()
                raise AdapterFormatError(
                    f"{folder}: reading the adapter config took more than {self.timeout:g} s (a target_modules "
                    "or rank_pattern regex with catastrophic backtracking?); refused")
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                self._kill()
                raise AdapterFormatError(f"{folder}: the adapter checker process died reading it") from None
        if kind == "ok":
            return value
        name, msg = value
        exc = {"FileNotFoundError": FileNotFoundError, "NotADirectoryError": FileNotFoundError,
               "PermissionError": PermissionError}.get(name, AdapterFormatError)
        raise exc(msg)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                try:
                    self._conn.close()
                except OSError:
                    pass
                self._proc.join(2)
                if self._proc.is_alive():
                    self._kill()
            self._proc = self._conn = None
