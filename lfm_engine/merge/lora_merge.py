"""Merging several LoRA adapters of one base model (on the GPU or the CPU).

A LoRA adapter changes a Linear weight W [out, in] by  delta = s * B @ A  with
A [r, in], B [out, r] and the scale s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).
Given K adapters for the same base model, per module:

    delta_i = s_i * B_i @ A_i                       (fp32, on the device of the tensors)
    merged  = merge_tensors(0, [delta_1 .. delta_K], method, ...)   (docs/spec/merge.md)

i.e. the adapters' full deltas are the task vectors of the merge (base 0, so the kernel's
task vector is delta_i exactly); every method of the task-vector family works (TIES,
DARE, DELLA, breadcrumbs, task_arithmetic, linear), with the merge's own parameters.
Then either

(a) ``merge_adapters_into``: W += merged, in place, rounded once to W's dtype
    (the per-request "merge adapters into the served weights" use case); or
(b) ``merge_adapters_to_lora``: a new adapter of rank r: merged ~= B' @ A' with
    B' = U_r sqrt(S_r), A' = sqrt(S_r) V_r^T from a randomized SVD (Halko, Martinsson &
    Tropp 2011: Gaussian sketch with oversampling p, q power iterations with QR
    re-orthonormalisation, then an exact SVD of the small projected matrix), and scale 1
    (lora_alpha = r). For task_arithmetic/linear the merged delta is exactly
    sum_i c_i B_i A_i, a matrix of rank <= sum_i r_i, so the SVD is computed exactly from
    QR factors of the stacked B's and A's without forming the [out, in] matrix.

Decisions where no spec speaks: a module missing from some adapters counts as a zero
delta for them (a zero task vector: it never wins a TIES election and adds nothing);
the DARE/DELLA random streams are keyed by the module name (``<module>.weight``) and the
adapter's position, so a merge is reproducible; ``weights`` default to 1 per adapter as
in merge_tensors. Adapters are read from PEFT's on-disk format by the one adapter-folder
reader, lfm_engine/io/peft.py (rank_pattern/alpha_pattern, defaults and modules_to_save:
docs/spec/io.md "PEFT LoRA adapter folders").
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "LoraAdapter",
    "load_peft_adapter",
    "save_peft_adapter",
    "adapter_delta",
    "merged_delta",
    "merge_adapters_into",
    "merge_adapters_to_lora",
    "randomized_svd",
]

_LINEAR_METHODS = ("task_arithmetic", "linear")


@dataclass
class LoraAdapter:
    """One LoRA adapter: module name -> (A [r, in], B [out, r]) and a scale per module.

    ``scales`` maps module name -> s (delta = s * B @ A); ``default_scale`` is used for
    modules missing from ``scales``. ``name`` is informational (e.g. the directory).

    ``embedding``: modules that PEFT stores as embedding LoRA. Their factors are held here
    in the same Linear convention as every other module (A = Bₑᵀ [r, embedding_dim],
    B = Aₑᵀ [num_embeddings, r], so s * B @ A is the table's change [num, dim]); the set
    only tells :func:`save_peft_adapter` to write PEFT's lora_embedding_A/B layout back.
    """
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    scales: Dict[str, float] = field(default_factory=dict)
    default_scale: float = 1.0
    name: str = ""
    saved: Dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: name -> tensor
    embedding: frozenset = frozenset()

    def scale(self, module: str) -> float:
        return float(self.scales.get(module, self.default_scale))

    def to(self, device) -> "LoraAdapter":
        return LoraAdapter({m: (a.to(device), b.to(device)) for m, (a, b) in self.modules.items()},
                           dict(self.scales), self.default_scale, self.name,
                           {n: t.to(device) for n, t in self.saved.items()}, self.embedding)


# ---------------------------------------------------------------------------------------
# PEFT files (read by lfm_engine.io.peft, the one adapter-folder reader)


def load_peft_adapter(path: str, device="cpu") -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    Module names are the safetensors key stems without ``base_model.model.``, e.g.
    ``model.layers.0.self_attn.q_proj``. Scales: lora_alpha / r (use_rslora:
    lora_alpha / sqrt(r)), r and lora_alpha per module from rank_pattern/alpha_pattern
    (rules: lfm_engine/io/peft.py). modules_to_save tensors land in ``saved`` (never
    dropped). Embedding LoRA factors are turned into the Linear convention (see
    :class:`LoraAdapter`). Raises FileNotFoundError / ValueError naming the file and the problem.
    """
    from lfm_engine.io.peft import open_adapter, read_saved, read_weights

    spec = open_adapter(path)
    weights = read_weights(spec)
    embedding = frozenset(m for m, info in spec.modules.items() if info.embedding)
    modules = {m: ((b.T, a.T) if m in embedding else (a, b)) for m, (a, b) in weights.items()}
    modules = {m: (a.to(device).contiguous(), b.to(device).contiguous()) for m, (a, b) in modules.items()}
    scales = {m: spec.modules[m].scale for m in modules}
    saved = {n: t.to(device) for n, t in read_saved(spec).items()}
    return LoraAdapter(modules, scales, default_scale=1.0, name=os.path.basename(os.path.normpath(path)),
                       saved=saved, embedding=embedding)


def save_peft_adapter(adapter: LoraAdapter, path: str, base_model_name_or_path: Optional[str] = None,
                      prefix: str = "base_model.model.") -> None:
    """Write ``adapter`` as a PEFT LoRA directory. All modules must share one rank r; the
    scale is stored as lora_alpha = s * r (alpha_pattern for modules whose scale
    differs); ``adapter.saved`` tensors are written as modules_to_save, except the weight
    of a LoRA module (PEFT's ``base_layer.weight``); embedding modules in PEFT's
    lora_embedding_A/B layout. Files are written to temporary names and renamed."""
    from lfm_engine.io.safetensors import save_tensors

    if not adapter.modules:
        raise ValueError("save_peft_adapter: the adapter has no modules")
    ranks = {a.shape[0] for a, _ in adapter.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"save_peft_adapter: modules have different ranks {sorted(ranks)}; PEFT needs rank_pattern")
    r = ranks.pop()
    scales = {m: adapter.scale(m) for m in adapter.modules}
    common = max(set(scales.values()), key=list(scales.values()).count)
    alpha_pattern = {re.escape(m): s * r for m, s in scales.items() if s != common}
    targets = sorted({m.rsplit(".", 1)[-1] for m in adapter.modules})
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": common * r, "target_modules": targets,
        "alpha_pattern": alpha_pattern, "rank_pattern": {}, "use_rslora": False, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "task_type": None,
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in adapter.saved}
                                  - set(adapter.modules)) or None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    tensors = {}
    for m, (a, b) in adapter.modules.items():
        if m in adapter.embedding:  # back to PEFT's layout: A_e = B^T [r, num], B_e = A^T [dim, r]
            tensors[f"{prefix}{m}.lora_embedding_A"] = b.detach().T.contiguous().cpu()
            tensors[f"{prefix}{m}.lora_embedding_B"] = a.detach().T.contiguous().cpu()
        else:
            tensors[f"{prefix}{m}.lora_A.weight"] = a.detach().contiguous().cpu()
            tensors[f"{prefix}{m}.lora_B.weight"] = b.detach().contiguous().cpu()
    for n, t in adapter.saved.items():
        mod = n.rsplit(".", 1)[0]
        key = f"{prefix}{mod}.base_layer.weight" if mod in adapter.modules and n.endswith(".weight") \
            else f"{prefix}{n}"
        tensors[key] = t.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_tensors(os.path.join(path, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    fd, tmp = tempfile.mkstemp(prefix=".adapter_config.json.", dir=path)
    os.close(fd)
    try:
        _write_json(cfg, tmp)
        os.replace(tmp, os.path.join(path, "adapter_config.json"))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(obj, p):
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------
# deltas and merges


def adapter_delta(adapter: LoraAdapter, module: str, dtype=torch.float32) -> torch.Tensor:
    """s * B @ A for one module, computed in fp32 (or ``dtype``): [out, in]."""
    a, b = adapter.modules[module]
    return (b.to(dtype) @ a.to(dtype)) * adapter.scale(module)


def _module_shape(adapters: Sequence[LoraAdapter], module: str) -> Tuple[int, int]:
    shape = None
    for j, ad in enumerate(adapters):
        if module in ad.modules:
            a, b = ad.modules[module]
            s = (b.shape[0], a.shape[1])
            if shape is not None and s != shape:
                raise ValueError(f"module {module}: adapter {j} gives a delta of shape {s}, another gives {shape}")
            shape = s
    if shape is None:
        raise KeyError(f"module {module} is in none of the adapters")
    return shape


def _device_of(adapters: Sequence[LoraAdapter], module: str):
    for ad in adapters:
        if module in ad.modules:
            return ad.modules[module][0].device
    return torch.device("cpu")


def merged_delta(adapters: Sequence[LoraAdapter], module: str, method: str = "ties", *,
                 backend: Optional[str] = None, device=None, **merge_kwargs) -> torch.Tensor:
    """The merged full delta [out, in] (fp32) of one module over K adapters.

    merge_kwargs go to merge_tensors (weights, density, gamma, epsilon, normalize, rescale,
    lam, seed, ...); ``name`` defaults to ``<module>.weight`` (keys the random streams).
    """
    from lfm_engine.ops.merge import merge_tensors

    if not adapters:
        raise ValueError("merged_delta: no adapters given")
    out_f, in_f = _module_shape(adapters, module)
    dev = torch.device(device) if device is not None else _device_of(adapters, module)
    deltas = []
    for ad in adapters:
        if module in ad.modules:
            a, b = ad.modules[module]
            # the product is formed where the merge runs (the GPU when dev is cuda)
            deltas.append((b.to(dev, torch.float32) @ a.to(dev, torch.float32)) * ad.scale(module))
        else:
            deltas.append(torch.zeros((out_f, in_f), dtype=torch.float32, device=dev))
    kw = dict(merge_kwargs)
    kw.setdefault("name", f"{module}.weight")
    if method == "linear":
        return merge_tensors(None, deltas, "linear", backend=backend, out_dtype=torch.float32, **kw)
    zero = torch.zeros((out_f, in_f), dtype=torch.float32, device=dev)
    return merge_tensors(zero, deltas, method, backend=backend, out_dtype=torch.float32, **kw)


def merge_adapters_into(state_dict: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter],
                        method: str = "ties", *, weight_suffix: str = ".weight", backend: Optional[str] = None,
                        modules: Optional[Iterable[str]] = None, **merge_kwargs) -> List[str]:
    """(a) Add the merged delta of every adapted module into the base weights, in place.

    state_dict: {name: tensor [out, in]} (e.g. ``model.state_dict()``); the weight of
        module m is ``state_dict[m + weight_suffix]``, updated as
        W <- round_to_W.dtype(fp32(W) + merged_m), on W's device.
    Returns the list of updated weight names. A module with no weight in ``weights``
    raises KeyError naming it; a shape mismatch raises ValueError.
    """
    mods = sorted(set().union(*(ad.modules.keys() for ad in adapters))) if modules is None else list(modules)
    updated = []
    for m in mods:
        key = m + weight_suffix
        if key not in state_dict:
            raise KeyError(f"merge_adapters_into: no base weight '{key}' for adapted module {m}")
        w = state_dict[key]
        shape = _module_shape(adapters, m)
        if tuple(w.shape) != shape:
            raise ValueError(f"merge_adapters_into: base weight '{key}' has shape {tuple(w.shape)}, "
                             f"the adapters' delta has {shape}")
        d = merged_delta(adapters, m, method, backend=backend, device=w.device, **merge_kwargs)
        with torch.no_grad():
            w.copy_((w.float() + d).to(w.dtype))
        updated.append(key)
    return updated


def randomized_svd(mat: torch.Tensor, rank: int, *, oversample: int = 8, n_iter: int = 2,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``mat`` [m, n] (fp32): (U [m, r], S [r], Vh [r, n]).

    Halko-Martinsson-Tropp: Y = M Omega, Omega [n, r+p] Gaussian (seeded); q power
    iterations Y = M (M^T Q) with QR after each product; Q = qr(Y); SVD of Q^T M.
    Exact when rank + oversample >= min(m, n).
    """
    m, n = mat.shape
    if rank < 1:
        raise ValueError(f"randomized_svd: rank must be >= 1, got {rank}")
    if rank > min(m, n):
        raise ValueError(f"randomized_svd: rank {rank} exceeds min(m, n) = {min(m, n)}")
    M = mat.to(torch.float32)
    ell = min(min(m, n), rank + max(0, oversample))
    if ell >= min(m, n):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn((n, ell), generator=g, dtype=torch.float32).to(M.device)
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(max(0, n_iter)):
        Z, _ = torch.linalg.qr(M.T @ Q)
        Q, _ = torch.linalg.qr(M @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def _linear_lowrank(adapters: Sequence[LoraAdapter], module: str, method: str, rank: int,
                    merge_kwargs: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-r truncation of sum_i c_i s_i B_i A_i (task_arithmetic / linear)."""
    from lfm_engine.core.merge_methods import resolve_merge_params

    K = len(adapters)
    p = resolve_merge_params(method, K, weights=merge_kwargs.get("weights"),
                             normalize=merge_kwargs.get("normalize"), lam=merge_kwargs.get("lam", 1.0))
    coef = [float(w) for w in p.weights]
    if p.normalize:
        wsum = sum(coef)
        coef = [c / (1.0 if abs(wsum) < 1e-8 else wsum) for c in coef]
    if method != "linear":
        coef = [c * float(p.lam) for c in coef]
    Bs, As = [], []
    for c, ad in zip(coef, adapters):
        if module not in ad.modules:
            continue
        a, b = ad.modules[module]
        Bs.append(b.to(torch.float32) * (c * ad.scale(module)))
        As.append(a.to(torch.float32))
    Bc = torch.cat(Bs, dim=1)        # [out, R]
    Ac = torch.cat(As, dim=0)        # [R, in]
    Qb, Rb = torch.linalg.qr(Bc)     # Bc = Qb Rb
    Qa, Ra = torch.linalg.qr(Ac.T)   # Ac^T = Qa Ra  ->  Bc Ac = Qb (Rb Ra^T) Qa^T
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    r = min(rank, S.numel())
    sq = S[:r].sqrt()
    B_new = (Qb @ U[:, :r]) * sq
    A_new = sq[:, None] * (Vh[:r] @ Qa.T)
    if r < rank:  # zero-pad to the requested rank so all modules share it
        B_new = torch.cat([B_new, B_new.new_zeros((B_new.shape[0], rank - r))], dim=1)
        A_new = torch.cat([A_new, A_new.new_zeros((rank - r, A_new.shape[1]))], dim=0)
    return A_new, B_new


def merge_adapters_to_lora(adapters: Sequence[LoraAdapter], rank: int, method: str = "ties", *,
                           backend: Optional[str] = None, oversample: int = 8, n_iter: int = 2,
                           svd_seed: int = 0, out_dtype: Optional[torch.dtype] = None,
                           modules: Optional[Iterable[str]] = None, **merge_kwargs) -> LoraAdapter:
    """(b) One new adapter of rank ``rank`` approximating the merged delta of every module.

    Returns LoraAdapter with A' [rank, in], B' [out, rank] per module, scale 1 (so
    delta' = B' @ A'), in ``out_dtype`` (default: the first adapter's A dtype), on the
    adapters' device. A module whose delta has min(out, in) < rank raises ValueError.
    """
    if not adapters:
        raise ValueError("merge_adapters_to_lora: no adapters given")
    if rank < 1:
        raise ValueError(f"merge_adapters_to_lora: rank must be >= 1, got {rank}")
    mods = sorted(set().union(*(ad.modules.keys() for ad in adapters))) if modules is None else list(modules)
    first = next(iter(adapters[0].modules.values()))[0] if adapters[0].modules else None
    dt = out_dtype or (first.dtype if first is not None else torch.float32)
    new = {}
    for m in mods:
        out_f, in_f = _module_shape(adapters, m)
        if rank > min(out_f, in_f):
            raise ValueError(f"merge_adapters_to_lora: rank {rank} exceeds min(out, in) = {min(out_f, in_f)} "
                             f"of module {m}")
        if method in _LINEAR_METHODS:
            A, B = _linear_lowrank(adapters, m, method, rank, merge_kwargs)
        else:
            d = merged_delta(adapters, m, method, backend=backend, **merge_kwargs)
            U, S, Vh = randomized_svd(d, rank, oversample=oversample, n_iter=n_iter, seed=svd_seed)
            sq = S.sqrt()
            B = U * sq
            A = sq[:, None] * Vh
        new[m] = (A.to(dt).contiguous(), B.to(dt).contiguous())
    embedding = frozenset(m for m in new if any(m in ad.embedding for ad in adapters))
    return LoraAdapter(new, {}, default_scale=1.0, name=f"merged-{method}-r{rank}", embedding=embedding)
