"""mergekit-moe: a Mixtral mixture-of-experts model assembled from dense fine-tunes.

Config (mergekit-moe's keys)::

    base_model: path/or/hub-id        # attention, norms, embeddings, lm_head come from here
    gate_mode: hidden                 # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16                   # output dtype (default: the base's)
    experts_per_token: 2              # default min(2, number of experts)
    experts:
      - source_model: path/or/hub-id  # its MLP becomes expert i of every layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]     # optional

Output (the Mixtral checkpoint layout, which transformers loads as MixtralForCausalLM):
``model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight`` = expert E's
``mlp.{gate,up,down}_proj`` (w1 = gate, w3 = up, w2 = down), the router
``model.layers.L.block_sparse_moe.gate.weight`` [E, hidden] = the gate vectors below,
everything else copied from the base; config.json becomes a Mixtral config with
``num_local_experts`` = E and ``num_experts_per_tok``.

Gate vectors g[L, E] (mergekit's router.py): for each expert, a vector per layer from
its positive prompts minus (if any) its negative prompts, normalised to unit length:

* cheap_embed: Σ over prompts and tokens of the base's input embeddings of the
  prompts' tokens (BOS + prompt, no other special tokens), the same for every layer;
* hidden / hidden_avg: the base model's hidden states entering each layer
  (transformers ``output_hidden_states``, the last one dropped) at the last token
  (hidden) or averaged over positions (hidden_avg), averaged over prompts. Decision:
  prompts are left-padded, so "the last token" is a prompt token, never padding;
* random: standard normal; uniform_random: U(−1/√hidden, 1/√hidden) (seeded, --seed).

Architectures: Llama/Mistral-style bases (``mlp.gate_proj/up_proj/down_proj``) only;
Qwen2-MoE / shared experts are refused. Tensors are streamed one at a time into
a temporary folder renamed when complete.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional

import torch

from lfm_engine.merge import config as C
from lfm_engine.merge.outdir import staged_output
from lfm_engine.merge.yaml_load import YamlLimitError, load_documents

GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "architecture",
            "shared_experts", "tokenizer_source", "tokenizer", "out_dtype")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
ARCHS = ("llama", "mistral")
MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass
class Expert:
    ref: str
    path: str
    positive: List[str]
    negative: List[str]


@dataclass
class MoeConfig:
    base_ref: str
    base_path: str
    gate_mode: str
    dtype: Optional[str]
    experts_per_token: int
    experts: List[Expert]
    yaml_text: str


def _prompts(v, where, errors, required) -> List[str]:
    if v is None:
        if required:
            errors.append(f"{where}: missing (gate modes hidden and cheap_embed need prompts)")
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v) or (required and not v):
        errors.append(f"{where}: expected a list of non-empty strings, got {v!r}")
        return []
    return v


def parse_moe_config(path: str) -> MoeConfig:
    """Parse and check a mergekit-moe YAML file; raise MergeConfigErrors listing every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = load_documents(text)
    except OSError as e:
        raise C.MergeConfigErrors([f"{path}: cannot read the config: {e}"]) from None
    except YamlLimitError as e:
        raise C.MergeConfigErrors([f"{path}: refused: {e}"]) from None
    except Exception as e:  # yaml.YAMLError and decoding errors
        raise C.MergeConfigErrors([f"{path}: invalid YAML: {e}"]) from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise C.MergeConfigErrors([f"{path}: expected one YAML mapping (base_model, experts, ...)"])
    raw = docs[0]
    origin_dir = os.path.dirname(os.path.abspath(path))
    errors: List[str] = []
    for k in raw:
        if k not in TOP_KEYS:
            errors.append(f"{k}: unknown key" + C._suggest(k, TOP_KEYS))
    if raw.get("shared_experts") is not None:
        errors.append("shared_experts: Qwen2-MoE style shared experts are not supported (Mixtral output only)")
    arch = raw.get("architecture")
    if arch is not None and str(arch).lower() != "mixtral":
        errors.append(f"architecture: only 'mixtral' output is supported, got {arch!r}")
    tok = raw.get("tokenizer_source")
    if tok not in (None, "base") or raw.get("tokenizer") is not None:
        errors.append("tokenizer_source/tokenizer: only the base model's tokenizer is supported")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        errors.append(f"gate_mode: unknown mode {mode!r}" + C._suggest(str(mode), GATE_MODES)
                      + f" (one of: {', '.join(GATE_MODES)})")
        mode = "random"
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        if not isinstance(dtype, str) or dtype.lower() not in C.DTYPES:
            errors.append(f"dtype: unknown dtype {dtype!r}")
            dtype = None
        else:
            dtype = C.DTYPES[dtype.lower()]
    base_ref = raw.get("base_model")
    if not isinstance(base_ref, str) or not base_ref:
        errors.append("base_model: missing (the model the attention, norms and embeddings come from)")
        base_ref = None
    need_prompts = mode in ("hidden", "hidden_avg", "cheap_embed")
    experts: List[Expert] = []
    ex = raw.get("experts")
    if not isinstance(ex, list) or not ex:
        errors.append("experts: must be a non-empty list of {source_model, positive_prompts}")
        ex = []
    for i, e in enumerate(ex):
        where = f"experts[{i}]"
        if not isinstance(e, dict):
            errors.append(f"{where}: expected a mapping with source_model and positive_prompts")
            continue
        C._check_keys(e, EXPERT_KEYS, where, errors)
        for k in ("noise_scale", "residual_scale"):
            if e.get(k) is not None:
                errors.append(f"{where}.{k}: not supported")
        ref = e.get("source_model")
        if not isinstance(ref, str) or not ref:
            errors.append(f"{where}.source_model: missing")
            continue
        experts.append(Expert(ref, C._resolve_path(ref, origin_dir),
                              _prompts(e.get("positive_prompts"), f"{where}.positive_prompts", errors, need_prompts),
                              _prompts(e.get("negative_prompts"), f"{where}.negative_prompts", errors, False)))
    k = C.as_number(raw.get("experts_per_token", min(2, max(1, len(experts)))))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(1, len(experts)):
        errors.append(f"experts_per_token: must be an integer in [1, {max(1, len(experts))}], got {k!r}")
    base_path = C._resolve_path(base_ref, origin_dir) if base_ref else None
    from lfm_engine.io.model_folder import CheckpointError
    refs = ([(base_ref, base_path, "base_model")] if base_ref else []) + [
        (x.ref, x.path, f"experts[{i}].source_model") for i, x in enumerate(experts)]
    for ref, p, where in refs:
        try:
            C._quick_folder_check(ref, p)
        except CheckpointError as e:
            errors.append(f"{where}: {e}")
    if errors:
        raise C.MergeConfigErrors(errors)
    return MoeConfig(base_ref, base_path, mode, dtype, int(k), experts, text)


def _check_models(cfg: MoeConfig):
    from lfm_engine.io.model_folder import ModelFolder
    base = ModelFolder(cfg.base_path)
    errors = []
    bc = base.config or {}
    if bc.get("model_type") not in ARCHS:
        errors.append(f"base_model: model_type {bc.get('model_type')!r} is not supported "
                      f"(Llama/Mistral-style bases: {', '.join(ARCHS)})")
    folders = [ModelFolder(e.path) for e in cfg.experts]
    for e, fo in zip(cfg.experts, folders):
        for name, info in base.tensors.items():
            if MLP_RE.match(name):
                other = fo.tensors.get(name)
                if other is None or tuple(other.shape) != tuple(info.shape):
                    errors.append(f"{e.ref}: '{name}' is missing or has another shape than in the base")
                    break
    if errors:
        raise C.MergeConfigErrors(errors)
    return base, folders


def _tokenize(tokenizer, prompts):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def gate_vectors(cfg: MoeConfig, base, seed: int) -> torch.Tensor:
    """g [layers, experts, hidden] (see the module docstring), float32."""
    from lfm_engine.io.safetensors import read_tensor
    bc = base.config
    L, H, E = int(bc["num_hidden_layers"]), int(bc["hidden_size"]), len(cfg.experts)
    g = torch.Generator().manual_seed(seed)
    if cfg.gate_mode == "random":
        return torch.randn((L, E, H), generator=g)
    if cfg.gate_mode == "uniform_random":
        s = math.sqrt(1.0 / H)
        return torch.rand((L, E, H), generator=g) * 2 * s - s
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(cfg.base_path)
    if cfg.gate_mode == "cheap_embed":
        emb = read_tensor(base.tensors["model.embed_tokens.weight"]).float()

        def vec(prompts):
            t = _tokenize(tok, prompts)
            h = emb[t["input_ids"]] * t["attention_mask"].unsqueeze(-1)
            return h.sum(dim=(0, 1)).unsqueeze(0).repeat(L, 1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.base_path, dtype=torch.float32)
        model.eval()

        def vec(prompts):
            t = _tokenize(tok, prompts)
            with torch.no_grad():
                out = model(**t, output_hidden_states=True, return_dict=True)
            hs = torch.stack(out.hidden_states[:-1])          # [L, batch, seq, H]
            hs = hs.mean(dim=2) if cfg.gate_mode == "hidden_avg" else hs[:, :, -1, :]
            return hs.mean(dim=1)
    rows = []
    for e in cfg.experts:
        v = vec(e.positive)
        if e.negative:
            v = v - vec(e.negative)
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def build_moe(config_path: str, out_dir: str, *, seed: int = 0, out_shard_size="5GB",
              allow_overwrite: bool = False) -> int:
    """Write the Mixtral model; return the number of tensors written."""
    from lfm_engine.io import dtypes
    from lfm_engine.io.safetensors import ShardedWriter, parse_size, plan_shards, read_tensor
    cfg = parse_moe_config(config_path)
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not allow_overwrite:
        raise C.MergeConfigErrors([f"output folder '{out_dir}' already exists (use --allow-overwrite)"])
    base, experts = _check_models(cfg)
    gates = gate_vectors(cfg, base, seed)
    out_dt = dtypes.from_name(cfg.dtype) if cfg.dtype else None

    def dt(info):
        return out_dt if (out_dt is not None and info.dtype.is_floating_point) else info.dtype

    # (output name, source folder, source tensor name | None for a gate, layer)
    entries = []
    for name, info in base.tensors.items():
        m = MLP_RE.match(name)
        if m is None:
            entries.append((name, base, name, None))
        elif m.group(2) == "gate_proj":
            li = int(m.group(1))
            entries.append((f"model.layers.{li}.block_sparse_moe.gate.weight", None, None, li))
            for ei, fo in enumerate(experts):
                for w, proj in MLP.items():
                    entries.append((f"model.layers.{li}.block_sparse_moe.experts.{ei}.{w}.weight", fo,
                                    f"model.layers.{li}.mlp.{proj}.weight", None))
    ref_dt = dt(base.tensors["model.embed_tokens.weight"])
    specs = []
    for out_name, fo, src, li in entries:
        if fo is None:
            specs.append((out_name, ref_dt, (len(experts), gates.shape[-1])))
        else:
            info = fo.tensors[src]
            specs.append((out_name, dt(info), tuple(info.shape)))
    layout = plan_shards(specs, parse_size(out_shard_size))
    with staged_output(out_dir) as tmp:
        writer = ShardedWriter(tmp, layout, metadata={"producer": "lfm_engine moe"})
        try:
            for (out_name, fo, src, li), (_, d, _) in zip(entries, specs):
                t = gates[li] if fo is None else read_tensor(fo.tensors[src])
                writer.write(out_name, t.to(d.torch).contiguous())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        mc = dict(base.config)
        mc.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                  num_local_experts=len(experts), num_experts_per_tok=cfg.experts_per_token)
        if cfg.dtype:
            mc["torch_dtype"] = cfg.dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(mc, f, indent=2)
        from lfm_engine.merge.runner import TOKENIZER_FILES
        for fn in TOKENIZER_FILES + ("generation_config.json",):
            s = os.path.join(cfg.base_path, fn)
            if os.path.isfile(s):
                shutil.copyfile(s, os.path.join(tmp, fn))
        with open(os.path.join(tmp, "mergekit_moe_config.yml"), "w") as f:
            f.write(cfg.yaml_text)
    return len(entries)
