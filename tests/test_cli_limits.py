"""Sizes from the command line are bounded when the arguments are parsed (issue: a thread
count of 2**31 - 1 reached the core mid-run and allocated gigabytes before failing)."""
from __future__ import annotations

import pytest

from lfm_engine.cli import main as cli_main


@pytest.mark.parametrize("argv", [
    ["merge", "c.yml", "out", "-j", "2147483647"],
    ["merge", "c.yml", "out", "--num-threads", "-1"],
    ["compress", "--base", "b", "--model", "m", "--threads", "2147483647", "x.lfmd"],
    ["decompress", "--base", "b", "--threads", "1025", "x.lfmd", "out"],
    ["merge", "c.yml", "out", "-j", "many"],
])
def test_thread_counts_bounded_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("0 (all cores) to 1024" in err or "number of threads" in err), err


def test_merge_api_bounds_threads(tmp_path):
    from lfm_engine.merge import MergeConfigErrors, merge_models
    with pytest.raises(MergeConfigErrors, match=r"--threads: must be in 1\.\.1024, got 2147483647"):
        merge_models({"merge_method": "linear", "models": [{"model": str(tmp_path), "parameters": {"weight": 1}}]},
                     str(tmp_path / "out"), threads=2 ** 31 - 1)
