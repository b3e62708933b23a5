"""Merging several LoRA adapters of one base model (on the GPU or the CPU).

A LoRA adapter changes a Linear weight W [out, in] by  delta = s * B @ A  with
A [r, in], B [out, r] and the scale s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).
Given K adapters for the same base model, per module:

    delta_i = s_i * B_i @ A_i                       (fp32, on the device of the tensors)
    merged  = merge_tensors(0, [delta_1 .. delta_K], method, ...)   (spec/merge.md)

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
in merge_tensors. Adapters are read from PEFT's on-disk format (adapter_config.json +
adapter_model.safetensors, keys ``<prefix>.<module>.lora_A.weight`` /
``.lora_B.weight``); ``rank_pattern``/``alpha_pattern`` are honoured by matching a
pattern as a regular expression against the end of the module name, as PEFT does.
"""
from __future__ import annotations

import json
import math
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
    ``fan_in_fan_out``: the base stores these weights transposed, [in, out] (GPT-2's
    Conv1D, PEFT's ``fan_in_fan_out``), so the delta to add to the stored tensor is
    (s * B @ A)^T.
    """
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    scales: Dict[str, float] = field(default_factory=dict)
    default_scale: float = 1.0
    name: str = ""
    fan_in_fan_out: bool = False

    def scale(self, module: str) -> float:
        return float(self.scales.get(module, self.default_scale))

    def to(self, device) -> "LoraAdapter":
        return LoraAdapter({m: (a.to(device), b.to(device)) for m, (a, b) in self.modules.items()},
                           dict(self.scales), self.default_scale, self.name, self.fan_in_fan_out)


# ---------------------------------------------------------------------------------------
# PEFT files


def _pattern_value(patterns: Mapping[str, object], module: str, default, key: str = "pattern"):
    """The value of the first pattern (PEFT's rule: the key matches a suffix of the module
    name at a dot) that matches ``module``, else ``default``."""
    if patterns is None:
        return default
    if not isinstance(patterns, Mapping):
        raise ValueError(f"{key} must be a JSON object of pattern -> value, got {type(patterns).__name__}")
    for pat, val in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?{pat}$", module)
        except re.error as exc:
            raise ValueError(f"{key}: {pat!r} is not a valid regular expression ({exc})") from None
        if hit:
            return val
    return default


_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def load_peft_adapter(path: str, device="cpu", strip_prefix: str = "base_model.model.") -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    Module names are the safetensors key stems with ``strip_prefix`` removed, e.g.
    ``model.layers.0.self_attn.q_proj``. Scales: lora_alpha / r (use_rslora:
    lora_alpha / sqrt(r)), r and lora_alpha per module from rank_pattern/alpha_pattern;
    each r a positive integer, each lora_alpha a finite number.
    Raises FileNotFoundError / ValueError naming the file and the problem. Anything that
    is not a pair of plain LoRA factors is refused, never skipped, so a fine-tune is never
    applied in part: ``modules_to_save`` (fully trained embeddings, lm_head, norms),
    embedding LoRA, DoRA magnitudes, LoRA biases, other adapter types.
    """
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    st_path = os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_peft_adapter: {p} does not exist")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_peft_adapter: {cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"load_peft_adapter: {cfg_path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"load_peft_adapter: {path} holds a {peft_type} adapter, not LORA")
    for key, what in (("modules_to_save", "fully trained modules (modules_to_save)"),
                      ("use_dora", "DoRA magnitudes (use_dora)"), ("lora_bias", "LoRA biases (lora_bias)")):
        if cfg.get(key):
            raise ValueError(f"load_peft_adapter: {cfg_path} has {key}={cfg[key]!r}: {what} are not supported; "
                             "applying only the LoRA factors would leave part of the fine-tune out")
    if cfg.get("bias", "none") not in ("none", None):
        raise ValueError(f"load_peft_adapter: {cfg_path} has bias={cfg['bias']!r}: trained biases are not "
                         "supported (only bias: none)")
    try:
        tensors = load_file(st_path, device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"load_peft_adapter: cannot read {st_path}: {exc}") from None
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    extra = sorted(k for k in tensors if not _KEY.match(k))
    if extra:  # modules_to_save weights, lora_embedding_A/B, DoRA magnitudes, biases ...
        raise ValueError(f"load_peft_adapter: {st_path} holds {len(extra)} tensors that are not LoRA factors "
                         f"(first: '{extra[0]}'; modules_to_save, embedding LoRA or DoRA?): not supported, and "
                         "skipping them would apply only part of the fine-tune")
    for key, t in tensors.items():
        m = _KEY.match(key)
        module = m.group("module")
        if strip_prefix and module.startswith(strip_prefix):
            module = module[len(strip_prefix):]
        parts.setdefault(module, {})[m.group("which")] = t
    if not parts:
        raise ValueError(f"load_peft_adapter: {st_path} contains no lora_A/lora_B weights")
    r_default = _number(cfg.get("r", 8), "r", cfg_path, integer=True)
    alpha_default = _number(cfg.get("lora_alpha", r_default), "lora_alpha", cfg_path)
    rslora = bool(cfg.get("use_rslora", False))
    modules, scales = {}, {}
    for module, ab in parts.items():
        if "A" not in ab or "B" not in ab:
            raise ValueError(f"load_peft_adapter: module {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"load_peft_adapter: module {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} do not form B @ A")
        r = _number(_pattern_value(cfg.get("rank_pattern"), module, r_default, f"{cfg_path}: rank_pattern"),
                    f"rank_pattern ({module})", cfg_path, integer=True)
        if r != a.shape[0]:
            raise ValueError(f"load_peft_adapter: module {module}: config rank {r} but lora_A has {a.shape[0]} rows")
        alpha = _number(_pattern_value(cfg.get("alpha_pattern"), module, alpha_default,
                                       f"{cfg_path}: alpha_pattern"), f"alpha_pattern ({module})", cfg_path)
        scales[module] = alpha / (math.sqrt(r) if rslora else r)
        if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
            raise ValueError(f"load_peft_adapter: {st_path}: the factors of {module} hold NaN or Inf")
        modules[module] = (a, b)
    return LoraAdapter(modules, scales, default_scale=1.0, name=os.path.basename(os.path.normpath(path)),
                       fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)))


def _number(value, key: str, where: str, integer: bool = False):
    """A finite number from an adapter config (a positive integer for ranks); a NaN or
    infinite lora_alpha would make every output of the module non-finite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer() and value > 0
    if not ok:
        want = "a positive integer" if integer else "a finite number"
        raise ValueError(f"load_peft_adapter: {where}: {key} must be {want}, got {value!r}")
    return int(value) if integer else float(value)


def save_peft_adapter(adapter: LoraAdapter, path: str, base_model_name_or_path: Optional[str] = None,
                      prefix: str = "base_model.model.") -> None:
    """Write ``adapter`` as a PEFT LoRA directory. All modules must share one rank r; the
    scale is stored as lora_alpha = s * r (alpha_pattern for modules whose scale
    differs). Files are written to temporary names and renamed."""
    from safetensors.torch import save_file

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
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    tensors = {}
    for m, (a, b) in adapter.modules.items():
        tensors[f"{prefix}{m}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{prefix}{m}.lora_B.weight"] = b.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    for fname, writer in (("adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                          ("adapter_config.json", lambda p: _write_json(cfg, p))):
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", dir=path)
        os.close(fd)
        try:
            writer(tmp)
            os.replace(tmp, os.path.join(path, fname))
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
    """s * B @ A for one module, computed in fp32 (or ``dtype``): [out, in]; transposed,
    [in, out] like the stored weight, for a ``fan_in_fan_out`` adapter."""
    a, b = adapter.modules[module]
    d = (b.to(dtype) @ a.to(dtype)) * adapter.scale(module)
    return d.T if adapter.fan_in_fan_out else d


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
    return LoraAdapter(new, {}, default_scale=1.0, name=f"merged-{method}-r{rank}")
