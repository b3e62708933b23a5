"""examples/c/*.c as a user builds them: compiled against the installed header and liblfm
(lfm_engine.get_include() / get_library()), run, and their own verdict checked."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import lfm_engine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "c"


def _sources():
    return sorted(p.name for p in EXAMPLES.glob("*.c"))


def test_examples_exist():
    assert "merge_example.c" in _sources()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("source", _sources())
def test_c_example_builds_and_runs(source, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = Path(lfm_engine.get_library())
    exe = tmp_path / source[:-2]
    cmd = [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", str(EXAMPLES / source), "-I", lfm_engine.get_include(),
           str(lib), f"-Wl,-rpath,{lib.parent}", "-lm", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, LFM_NUM_THREADS="2")
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("OK"), res.stdout
