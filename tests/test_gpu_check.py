"""tools/gpu_check.sh (docs/gpu_check.md): its dry run end to end, and the parts of the GPU run
that can be checked without a GPU (target verdicts from benchmark reports, JUnit and
sanitizer output parsing, the sanitizer driver's cases on the CPU, the time limits)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from gpu_check import build, report, sanitize, targets, tests_step  # noqa: E402
from gpu_check.runner import Budget, run  # noqa: E402


def test_dry_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / report.JSON_NAME).read_text())
    assert data["mode"] == "dry-run" and data["exit_status"] == 0
    steps = data["steps"]
    assert list(steps) == ["build", "tests", "sanitize", "bench"]
    assert steps["build"]["status"] == "ok" and "--no-build-isolation" in steps["build"]["data"]["command"]
    assert steps["build"]["data"]["installed"]["build_info"]["version"]
    t = steps["tests"]
    assert t["status"] == "ok", t["summary"]
    assert t["data"]["counts"]["passed"] >= 5 and t["data"]["counts"]["failed"] == 0
    # the cuda-marked checks were selected and skipped (CUDA is hidden in the dry run)
    from test_codec import NATIVE  # one skipped case per codec with a GPU kernel

    assert t["data"]["named"]["test_triton_delta_apply_bf16_gpu"]["skipped"] == len(NATIVE)
    assert t["data"]["skip_reasons"] == {"needs a CUDA GPU": t["data"]["counts"]["skipped"]}
    assert steps["sanitize"]["status"] == "skipped" and len(steps["sanitize"]["data"]["planned"]) == 4
    assert set(steps["bench"]["data"]["planned"]) == {"merge_gpu", "lora", "codec", "merge_models"}
    assert [x["id"] for x in data["targets"]] == ["masks", "merge", "lora_bw", "lora_mm", "codec"]
    assert {x["status"] for x in data["targets"]} == {"not measured"}
    md = (out / report.MD_NAME).read_text()
    assert "## Targets (issue 16)" in md and "| tests | ok |" in md
    # the device tool brings back at most 8 files, at most 2 folders down
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(len(f.relative_to(out).parts) <= 3 for f in files)
    assert not list(out.rglob(".*.tmp"))
    tail = p.stdout.strip().splitlines()
    assert tail[-1].startswith("written: ") and any(line.startswith("targets:") for line in tail[-14:])
    assert data["wall_s"] < 150


def _steps_with(reports: dict, tests_named=None) -> dict:
    suites = {n: {"status": "ok", "report": r} for n, r in reports.items()}
    return {"tests": {"status": "ok", "summary": "", "data": {"named": tests_named or {}}},
            "bench": {"status": "ok", "summary": "", "data": {"suites": suites}}}


def _row(case, provider, seconds, frac, **extra):
    return {"case": case, "provider": provider, "seconds": seconds, "frac_copy": frac, "extra": extra}


def test_targets_from_reports():
    merge = {"copy_bw_gbps": 3000.0, "rows": [
        _row("ties 11008x4096", "ours-cuda", 1e-3, 0.2, passes=4, per_pass_gbps=2400.0),
        _row("ties 11008x4096", "ours-triton", 1e-3, 0.2, passes=3, per_pass_gbps=1500.0),
        _row("ties 11008x4096", "torch-multipass", 1e-2, 0.02),
        _row("linear 11008x4096", "ours-cuda", 1e-3, 0.9, passes=1, per_pass_gbps=2700.0)]}
    lora = {"copy_bw_gbps": 3000.0, "rows": [
        _row("decode-256-distinct", "ours-cuda", 30e-6, 0.75, op="apply", T=256, mix="distinct"),
        _row("decode-256-distinct", "torch-mm", 5e-6, 0.1, op="apply", T=256, mix="distinct"),
        _row("decode-64-uniform", "ours-cuda", 11e-6, 0.3, op="apply", T=64, mix="uniform"),
        _row("decode-64-uniform", "torch-mm", 10e-6, 0.3, op="apply", T=64, mix="uniform"),
        _row("decode-16-shared", "ours-cuda", 50e-6, 0.1, op="apply", T=16, mix="shared"),
        _row("decode-16-shared", "torch-mm", 5e-6, 0.1, op="apply", T=16, mix="shared"),
        _row("shrink decode-256-shared", "ours-cuda", 50e-6, 0.1, op="shrink", T=256, mix="shared"),
        _row("shrink decode-256-shared", "torch-mm", 5e-6, 0.1, op="shrink", T=256, mix="shared")]}
    codec = {"copy_bw_gbps": 3000.0, "rows": [
        _row("decode+add int4 8192x8192 bf16", "ours-cuda", 1e-4, 0.8),
        _row("decode+add int4 8192x8192 bf16", "ours-triton", 1e-4, 0.6),
        _row("decode+add sign1 8192x8192 bf16", "ours-cuda", 1e-4, 0.69)]}
    named = {"test_gpu_masks_bit_identical_every_method": {"passed": 7, "failed": 0, "skipped": 0, "messages": []}}
    got = {t["id"]: t for t in targets.evaluate(_steps_with(
        {"merge_gpu": merge, "lora": lora, "codec": codec}, named))}
    assert got["masks"]["status"] == "met"
    assert got["merge"]["status"] == "met"  # 80% and 90% per pass (Triton's 50% is listed, not judged)
    assert "triton 50%" in got["merge"]["evidence"]
    assert got["lora_bw"]["status"] == "met"
    # judged: uniform T=64 at 1.1x; distinct is listed only; T < 64 and shrink rows are not read
    assert got["lora_mm"]["status"] == "met" and "not judged: decode-256-distinct 6.00x" in got["lora_mm"]["evidence"]
    assert got["codec"]["status"] == "not met" and "sign1 69%" in got["codec"]["evidence"]
    merge["rows"][0]["extra"]["per_pass_gbps"] = 2000.0
    lora["rows"][2]["seconds"] = 13e-6
    named["test_gpu_masks_bit_identical_every_method"].update(failed=1, messages=["della: cuda masks differ"])
    got = {t["id"]: t for t in targets.evaluate(_steps_with(
        {"merge_gpu": merge, "lora": lora, "codec": codec}, named))}
    assert got["merge"]["status"] == "not met" and "ties 67%" in got["merge"]["evidence"]
    assert got["lora_mm"]["status"] == "not met"
    assert got["masks"]["status"] == "not met" and "della" in got["masks"]["evidence"]
    none = {t["id"]: t for t in targets.evaluate({"bench": {"status": "failed", "summary": "x", "data": {
        "suites": {"lora": {"status": "timeout"}}}}})}
    assert {t["status"] for t in none.values()} == {"not measured"}
    assert none["lora_bw"]["evidence"] == "bench suite lora timeout"
    assert none["masks"]["evidence"].startswith("step tests did not run")


def test_junit_parsing(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_codec" name="test_triton_delta_apply_bf16_gpu[int4]" time="1.5"/>
<testcase classname="tests.test_codec" name="test_triton_delta_apply_bf16_gpu[sign1]" time="0.2">
  <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3">tb</failure></testcase>
<testcase classname="tests.test_merge_gpu" name="test_gpu_masks_bit_identical_every_method[ties]" time="3">
  <skipped message="lfm_engine was built without CUDA"/></testcase>
<testcase classname="tests.test_lora" name="test_gpu[cuda]" time="0.1"><error message="boom"/></testcase>
</testsuite></testsuites>""")
    d = tests_step.parse_junit(xml)
    assert d["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert d["failures"][0] == {"id": "tests/test_codec.py::test_triton_delta_apply_bf16_gpu[sign1]",
                                "outcome": "failed", "message": "AssertionError: Tensor-likes are not close!"}
    assert d["skip_reasons"] == {"lfm_engine was built without CUDA": 1}
    assert d["named"]["test_triton_delta_apply_bf16_gpu"]["passed"] == 1
    assert d["named"]["test_triton_delta_apply_bf16_gpu"]["failed"] == 1
    m = d["named"]["test_gpu_masks_bit_identical_every_method"]
    verdict = targets.masks({"tests": {"data": {"named": d["named"]}}})
    assert m["skipped"] == 1 and verdict["status"] == "not measured" and "built without CUDA" in verdict["evidence"]


def test_sanitizer_output_parsing():
    mem = "========= COMPUTE-SANITIZER\nsanitize_driver: merge on cuda: 81 cases, ok\n========= ERROR SUMMARY: 0 errors\n"
    assert sanitize.parse_output("memcheck", mem) == {"errors": 0, "driver": "81 cases, ok"}
    race = ("========= Error: Race reported between Write access at k_hist+0x1a0\n"
            "sanitize_driver: merge-select on cuda: 6 cases, ok\n"
            "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n========= ERROR SUMMARY: 1 error\n")
    r = sanitize.parse_output("racecheck", race)
    assert (r["errors"], r["hazards"], r["race_errors"], r["race_warnings"]) == (1, 2, 1, 1)
    cmd = sanitize.sanitizer_command("cs", "python3", "racecheck", "merge-select")
    assert cmd[:3] == ["cs", "--tool", "racecheck"] and "kns=k_hist" in cmd and cmd[-3:] == ["merge-select",
                                                                                               "--device", "cuda"]


@pytest.mark.parametrize("family", ["merge", "merge-select", "lora", "codec"])
def test_sanitize_driver_cases_run_on_cpu(family, capsys):
    """The driver's cases are valid calls (shapes, options) that agree with the CPU kernel."""
    from gpu_check import sanitize_driver

    assert sanitize_driver.main(["--family", family, "--device", "cpu", "--limit", "4"]) == 0
    assert capsys.readouterr().out.strip().endswith("4 cases, ok")


def test_build_command_and_arch():
    assert build.cuda_arch("9.0") == "90" and build.cuda_arch(" 12.1 ") == "121"
    with pytest.raises(ValueError, match="compute capability"):
        build.cuda_arch("[N/A]")
    cmd = build.pip_command("python3", "90")
    assert cmd[:4] == ["python3", "-m", "pip", "install"] and cmd[-1] == "."
    assert {"--no-build-isolation", "--no-deps", "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=90"} <= set(cmd)


def test_runner_kills_the_whole_group_at_the_limit(tmp_path):
    log = tmp_path / "x.log"
    t0 = time.monotonic()
    p = run(["bash", "-c", "sleep 30 & sleep 30; echo ne""ver"], log=log, timeout=1, cwd=tmp_path, echo=False)
    assert p.timed_out and p.rc is None and time.monotonic() - t0 < 10
    assert "done-42" not in log.read_text() and "killed at the timeout" in log.read_text()
    p = run([sys.executable, "-c", "print('hi')"], log=log, timeout=30, cwd=tmp_path, echo=False)
    assert p.ok and "hi" in p.output
    p = run(["true"], log=log, timeout=0, cwd=tmp_path, echo=False)
    assert p.rc is None and "not started" in p.output
    b = Budget(100, reserve_s=10)
    assert 85 < b.grant(500) <= 90 and b.grant(5) == 5


def test_bench_lora_ops_and_mixes_on_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_lora

    js = tmp_path / "lora.json"
    assert bench_lora.main(["--hidden", "32", "--rank", "4", "--tokens", "1,6", "--mixes", "distinct,uniform,shared",
                            "--uniform-adapters", "2", "--ops", "shrink,expand,apply", "--prefill", "",
                            "--reps", "1", "--no-base", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    keys = {(r["extra"]["op"], r["extra"]["T"], r["extra"]["mix"], r["provider"]) for r in rows}
    assert ("apply", 6, "uniform", "torch-mm") in keys and ("shrink", 1, "distinct", "ours-cpu") in keys
    assert {r["extra"]["adapters"] for r in rows if r["extra"]["T"] == 6} == {6, 2, 1}
    assert {r["case"] for r in rows if r["extra"]["op"] == "expand"} >= {"expand decode-6-shared"}
    with pytest.raises(SystemExit, match="unknown mix"):
        bench_lora.main(["--mixes", "zipf"])


def test_bench_codec_torch_baseline_matches_ours(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_codec import structured_delta, torch_decode_add

    from lfm_engine.ops.codec import decode_add, encode_delta

    d = structured_delta(9, 301, dtype=torch.bfloat16)
    b = torch.randn(9, 301).to(torch.bfloat16)
    for codec, opts in [("sign1", {}), ("int8", {"group_size": 64}), ("int4", {"group_size": 64}),
                        ("int2", {"group_size": 32})]:
        e = encode_delta(d, codec, **opts)
        assert torch.equal(torch_decode_add(e, b, torch.empty_like(b)), decode_add(e, b)), codec
