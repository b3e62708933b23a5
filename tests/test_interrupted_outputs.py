"""Outputs of killed runs (issue: kill -9 left `.tmp-*` folders behind; compress ignored
SIGTERM). A run killed with SIGKILL cannot clean up, so the next run that writes the same
output removes temporaries whose owner process is gone (merge/outdir.py); SIGTERM unwinds
like Ctrl-C in merge, compress and decompress (cli/guard.py): exit 130, nothing left.

The owners here are real processes killed with SIGKILL / SIGTERM, not simulated names."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from lfm_engine.cli import main as cli_main
from lfm_engine.merge.outdir import StaleTemporaryWarning, make_temp_dir, sweep_stale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _killed_owner(code: str) -> int:
    """Run `code` in a child python that then SIGKILLs itself; return the dead child's pid."""
    src = textwrap.dedent(code) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    p = subprocess.run([sys.executable, "-c", src], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return int(p.stdout.split()[-1])


def _hidden(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=g), "position_ids": torch.arange(8, dtype=torch.int64)[None]}
    ft = {"w": base["w"] + 0.01 * torch.randn(64, 32, generator=g), "position_ids": base["position_ids"]}
    for name, t in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text('{"model_type": "llama", "hidden_size": 32}')
    return tmp_path


def test_merge_after_kill_9_removes_the_dead_runs_temporary(pair, capsys):
    out = pair / "merged"
    pid = _killed_owner(f"""
        from lfm_engine.merge.outdir import make_temp_dir
        import os
        t = make_temp_dir({str(out)!r})
        open(os.path.join(t, "model-00001-of-00002.safetensors"), "wb").write(b"half")
        print(os.getpid())
    """)
    assert _hidden(pair) and all(f".tmp-{pid}-" in n for n in _hidden(pair))
    live = pair / f".merged.tmp-{os.getppid()}-concurrent"  # a live owner (our parent): never touched
    live.mkdir()
    cfg = pair / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {pair / 'ft'}\n    parameters: {{weight: 1.0}}\n"
                   f"  - model: {pair / 'base'}\n    parameters: {{weight: 1.0}}\n")
    assert cli_main(["merge", str(cfg), str(out), "--quiet"]) == 0
    assert f"warning: removed {pair}/.merged.tmp-{pid}-" in capsys.readouterr().err
    assert _hidden(pair) == [live.name] and (out / "model.safetensors").is_file()


def test_compress_and_decompress_after_kill_9(pair):
    lfmd = pair / "m.lfmd"
    pid = _killed_owner(f"""
        import os
        from lfm_engine.io.safetensors import SafetensorsWriter
        import torch
        w = SafetensorsWriter({str(lfmd)!r})
        w.add("x", torch.zeros(4))
        w.f.flush()
        d = {str(pair / "rec")!r}
        os.makedirs(os.path.join(os.path.dirname(d), f".rec.tmp-{{os.getpid()}}"))
        print(os.getpid())
    """)
    assert {f".m.lfmd.tmp-{pid}.body", f".rec.tmp-{pid}"} <= set(_hidden(pair))
    with pytest.warns(StaleTemporaryWarning):
        assert cli_main(["compress", "--base", str(pair / "base"), "--model", str(pair / "ft"), "--codec", "int8",
                         "--quiet", str(lfmd)]) == 0
    with pytest.warns(StaleTemporaryWarning):
        assert cli_main(["decompress", "--base", str(pair / "base"), str(lfmd), str(pair / "rec")]) == 0
    assert _hidden(pair) == []


def test_sweep_only_matches_its_own_output(tmp_path):
    (tmp_path / ".other.tmp-999999999-x").mkdir()          # another output's temporary
    (tmp_path / ".out.tmpl-999999999").mkdir()             # not a temporary name
    (tmp_path / "out.tmp-999999999").mkdir()               # not hidden: a user's folder
    assert sweep_stale(tmp_path / "out") == []
    t = make_temp_dir(tmp_path / "out")                     # our own pid: kept
    assert sweep_stale(tmp_path / "out") == [] and os.path.isdir(t)


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_sigterm_mid_write_cleans_up(pair, command):
    """SIGTERM while the output is half written: exit 130, no output, no temporary."""
    lfmd = pair / "m.lfmd"
    if command == "decompress":
        assert cli_main(["compress", "--base", str(pair / "base"), "--model", str(pair / "ft"), "--codec", "int8",
                         "--quiet", str(lfmd)]) == 0
        hook, argv = "decode_add", ["decompress", "--base", str(pair / "base"), str(lfmd), str(pair / "rec")]
    else:
        hook, argv = "encode_delta", ["compress", "--base", str(pair / "base"), "--model", str(pair / "ft"),
                                      "--codec", "int8", str(lfmd)]
    before = _hidden(pair)
    src = textwrap.dedent(f"""
        import os, signal, sys
        import lfm_engine.compress.lfmd as L
        real = L.{hook}
        def hooked(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered at the next bytecode, mid-write
            return real(*a, **k)
        L.{hook} = hooked
        from lfm_engine.cli import main
        sys.exit(main({argv!r}))
    """)
    p = subprocess.run([sys.executable, "-c", src], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and "interrupted" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _hidden(pair) == before
    assert not (pair / "rec").exists() and (command == "decompress" or not lfmd.exists())
