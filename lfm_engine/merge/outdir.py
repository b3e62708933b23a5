"""Writing an output folder all at once: build it in a temporary sibling, rename when done.

``with staged_output(out_dir) as tmp:`` yields an empty folder next to ``out_dir``; when
the block completes, an existing ``out_dir`` (only reached with ``allow_overwrite``,
checked by the caller) is removed and ``tmp`` renamed into place; on any error or
interrupt ``tmp`` is deleted, so no half-written output is ever visible.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_output(out_dir: str):
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.lexists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
