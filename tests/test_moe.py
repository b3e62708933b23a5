"""`lfm-engine moe` (mergekit-moe): Mixtral output from dense Llama fine-tunes (Qwen2-MoE: test_moe_qwen.py), loadable by
transformers; gate vectors as mergekit defines them."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import finetune, llama_config, load_folder, random_weights, write_model  # noqa: E402
from merge_cli_helpers import assert_same_logits  # noqa: E402
from moe_fixtures import VOCAB, WORDS, real_tokenizer, run_moe  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=VOCAB)
    base = random_weights(cfg, 0)
    paths = [write_model(str(root / "base"), cfg, base),
             write_model(str(root / "ft1"), cfg, finetune(base, 1, 0.05)),
             write_model(str(root / "ft2"), cfg, finetune(base, 2, 0.05))]
    real_tokenizer(paths[0])
    return paths


def test_identical_experts_reproduce_the_base(models, tmp_path):
    b = models[0]
    rc, out = run_moe({"base_model": b, "gate_mode": "random", "dtype": "float32",
                       "experts": [{"source_model": b}, {"source_model": b}]}, tmp_path)
    assert rc == 0
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert_same_logits(moe, transformers.AutoModelForCausalLM.from_pretrained(b), [1, 7, 9, 4], 1e-4, 1e-5)


def test_cheap_embed_gates_and_expert_weights(models, tmp_path):
    b, f1, f2 = models
    cfg = {"base_model": b, "gate_mode": "cheap_embed", "experts_per_token": 1,
           "experts": [{"source_model": f1, "positive_prompts": ["w1 w2", "w3"]},
                       {"source_model": f2, "positive_prompts": ["w5"], "negative_prompts": ["w1"]}]}
    rc, out = run_moe(cfg, tmp_path)
    assert rc == 0
    got, B, F1, F2 = load_folder(str(out)), load_folder(b), load_folder(f1), load_folder(f2)
    emb = B["model.embed_tokens.weight"].double()
    ids = {w: WORDS.index(w) for w in ("<s>", "w1", "w2", "w3", "w5")}
    v0 = emb[[ids["<s>"], ids["w1"], ids["w2"], ids["<s>"], ids["w3"]]].sum(0)
    pos, neg = emb[[ids["<s>"], ids["w5"]]].sum(0), emb[[ids["<s>"], ids["w1"]]].sum(0)
    v1 = pos / pos.norm() - neg / neg.norm()       # mergekit normalises each side first
    exp = torch.stack([v0 / v0.norm(), v1 / v1.norm()])
    for li in range(2):
        torch.testing.assert_close(got[f"model.layers.{li}.block_sparse_moe.gate.weight"].double(), exp,
                                   rtol=1e-5, atol=1e-6)
        for ei, src in enumerate((F1, F2)):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(got[f"model.layers.{li}.block_sparse_moe.experts.{ei}.{w}.weight"],
                                   src[f"model.layers.{li}.mlp.{proj}.weight"])
        assert torch.equal(got[f"model.layers.{li}.self_attn.q_proj.weight"], B[f"model.layers.{li}.self_attn.q_proj.weight"])
    assert not any(".mlp." in n for n in got)
    c = json.loads((out / "config.json").read_text())
    assert c["num_local_experts"] == 2 and c["num_experts_per_tok"] == 1 and c["model_type"] == "mixtral"


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_are_unit_vectors_and_load(models, tmp_path, mode):
    b, f1, f2 = models
    rc, out = run_moe({"base_model": b, "gate_mode": mode, "experts": [
        {"source_model": f1, "positive_prompts": ["w1 w2 w3"]},
        {"source_model": f2, "positive_prompts": ["w9", "w10 w11"]}]}, tmp_path, name=mode)
    assert rc == 0
    got = load_folder(str(out))
    g = got["model.layers.1.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2), rtol=1e-5, atol=1e-5)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_moe_config_problems(models, tmp_path, capsys):
    b, f1, _ = models
    rc, _ = run_moe({"base_model": b, "gate_mode": "hiden", "shared_experts": [{"source_model": f1}],
                 "experts": [{"source_model": f1}], "experts_per_token": 3}, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2
    for needle in ("gate_mode: unknown mode 'hiden' (did you mean 'hidden'?)", "mergekit would write DeepSeek MoE output",
                   "experts_per_token: must be an integer in [1, 1]"):
        assert needle in err, err
    rc, _ = run_moe({"base_model": b, "gate_mode": "cheap_embed", "experts": [{"source_model": f1}]}, tmp_path)
    assert rc == 2 and "experts[0].positive_prompts: missing" in capsys.readouterr().err
    rc, out = run_moe({"base_model": b, "gate_mode": "random", "experts": [{"source_model": str(tmp_path / "x")}]},
                  tmp_path)
    assert rc == 2 and "does not exist" in capsys.readouterr().err and not out.exists()


def test_unroutable_configs_refused_as_mergekit_does(models, tmp_path, capsys):
    b, f1, _ = models
    same = [{"source_model": f1, "positive_prompts": ["w1"]}, {"source_model": f1, "positive_prompts": ["w1"]}]
    rc, _ = run_moe({"base_model": b, "gate_mode": "cheap_embed", "experts": same}, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2 and "every expert has the same positive and negative prompts" in err
    assert "every expert is the same model" in err and "--i-understand-this-is-not-useful-without-training" in err
    same[1]["positive_prompts"] = ["w2"]
    rc, _ = run_moe({"base_model": b, "gate_mode": "cheap_embed", "experts": same}, tmp_path, "--dry-run",
                    "--i-understand-this-is-not-useful-without-training")
    assert rc == 0 and "output: Mixtral (MixtralForCausalLM), 2 experts" in capsys.readouterr().out


def test_mergekit_moe_flags(models, tmp_path, capsys):
    b, f1, f2 = models
    cfg = {"base_model": b, "gate_mode": "random", "experts": [{"source_model": f1}, {"source_model": f2}]}
    rc, out = run_moe(cfg, tmp_path, "--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card",
                      "-j", "1", "--random-seed", "3", "--out-shard-size", "500M", "-v")
    assert rc == 0 and "note: --lazy-unpickle accepted, no effect" in capsys.readouterr().err
    assert not (out / "tokenizer.json").exists() and not (out / "mergekit_moe_config.yml").exists()
    assert (out / "config.json").exists()
    rc, out = run_moe(cfg, tmp_path, "--load-in-4bit", name="q")
    assert rc == 2 and "--load-in-4bit is not supported" in capsys.readouterr().err and not out.exists()
    if not torch.cuda.is_available():
        rc, _ = run_moe(cfg, tmp_path, "--cuda", name="c")
        assert rc == 2 and "no CUDA device is available" in capsys.readouterr().err
    rc, _ = run_moe(cfg, tmp_path, "--cuda", "--device", "cpu", name="c")
    assert rc == 2 and "--cuda contradicts --device cpu" in capsys.readouterr().err
