"""mergekit-moe: a Mixtral or Qwen2-MoE mixture-of-experts model assembled from dense fine-tunes.

Config (mergekit-moe's keys)::

    base_model: path/or/hub-id        # attention, norms, embeddings, lm_head come from here
    architecture: qwen                # optional: mergekit's output name, matched by prefix
    gate_mode: hidden                 # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16                   # output dtype (default: the base's)
    experts_per_token: 2              # default min(2, number of experts)
    experts:
      - source_model: path/or/hub-id  # its MLP becomes expert i of every layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]     # optional
    shared_experts:                   # Qwen2-MoE: exactly one, always active, gated
      - source_model: path/or/hub-id
        positive_prompts: ["..."]     # its gate vector (not needed with gate_mode random)

The output architecture is chosen as mergekit chooses it (lfm_engine.merge.moe_arch:
Mixtral without shared experts, Qwen2-MoE with one); the tensor layouts and config.json
fields are described there, the gate vectors in lfm_engine.merge.moe_gates. Tensors
are streamed one at a time into a temporary folder renamed when complete; every problem
of a config (keys, folders, architecture, tensor shapes) is reported at once, before
anything is computed (``dry_run`` stops there).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional

from lfm_engine.merge import config as C
from lfm_engine.merge import lora_ref
from lfm_engine.merge import moe_arch as A
from lfm_engine.merge.moe_gates import GATE_MODES, PROMPT_MODES
from lfm_engine.merge.vocab_config import suggest
from lfm_engine.merge.outdir import staged_output
from lfm_engine.merge.yaml_load import YamlLimitError, load_documents

TOP_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "architecture",
            "shared_experts", "tokenizer_source", "tokenizer", "out_dtype")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
    shared: List[Expert] = field(default_factory=list)
    architecture: Optional[str] = None      # as written in the config


@dataclass
class MoePlan:
    """A checked config: the output architecture and tensors, ready to write."""
    cfg: MoeConfig
    arch: str
    base: object                            # ModelFolder
    experts: list                           # ModelFolder per routed expert
    shared: Optional[object]                # ModelFolder of the shared expert (Qwen2-MoE)
    entries: List[A.Entry]
    warnings: List[str]

    def summary(self) -> str:
        c = self.cfg
        lines = [f"output: {self.arch} ({A.output_config(self.arch, self.base.config, len(c.experts), c.experts_per_token)['architectures'][0]}), "
                 f"{len(c.experts)} experts, {c.experts_per_token} per token, gate_mode {c.gate_mode}",
                 f"base: {c.base_ref}"]
        lines += [f"expert {i}: {e.ref}" for i, e in enumerate(c.experts)]
        lines += [f"shared expert: {e.ref}" for e in c.shared]
        lines.append(f"{len(self.entries)} tensors")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


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


def _experts(raw, key, need_prompts, origin_dir, errors, required) -> List[Expert]:
    ex = raw.get(key)
    if ex is None and not required:
        return []
    if not isinstance(ex, list) or (required and not ex):
        errors.append(f"{key}: must be a {'non-empty ' if required else ''}list of {{source_model, positive_prompts}}")
        return []
    out = []
    for i, e in enumerate(ex):
        where = f"{key}[{i}]"
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
        out.append(Expert(ref, C._resolve_path(ref, origin_dir),
                          _prompts(e.get("positive_prompts"), f"{where}.positive_prompts", errors, need_prompts),
                          _prompts(e.get("negative_prompts"), f"{where}.negative_prompts", errors, False)))
    return out


def _parse(path: str):
    """(MoeConfig or None, errors) from the YAML file; folders are not opened."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        docs = load_documents(text)
    except OSError as e:
        return None, [f"{path}: cannot read the config: {e}"]
    except YamlLimitError as e:
        return None, [f"{path}: refused: {e}"]
    except Exception as e:  # yaml.YAMLError and decoding errors
        return None, [f"{path}: invalid YAML: {e}"]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return None, [f"{path}: expected one YAML mapping (base_model, experts, ...)"]
    raw = docs[0]
    origin_dir = os.path.dirname(os.path.abspath(path))
    errors: List[str] = []
    for k in raw:
        if k not in TOP_KEYS:
            errors.append(f"{k}: unknown key" + suggest(k, TOP_KEYS))
    arch = raw.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch):
        errors.append(f"architecture: expected a name such as mixtral or qwen, got {arch!r}")
        arch = None
    tok = raw.get("tokenizer_source")
    if tok not in (None, "base") or raw.get("tokenizer") is not None:
        errors.append("tokenizer_source/tokenizer: only the base model's tokenizer is supported")
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        errors.append(f"gate_mode: unknown mode {mode!r}" + suggest(str(mode), GATE_MODES)
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
    experts = _experts(raw, "experts", mode in PROMPT_MODES, origin_dir, errors, True)
    # a shared expert's prompts are optional here: the architecture decides (moe_arch)
    shared = _experts(raw, "shared_experts", False, origin_dir, errors, False)
    k = C.as_number(raw.get("experts_per_token", min(2, max(1, len(experts)))))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(1, len(experts)):
        errors.append(f"experts_per_token: must be an integer in [1, {max(1, len(experts))}], got {k!r}")
        k = 1
    base_path = C._resolve_path(base_ref, origin_dir) if base_ref else None
    errors += _useless_config(mode, experts)
    return MoeConfig(base_ref, base_path, mode, dtype, int(k), experts, text, shared, arch), errors


SAME_MODELS_FLAG = "--i-understand-this-is-not-useful-without-training"


def _useless_config(mode: str, experts: List[Expert]) -> List[str]:
    """mergekit's refusals of a MoE that cannot route (is_bad_config), outside gate_mode
    random: every expert with the same prompts, or every expert the same model (the
    latter allowed by SAME_MODELS_FLAG, checked by plan_moe)."""
    if mode == "random" or len(experts) < 2:
        return []
    prompts = {(tuple(e.positive), tuple(e.negative)) for e in experts}
    if len(prompts) == 1:
        return ["experts: every expert has the same positive and negative prompts, so the router "
                "cannot tell them apart (each expert's positive_prompts should show what goes to it)"]
    return []


def _open(ref: str, path: str, where: str, errors: List[str]):
    from lfm_engine.io.model_folder import CheckpointError, ModelFolder
    try:
        C._quick_folder_check(ref, path)
        return ModelFolder(path)
    except CheckpointError as e:
        errors.append(f"{where}: {e}")
        return None


def _mlp_mismatch(base, other, ref: str, where: str) -> Optional[str]:
    for name, info in base.tensors.items():
        if A.MLP_RE.match(name):
            o = other.tensors.get(name)
            if o is None or tuple(o.shape) != tuple(info.shape):
                return f"{where} ({ref}): '{name}' is missing or has another shape than in the base"
    return None


def plan_moe(config_path: str, other_errors=(), allow_all_same: bool = False) -> MoePlan:
    """Parse and check a mergekit-moe config and its models; raise MergeConfigErrors
    listing every problem found (config keys, folders, architecture, tensors), after
    ``other_errors`` (the caller's, e.g. about the output folder)."""
    cfg, errors = _parse(config_path)
    errors = list(other_errors) + errors
    if cfg is None:
        raise C.MergeConfigErrors(errors)
    if (cfg.gate_mode != "random" and len(cfg.experts) > 1 and not allow_all_same
            and len({os.path.realpath(e.path) for e in cfg.experts}) == 1):
        errors.append(f"experts: every expert is the same model, which gives the base's outputs at a "
                      f"higher cost; to build it anyway (to train it afterwards) pass {SAME_MODELS_FLAG}")
    base = _open(cfg.base_ref, cfg.base_path, "base_model", errors) if cfg.base_ref else None
    experts = [_open(e.ref, e.path, f"experts[{i}].source_model", errors) for i, e in enumerate(cfg.experts)]
    shared = [_open(e.ref, e.path, f"shared_experts[{i}].source_model", errors) for i, e in enumerate(cfg.shared)]
    warnings: List[str] = []
    arch, entries = None, []
    if base is not None and all(f is not None for f in experts + shared):
        def mtype(fo):
            return (fo.config or {}).get("model_type")
        x = A.SelectionInputs(
            cfg.gate_mode, len(cfg.shared), bool(cfg.shared and cfg.shared[0].positive),
            bool(cfg.shared and (cfg.shared[0].positive or cfg.shared[0].negative)),
            [mtype(base)] + [mtype(f) for f in experts], [mtype(base)] + [mtype(f) for f in experts + shared])
        arch, arch_errors = A.select(cfg.architecture, x)
        errors += arch_errors
        for i, (e, fo) in enumerate(zip(cfg.experts + cfg.shared, experts + shared)):
            where = f"experts[{i}]" if i < len(cfg.experts) else f"shared_experts[{i - len(cfg.experts)}]"
            msg = _mlp_mismatch(base, fo, e.ref, where)
            if msg:
                errors.append(msg)
        bc = base.config or {}
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            if not isinstance(bc.get(key), int):
                errors.append(f"base_model: config.json has no integer '{key}'")
        if not any(A.MLP_RE.match(n) for n in base.tensors) or "model.embed_tokens.weight" not in base.tensors:
            errors.append(f"base_model: '{cfg.base_ref}' has no model.embed_tokens.weight or no "
                          f"model.layers.N.mlp.gate_proj/up_proj/down_proj weights (Llama-style names)")
        elif arch is not None and isinstance(bc.get("hidden_size"), int):
            entries, lay_errors = A.layout(arch, base.tensors, len(cfg.experts), bc["hidden_size"])
            errors += lay_errors
            n = len(cfg.experts)
            if arch == A.QWEN and n & (n - 1):
                warnings.append(f"{n} experts is not a power of two: llama.cpp cannot run this model "
                                "(mergekit's warning)")
        if cfg.gate_mode in ("hidden", "hidden_avg") and lora_ref.split(cfg.base_ref) is not None:
            errors.append(f"base_model: gate_mode {cfg.gate_mode} runs the base in transformers, which "
                          f"would not apply the adapter of '{cfg.base_ref}'; merge it into a folder first")
        if cfg.gate_mode in PROMPT_MODES and not any(
                os.path.isfile(os.path.join(cfg.base_path, m)) for m in TOKENIZER_MARKERS):
            errors.append(f"base_model: gate_mode {cfg.gate_mode} tokenizes the prompts with the base's "
                          f"tokenizer, and '{cfg.base_ref}' has none ({', '.join(TOKENIZER_MARKERS)})")
    if errors:
        raise C.MergeConfigErrors(errors)
    return MoePlan(cfg, arch, base, experts, shared[0] if shared else None, entries, warnings)


def build_moe(config_path: str, out_dir: str, *, seed: int = 0, out_shard_size="5GB",
              allow_overwrite: bool = False, dry_run: bool = False, allow_all_same: bool = False,
              device: str = "cpu", copy_tokenizer: bool = True, write_config_copy: bool = True) -> MoePlan:
    """Write the MoE model (nothing with ``dry_run``); return the checked plan. ``device``
    runs the hidden gate modes; ``copy_tokenizer`` copies the base's tokenizer files;
    ``write_config_copy`` writes the config as mergekit_moe_config.yml (mergekit's
    --write-model-card)."""
    import torch

    from lfm_engine.io import dtypes
    from lfm_engine.io.safetensors import ShardedWriter, parse_size, plan_shards, read_tensor
    from lfm_engine.merge.moe_gates import gate_vectors
    out_dir = os.path.abspath(out_dir)
    exists = os.path.lexists(out_dir) and not allow_overwrite
    plan = plan_moe(config_path, [f"output folder '{out_dir}' already exists (use --allow-overwrite)"]
                    if exists else [], allow_all_same)
    if dry_run:
        return plan
    cfg, base = plan.cfg, plan.base
    E = len(cfg.experts)
    gated = list(cfg.experts) + (list(cfg.shared) if plan.arch == A.QWEN else [])
    gates = gate_vectors(cfg.gate_mode, base, cfg.base_path, gated, seed, device)   # [L, E(+1), H]
    out_dt = dtypes.from_name(cfg.dtype) if cfg.dtype else None

    def dt(info):
        return out_dt if (out_dt is not None and info.dtype.is_floating_point) else info.dtype

    ref_dt = dt(base.tensors["model.embed_tokens.weight"])

    def source(e: A.Entry):
        if e.source == "base":
            return base
        return plan.shared if e.source == "shared" else plan.experts[e.index]

    specs = []
    for e in plan.entries:
        if e.source in ("router", "shared_gate", "zeros"):
            specs.append((e.out, ref_dt, e.shape))
        else:
            info = source(e).tensors[e.src]
            specs.append((e.out, dt(info), tuple(info.shape)))

    def tensor(e: A.Entry):
        if e.source == "router":
            return gates[e.index, :E]
        if e.source == "shared_gate":
            return gates[e.index, E:E + 1]
        if e.source == "zeros":
            return torch.zeros(e.shape)
        return read_tensor(source(e).tensors[e.src])

    layout = plan_shards(specs, parse_size(out_shard_size))
    with staged_output(out_dir) as tmp:
        writer = ShardedWriter(tmp, layout, metadata={"producer": "lfm_engine moe"})
        try:
            for e, (_, d, _) in zip(plan.entries, specs):
                writer.write(e.out, tensor(e).to(d.torch).contiguous())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        mc = A.output_config(plan.arch, base.config, E, cfg.experts_per_token)
        if cfg.dtype:
            mc["torch_dtype"] = cfg.dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(mc, f, indent=2)
        from lfm_engine.merge.runner import TOKENIZER_FILES
        for fn in (TOKENIZER_FILES if copy_tokenizer else ()) + ("generation_config.json",):
            s = os.path.join(cfg.base_path, fn)
            if os.path.isfile(s):
                shutil.copyfile(s, os.path.join(tmp, fn))
        if write_config_copy:
            with open(os.path.join(tmp, "mergekit_moe_config.yml"), "w") as f:
                f.write(cfg.yaml_text)
    return plan
