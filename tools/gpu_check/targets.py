"""The issue's targets, read off the check's results: each is "met", "not met" or
"not measured" (its step did not run, failed before measuring, or this was the dry run).

  masks     masks bit-identical across CPU, CUDA and Triton for every method
            (tests/test_merge_gpu.py::test_gpu_masks_bit_identical_every_method passed for
            every method; a failure: not met; a skipped method and no failure: not measured)
  merge     merge >= 70 % of the device's copy bandwidth per pass, every method, 11008x4096
            K = 3 bf16: the default GPU backend (CUDA C++, "ours-cuda"); Triton listed beside
  lora_bw   LoRA apply at T = 256 distinct adapters >= 70 % of copy bandwidth (ours-cuda)
  lora_mm   LoRA apply <= 1.2x the time of a dense torch.mm of the same shape at T >= 64,
            judged on the uniform and shared mixes; the distinct mix is listed but not judged:
            it must read T adapters where the dense product reads one, so the same-shape
            torch.mm is not its floor (docs/gpu_check.md)
  codec     codec decode-and-add >= 70 % of copy bandwidth, every codec (ours-cuda)
"""
from __future__ import annotations

from typing import Optional

FRACTION = 0.70
MM_RATIO = 1.2


def _target(tid: str, text: str, status: str, evidence: str, values: Optional[dict] = None) -> dict:
    return {"id": tid, "text": text, "status": status, "evidence": evidence, "values": values or {}}


def _report(steps: dict, suite: str) -> Optional[dict]:
    entry = steps.get("bench", {}).get("data", {}).get("suites", {}).get(suite)
    return entry.get("report") if entry and entry.get("status") == "ok" else None


def _why_missing(steps: dict, step: str, suite: Optional[str] = None) -> str:
    st = steps.get(step)
    if st is None:
        return f"step {step} did not run"
    if st["status"] == "skipped":
        return f"step {step} skipped: {st['summary']}"
    if suite:
        entry = st.get("data", {}).get("suites", {}).get(suite)
        if entry is None:
            return f"bench suite {suite} did not run"
        return f"bench suite {suite} {entry.get('status')}"
    return f"step {step} {st['status']}: {st['summary']}"


def masks(steps: dict) -> dict:
    text = "masks bit-identical across CPU, CUDA and Triton for every method"
    named = steps.get("tests", {}).get("data", {}).get("named", {}).get("test_gpu_masks_bit_identical_every_method")
    if not named or named["passed"] + named["failed"] == 0:
        if not named:
            why = _why_missing(steps, "tests")
        elif named["skipped"]:
            why = "the masks test was skipped: " + "; ".join(named.get("messages", []))
        else:
            why = "the masks test did not run (not collected, or the run stopped before it)"
        return _target("masks", text, "not measured", why)
    ev = f"{named['passed']} methods passed, {named['failed']} failed, {named['skipped']} skipped"
    if named["messages"]:
        ev += ": " + "; ".join(named["messages"])
    status = "not met" if named["failed"] else ("not measured" if named["skipped"] else "met")
    return _target("masks", text, status, ev, named)


def _suite(steps: dict, tid: str, text: str, suite: str):
    """(the suite's JSON report, None), or (None, a "not measured" target saying why)."""
    rep = _report(steps, suite)
    if rep is None:
        return None, _target(tid, text, "not measured", _why_missing(steps, "bench", suite))
    return rep, None


def _bandwidth(steps: dict, tid: str, text: str, suite: str, item, value, what: str = "") -> dict:
    """Fractions of copy bandwidth {item(row): {provider: value(row)}} over the suite's rows
    where value(row) is not None, judged on ours-cuda (the default GPU backend) for every
    item; Triton's fraction is listed beside."""
    rep, missing = _suite(steps, tid, text, suite)
    if missing:
        return missing
    vals: dict = {}
    for r in rep["rows"]:
        v = value(r, rep["copy_bw_gbps"])
        if v is not None:
            vals.setdefault(item(r), {})[r["provider"]] = v
    cuda = {k: v["ours-cuda"] for k, v in vals.items() if "ours-cuda" in v}
    if not cuda:
        return _target(tid, text, "not measured", "no ours-cuda rows (built without CUDA?)", vals)
    ev = ", ".join(f"{k} {f:.0%}" + (f" (triton {vals[k]['ours-triton']:.0%})" if "ours-triton" in vals[k] else "")
                   for k, f in cuda.items())
    low = [k for k, f in cuda.items() if f < FRACTION]
    return _target(tid, text, "not met" if low else "met", f"ours-cuda{what}: {ev}", vals)


def merge(steps: dict) -> dict:
    text = f"merge >= {FRACTION:.0%} of copy bandwidth per pass (11008x4096, K=3, bf16, every method)"

    def per_pass(r, bw):
        pp = r.get("extra", {}).get("per_pass_gbps")
        return None if pp is None else pp / bw

    return _bandwidth(steps, "merge", text, "merge_gpu", lambda r: r["case"].split()[0], per_pass, " per pass")


def _lora_rows(rep: dict, op: str = "apply") -> list:
    return [r for r in rep["rows"] if r.get("extra", {}).get("op") == op]


def lora_bandwidth(steps: dict) -> dict:
    text = f"LoRA apply at T=256 distinct adapters >= {FRACTION:.0%} of copy bandwidth"

    def frac(r, bw):
        x = r.get("extra", {})
        return r["frac_copy"] if (x.get("op"), x.get("T"), x.get("mix")) == ("apply", 256, "distinct") else None

    return _bandwidth(steps, "lora_bw", text, "lora", lambda r: r["case"], frac)


def lora_mm(steps: dict) -> dict:
    text = f"LoRA apply <= {MM_RATIO}x a dense torch.mm of the same shape at T >= 64 (uniform, shared mixes)"
    rep, missing = _suite(steps, "lora_mm", text, "lora")
    if missing:
        return missing
    by_case: dict = {}
    for r in _lora_rows(rep):
        if r["extra"].get("T", 0) >= 64:
            by_case.setdefault(r["case"], {"mix": r["extra"].get("mix")})[r["provider"]] = r["seconds"]
    ratios, info = {}, {}
    for case, d in by_case.items():
        if "ours-cuda" in d and "torch-mm" in d:
            (ratios if d["mix"] in ("uniform", "shared") else info)[case] = d["ours-cuda"] / d["torch-mm"]
    if not ratios:
        return _target("lora_mm", text, "not measured", "no ours-cuda / torch-mm pair at T >= 64", by_case)
    bad = {c: v for c, v in ratios.items() if v > MM_RATIO}
    ev = ", ".join(f"{c} {v:.2f}x" for c, v in ratios.items())
    if info:
        ev += "; not judged: " + ", ".join(f"{c} {v:.2f}x" for c, v in info.items())
    return _target("lora_mm", text, "not met" if bad else "met", ev, {"judged": ratios, "listed": info})


def codec(steps: dict) -> dict:
    text = f"codec decode-and-add >= {FRACTION:.0%} of copy bandwidth (8192x8192 bf16, every codec)"
    return _bandwidth(steps, "codec", text, "codec", lambda r: r["case"].split()[1],
                      lambda r, bw: r["frac_copy"] if r["case"].startswith("decode+add") else None)


def evaluate(steps: dict) -> list:
    return [masks(steps), merge(steps), lora_bandwidth(steps), lora_mm(steps), codec(steps)]
