"""Compressed full fine-tunes (.lfmd deltas) as a second kind of adapter of an AdapterPool.

A served delta adapter d holds, for every attached linear m it changes, the codec fields of
Δ_m = W_m(fine-tune) − W_m(base) (docs/spec/codec.md). A batch row r that uses d gets

    y[t] = x[t] · W_mᵀ  +  x[t] · decode(Δ_m,d)ᵀ          (t a token of row r)

computed by `delta_apply` (ops/codec.py: sign1 packed-bit GEMV with a per-row scale, intN
group-dequantised in registers / cache-resident scratch) on the rows of each delta; no
dense Δ is ever built. Rows with a LoRA or no adapter are untouched by this term.

Decisions (written down in docs/spec/serving.md "Compressed fine-tunes"):
  * Served: the deltas of attached linears (param "<module>.weight") with codec sign1,
    int8, int4, int2 or nf4; "zero" entries (unchanged tensors) add nothing. Anything else the
    fine-tune changed (norms, embeddings, biases, lm_head, other codecs) cannot be served
    as a per-row term of a linear; the load is refused naming the first such tensor unless
    ``skip_unsupported=True`` (those tensors are then served at their base value and
    listed in ``info()``).
  * The container's lfm.base fingerprint must equal the pool's ``base_fingerprint`` (set
    from the served model folder); a mismatch is refused (FingerprintMismatchError). A pool
    without a fingerprint checks shapes only.
  * Loading reads and checks every field (SHA-256 per tensor) before the delta becomes
    visible: a truncated or corrupt file fails the load and leaves running batches alone.
  * Deltas stay resident until unloaded (no LRU eviction): each costs its stored bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lfm_engine._tensor import view as _view
from lfm_engine.ops.codec import NATIVE_CODECS, Encoded, _check_fields, _native_args

# signature of one module's delta: (codec code, group size, per_tensor, scale dtype); one
# delta_apply call serves every slot with the same signature
Sig = Tuple[int, int, bool, torch.dtype]


@dataclass
class DeltaModule:
    """One attached linear's delta of one fine-tune: the codec fields on the pool device."""

    sig: Sig
    data: torch.Tensor
    scales: torch.Tensor
    data_view: tuple = ()
    scales_view: tuple = ()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class DeltaEntry:
    name: str
    path: str
    slot: int
    modules: Dict[str, DeltaModule]
    nbytes: int
    codecs: Dict[str, int] = field(default_factory=dict)  # codec name -> tensor count
    skipped: List[str] = field(default_factory=list)
    refs: int = 0
    unload_requested: bool = False


class DeltaLoadError(ValueError):
    """The .lfmd cannot be served by this pool (wrong base, unsupported tensors, bad file)."""


def read_delta(path, module_shapes: Dict[str, Tuple[int, int]], device: torch.device, *,
               base_fingerprint: Optional[str] = None, skip_unsupported: bool = False):
    """Read an .lfmd container into {module: DeltaModule} for the attached modules.

    Returns (modules, nbytes, codec counts, skipped names). Raises DeltaLoadError (or its
    subclass FingerprintMismatchError from compress.lfmd) with a message naming the file and
    the tensor at fault.
    """
    from lfm_engine.compress.lfmd import FingerprintMismatchError, LfmdError, open_container
    from lfm_engine.reference.codec import CodecError

    try:
        c = open_container(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no .lfmd file at {path}") from None
    except (LfmdError, OSError) as exc:
        raise DeltaLoadError(f"cannot serve {path}: {exc}") from None
    with c:
        if base_fingerprint is not None and c.base_fingerprint != base_fingerprint:
            raise FingerprintMismatchError(
                f"{path} was compressed against a base with fingerprint {c.base_fingerprint}, but the served "
                f"base has {base_fingerprint}: it is a fine-tune of another model")
        modules: Dict[str, DeltaModule] = {}
        skipped: List[str] = []
        counts: Dict[str, int] = {}
        nbytes = 0
        for pname, e in c.codecs.items():
            codec = e["codec"]
            mod = pname[: -len(".weight")] if pname.endswith(".weight") else None
            if codec == "zero":
                continue
            problem = None
            if mod is None or mod not in module_shapes:
                problem = "is not the weight of an attached linear"
            elif codec not in NATIVE_CODECS:
                problem = f"uses codec {codec!r} (servable: {', '.join(NATIVE_CODECS)})"
            elif tuple(e["shape"]) != (module_shapes[mod][1], module_shapes[mod][0]):
                problem = (f"has shape {tuple(e['shape'])} but the model's {mod} is "
                           f"[out, in] = {(module_shapes[mod][1], module_shapes[mod][0])}")
            if problem is not None:
                if skip_unsupported and "shape" not in problem:
                    skipped.append(pname)
                    continue
                raise DeltaLoadError(f"cannot serve {path}: tensor {pname!r} {problem}; only deltas of attached "
                                     "linears can be applied per batch row (skip_unsupported=True serves the "
                                     "rest and keeps such tensors at their base value)")
            try:
                enc: Encoded = c.encoded(pname)  # reads the bytes and checks their SHA-256
                _check_fields(enc)
            except (LfmdError, CodecError, KeyError, OSError) as exc:
                raise DeltaLoadError(f"cannot serve {path}: {exc}") from None
            modules[mod] = _module(enc, device)
            counts[codec] = counts.get(codec, 0) + 1
            nbytes += modules[mod].nbytes
        if not modules:
            raise DeltaLoadError(f"cannot serve {path}: it changes none of the attached linears")
        return modules, nbytes, counts, skipped


def encoded_modules(encoded: Dict[str, Encoded], module_shapes: Dict[str, Tuple[int, int]], device: torch.device):
    """{module: DeltaModule} from in-memory Encoded deltas keyed by module name (see
    AdapterPool.add_delta); same checks as read_delta except the fingerprint."""
    modules: Dict[str, DeltaModule] = {}
    counts: Dict[str, int] = {}
    nbytes = 0
    for mod, enc in encoded.items():
        if mod not in module_shapes:
            raise DeltaLoadError(f"delta for {mod!r}: not an attached linear of the model")
        if enc.codec not in NATIVE_CODECS:
            raise DeltaLoadError(f"delta for {mod!r} uses codec {enc.codec!r} (servable: {', '.join(NATIVE_CODECS)})")
        want = (module_shapes[mod][1], module_shapes[mod][0])
        if tuple(enc.shape) != want:
            raise DeltaLoadError(f"delta for {mod!r} has shape {tuple(enc.shape)}, the model's is [out, in] = {want}")
        _check_fields(enc)
        modules[mod] = _module(enc, device)
        counts[enc.codec] = counts.get(enc.codec, 0) + 1
        nbytes += modules[mod].nbytes
    if not modules:
        raise DeltaLoadError("add_delta: no deltas given")
    return modules, nbytes, counts, []


def _module(enc: Encoded, device: torch.device) -> DeltaModule:
    data, scales, code, g, per_tensor = _native_args(enc)
    data = data.to(device).contiguous()
    scales = scales.to(device).contiguous()
    m = DeltaModule((code, g, per_tensor, scales.dtype), data, scales)
    m.data_view, m.scales_view = _view(data), _view(scales)
    return m


class DeltaStore:
    """The delta adapters of one pool: name -> DeltaEntry, delta slot numbers, and per
    module the slots that change it. Guarded by the pool's lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: Dict[str, DeltaEntry] = {}
        self.slot_owner: List[Optional[str]] = [None] * capacity
        # module -> {slot: DeltaModule}; replaced (not mutated) on load/unload so a running
        # step keeps reading the dict it started with
        self.by_module: Dict[str, Dict[int, DeltaModule]] = {}

    def free_slot(self) -> int:
        for i, o in enumerate(self.slot_owner):
            if o is None:
                return i
        return -1

    def publish(self, e: DeltaEntry) -> None:
        self.entries[e.name] = e
        self.slot_owner[e.slot] = e.name
        new = {k: dict(v) for k, v in self.by_module.items()}
        for mod, m in e.modules.items():
            new.setdefault(mod, {})[e.slot] = m
        self.by_module = new

    def drop(self, e: DeltaEntry) -> None:
        self.entries.pop(e.name, None)
        if 0 <= e.slot < self.capacity and self.slot_owner[e.slot] == e.name:
            self.slot_owner[e.slot] = None
        new = {}
        for mod, slots in self.by_module.items():
            rest = {s: m for s, m in slots.items() if s != e.slot}
            if rest:
                new[mod] = rest
        self.by_module = new


def delta_calls(slots: Dict[int, DeltaModule], row_delta: Sequence[int], tokens_per_row: int,
                device: torch.device) -> list:
    """The delta_apply calls one module needs for a batch: one per codec signature, each
    (sig, [data views], [scale views], [data], [scales], token_slot int32 [T]) where
    token_slot[t] indexes the call's lists (-1: token t's row has no delta of that kind)."""
    groups: Dict[Sig, list] = {}
    for s in sorted({d for d in row_delta if d >= 0 and d in slots}):
        groups.setdefault(slots[s].sig, []).append(s)
    calls = []
    for sig, members in groups.items():
        index = {s: i for i, s in enumerate(members)}
        per_row = [index.get(d, -1) for d in row_delta]
        ts = torch.tensor(per_row, dtype=torch.int32).repeat_interleave(tokens_per_row).to(device)
        ms = [slots[s] for s in members]
        calls.append((sig, [m.data_view for m in ms], [m.scales_view for m in ms], [m.data for m in ms],
                      [m.scales for m in ms], ts))
    return calls
