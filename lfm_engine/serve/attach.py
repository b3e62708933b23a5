"""attach(model, pool): make the linears of any torch model multi-LoRA aware.

Each selected nn.Linear (or transformers' GPT-2 style Conv1D, weight [in, out]) is replaced
by a `LoRALinear` that wraps it unchanged and, when a ``pool.assign(names)`` is active in
the calling thread, adds the batched LoRA term of every row's adapter, or the row's
compressed fine-tune delta (route.py):

    y = base(x);   y[t] += scale[s_t] · (x[t] · A[s_t][:r]ᵀ) · B[s_t][:, :r]ᵀ   (lora_apply, in place)
                   y[t] += x[t] · decode(Δ[d_t])ᵀ                              (delta_apply, in place)

Projections that read the same input (q_proj/k_proj/v_proj, gate_proj/up_proj, w1/w3
under one parent) are attached as a group: the step's route computes their LoRA terms in
one fused kernel call. The hot path per linear is one thread-local read and one method call.

x: [rows, seq, H_in] (or any [..., H_in] whose leading size is a multiple of the rows),
s_t = the slot of token t's row, -1 (base only) for rows assigned None.
Without an active assignment, or when no loaded adapter targets the module, the layer is
the base layer (bit for bit). Inside an active assignment, a call with at most 16 tokens on
the CPU computes base(x) of a plain nn.Linear with the skinny-M kernel (ops/skinny_linear.py:
the weight is read once for all tokens; results within fp32 rounding of torch's, spec in
docs/spec/skinny_linear.md); ``pool.skinny_base = False`` or LFM_SKINNY_LINEAR=0 turns that off.

The output embedding (lm_head, when it is a plain nn.Linear on the CPU) is wrapped in a
`SkinnyHead`: no adapter terms, only the same skinny base matmul inside an assignment.

Module names are the model's ``named_modules()`` names (plus an optional ``prefix``); they
must equal the adapter's module names after PEFT's ``base_model.model.`` prefix is dropped,
which is the case when `model` is the same class PEFT wrapped (e.g. LlamaForCausalLM).
By default every linear except the output embedding (lm_head) is attached, so adapters
loaded later can target any of them; ``target_modules`` (list of names/suffixes or a regex)
narrows that.

Gradients: serving runs under no_grad/inference_mode and adds into the base output in place.
With grad mode on, the LoRA term is added out of place so gradients still reach the base
weights (the adapters themselves are constants here).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from lfm_engine.ops.skinny_linear import MAX_M as _SKINNY_MAX_M
from lfm_engine.ops.skinny_linear import _NATIVE_OK as _SKINNY_OK
from lfm_engine.ops.skinny_linear import linear_rows

from .pool import AdapterPool

# sibling projections that read the same input (fused adapter calls, route.py)
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
                ("query", "key", "value"))


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ weight + bias, weight [in, out]
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and getattr(m, "weight").dim() == 2


def _features(m: nn.Module):
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = m.weight
    return w.shape[0], w.shape[1]


class _PoolLinear(nn.Module):
    """A base linear bound to a pool (not a submodule: no state_dict entries), with the
    skinny-M base matmul inside an active assignment (`_base_forward`)."""

    def __init__(self, base: nn.Module, pool: AdapterPool):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        object.__setattr__(self, "_pool", pool)
        object.__setattr__(self, "_local", pool._local)
        # the skinny base path needs exactly nn.Linear's math (subclasses, e.g. quantized
        # linears, keep their own forward) and a built kernel
        object.__setattr__(self, "_skinny", type(base) is nn.Linear and _SKINNY_OK and self.in_features > 0)

    @property
    def pool(self) -> AdapterPool:
        return self._pool

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _base_forward(self, x)


class LoRALinear(_PoolLinear):
    """A base linear plus the per-row LoRA of its pool (see the module docstring)."""

    def __init__(self, base: nn.Module, pool: AdapterPool, key: str):
        super().__init__(base, pool)
        self.key = key
        object.__setattr__(self, "group", None)  # tuple of LoRALinear sharing the input (attach)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = getattr(self._local, "route", None)
        if route is None or not route.active:
            return self.base(x)
        return route.apply(self, x, self._base_forward(x))


class SkinnyHead(_PoolLinear):
    """The output embedding (lm_head) of an attached model. It gets no adapter terms (attach()
    gives it no LoRA tables), but inside an active assignment its small-batch matmul runs in
    the skinny-M kernel like the attached linears' base matmul: at a decode batch of 8 rows
    torch's GEMM reads the vocab x hidden weight at about half the speed of one row.
    Outside an assignment it is the base layer, bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = getattr(self._local, "route", None)
        if route is None or not route.active:
            return self.base(x)
        return self._base_forward(x)


def _base_forward(lin, x: torch.Tensor) -> torch.Tensor:
    """base(x) of a wrapper (LoRALinear, SkinnyHead); for a small decode batch on the CPU (at
    most skinny MAX_M tokens) a plain nn.Linear's matmul runs in the skinny-M kernel, which
    reads the weight once for all tokens (a platform GEMM costs ~2x its one-token call at 8
    tokens). Everything else, and grad mode, hooks on the base, or pool.skinny_base = False,
    is base(x) itself."""
    if lin._skinny and lin._pool.skinny_base and not torch.is_grad_enabled():
        base = lin.base
        w = base.weight
        if (x.device.type == "cpu" and x.dtype == w.dtype and x.numel() <= _SKINNY_MAX_M * lin.in_features
                and w.is_contiguous() and not base._forward_hooks and not base._forward_pre_hooks):
            x2 = x.reshape(-1, lin.in_features)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            return linear_rows(x2, w, base.bias).reshape(*x.shape[:-1], lin.out_features)
    return lin.base(x)


def _selected(name: str, target_modules) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def attach(model: nn.Module, pool: AdapterPool, *, target_modules: Union[None, str, Sequence[str]] = None,
           exclude: Sequence[str] = ("lm_head",), prefix: str = "") -> List[str]:
    """Swap the model's linears for LoRALinear wrappers bound to `pool`; return their names.

    The model must already live on pool.device. Adapters already in the pool are checked
    against the model's module names and shapes (ValueError naming the module otherwise).
    """
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        try:
            out_emb = model.get_output_embeddings()
        except Exception:  # some models raise NotImplementedError
            out_emb = None
    chosen: Dict[str, nn.Module] = {}
    head_name = None
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, SkinnyHead)):
            raise ValueError(f"model already has LoRALinear modules ({name}); call detach(model) first")
        if out_emb is not None and mod is out_emb:
            head_name = name
            continue
        if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
            continue
        if name.rsplit(".", 1)[-1] in exclude or not _selected(name, target_modules):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        dev = mod.weight.device
        if dev.type != pool.device.type or (dev.index is not None and pool.device.index is not None
                                            and dev.index != pool.device.index):
            raise ValueError(f"module {name} is on {dev} but the adapter pool is on {pool.device}; "
                             "move the model to the pool's device first")
        chosen[name] = mod
    if not chosen:
        raise ValueError("attach(): no nn.Linear modules selected in the model "
                         f"(target_modules={target_modules!r}, exclude={tuple(exclude)})")
    pool.register_modules({prefix + n: _features(m) for n, m in chosen.items()})
    wrapped: Dict[str, LoRALinear] = {}
    for name, mod in chosen.items():
        wrapped[name] = LoRALinear(mod, pool, prefix + name)
        _replace(model, name, wrapped[name])
    _make_groups(wrapped)
    # the output embedding: no adapter tables, but the skinny base matmul inside assignments
    if head_name is not None and type(out_emb) is nn.Linear and out_emb.weight.device.type == "cpu" and _SKINNY_OK:
        _replace(model, head_name, SkinnyHead(out_emb, pool))
    return [prefix + n for n in chosen]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `model` is."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def _make_groups(wrapped: Dict[str, LoRALinear]) -> None:
    """Mark sibling projections of one input (INPUT_GROUPS) so the route fuses their calls."""
    for name in wrapped:
        parent, _, leaf = name.rpartition(".")
        for leaves in INPUT_GROUPS:
            if leaf == leaves[0]:
                members = [wrapped.get(f"{parent}.{x}" if parent else x) for x in leaves]
                members = [m for m in members if m is not None]
                if len(members) > 1 and len({m.in_features for m in members}) == 1:
                    g = tuple(members)
                    for m in g:
                        object.__setattr__(m, "group", g)


def detach(model: nn.Module) -> int:
    """Put the original linears back (and the output embedding); returns how many attached
    linears were restored."""
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (LoRALinear, SkinnyHead)):
            _replace(model, name, mod.base)
            n += isinstance(mod, LoRALinear)
    return n
