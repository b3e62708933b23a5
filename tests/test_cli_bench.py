"""`lfm-engine bench`: suite discovery, running a real suite at a tiny size, the combined
JSON, the plot, and clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lfm_engine.cli import bench as cli_bench
from lfm_engine.cli import main

REPO_BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_finds_every_repo_suite():
    suites = cli_bench.find_suites()
    assert set(p.name for p in REPO_BENCH.glob("bench_*.py")) == {p.name for p in suites.values()}
    assert list(suites)[:2] == ["merge", "merge_gpu"]


def test_installed_copy_is_looked_up_first(tmp_path, monkeypatch):
    pkg = tmp_path / "lfm_engine"
    (pkg / "bench_suites").mkdir(parents=True)
    (pkg / "bench_suites" / "bench_merge.py").write_text("def main(argv=None):\n    return 0\n")
    monkeypatch.setattr(cli_bench, "__file__", str(pkg / "cli" / "bench.py"))
    assert cli_bench.find_suites() == {"merge": pkg / "bench_suites" / "bench_merge.py"}
    (pkg / "bench_suites" / "bench_merge.py").unlink()
    with pytest.raises(cli_bench.SuiteError, match="no benchmark suites"):
        cli_bench.find_suites()


def test_quick_merge_suite_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "RESULTS.md"
    rc = main(["bench", "--quick", "--only", "merge", "--json", str(out), "--plot", str(png), "--markdown", str(md),
               "--suite-args", "merge=--shapes 64x128 --methods ties,linear --reps 1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ours-cpu" in text and "torch-multipass" in text  # the suite's own table was printed
    data = json.loads(out.read_text())
    assert data["mode"] == "quick" and list(data["suites"]) == ["merge"]
    entry = data["suites"]["merge"]
    assert entry["status"] == "ok"
    assert entry["argv"][-6:] == ["--shapes", "64x128", "--methods", "ties,linear", "--reps", "1"]
    rows = entry["report"]["rows"]
    assert {(r["case"], r["provider"]) for r in rows} == {
        (f"{m} 64x128", p) for m in ("ties", "linear") for p in ("ours-cpu", "torch-multipass")}
    assert all(r["seconds"] > 0 and r["frac_copy"] > 0 for r in rows)
    plotted = cli_bench.collect(data)
    assert len(plotted["bandwidth"]) == 2 and len(plotted["speedup"]) == 2
    text = md.read_text()
    assert "| ties 64x128 | ours-cpu |" in text and "vs torch-multipass" in text and data["date"] in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_failing_and_skipped_suites_are_reported(tmp_path, capsys):
    d = tmp_path / "suites"
    d.mkdir()
    (d / "bench_boom.py").write_text("def main(argv=None):\n    raise ValueError('kaput')\n")
    (d / "bench_fine.py").write_text(
        "import json, sys\n"
        "def main(argv=None):\n"
        "    i = argv.index('--json')\n"
        "    json.dump({'title': 't', 'rows': []}, open(argv[i + 1], 'w'))\n"
        "    return 0\n")
    (d / "bench_merge_gpu.py").write_text("def main(argv=None):\n    return 0\n")
    out = tmp_path / "all.json"
    rc = main(["bench", "--quick", "--suites-dir", str(d), "--json", str(out)])
    assert rc == 1  # a failed suite fails the command, after the others ran
    data = json.loads(out.read_text())
    assert data["suites"]["boom"]["status"] == "failed" and "kaput" in data["suites"]["boom"]["reason"]
    assert data["suites"]["fine"]["status"] == "ok"
    import torch

    if not torch.cuda.is_available():
        assert data["suites"]["merge_gpu"]["status"] == "skipped"


def test_bad_arguments_are_clear(capsys):
    assert main(["bench", "--only", "nosuch"]) == 2
    assert "unknown suite(s) nosuch" in capsys.readouterr().err
    assert main(["bench", "--suite-args", "merge"]) == 2
    assert "SUITE=ARGS" in capsys.readouterr().err
    assert main(["bench", "--only", "merge", "--json", "/nonexistent/dir/out.json"]) == 2
    assert "/nonexistent/dir does not exist" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["bench", "--only", "merge", "--plot", "x.png"]) == 2
    assert 'pip install "lfm_engine[bench]"' in capsys.readouterr().err
