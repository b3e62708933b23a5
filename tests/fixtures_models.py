"""Tiny Hugging Face-layout Llama-shaped model folders for merge tests and benchmarks.

``make_family(root, n_finetunes, ...)`` writes a base model and fine-tunes
(base + small random task vectors, so signs conflict and magnitudes tie rarely)
as real safetensors folders with config.json and tokenizer files; optionally
sharded with model.safetensors.index.json. Weights are random (seeded).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from safetensors.torch import save_file  # the library's writer: our reader is tested against it

from lfm_engine.io import dtypes


def llama_config(hidden=32, layers=2, intermediate=64, vocab=128, heads=4, kv_heads=2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "vocab_size": vocab, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def llama_shapes(cfg: dict) -> Dict[str, tuple]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        shapes.update({
            p + "self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, cfg["num_attention_heads"] * hd),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def random_weights(cfg: dict, seed: int, dtype=torch.float32, scale: float = 0.05) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            out[name] = (scale * torch.randn(shape, generator=g)).to(dtype)
    return out


def write_tokenizer(path: str, vocab: int, tag: str = "") -> None:
    toks = {f"tok{i}": i for i in range(vocab)}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        # a complete tokenizers-library file, so transformers (and mergekit) can load it
        json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                   "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
                   "post_processor": None, "decoder": None,
                   "model": {"type": "WordLevel", "vocab": toks, "unk_token": "tok0"}}, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "tag": tag}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "tok1", "eos_token": "tok2"}, f)


def write_model(path: str, cfg: dict, tensors: Dict[str, torch.Tensor], *, shards: int = 1,
                tokenizer: bool = True, tag: str = "") -> str:
    """Write config.json, weights (1 file or `shards` files + index) and tokenizer files."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(cfg)
    dts = {t.dtype for t in tensors.values()}
    if len(dts) == 1:
        cfg["torch_dtype"] = dtypes.of(dts.pop()).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    names = list(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        per = (len(names) + shards - 1) // shards
        wmap = {}
        for s in range(shards):
            part = names[s * per:(s + 1) * per]
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n].contiguous() for n in part}, os.path.join(path, fn),
                      metadata={"format": "pt"})
            wmap.update({n: fn for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f)
    if tokenizer:
        write_tokenizer(path, cfg["vocab_size"], tag or os.path.basename(path))
    return path


def finetune(base: Dict[str, torch.Tensor], seed: int, delta_scale: float = 0.01) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + delta_scale * torch.randn(t.shape, generator=g)).to(t.dtype)
            for n, t in base.items()}


def make_family(root: str, n_finetunes: int = 3, *, dtype=torch.float32, shards: int = 1,
                seed: int = 0, **cfg_kw) -> List[str]:
    """Write base + n fine-tunes under root; return [base_path, ft1_path, ...]."""
    cfg = llama_config(**cfg_kw)
    base = random_weights(cfg, seed, dtype)
    paths = [write_model(os.path.join(root, "base"), cfg, base, shards=shards)]
    for k in range(n_finetunes):
        paths.append(write_model(os.path.join(root, f"ft{k + 1}"), cfg,
                                 finetune(base, seed + 100 + k), shards=shards))
    return paths


# All tensors of a model folder (single file or sharded): one implementation, in the package.
from lfm_engine.demo.data import load_folder  # noqa: E402,F401
