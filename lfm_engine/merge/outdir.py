"""Writing an output all at once: build it under a temporary sibling name, rename when done.

``with staged_output(out_dir) as tmp:`` yields an empty folder next to ``out_dir``; when
the block completes, an existing ``out_dir`` (only reached with ``allow_overwrite``,
checked by the caller) is removed and ``tmp`` renamed into place; on any error or
interrupt ``tmp`` is deleted, so no half-written output is ever visible.

Temporaries carry their owner's process id: ``.NAME.KIND-PID[-random|.suffix]`` beside
``NAME`` (KIND is ``tmp``, ``old`` or ``stages``). A process killed with SIGKILL (or a
machine that lost power) cannot remove its own, so every run that writes ``NAME`` first
calls :func:`sweep_stale`, which deletes the temporaries of ``NAME`` whose owner is no
longer running on this machine. A temporary of a live process (a concurrent run) is never
touched; the check is by pid on this machine, so a folder shared with other machines may
keep a temporary of a run that died elsewhere until a run on that machine sweeps it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from typing import List

TEMP_KINDS = ("tmp", "old", "stages")


class StaleTemporaryWarning(UserWarning):
    """A temporary left by a process that no longer runs was removed."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def sweep_stale(out_path) -> List[str]:
    """Remove the temporaries of ``out_path`` left by processes that no longer run; return
    their paths (each also reported once as a StaleTemporaryWarning)."""
    out_path = os.path.abspath(os.fspath(out_path))
    parent, name = os.path.split(out_path)
    pattern = re.compile(r"^\.%s\.(?:%s)-(\d{1,10})(?:[-.].*)?$" % (re.escape(name), "|".join(TEMP_KINDS)),
                         re.DOTALL)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = pattern.match(entry)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        path = os.path.join(parent, entry)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue  # another run swept it first
        except OSError as exc:
            warnings.warn(f"could not remove {path}, left by process {pid} which is no longer running: {exc}",
                          StaleTemporaryWarning, stacklevel=2)
            continue
        removed.append(path)
        warnings.warn(f"removed {path}, a temporary left by process {pid} which is no longer running "
                      "(killed mid-write?)", StaleTemporaryWarning, stacklevel=2)
    return removed


def make_temp_dir(out_path, kind: str = "tmp") -> str:
    """A new empty folder ``.NAME.KIND-PID-xxxxxxxx`` beside ``out_path`` (0700, as
    mkdtemp makes it), after sweeping stale temporaries of ``out_path``."""
    assert kind in TEMP_KINDS, kind
    out_path = os.path.abspath(os.fspath(out_path))
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    sweep_stale(out_path)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.{kind}-{os.getpid()}-", dir=parent)


@contextlib.contextmanager
def staged_output(out_dir: str):
    out_dir = os.path.abspath(out_dir)
    tmp = make_temp_dir(out_dir)
    try:
        yield tmp
        if os.path.lexists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
