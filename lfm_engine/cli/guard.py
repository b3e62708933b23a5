"""One exit-status convention for the file-producing subcommands (compress, decompress,
extract-lora, moe; merge has its own richer mapping but the same SIGTERM rule).

``guarded(call, what)`` runs ``call()`` and maps what it raises: configuration or
input problems (MergeConfigError, CheckpointError, and the command's own
``user_errors``) -> 2 with the message; Ctrl-C or SIGTERM -> 130; anything else -> 1
naming the exception (the commands write through a temporary name, so nothing is left
behind). Returns (exit status, the call's result or None).

``thread_count`` is the argparse type of every --threads/-j option: 0 (all cores) to
MAX_THREADS, checked when the arguments are parsed rather than mid-run.

``sigterm_unwinds()`` makes SIGTERM (a job scheduler, ``kill``) raise KeyboardInterrupt
in the main thread while the block runs, so the same ``except BaseException`` clean-up
that removes temporaries on Ctrl-C runs too (Python's default for SIGTERM is to die
without unwinding). SIGKILL cannot be caught: the next run sweeps what it leaves
(lfm_engine/merge/outdir.py).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

MAX_THREADS = 1024  # the core's bound (kMaxThreads in csrc/core/thread_pool.cpp)


def thread_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if not 0 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 0 (all cores) to {MAX_THREADS}, got {n}")
    return n


@contextlib.contextmanager
def sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. tests in threads)
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def guarded(call, what: str, user_errors=()):
    from lfm_engine.core.merge_methods import MergeConfigError
    from lfm_engine.io.model_folder import CheckpointError
    try:
        with sigterm_unwinds():
            return 0, call()
    except (MergeConfigError, CheckpointError) + tuple(user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130, None
    except Exception as e:
        print(f"error: {what} failed: {type(e).__name__}: {e} (no output written)", file=sys.stderr)
        return 1, None
