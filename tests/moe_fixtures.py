"""Shared by the mergekit-moe tests: tiny dense Llama / Qwen2 checkpoints with a real
word-level tokenizer (the prompt-based gate modes tokenize), and running `lfm-engine moe`."""
from __future__ import annotations

import json
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import llama_config, random_weights  # noqa: E402

from lfm_engine.cli import main as cli_main  # noqa: E402

VOCAB = 64
WORDS = ["<s>", "</s>", "<unk>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]


def real_tokenizer(folder, byte_level=False):
    """A tokenizer that transformers can load (the fixture's is a stub): word-level over
    WORDS, or with ``byte_level`` a byte-level BPE over 'w', ' w' and the digits, which is
    what transformers' Qwen2Tokenizer (forced for model_type qwen2) can run."""
    import tokenizers
    if byte_level:
        vocab = {w: i for i, w in enumerate(WORDS[:4] + ["w", "\u0120", "\u0120w"] + list("0123456789"))}
        tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("\u0120", "w")]))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<pad>"}, f)
    for fn in ("special_tokens_map.json", "vocab.json", "merges.txt"):
        if os.path.exists(os.path.join(folder, fn)):
            os.remove(os.path.join(folder, fn))


def dense_config(model_type="llama"):
    """A transformers config (as config.json) of a 2-layer dense model, hidden 32."""
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=VOCAB)
    if model_type == "qwen2":
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                   sliding_window=None, max_window_layers=2)
    elif model_type == "mistral":
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    return cfg


def dense_weights(cfg, seed):
    """random_weights plus the q/k/v biases a Qwen2 model has."""
    w = random_weights(cfg, seed)
    if cfg["model_type"] == "qwen2":
        g = torch.Generator().manual_seed(1000 + seed)
        for name in list(w):
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                w[name[:-len("weight")] + "bias"] = 0.05 * torch.randn(w[name].shape[0], generator=g)
    return w


def run_moe(cfg, tmp_path, *extra, name="moe"):
    """`lfm-engine moe` on cfg (a dict) -> (exit status, output folder)."""
    p = tmp_path / f"{name}.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / f"out_{name}"
    return cli_main(["moe", str(p), str(out), *extra]), out
