"""Extract a LoRA adapter from a fine-tune: per-module low-rank SVD of W_ft − W_base.

For every 2-D ``*.weight`` of the linear layers (embeddings, lm_head and norms are
not Linear modules of the layers; lm_head is included with ``include_lm_head``),
streaming one module at a time:

    D = W_ft − W_base                          (fp32, [out, in])
    U, S, Vh = randomized_svd(D, r)            (lora_merge.randomized_svd, seeded)
    B = U · diag(√S)  [out, r],  A = diag(√S) · Vh  [r, in],  scale 1 (lora_alpha = r)

so B @ A is the best rank-r approximation of D (exact when r + oversampling ≥
min(out, in)). The rank is ``rank`` for every module, or with ``energy`` the smallest
r ≤ ``rank`` whose singular values hold that fraction of ‖D‖_F² (‖D‖_F² is known
exactly, so the fraction is exact even though only ``rank`` values are computed);
modules whose delta is zero are left out. The report gives, per module, the rank
and the relative error ‖D − BA‖_F / ‖D‖_F. Output: a PEFT LoRA folder
(adapter_config.json with rank_pattern/alpha_pattern where ranks differ,
adapter_model.safetensors, extraction_report.json), written to a temporary sibling
and renamed when complete.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from lfm_engine.io.model_folder import ModelFolder
from lfm_engine.io.safetensors import read_tensor
from lfm_engine.merge.outdir import staged_output

SKIP_RE = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|embed_in|embed_out|norm|ln_)")
LM_HEAD_RE = re.compile(r"(^|\.)lm_head\.weight$")


class ExtractError(ValueError):
    """Inputs or options that cannot give an adapter (message names the problem)."""


@dataclass
class ModuleResult:
    module: str
    shape: tuple
    rank: int
    rel_error: float


def _targets(base: ModelFolder, ft: ModelFolder, include_lm_head: bool, errors: List[str]) -> List[str]:
    names = []
    for n, info in base.tensors.items():
        if not n.endswith(".weight") or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        if LM_HEAD_RE.search(n):
            if not include_lm_head:
                continue
        elif SKIP_RE.search(n):
            continue
        other = ft.tensors.get(n)
        if other is None:
            errors.append(f"'{n}' is missing from the fine-tune")
        elif tuple(other.shape) != tuple(info.shape):
            errors.append(f"'{n}': the fine-tune has shape {list(other.shape)}, the base {list(info.shape)}")
        else:
            names.append(n)
    return names


def extract(base_path: str, ft_path: str, out_dir: str, *, rank: int, energy: Optional[float] = None,
            include_lm_head: bool = False, seed: int = 0, allow_overwrite: bool = False) -> List[ModuleResult]:
    """Write the adapter to ``out_dir``; return the per-module report (see module doc)."""
    from lfm_engine.io.safetensors import save_tensors
    from lfm_engine.merge.lora_merge import randomized_svd

    if not isinstance(rank, int) or rank < 1:
        raise ExtractError(f"--rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ExtractError(f"--energy must lie in (0, 1], got {energy!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not allow_overwrite:
        raise ExtractError(f"output folder '{out_dir}' already exists (use --allow-overwrite)")
    base, ft = ModelFolder(base_path), ModelFolder(ft_path)
    errors: List[str] = []
    names = _targets(base, ft, include_lm_head, errors)
    if errors:
        raise ExtractError("; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    if not names:
        raise ExtractError("no linear-layer weights to extract from (2-D *.weight tensors in the layers)")

    tensors: Dict[str, torch.Tensor] = {}
    report: List[ModuleResult] = []
    for n in names:
        d = read_tensor(ft.tensors[n]).float() - read_tensor(base.tensors[n]).float()
        total = float(d.square().sum())
        if not math.isfinite(total):
            raise ExtractError(f"'{n}': the delta is not finite (NaN/Inf in an input or overflow)")
        module = n[:-len(".weight")]
        if total == 0.0:
            continue
        r_max = min(rank, *d.shape)
        U, S, Vh = randomized_svd(d, r_max, seed=seed)
        r = r_max
        if energy is not None:
            cum = torch.cumsum(S.double().square(), 0) / total
            hit = torch.nonzero(cum >= energy - 1e-12)
            r = int(hit[0]) + 1 if hit.numel() else r_max
        sq = S[:r].clamp(min=0).sqrt()
        B = (U[:, :r] * sq).contiguous()
        A = (sq[:, None] * Vh[:r]).contiguous()
        err = float((d - B @ A).norm()) / math.sqrt(total)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
        report.append(ModuleResult(module, tuple(d.shape), r, err))
    if not report:
        raise ExtractError("the fine-tune equals the base in every linear layer: nothing to extract")

    r_top = max(m.rank for m in report)
    rank_pattern = {re.escape(m.module): m.rank for m in report if m.rank != r_top}
    cfg = {"peft_type": "LORA", "r": r_top, "lora_alpha": r_top,
           "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),  # scale 1 everywhere
           "target_modules": sorted({m.module.rsplit(".", 1)[-1] for m in report}),
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
