"""Compressed fine-tunes (.lfmd deltas) served per batch row next to LoRA adapters and base rows.

Each delta row must give the logits of the dense fine-tune rebuilt as base + decode(delta)
(decompress_model), each LoRA row those of the LoRA alone, each base row the base model's.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from fixtures_models import llama_config, random_weights, write_model  # noqa: E402
from lfm_engine.compress.lfmd import FingerprintMismatchError, compress_model, decompress_model  # noqa: E402
from lfm_engine.io.model_folder import ModelFolder  # noqa: E402
from lfm_engine.serve import AdapterPool, Engine, Request, attach  # noqa: E402
from lfm_engine.serve.deltas import DeltaLoadError  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CFG = llama_config(hidden=64, layers=2, intermediate=128, vocab=96, heads=4, kv_heads=2)


def _ft_linears(base, seed, scale=0.02):
    """A fine-tune that changes only the attached linears (what a delta can serve)."""
    g = torch.Generator().manual_seed(seed)
    return {n: (t + scale * torch.randn(t.shape, generator=g)) if n.rsplit(".", 2)[-2] in PROJ else t.clone()
            for n, t in base.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    base_w = random_weights(CFG, 0)
    base = write_model(str(root / "base"), CFG, base_w, tokenizer=False)
    out = {"base": base}
    for name, codec, seed in (("s1", "sign1", 11), ("i4", "int4:group_size=32", 12), ("n4", "nf4:group_size=32", 15)):
        ft = write_model(str(root / f"ft_{name}"), CFG, _ft_linears(base_w, seed))
        path = str(root / f"{name}.lfmd")
        compress_model(base, ft, path, codec)
        out[name] = path
        out[name + "_dense"] = str(decompress_model(base, path, root / f"dense_{name}"))
    # a fine-tune that also changes a norm (not servable per row) and another base
    ft = {k: v.clone() for k, v in _ft_linears(base_w, 13).items()}
    ft["model.norm.weight"] += 0.5
    write_model(str(root / "ft_norm"), CFG, ft)
    compress_model(base, str(root / "ft_norm"), str(root / "norm.lfmd"), "sign1")
    out["norm"] = str(root / "norm.lfmd")
    other = write_model(str(root / "other"), CFG, random_weights(CFG, 5))
    compress_model(other, write_model(str(root / "ft_other"), CFG, _ft_linears(random_weights(CFG, 5), 14)),
                   str(root / "other.lfmd"), "sign1")
    out["other"] = str(root / "other.lfmd")
    # a LoRA adapter on the same base
    m = LlamaForCausalLM.from_pretrained(base).eval()
    torch.manual_seed(3)
    pm = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ),
                                                     init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(root / "lora"))
    out["lora"] = str(root / "lora")
    return out


def _served(family, deltas=("s1", "i4"), **kw):
    model = LlamaForCausalLM.from_pretrained(family["base"]).eval()
    with ModelFolder(family["base"]) as mf:
        fp = mf.fingerprint()
    pool = AdapterPool(capacity=2, base_fingerprint=fp, **kw)
    attach(model, pool)
    pool.load("lora", family["lora"], wait=True)
    for name in deltas:
        pool.load_delta(name, family[name])
    return model, pool


def _dense(path):
    return LlamaForCausalLM.from_pretrained(path).eval()


def test_mixed_lora_delta_base_rows_match_dense_references(family):
    model, pool = _served(family, deltas=("s1", "i4", "n4"))
    ids = torch.randint(0, CFG["vocab_size"], (5, 7), generator=torch.Generator().manual_seed(0))
    names = ["s1", "lora", None, "i4", "n4", "s1"]
    ids = torch.cat([ids, ids[:1]])
    with torch.no_grad(), pool.assign(names):
        got = model(ids).logits
    refs = {"s1": _dense(family["s1_dense"]), "i4": _dense(family["i4_dense"]), "n4": _dense(family["n4_dense"]),
            None: LlamaForCausalLM.from_pretrained(family["base"]).eval()}
    with torch.no_grad():
        for r, n in enumerate(names):
            if n == "lora":
                with pool.assign([n]):
                    want = model(ids[r:r + 1]).logits
            else:
                want = refs[n](ids[r:r + 1]).logits
            torch.testing.assert_close(got[r:r + 1], want, rtol=1e-4, atol=1e-4, msg=f"row {r} ({n})")
    # the delta really changes the output (the test can fail)
    assert (got[0] - got[2]).abs().max() > 1e-3


def test_engine_generates_each_row_like_its_dense_model(family):
    model, pool = _served(family)
    eng = Engine(model, pool, max_batch_size=4)
    prompts = [[3, 5, 7, 9], [4, 4, 8], [10, 11, 12, 13, 14], [6]]
    names = ["s1", "i4", None, "lora"]
    res = eng.generate([Request(prompt=p, adapter=n, max_new_tokens=5, ignore_eos=True)
                        for p, n in zip(prompts, names)])
    for p, n, r in zip(prompts, names, res):
        assert r.finish_reason == "length", r.error
        alone = eng.generate([Request(prompt=p, adapter=n, max_new_tokens=5, ignore_eos=True)])[0]
        assert r.token_ids == alone.token_ids
        if n in ("s1", "i4"):
            dense = _dense(family[n + "_dense"])
            with torch.no_grad():
                out = dense.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long))
            assert r.token_ids == out[0, len(p):].tolist()


def test_bad_deltas_are_refused_and_others_keep_running(family, tmp_path):
    model, pool = _served(family)
    eng = Engine(model, pool, max_batch_size=4)
    hs = [eng.submit(Request(prompt=[1, 2, 3], adapter=n, max_new_tokens=6, ignore_eos=True)) for n in ("s1", "lora")]
    eng.step()
    with pytest.raises(FingerprintMismatchError, match="another model"):
        pool.load_delta("x", family["other"])
    cut = tmp_path / "cut.lfmd"
    data = open(family["i4"], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaLoadError, match="cut.lfmd"):
        pool.load_delta("y", str(cut))
    with pytest.raises(DeltaLoadError, match="model.norm.weight"):
        pool.load_delta("z", family["norm"])
    with pytest.raises(ValueError, match="already registered"):
        pool.load_delta("s1", family["s1"])
    assert "x" not in pool and "y" not in pool and "z" not in pool
    while not all(h.done() for h in hs):
        eng.step()
    assert [h.result().finish_reason for h in hs] == ["length", "length"]
    # skip_unsupported serves the linears and lists what it left at the base value
    pool.load_delta("z", family["norm"], skip_unsupported=True)
    info = {i["name"]: i for i in pool.info()}
    assert info["z"]["kind"] == "delta" and info["z"]["skipped"] == ["model.norm.weight"]
    pool.unload("z")
    assert "z" not in pool
    with pytest.raises(FileNotFoundError, match="no .lfmd file"):
        pool.load_delta("w", str(tmp_path / "missing.lfmd"))
    # an unload while a batch holds the delta hides the name; the slot lives until release
    assert pool.try_acquire("i4")
    pool.unload("i4")
    assert "i4" not in pool
    with pytest.raises(KeyError):
        eng.submit(Request(prompt=[1], adapter="i4"))
    with torch.no_grad(), pool.assign_held(["i4", None]):
        held = model(torch.tensor([[1, 2], [1, 2]])).logits
    assert (held[0] - held[1]).abs().max() > 1e-4  # still the fine-tune's row
    pool.release("i4")
    assert pool._deltas.by_module and all(len(v) == 1 for v in pool._deltas.by_module.values())  # only s1 left


def test_compile_one_graph_no_breaks_with_lora_and_delta_rows(family):
    model, pool = _served(family)
    ids = torch.randint(0, CFG["vocab_size"], (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pool.assign(["s1", "lora", None]):
        explained = torch._dynamo.explain(model)(ids)
        want = model(ids).logits
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), pool.assign(["s1", "lora", None]):
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pool.assign(["i4", None, "lora"]):  # new routing, same graph shape
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_serve_cli_delta_and_http_load_route(family):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from server_harness import Running

    run = Running([family["base"], "--delta", f"s1={family['s1']}", "--adapter", f"lora={family['lora']}",
                   "--max-num-seqs", "4"])
    try:
        with httpx.Client(base_url=run.url, timeout=60) as hc:
            ids = {m["id"] for m in hc.get("/v1/models").json()["data"]}
            assert {"s1", "lora"} <= ids
            body = dict(prompt=[3, 5, 7, 9], max_tokens=4, temperature=0, ignore_eos=True)
            got = hc.post("/v1/completions", json=dict(body, model="s1")).json()
            dense = _dense(family["s1_dense"])
            with torch.no_grad():
                want = dense.generate(torch.tensor([[3, 5, 7, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones(1, 4, dtype=torch.long))[0, 4:].tolist()
            assert got["choices"][0]["token_ids"] == want
            r = hc.post("/v1/load_lora_adapter", json=dict(lora_name="i4", lora_path=family["i4"]))
            assert r.status_code == 200, r.text
            assert hc.post("/v1/completions", json=dict(body, model="i4")).status_code == 200
            r = hc.post("/v1/load_lora_adapter", json=dict(lora_name="o", lora_path=family["other"]))
            assert r.status_code == 400 and "another model" in r.json()["error"]["message"]
            assert hc.post("/v1/completions", json=dict(body, model="s1")).json()["choices"][0]["token_ids"] == want
    finally:
        run.close()


def test_long_same_adapter_runs_use_gemm_and_match_the_kernel(family, monkeypatch):
    """Prefill-size runs (>= GEMM_MIN_TOKENS tokens of one adapter) take two GEMMs per run;
    the result equals the grouped kernel's (forced by raising the threshold)."""
    from lfm_engine.serve import route

    model, pool = _served(family)
    ids = torch.randint(0, CFG["vocab_size"], (3, route.GEMM_MIN_TOKENS), generator=torch.Generator().manual_seed(2))
    names = ["lora", "lora", None]
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), pool.assign(names):
        gemm = model(ids).logits
    assert calls, "the GEMM path did not run"
    monkeypatch.setattr(route, "GEMM_MIN_TOKENS", 10 ** 9)
    with torch.no_grad(), pool.assign(names):
        kernel = model(ids).logits
    torch.testing.assert_close(gemm, kernel, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (gemm[0] - LlamaForCausalLM.from_pretrained(family["base"]).eval()(ids[:1]).logits[0]).abs().max() > 1e-3
