"""Extract a LoRA adapter from a fine-tune (mergekit-extract-lora): per-module low-rank
SVD of W_ft − W_base, embeddings and lm_head saved in full or as low-rank factors.

Every 2-D floating ``*.weight`` of the base is one of (module = the name without
``.weight``, key = its last segment):

* an input embedding (``embed_tokens``, ``wte``, ``wpe``, ``word_embeddings``,
  ``embed_in``: PEFT's nn.Embedding) or the output embedding (``lm_head``, ``embed_out``);
* a norm (``norm``, ``ln_``) or any other weight that is not 2-D: not decomposable;
* otherwise a linear layer.

What happens to a module (first rule that applies, mergekit's order):

1. listed by ``save_modules`` (module or key, mergekit's ``--save-module``): the
   fine-tune's weight (and bias) saved in full, PEFT ``modules_to_save``;
2. an embedding, unless an ``exclude`` regex matches it: with ``embed_lora`` low-rank
   (below; lm_head as a linear layer), otherwise saved in full as ``modules_to_save``
   (mergekit's default). Decision: an embedding whose delta is zero is left out (the
   adapter then gives base + adapter = fine-tune without carrying the matrices), and an
   embedding whose vocabulary differs from the base's is saved in full even with
   ``embed_lora`` (as mergekit does; the base must be resized to load it);
   ``include_lm_head`` (kept from earlier releases) extracts lm_head low-rank alone;
3. excluded by an ``exclude`` regex or not matched by any ``include`` regex
   (``re.search`` on the module name): left out;
4. not decomposable (norms): saved in full as ``modules_to_save`` when its weight
   changed (mergekit saves them always), left out with ``skip_undecomposable``;
5. a linear layer: low-rank. Its bias, if the fine-tune changed it, is not carried
   (mergekit writes ``lora_B.bias``, which PEFT reads only with ``lora_bias``): the
   report notes it.

Low rank, one module at a time (streaming):

    D = W_ft − W_base                          (fp32, [out, in]; an embedding's is
                                                transposed first: [hidden, vocab])
    U, S, Vh = randomized_svd(D, r)            (lora_merge.randomized_svd, seeded)
    B = U · diag(√S)  [out, r],  A = diag(√S) · Vh  [r, in],  scale 1 (lora_alpha = r)
                                               (distribute_scale=False: B = U, A = S·Vh)

so B @ A is the best rank-r approximation of D (exact when r + oversampling ≥
min(out, in)). Linear layers are written as ``lora_A.weight``/``lora_B.weight``;
embeddings in PEFT's embedding layout, ``lora_embedding_A`` [r, vocab] and
``lora_embedding_B`` [hidden, r] (PEFT adds (B @ A)ᵀ to the [vocab, hidden] table). The
rank is ``rank`` for every module, or with ``energy`` the smallest r ≤ ``rank`` whose
singular values hold that fraction of ‖D‖_F² (‖D‖_F² is known exactly, so the fraction
is exact even though only ``rank`` values are computed); with ``sv_epsilon`` > 0 only
singular values above it are kept (mergekit's --sv-epsilon; a module with none is left
out); modules whose delta is zero are left out. The report gives, per module, how it was stored, the rank and the relative
error ‖D − BA‖_F / ‖D‖_F (0 for modules saved in full). Output: a PEFT LoRA folder
(adapter_config.json with rank_pattern/alpha_pattern where ranks differ and
modules_to_save by full module name, adapter_model.safetensors,
extraction_report.json), written to a
temporary sibling and renamed when complete.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from lfm_engine.io.model_folder import ModelFolder
from lfm_engine.io.safetensors import read_tensor
from lfm_engine.merge.outdir import staged_output

EMBED_RE = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in)\.weight$")
LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
NORM_RE = re.compile(r"(norm|ln_)")
LORA, EMBED_LORA, SAVED = "lora", "embedding_lora", "saved"


class ExtractError(ValueError):
    """Inputs or options that cannot give an adapter (message names the problem)."""


@dataclass
class ModuleResult:
    module: str
    shape: tuple
    rank: Optional[int]          # None: saved in full
    rel_error: float
    kind: str = LORA             # lora | embedding_lora | saved
    note: Optional[str] = None


@dataclass
class _Target:
    name: str                    # the weight's tensor name
    kind: str
    note: Optional[str] = None   # why an embedding is saved in full


def _compile(patterns: Sequence[str], flag: str) -> List[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ExtractError(f"{flag} {p!r}: not a regular expression ({e})") from None
    return out


def _targets(base: ModelFolder, ft: ModelFolder, *, include_lm_head: bool, embed_lora: bool,
             save_modules: Sequence[str], skip_undecomposable: bool, exclude, include,
             errors: List[str]) -> List[_Target]:
    out = []
    for n, info in base.tensors.items():
        if not n.endswith(".weight") or not info.dtype.is_floating_point:
            continue
        module = n[:-len(".weight")]
        key = module.rsplit(".", 1)[-1]
        other = ft.tensors.get(n)
        if other is None:
            errors.append(f"'{n}' is missing from the fine-tune")
            continue
        same = tuple(other.shape) == tuple(info.shape)
        is_embed, is_head = bool(EMBED_RE.search(n)), bool(LM_HEAD_RE.search(n))
        excluded = any(r.search(module) for r in exclude)
        linear = len(info.shape) == 2 and not NORM_RE.search(module)
        if module in save_modules or key in save_modules:
            out.append(_Target(n, SAVED))
        elif (is_embed or is_head) and not excluded:
            if not same:
                out.append(_Target(n, SAVED, f"the fine-tune's vocabulary differs ({list(other.shape)} vs the "
                                             f"base's {list(info.shape)}): resize the base's embeddings to load it"))
            elif embed_lora or (is_head and include_lm_head):
                out.append(_Target(n, EMBED_LORA if is_embed else LORA))
            else:
                out.append(_Target(n, SAVED))
        elif is_embed or is_head or excluded or (include and not any(r.search(module) for r in include)):
            continue
        elif not same:
            errors.append(f"'{n}': the fine-tune has shape {list(other.shape)}, the base {list(info.shape)}")
        elif linear:
            out.append(_Target(n, LORA))
        elif not skip_undecomposable:
            out.append(_Target(n, SAVED))
    return out


@dataclass
class RankRule:
    """How many singular values a module keeps and how they are split between A and B."""
    rank: int
    energy: Optional[float] = None
    sv_epsilon: float = 0.0          # mergekit's --sv-epsilon: drop σ ≤ epsilon
    distribute_scale: bool = True    # mergekit's --no-distribute-scale: A = S·Vh, B = U
    seed: int = 0


def _low_rank(d: torch.Tensor, total: float, rule: RankRule):
    """(A [r, in], B [out, r], relative error) of the delta d [out, in] (module
    docstring), or None when no singular value is above ``sv_epsilon``."""
    from lfm_engine.merge.lora_merge import randomized_svd
    r_max = min(rule.rank, *d.shape)
    U, S, Vh = randomized_svd(d, r_max, seed=rule.seed)
    r = r_max
    if rule.energy is not None:
        cum = torch.cumsum(S.double().square(), 0) / total
        hit = torch.nonzero(cum >= rule.energy - 1e-12)
        r = int(hit[0]) + 1 if hit.numel() else r_max
    if rule.sv_epsilon > 0:
        r = min(r, int((S > rule.sv_epsilon).sum()))
        if r == 0:
            return None
    S = S[:r].clamp(min=0)
    if rule.distribute_scale:
        sq = S.sqrt()
        B, A = U[:, :r] * sq, sq[:, None] * Vh[:r]
    else:
        B, A = U[:, :r], S[:, None] * Vh[:r]
    B, A = B.contiguous(), A.contiguous()
    return A, B, float((d - B @ A).norm()) / math.sqrt(total)


def extract(base_path: str, ft_path: str, out_dir: str, *, rank: int, energy: Optional[float] = None,
            include_lm_head: bool = False, embed_lora: bool = False, save_modules: Sequence[str] = (),
            exclude_regexes: Sequence[str] = (), include_regexes: Sequence[str] = (),
            skip_undecomposable: bool = False, sv_epsilon: float = 0.0, distribute_scale: bool = True,
            seed: int = 0, allow_overwrite: bool = False) -> List[ModuleResult]:
    """Write the adapter to ``out_dir``; return the per-module report (see module doc)."""
    from lfm_engine.io.safetensors import save_tensors

    if not isinstance(rank, int) or rank < 1:
        raise ExtractError(f"--rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ExtractError(f"--energy must lie in (0, 1], got {energy!r}")
    if not (sv_epsilon >= 0.0 and math.isfinite(sv_epsilon)):
        raise ExtractError(f"--sv-epsilon must be a finite number >= 0, got {sv_epsilon!r}")
    rule = RankRule(rank, energy, sv_epsilon, distribute_scale, seed)
    exclude = _compile(exclude_regexes, "--exclude-regex")
    include = _compile(include_regexes, "--include-regex")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not allow_overwrite:
        raise ExtractError(f"output folder '{out_dir}' already exists (use --allow-overwrite)")
    base, ft = ModelFolder(base_path), ModelFolder(ft_path)
    errors: List[str] = []
    targets = _targets(base, ft, include_lm_head=include_lm_head, embed_lora=embed_lora,
                       save_modules=set(save_modules), skip_undecomposable=skip_undecomposable,
                       exclude=exclude, include=include, errors=errors)
    named = {t.name[:-len(".weight")] for t in targets} | {t.name[:-len(".weight")].rsplit(".", 1)[-1] for t in targets}
    for s in save_modules:
        if s not in named:
            errors.append(f"--save-module {s}: no weight of the base belongs to a module named so (full name or last part)")
    if errors:
        raise ExtractError("; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    if not targets:
        raise ExtractError("no linear-layer weights to extract from (2-D *.weight tensors in the layers)")

    tensors: Dict[str, torch.Tensor] = {}
    report: List[ModuleResult] = []
    for t in targets:
        module = t.name[:-len(".weight")]
        w_ft = read_tensor(ft.tensors[t.name])
        if t.kind == SAVED and t.note:
            d_total = None   # no delta across different vocabularies
        else:
            d = w_ft.float() - read_tensor(base.tensors[t.name]).float()
            d_total = float(d.square().sum())
            if not math.isfinite(d_total):
                raise ExtractError(f"'{t.name}': the delta is not finite (NaN/Inf in an input or overflow)")
            if d_total == 0.0 and module not in save_modules and module.rsplit(".", 1)[-1] not in save_modules:
                continue
        if t.kind == SAVED:
            tensors[f"base_model.model.{t.name}"] = w_ft.contiguous()
            bias = f"{module}.bias"
            if bias in ft.tensors:
                tensors[f"base_model.model.{bias}"] = read_tensor(ft.tensors[bias]).contiguous()
            report.append(ModuleResult(module, tuple(w_ft.shape), None, 0.0, SAVED, t.note))
            continue
        low = _low_rank(d.t() if t.kind == EMBED_LORA else d, d_total, rule)
        if low is None:
            continue          # every singular value is within --sv-epsilon
        A, B, err = low
        if t.kind == EMBED_LORA:
            tensors[f"base_model.model.{module}.lora_embedding_A"] = A
            tensors[f"base_model.model.{module}.lora_embedding_B"] = B
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = B
        note = None
        bias = f"{module}.bias"
        if bias in base.tensors and bias in ft.tensors and not torch.equal(
                read_tensor(base.tensors[bias]), read_tensor(ft.tensors[bias])):
            note = "its bias changed too; bias deltas are not carried (PEFT lora_bias is not written)"
        report.append(ModuleResult(module, tuple(d.shape), A.shape[0], err, t.kind, note))
    lora = [m for m in report if m.kind != SAVED]
    if not report:
        raise ExtractError("the fine-tune equals the base in every extracted module: nothing to extract")
    if not lora:
        raise ExtractError(f"only modules saved in full changed ({', '.join(m.module for m in report)}); a PEFT "
                           f"LoRA adapter needs at least one low-rank module (--embed-lora extracts "
                           f"embeddings and lm_head low-rank)")

    r_top = max((m.rank for m in lora), default=1)
    rank_pattern = {re.escape(m.module): m.rank for m in lora if m.rank != r_top}
    cfg = {"peft_type": "LORA", "r": r_top, "lora_alpha": r_top,
           "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),  # scale 1 everywhere
           "target_modules": sorted({m.module.rsplit(".", 1)[-1] for m in lora}),
           # full module names: PEFT matches by suffix, and a last part ("norm") would also
           # claim modules that have no saved tensor (input_layernorm), which PEFT refuses
           "modules_to_save": sorted(m.module for m in report if m.kind == SAVED) or None,
           "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "task_type": "CAUSAL_LM", "inference_mode": True,
           "base_model_name_or_path": os.path.abspath(base_path)}
    with staged_output(out_dir) as tmp:
        save_tensors(os.path.join(tmp, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "extraction_report.json"), "w") as f:
            json.dump([m.__dict__ for m in report], f, indent=1)
    return report
