"""Generated model folders for the demo, tests and benchmarks (real file formats, random weights).

``make_demo_set(root)`` writes, under ``root``:

    base/            a Llama-shaped causal LM in Hugging Face layout
                     (config.json, model.safetensors, generation_config.json)
    ft1/ ft2/ ft3/   fine-tunes: base + a small random task vector per tensor
                     x_i = b + delta_scale · N(0, 1)   (fresh signs, so TIES elections conflict)
    lora1/ ... lora4/  PEFT LoRA adapter folders (adapter_config.json +
                     adapter_model.safetensors with PEFT's key names
                     ``base_model.model.<module>.lora_A.weight`` [r, H_in] and
                     ``...lora_B.weight`` [H_out, r]); ranks, alphas and target modules
                     differ between adapters (one uses rsLoRA), B is non-zero so every
                     adapter changes the output.

Everything is seeded (same bytes on every run) and written to a temporary name then
renamed, so an interrupted run never leaves a half-written folder that looks complete.
The files are exactly what transformers / PEFT / mergekit read: ``LlamaForCausalLM.
from_pretrained(base)`` and ``PeftModel.from_pretrained(model, lora1)`` load them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lfm_engine.io import dtypes

# the seven projections of a Llama block: module suffix -> (H_out, H_in) as a function of cfg
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Default adapters of the demo set: (rank, lora_alpha, target_modules, use_rslora).
DEFAULT_ADAPTERS = (
    (8, 16, ["q_proj", "v_proj"], False),
    (16, 16, list(PROJECTIONS), False),
    (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    (8, 8, ["gate_proj", "up_proj", "down_proj"], True),
)


def llama_config(hidden: int = 256, layers: int = 2, intermediate: int = 512, vocab: int = 512,
                 heads: int = 4, kv_heads: int = 2, max_positions: int = 256) -> dict:
    """A transformers LlamaConfig dict (grouped-query attention when kv_heads < heads)."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) and heads of kv_heads ({kv_heads})")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def linear_shapes(cfg: dict) -> Dict[str, Tuple[int, int]]:
    """{module name: (H_out, H_in)} of every projection (the modules LoRA can target)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
           "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {}
    for L in range(cfg["num_hidden_layers"]):
        for p, shape in per.items():
            grp = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out[f"model.layers.{L}.{grp}.{p}"] = shape
    return out


def tensor_shapes(cfg: dict) -> Dict[str, tuple]:
    """{tensor name: shape} of a LlamaForCausalLM state dict (untied lm_head)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes: Dict[str, tuple] = {"model.embed_tokens.weight": (v, h)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        for mod, shape in linear_shapes(cfg).items():
            if mod.startswith(p):
                shapes[mod + ".weight"] = shape
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def random_weights(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Base weights: norms ~ 1 + 0.1·N(0,1); matrices N(0, 1/H_in) so activations stay O(1)
    through the layers (the logits are then well spread, which keeps greedy decoding away
    from near-ties)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        out[name] = t.to(dtype)
    return out


def finetune(base: Dict[str, torch.Tensor], seed: int, delta_scale: float = 0.01) -> Dict[str, torch.Tensor]:
    """x = b + delta_scale · N(0,1) · rms(b) per tensor, rounded once to b's dtype."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, t in base.items():
        rms = float(t.float().pow(2).mean().sqrt()) or 1.0
        out[n] = (t.float() + delta_scale * rms * torch.randn(t.shape, generator=g)).to(t.dtype)
    return out


def _tmp_folder(path: str) -> str:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)) or ".",
                       f".{os.path.basename(os.path.normpath(path))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, path: str) -> str:
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def write_model(path: str, cfg: dict, tensors: Dict[str, torch.Tensor], *, shards: int = 1) -> str:
    """Write a Hugging Face model folder: config.json, generation_config.json and
    model.safetensors, or with shards > 1 model-0000i-of-0000n.safetensors files plus
    model.safetensors.index.json (tensors split in order, about equally by count)."""
    from lfm_engine.io.safetensors import save_tensors as save_file

    tmp = _tmp_folder(path)
    try:
        cfg = dict(cfg)
        dts = {t.dtype for t in tensors.values()}
        if len(dts) == 1:
            cfg["torch_dtype"] = dtypes.of(next(iter(dts))).name
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
                       "do_sample": False}, f, indent=1)
        names = list(tensors)
        if shards <= 1:
            save_file(os.path.join(tmp, "model.safetensors"), {n: tensors[n] for n in names},
                      metadata={"format": "pt"})
        else:
            per = -(-len(names) // shards)
            wmap = {}
            for s in range(shards):
                part = names[s * per:(s + 1) * per]
                fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
                save_file(os.path.join(tmp, fn), {n: tensors[n] for n in part}, metadata={"format": "pt"})
                wmap.update({n: fn for n in part})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, path)


@dataclass
class AdapterWeights:
    """One PEFT LoRA adapter in memory: {module: (A [r, H_in], B [H_out, r])} and its scale rule."""

    rank: int
    alpha: float
    use_rslora: bool
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        """s = alpha / r (alpha / sqrt(r) with rsLoRA): the module output gains s · x Aᵀ Bᵀ."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def delta(self, module: str) -> torch.Tensor:
        """The dense weight change s · B @ A [H_out, H_in] (fp32) of one module."""
        A, B = self.modules[module]
        return self.scale * (B.float() @ A.float())


def random_adapter(cfg: dict, seed: int, rank: int = 8, alpha: float = 16, targets: Sequence[str] = ("q_proj", "v_proj"),
                   use_rslora: bool = False, magnitude: float = 0.2) -> AdapterWeights:
    """Random LoRA with a non-zero B (a trained adapter, not PEFT's B = 0 initialisation),
    sized so that s·B·A has a Frobenius norm of about `magnitude` times the base weight's."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    for name, (h_out, h_in) in linear_shapes(cfg).items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        A = torch.randn(rank, h_in, generator=g) / math.sqrt(h_in)
        # ||s B A||_F ~ s·sigma_B·sqrt(H_out·r); base ||W||_F ~ sqrt(H_out)
        B = torch.randn(h_out, rank, generator=g) * (magnitude / (scale * math.sqrt(rank)))
        mods[name] = (A, B)
    if not mods:
        raise ValueError(f"adapter targets {list(targets)} match no module of the model")
    return AdapterWeights(rank, float(alpha), use_rslora, mods)


def write_adapter(path: str, adapter: AdapterWeights, base_model_path: Optional[str] = None,
                  dtype: torch.dtype = torch.float32) -> str:
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), PEFT key format."""
    from lfm_engine.io.safetensors import save_tensors

    targets = sorted({m.rsplit(".", 1)[-1] for m in adapter.modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "target_modules": targets,
        "bias": "none", "use_rslora": adapter.use_rslora, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {}
    for m, (A, B) in adapter.modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = B.to(dtype).contiguous()
    tmp = _tmp_folder(path)
    try:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        save_tensors(os.path.join(tmp, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, path)


@dataclass
class DemoSet:
    """Paths (and the in-memory weights, for reference checks) of a generated demo set."""

    root: str
    config: dict
    base: str
    finetunes: List[str]
    adapters: Dict[str, str]
    base_weights: Dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    finetune_weights: List[Dict[str, torch.Tensor]] = field(repr=False, default_factory=list)
    adapter_weights: Dict[str, AdapterWeights] = field(repr=False, default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.base_weights.values())


def make_demo_set(root: str, *, hidden: int = 256, layers: int = 2, intermediate: int = 512, vocab: int = 512,
                  heads: int = 4, kv_heads: int = 2, n_finetunes: int = 3, n_adapters: int = 4,
                  delta_scale: float = 0.01, dtype: torch.dtype = torch.float32, seed: int = 0) -> DemoSet:
    """Write base, ft1..ftN and lora1..loraM under `root` (see the module docstring)."""
    if n_finetunes < 1 or n_adapters < 0:
        raise ValueError("need at least one fine-tune and a non-negative number of adapters")
    cfg = llama_config(hidden, layers, intermediate, vocab, heads, kv_heads)
    os.makedirs(root, exist_ok=True)
    base = random_weights(cfg, seed, dtype)
    ds = DemoSet(root=os.path.abspath(root), config=cfg, base=write_model(os.path.join(root, "base"), cfg, base),
                 finetunes=[], adapters={}, base_weights=base)
    for k in range(n_finetunes):
        ft = finetune(base, seed + 100 + k, delta_scale)
        ds.finetunes.append(write_model(os.path.join(root, f"ft{k + 1}"), cfg, ft))
        ds.finetune_weights.append(ft)
    for j in range(n_adapters):
        rank, alpha, targets, rs = DEFAULT_ADAPTERS[j % len(DEFAULT_ADAPTERS)]
        ad = random_adapter(cfg, seed + 200 + j, rank, alpha, targets, rs)
        name = f"lora{j + 1}"
        ds.adapters[name] = write_adapter(os.path.join(root, name), ad, base_model_path=ds.base)
        ds.adapter_weights[name] = ad
    return ds


def load_folder(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors model folder (one file or sharded with an index), as
    torch tensors (lfm_engine.io.model_folder.ModelFolder reads them)."""
    from lfm_engine.io.model_folder import ModelFolder

    with ModelFolder(path) as folder:
        return {k: folder.get(k) for k in folder.names()}
