"""mergekit-moe's output architectures: which one a config gets, and for the two written
here (Mixtral, Qwen2-MoE) the output config.json and the tensor layout.

Selection is mergekit's (``select_output_arch``, mergekit 0.1.5): its architectures in
its order, ``Mixtral``, ``DeepSeek MoE``, ``Qwen MoE``, ``Qwen3 MoE``, are kept when the
config's ``architecture:`` is a case-insensitive prefix of the name (all of them without
``architecture:``), then when the config meets the architecture's conditions:

=============  ==========================================================================
Mixtral        no shared experts; base + experts of one model_type: llama or mistral
DeepSeek MoE   at most one shared expert and it has no prompts; all models (shared
               included) of one model_type: llama or mistral
Qwen MoE       exactly one shared expert, with positive_prompts unless gate_mode is
               ``random``; all models of one model_type: llama, mistral or qwen2
Qwen3 MoE      no shared experts; every model of model_type qwen3
=============  ==========================================================================

Mixtral wins when it qualifies (mergekit's compatibility rule), otherwise the first that
does. lfm-engine writes Mixtral and Qwen MoE (transformers' Qwen2MoeForCausalLM); a
config for which mergekit would write DeepSeek MoE (remote code) or Qwen3 MoE is an
error naming that architecture, never silently another output.

Layouts (E routed experts, layer L; every other tensor is the base's):

* Mixtral: ``model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` = expert E's
  ``mlp.{gate,up,down}_proj.weight``; router ``block_sparse_moe.gate.weight`` [E, hidden].
* Qwen MoE: ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` = expert E's
  MLP; ``mlp.shared_expert.{gate,up,down}_proj.weight`` = the shared expert model's MLP;
  router ``mlp.gate.weight`` [E, hidden] and ``mlp.shared_expert_gate.weight`` [1, hidden]
  = the shared expert's gate vector (the model computes
  ``mlp(x) = Σ_topk p_e·expert_e(x) + sigmoid(shared_expert_gate·x)·shared_expert(x)``,
  p renormalised over the top k). Qwen2-MoE attention has q/k/v biases: a base without
  them (Llama, Mistral) gets zero biases, as mergekit writes. A base tensor with no place
  in Qwen2-MoE (an ``o_proj`` or MLP bias, ...) is an error (mergekit drops it silently);
  ``rotary_emb.inv_freq`` buffers are dropped (transformers recomputes them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ORDER = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")   # mergekit's names and order
MIXTRAL, QWEN = "Mixtral", "Qwen MoE"
WRITTEN = (MIXTRAL, QWEN)

MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
MIXTRAL_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_QWEN_COPY_RE = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight|model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias)$")
_BUFFER_RE = re.compile(r"\.rotary_emb\.inv_freq$")
_QKV_RE = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight$")


@dataclass
class SelectionInputs:
    """What mergekit's conditions look at."""
    gate_mode: str
    n_shared: int
    shared_positive: bool      # the first shared expert has positive_prompts
    shared_any_prompts: bool   # ... positive or negative prompts
    routed_types: List[str]    # model_type of base + experts
    all_types: List[str]       # ... + shared experts


def _same_type(types: Sequence[str], allowed: Sequence[str], name: str) -> Optional[str]:
    if len(set(types)) != 1:
        return f"{name} needs all input models of one model_type, got {', '.join(sorted(set(map(str, types))))}"
    if types[0] not in allowed:
        return f"{name} needs {' or '.join(allowed)} input models, got {types[0]!r}"
    return None


def why_not(name: str, x: SelectionInputs) -> Optional[str]:
    """None when mergekit's architecture ``name`` accepts the config, else the reason."""
    if name == MIXTRAL:
        if x.n_shared:
            return "Mixtral has no shared experts"
        return _same_type(x.routed_types, ("llama", "mistral"), name)
    if name == "DeepSeek MoE":
        if x.n_shared > 1:
            return "DeepSeek MoE takes at most one shared expert"
        if x.n_shared and x.shared_any_prompts:
            return "DeepSeek MoE does not gate its shared expert (it has prompts)"
        return _same_type(x.all_types, ("llama", "mistral"), name)
    if name == QWEN:
        if x.n_shared != 1:
            return f"Qwen MoE needs exactly one shared expert, got {x.n_shared}"
        if x.gate_mode != "random" and not x.shared_positive:
            return ("Qwen MoE needs positive_prompts on the shared expert (its gate) unless "
                    "gate_mode is random")
        return _same_type(x.all_types, ("llama", "mistral", "qwen2"), name)
    if x.n_shared:
        return "Qwen3 MoE has no shared experts"
    return _same_type(x.all_types, ("qwen3",), name)


def select(architecture: Optional[str], x: SelectionInputs) -> Tuple[Optional[str], List[str]]:
    """(the architecture mergekit would write, errors). Errors when none qualifies or the
    one chosen is not written by lfm-engine."""
    names = list(ORDER)
    if architecture is not None:
        names = [n for n in ORDER if n.lower().startswith(str(architecture).lower())]
        if not names:
            return None, [f"architecture: no output architecture matches {architecture!r} (mergekit's names, "
                          f"matched by prefix: {', '.join(ORDER)}; lfm-engine writes {' and '.join(WRITTEN)})"]
    reasons = {n: why_not(n, x) for n in names}
    ok = [n for n in names if reasons[n] is None]
    if not ok:
        return None, ["no output architecture fits this config: "
                      + "; ".join(f"{n}: {r}" for n, r in reasons.items())]
    chosen = MIXTRAL if MIXTRAL in ok else ok[0]
    if chosen not in WRITTEN:
        hint = (" (give the shared expert positive_prompts, or use gate_mode random with `architecture: qwen`, "
                "for Qwen2-MoE output)" if chosen == "DeepSeek MoE" else "")
        return None, [f"mergekit would write {chosen} output for this config; lfm-engine writes "
                      f"{' and '.join(WRITTEN)} only{hint}"]
    return chosen, []


def output_config(arch: str, base_cfg: dict, n_experts: int, experts_per_token: int) -> dict:
    """config.json of the output (mergekit's fields; every other field the base's)."""
    mc = dict(base_cfg)
    if arch == MIXTRAL:
        mc.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                  num_local_experts=n_experts, num_experts_per_tok=experts_per_token)
        return mc
    inter = base_cfg["intermediate_size"]
    mc.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=n_experts,
              num_experts_per_tok=experts_per_token, decoder_sparse_step=1, norm_topk_prob=True,
              sliding_window=None, use_sliding_window=False, moe_intermediate_size=inter,
              shared_expert_intermediate_size=inter, mlp_only_layers=[], qkv_bias=True,
              router_aux_loss_coef=0.001, output_router_logits=False)
    return mc


@dataclass
class Entry:
    """One output tensor: from ``source`` ("base", "expert", "shared") tensor ``src``
    (expert index ``index``), or generated: "router"/"shared_gate" of layer ``index``,
    "zeros" of ``shape``."""
    out: str
    source: str
    src: Optional[str] = None
    index: int = 0
    shape: Tuple[int, ...] = ()


def layout(arch: str, base_tensors: Dict[str, object], n_experts: int, hidden: int) -> Tuple[List[Entry], List[str]]:
    """The output's tensors in base order (see the module docstring), and the base
    tensors that have no place in the output (errors)."""
    entries: List[Entry] = []
    errors: List[str] = []
    qwen = arch == QWEN
    for name, info in base_tensors.items():
        m = MLP_RE.match(name)
        if m is None:
            if qwen and _BUFFER_RE.search(name):
                continue
            if qwen and not _QWEN_COPY_RE.match(name):
                errors.append(f"base_model: '{name}' has no place in a Qwen2-MoE checkpoint")
                continue
            entries.append(Entry(name, "base", name))
            q = _QKV_RE.match(name) if qwen else None
            if q and f"{q.group(1)}.bias" not in base_tensors:
                entries.append(Entry(f"{q.group(1)}.bias", "zeros", shape=(int(info.shape[0]),)))
            continue
        li, proj = int(m.group(1)), m.group(2)
        if qwen:
            p = f"model.layers.{li}.mlp"
            entries += [Entry(f"{p}.experts.{e}.{proj}.weight", "expert", name, e) for e in range(n_experts)]
            entries.append(Entry(f"{p}.shared_expert.{proj}.weight", "shared", name))
            if proj == "gate_proj":
                entries.append(Entry(f"{p}.gate.weight", "router", index=li, shape=(n_experts, hidden)))
                entries.append(Entry(f"{p}.shared_expert_gate.weight", "shared_gate", index=li, shape=(1, hidden)))
        else:
            p = f"model.layers.{li}.block_sparse_moe"
            entries += [Entry(f"{p}.experts.{e}.{MIXTRAL_W[proj]}.weight", "expert", name, e)
                        for e in range(n_experts)]
            if proj == "gate_proj":
                entries.append(Entry(f"{p}.gate.weight", "router", index=li, shape=(n_experts, hidden)))
    return entries, errors
