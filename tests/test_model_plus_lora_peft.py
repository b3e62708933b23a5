"""`model+lora` references with adapters saved by the real PEFT library: the merged output
equals PEFT's own merge_and_unload (including GPT-2's Conv1D weights, stored [in, out],
whose adapters set fan_in_fan_out: the square c_proj was silently added untransposed), and
an adapter that makes the weights non-finite (a NaN lora_alpha loaded) is refused by name."""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import load_folder  # noqa: E402
from merge_cli_helpers import run  # noqa: E402


def _base_and_adapter(root, base, lcfg, std):
    """Save `base` and a PEFT adapter of it (factors ~ N(0, std)) under root/base and
    root/lora; return (root, PEFT's merge_and_unload state dict)."""
    base.save_pretrained(str(root / "base"))
    pm = peft.get_peft_model(copy.deepcopy(base), lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)
    pm.save_pretrained(str(root / "lora"))
    merged = pm.merge_and_unload()
    return root, {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2lora")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    lcfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                           init_lora_weights=False)
    return _base_and_adapter(root, base, lcfg, 0.2)


def _changed_copy(src, dst, change: dict):
    """A copy of the adapter folder `src` at `dst` with adapter_config.json updated."""
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    c = json.loads((dst / "adapter_config.json").read_text())
    c.update(change)
    (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def test_conv1d_adapter_matches_peft_merge_and_unload(gpt2, tmp_path):
    root, want = gpt2
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{root / 'base'}+{root / 'lora'}", "parameters": {"weight": 1.0}}]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    checked = 0
    for name, t in got.items():
        if name in want:
            torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)
            checked += ".c_attn." in name or ".c_proj." in name
    assert checked >= 4  # the adapted Conv1D weights were compared, not only untouched ones


@pytest.mark.parametrize("alpha", [float("nan"), 1e40])  # 1e40: finite (float64), s * B @ A overflows float32
def test_adapter_that_makes_a_weight_non_finite_is_named(gpt2, tmp_path, capsys, alpha):
    root, _ = gpt2
    big = _changed_copy(root / "lora", tmp_path / "big", dict(lora_alpha=alpha))
    cfg = {"merge_method": "linear", "models": [{"model": f"{root / 'base'}+{big}", "parameters": {"weight": 1}}]}
    rc, out = run(cfg, tmp_path)
    err = capsys.readouterr().err
    # NaN is refused when the folder is opened; a finite alpha that overflows when applied
    words = "lora_alpha must be a finite number" if alpha != alpha else "gives NaN or Inf"
    assert rc == 2 and words in err and str(big) in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def llama_embedding_lora(tmp_path_factory):
    """A Llama base and a PEFT adapter with embedding LoRA on embed_tokens (saved by PEFT with
    its base_layer weight) and Linear LoRA on q_proj, plus PEFT's merge_and_unload."""
    root = tmp_path_factory.mktemp("emblora")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).eval()
    lcfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    return _base_and_adapter(root, base, lcfg, 0.3)


def test_embedding_lora_matches_peft_merge_and_unload(llama_embedding_lora, tmp_path):
    root, want = llama_embedding_lora
    from safetensors import safe_open
    with safe_open(str(root / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in keys)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys)  # PEFT saves the table too
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{root / 'base'}+{root / 'lora'}", "parameters": {"weight": 1.0}}]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    base = load_folder(str(root / "base"))
    emb = "model.embed_tokens.weight"
    assert not torch.equal(got[emb], base[emb])  # the embedding changed...
    for name, t in got.items():
        if name in want:  # ...and equals PEFT's merge (embedding transposed, q_proj as Linear)
            torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_embedding_lora_round_trips_through_save_peft_adapter(llama_embedding_lora, tmp_path):
    """load_peft_adapter -> save_peft_adapter writes PEFT's embedding layout back, and PEFT
    itself loads the copy to the same merged weights."""
    from lfm_engine.merge.lora_merge import load_peft_adapter, save_peft_adapter

    root, want = llama_embedding_lora
    ad = load_peft_adapter(str(root / "lora"))
    assert ad.embedding == frozenset({"model.embed_tokens"})
    a, b = ad.modules["model.embed_tokens"]
    assert tuple(a.shape) == (3, 32) and tuple(b.shape) == (96, 3)  # Linear convention: B @ A is [vocab, hidden]
    save_peft_adapter(ad, str(tmp_path / "copy"))
    base = transformers.LlamaForCausalLM.from_pretrained(str(root / "base")).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "copy"))
    merged = pm.merge_and_unload().state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(merged[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
