"""The C ABI as an embedder sees it: compile tests/capi/*.c against the installed
header and liblfm, run, and check the program's own verdict."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import lfm_engine

HERE = Path(__file__).parent / "capi"


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("source", sorted(p.name for p in HERE.glob("*.c")))
def test_c_program(source, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = Path(lfm_engine.get_library())
    exe = tmp_path / source.replace(".c", "")
    cmd = [cc, "-std=c99", "-Wall", "-Werror", str(HERE / source), "-I", lfm_engine.get_include(),
           str(lib), f"-Wl,-rpath,{lib.parent}", "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    env = dict(os.environ, LFM_NUM_THREADS="2")
    res = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
