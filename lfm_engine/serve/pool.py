"""AdapterPool: device-resident slot tables of many LoRA adapters for one base model.

Layout (docs/spec/lora.md): for every adapted module m of the base model one slot table

    A_m [capacity, R_m, H_in]   B_m [capacity, H_out, R_m]   ranks_m [capacity] int32   scales_m [capacity] fp32

An adapter occupies the same slot index s in every table; in a module it does not adapt,
ranks_m[s] = 0 (adds nothing). R_m is the largest rank of a resident adapter in that module (the
table grows when a higher-rank adapter arrives and shrinks when it leaves, so the bound
capacity × R_m holds for the adapters resident now; ``max_rank`` caps R_m); rows/columns beyond an
adapter's own rank are zero padding and the kernels skip them (compute follows the real rank).

Capacity: ``capacity`` slots, and optionally ``max_bytes`` for the sum of the resident
adapters' real (unpadded) A/B bytes. A load that finds no room evicts the least recently
used adapter that is neither pinned nor in use; when every resident adapter is pinned or in
use the load fails with `PoolFullError` (the caller retries when a batch finishes).
Evicted adapters stay registered (state "evicted") and are reloaded from their folder on
their next use.

Loading is asynchronous: `load` checks the folder's config and tensor metadata at once (so
a bad folder fails in the caller), reserves a slot, and a background thread reads the
tensors (disk -> host, pinned when the pool is on CUDA), converts them to the pool dtype and
copies them into the slot (host -> device on a side CUDA stream). Running batches never see
a half-written adapter: a slot becomes assignable only when its copy has finished, and
other slots' rows are never touched by a load.

Per-batch assignment: ``with pool.assign(names):`` (one adapter name or None per batch row)
holds a reference on each named adapter (no eviction while in use) and publishes the step's
`Route` (route.py: rows' slots, token maps, fused-call caches, computed once per step) in a
thread-local slot, so it is private to the calling thread; assignments of one thread nest
(an asyncio task must not hold one across an await: run the forward inside the block, as
the Engine does). Inside, every `LoRALinear` attached to this pool (see attach.py) applies
the row's adapter. A thread-local (unlike a ContextVar) is traced by torch.compile without
graph breaks.

Two kinds of adapters share one name space: LoRA folders (`load`) and compressed full
fine-tunes, .lfmd deltas (`load_delta`, deltas.py); a batch may mix both and base rows.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lfm_engine.ops.lora import _default_backends, lora_prepare
from .deltas import DeltaEntry, DeltaStore, encoded_modules, read_delta
from .peft_format import AdapterSpec, open_adapter, read_weights
from .route import Route

if TYPE_CHECKING:
    from lfm_engine.ops.codec import Encoded
    from .static_route import StaticRoute

# the name ``Assignment`` of earlier versions: what pool.assign() yields
Assignment = Route


class PoolFullError(RuntimeError):
    """No slot (or byte budget) can be freed: every resident adapter is pinned or in use."""


class AdapterNotReadyError(RuntimeError):
    """The adapter is registered but its weights are not on the device (loading or failed)."""


@dataclass
class _Table:
    A: torch.Tensor
    B: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    # host copy of scales (the GEMM path of long runs reads it without a device sync);
    # shared, like ranks/scales, by the tables that replace this one on grow/shrink
    scales_host: List[float] = field(default_factory=list)
    _prepared: Optional[tuple] = None

    def prepared(self) -> tuple:
        """lora_prepare bundle of this table (its tensors never change identity)."""
        if self._prepared is None:
            self._prepared = lora_prepare(self.A, self.B, self.ranks, self.scales)
        return self._prepared

    @property
    def r_max(self) -> int:
        return self.A.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.ranks, self.scales))


@dataclass
class _Entry:
    name: str
    spec: AdapterSpec
    nbytes: int
    state: str = "loading"  # loading | ready | failed | evicted
    slot: int = -1
    pinned: bool = False
    refs: int = 0
    last_used: int = 0
    error: Optional[BaseException] = None
    future: Optional[Future] = None
    unload_requested: bool = False
    generation: int = 0  # bumps on every (re)load so a stale background job cannot publish
    load_seconds: float = 0.0


class AdapterPool:
    """Slot tables of LoRA adapters on one device. See the module docstring for the design.

    Args:
        capacity: number of adapter slots resident at once (>= 1).
        device: where the tables live (and where the attached model runs).
        dtype: storage dtype of A/B (adapters are converted on load). fp32 math either way.
        max_bytes: optional budget for the resident adapters' real A/B bytes.
        max_rank: optional upper bound on any module rank (a larger one fails to load).
        delta_capacity: most compressed fine-tunes (.lfmd deltas) resident at once.
        base_fingerprint: lfm.base fingerprint of the served base model (ModelFolder.fingerprint
            of its folder); deltas made against another base are refused. None: not checked.
        skinny_base: inside ``assign(...)``, compute the base matmul of each attached nn.Linear
            with the skinny-M kernel (ops/skinny_linear.py) when the call has at most 16 tokens
            on the CPU (attach.py). None (default): on unless the environment sets
            LFM_SKINNY_LINEAR=0. The attribute of the same name can be changed later.
    """

    def __init__(self, capacity: int = 8, device="cpu", dtype: torch.dtype = torch.float32, *,
                 max_bytes: Optional[int] = None, max_rank: Optional[int] = None, delta_capacity: int = 16,
                 base_fingerprint: Optional[str] = None, skinny_base: Optional[bool] = None):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"AdapterPool capacity must be an int >= 1, got {capacity!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"AdapterPool dtype must be float32, float16 or bfloat16, got {dtype}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._entries: Dict[str, _Entry] = {}
        self._slot_owner: List[Optional[str]] = [None] * capacity
        self._tables: Dict[str, _Table] = {}
        self._module_shapes: Dict[str, Tuple[int, int]] = {}  # from attach(): name -> (in, out)
        self._clock = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm-adapter-load")
        self._local = threading.local()  # .route: the Route of this thread's active assign()
        _default_backends()  # resolved now, in eager mode: torch.compile cannot trace the probe
        self._deltas = DeltaStore(int(delta_capacity))
        self._delta_plans: Dict[tuple, tuple] = {}  # route.py: delta_apply call plans across steps
        self.base_fingerprint = base_fingerprint
        if skinny_base is None:
            skinny_base = os.environ.get("LFM_SKINNY_LINEAR", "1").strip() not in ("0", "false", "off", "no")
        self.skinny_base = bool(skinny_base)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.counters = dict(loads=0, evictions=0, load_failures=0, table_shrinks=0)

    # ------------------------------------------------------------------ public API

    def load(self, name: str, folder, *, pin: bool = False, wait: bool = False,
             timeout: Optional[float] = None) -> Future:
        """Register adapter `name` from a PEFT folder and start copying it into a slot.

        Config/metadata errors (AdapterFormatError, FileNotFoundError), a duplicate name
        and a full pool (PoolFullError) raise here; tensor read errors surface from the
        returned Future (and from `assign`). wait=True blocks until the weights are resident.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        # an AdapterSpec already opened elsewhere (the server checks client folders in a
        # worker process with a time limit) is used as is
        spec = folder if isinstance(folder, AdapterSpec) else open_adapter(folder)
        self._check_spec(name, spec)
        with self._lock:
            if name in self._entries or name in self._deltas.entries:
                raise ValueError(f"adapter {name!r} is already registered; unload it first")
            entry = _Entry(name=name, spec=spec, nbytes=spec.nbytes(torch.empty((), dtype=self.dtype).element_size()),
                           pinned=bool(pin))
            self._entries[name] = entry
            try:
                fut = self._start_load(entry)
            except BaseException:
                del self._entries[name]
                raise
        if wait:
            fut.result(timeout)
        return fut

    def load_delta(self, name: str, path, *, skip_unsupported: bool = False) -> Future:
        """Register a compressed full fine-tune (an .lfmd container) under `name`.

        Reads and checks the whole container now (fingerprint against ``base_fingerprint``,
        each tensor's SHA-256, codecs, shapes against the attached linears; see deltas.py)
        and publishes it only when all of it is resident: a bad file raises here
        (DeltaLoadError / FingerprintMismatchError, both ValueError) and running batches
        never see it. Returns a finished Future, like `load`.
        """
        shapes = self._delta_precheck(name)
        t0 = time.perf_counter()
        got = read_delta(path, shapes, self.device, base_fingerprint=self.base_fingerprint,
                         skip_unsupported=skip_unsupported)
        return self._publish_delta(name, str(path), got, t0)

    def add_delta(self, name: str, encoded: Dict[str, Encoded]) -> Future:
        """Register a compressed fine-tune already in memory: {module name: Encoded delta of
        its weight} (ops.codec.encode_delta). No fingerprint exists here: the caller vouches
        that the deltas belong to the served base; codecs and shapes are checked as in
        load_delta."""
        shapes = self._delta_precheck(name)
        return self._publish_delta(name, "<memory>", encoded_modules(encoded, shapes, self.device), time.perf_counter())

    def _delta_precheck(self, name: str) -> Dict[str, Tuple[int, int]]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._entries or name in self._deltas.entries:
                raise ValueError(f"adapter {name!r} is already registered; unload it first")
            if not self._module_shapes:
                raise ValueError("load_delta: attach(model, pool) first (the pool must know the model's linears)")
            return dict(self._module_shapes)

    def _publish_delta(self, name: str, path: str, got, t0: float) -> Future:
        modules, nbytes, counts, skipped = got
        with self._lock:
            if name in self._entries or name in self._deltas.entries:
                raise ValueError(f"adapter {name!r} is already registered; unload it first")
            slot = self._deltas.free_slot()
            if slot < 0:
                raise PoolFullError(f"all {self._deltas.capacity} delta slots are in use (delta_capacity); "
                                    "unload a compressed fine-tune first")
            self._deltas.publish(DeltaEntry(name, path, slot, modules, nbytes, counts, skipped))
            self.counters["loads"] += 1
            self._changed.notify_all()
        fut: Future = Future()
        fut.set_result(time.perf_counter() - t0)
        return fut

    def kind(self, name: str) -> str:
        """'lora' or 'delta' (KeyError for unknown names)."""
        with self._lock:
            d = self._deltas.entries.get(name)
            if d is not None and not d.unload_requested:
                return "delta"
            self._get(name)
            return "lora"

    def unload(self, name: str) -> None:
        """Forget adapter `name`. If a batch is using it, its slot is freed when the batch ends."""
        with self._lock:
            d = self._deltas.entries.get(name)
            if d is not None and not d.unload_requested:
                d.unload_requested = True
                if d.refs == 0:
                    self._deltas.drop(d)
                self._changed.notify_all()
                return
            e = self._get(name)
            e.unload_requested = True
            e.generation += 1  # a load in flight will not publish
            if e.refs == 0:
                self._drop(e)
            self._changed.notify_all()

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (never evict) or unpin adapter `name`."""
        with self._lock:
            self._get(name).pinned = bool(pinned)
            self._changed.notify_all()

    def unpin(self, name: str) -> None:
        self.pin(name, False)

    def names(self) -> List[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if not e.unload_requested] + \
                [n for n, d in self._deltas.entries.items() if not d.unload_requested]

    def __contains__(self, name) -> bool:
        with self._lock:
            e = self._entries.get(name) or self._deltas.entries.get(name)
            return e is not None and not e.unload_requested

    def state(self, name: str) -> str:
        """'loading', 'ready', 'failed' or 'evicted' (a delta is 'ready' once registered)."""
        with self._lock:
            d = self._deltas.entries.get(name)
            if d is not None and not d.unload_requested:
                return "ready"
            return self._get(name).state

    def info(self) -> List[dict]:
        """One dict per registered adapter: name, state, slot, pinned, in_use (references), max rank,
        modules, bytes (real A/B bytes), folder, load_seconds (last load), error."""
        with self._lock:
            return [dict(name=e.name, state=e.state, slot=e.slot, pinned=e.pinned, in_use=e.refs,
                         rank=e.spec.max_rank, modules=len(e.spec.modules), bytes=e.nbytes, folder=e.spec.folder,
                         load_seconds=round(e.load_seconds, 4), error=None if e.error is None else str(e.error),
                         kind="lora")
                    for e in self._entries.values() if not e.unload_requested] + \
                [dict(name=d.name, state="ready", slot=d.slot, pinned=True, in_use=d.refs, rank=None,
                      modules=len(d.modules), bytes=d.nbytes, folder=d.path, load_seconds=0.0, error=None,
                      kind="delta", codecs=dict(d.codecs), skipped=list(d.skipped))
                 for d in self._deltas.entries.values() if not d.unload_requested]

    def wait(self, name: str, timeout: Optional[float] = None) -> None:
        """Block until `name` is resident (reloading it if evicted); raise if its load failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                e = self._get(name)
                if e.state == "ready":
                    return
                if e.state == "failed":
                    raise AdapterNotReadyError(f"adapter {name!r} failed to load: {e.error}") from e.error
                if e.state == "evicted":
                    self._start_load(e)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"adapter {name!r} not loaded after {timeout} s")
                self._changed.wait(left)

    def try_acquire(self, name: str) -> bool:
        """Take a reference on `name` if resident (True). Otherwise start its reload when
        evicted and there is room, and return False. Raises KeyError / AdapterNotReadyError
        for unknown or failed adapters."""
        with self._lock:
            d = self._deltas.entries.get(name)
            if d is not None and not d.unload_requested:
                d.refs += 1
                return True
            e = self._get(name)
            if e.state == "ready":
                e.refs += 1
                e.last_used = next(self._clock)
                return True
            if e.state == "failed":
                raise AdapterNotReadyError(f"adapter {name!r} failed to load: {e.error}") from e.error
            if e.state == "evicted":
                try:
                    self._start_load(e)
                except PoolFullError:
                    pass  # retried when a batch releases its adapters
            return False

    def acquire(self, name: str, timeout: Optional[float] = None) -> int:
        """Block until `name` is resident, take a reference, return its slot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.try_acquire(name):
                    d = self._deltas.entries.get(name)
                    return d.slot if d is not None else self._entries[name].slot
                e = self._entries[name]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"adapter {name!r} not resident after {timeout} s (state {e.state})")
                self._changed.wait(left if left is not None else 1.0)

    def release(self, name: str) -> None:
        """Drop one reference taken by acquire/try_acquire."""
        with self._lock:
            d = self._deltas.entries.get(name)
            if d is not None:
                if d.refs <= 0:
                    raise RuntimeError(f"release({name!r}) without a matching acquire")
                d.refs -= 1
                if d.refs == 0 and d.unload_requested:
                    self._deltas.drop(d)
                self._changed.notify_all()
                return
            e = self._entries.get(name)
            if e is None or e.refs <= 0:
                raise RuntimeError(f"release({name!r}) without a matching acquire")
            e.refs -= 1
            if e.refs == 0 and e.unload_requested:
                self._drop(e)
            self._changed.notify_all()

    @contextmanager
    def assign_held(self, names: Sequence[Optional[str]]) -> Iterator[Route]:
        """Like assign(), for a caller that already holds a reference on every named adapter
        (try_acquire): no waiting and no new references, and an adapter unloaded meanwhile
        (hidden, its slot kept until the last reference goes) still resolves to its slot."""
        slots, deltas = self._resolve_held(names)
        with self._publish_route(Route(self, names, slots, deltas)) as r:
            yield r

    def _resolve_held(self, names: Sequence[Optional[str]]) -> Tuple[List[int], List[int]]:
        """(LoRA slot, delta slot) of each name, -1 for none; every name must be held."""
        with self._lock:
            slots, deltas = [], []
            for n in names:
                d = None if n is None else self._deltas.entries.get(n)
                e = None if n is None or d is not None else self._entries.get(n)
                if d is not None:
                    if d.refs <= 0:
                        raise RuntimeError(f"assign_held({n!r}) without a reference on a resident adapter")
                elif n is not None and (e is None or e.refs <= 0 or e.slot < 0):
                    raise RuntimeError(f"assign_held({n!r}) without a reference on a resident adapter")
                slots.append(-1 if e is None else e.slot)
                deltas.append(-1 if d is None else d.slot)
        return slots, deltas

    def static_route(self, rows: int, tokens_per_row: int = 1) -> "StaticRoute":
        """Fixed-shape routing buffers updated in place, for CUDA graphs (static_route.py):
        ``sr = pool.static_route(8)``; ``with sr.assign(names): model(...)``."""
        from .static_route import StaticRoute

        return StaticRoute(self, rows, tokens_per_row)

    @contextmanager
    def assign(self, names: Sequence[Optional[str]], *, timeout: Optional[float] = None) -> Iterator[Route]:
        """Run the attached model with adapter names[i] (or none) on batch row i.

        Blocks until the named adapters are resident (loading evicted ones), holds them
        (no eviction) for the duration, and is visible only to this thread.
        """
        with self.holding(names, timeout=timeout, what="pool.assign()") as names:
            with self.assign_held(names) as r:
                yield r

    @contextmanager
    def holding(self, names: Sequence[Optional[str]], *, timeout: Optional[float] = None,
                what: str = "pool.holding()") -> Iterator[Tuple[Optional[str], ...]]:
        """Acquire every named adapter (waiting until resident) for the block; yields the
        names as a tuple and releases them on exit (also when an acquire fails midway)."""
        if isinstance(names, str) or names is None:
            raise TypeError(f"{what} takes a sequence with one adapter name (or None) per batch row")
        names = tuple(names)
        held: List[str] = []
        try:
            for n in names:
                if n is not None and not isinstance(n, str):
                    raise TypeError(f"adapter names must be str or None, got {type(n).__name__}")
                if n is not None:
                    self.acquire(n, timeout)
                    held.append(n)
            yield names
        finally:
            for n in held:
                self.release(n)

    @contextmanager
    def _publish_route(self, route: Route) -> Iterator[Route]:
        prev = getattr(self._local, "route", None)
        self._local.route = route
        try:
            yield route
        finally:
            self._local.route = prev

    def current(self) -> Optional[Route]:
        """The assignment active in this thread, or None (base model only)."""
        return getattr(self._local, "route", None)

    def table(self, module: str) -> Optional[_Table]:
        """Slot table of `module` (None when no loaded adapter ever targeted it)."""
        return self._tables.get(module)

    def table_bytes(self) -> int:
        with self._lock:
            return sum(t.nbytes for t in self._tables.values())

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.slot >= 0)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ attach() support

    def register_modules(self, shapes: Dict[str, Tuple[int, int]]) -> None:
        """Called by attach(): the model's adaptable modules and (in, out) widths.
        Adapters already registered are checked against them."""
        with self._lock:
            for name, e in self._entries.items():
                self._check_spec(name, e.spec, shapes)
            self._module_shapes.update(shapes)

    # ------------------------------------------------------------------ internals

    def _get(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None or e.unload_requested:
            raise KeyError(f"no adapter named {name!r} in the pool (known: {sorted(self.names())})")
        return e

    def _check_spec(self, name: str, spec: AdapterSpec, shapes: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
        shapes = self._module_shapes if shapes is None else shapes
        for module, m in spec.modules.items():
            if self.max_rank is not None and m.rank > self.max_rank:
                raise ValueError(f"adapter {name!r}: module {module!r} has rank {m.rank} > the pool's "
                                 f"max_rank={self.max_rank}")
            if shapes:
                if module not in shapes:
                    raise ValueError(f"adapter {name!r} targets module {module!r}, which is not an attached "
                                     "linear of the model (wrong base model, or a module attach() skipped)")
                if shapes[module] != (m.in_features, m.out_features):
                    raise ValueError(f"adapter {name!r}: module {module!r} is {m.in_features}->{m.out_features} "
                                     f"in the adapter but {shapes[module][0]}->{shapes[module][1]} in the model")
            t = self._tables.get(module)
            if t is not None and (t.A.shape[2], t.B.shape[1]) != (m.in_features, m.out_features):
                raise ValueError(f"adapter {name!r}: module {module!r} is {m.in_features}->{m.out_features} but "
                                 f"adapters already loaded use {t.A.shape[2]}->{t.B.shape[1]}")

    def _start_load(self, e: _Entry) -> Future:
        """Reserve a slot for e (evicting LRU if needed) and queue its copy. Lock held."""
        if self.max_bytes is not None and e.nbytes > self.max_bytes:
            raise PoolFullError(f"adapter {e.name!r} needs {e.nbytes} bytes, more than the pool's max_bytes="
                                f"{self.max_bytes}")
        slot = self._free_slot(e.nbytes)
        self._slot_owner[slot] = e.name
        e.slot, e.state, e.error = slot, "loading", None
        e.generation += 1
        e.last_used = next(self._clock)
        e.future = self._executor.submit(self._load_job, e, e.generation)
        return e.future

    def _free_slot(self, need_bytes: int) -> int:
        def resident_bytes():
            return sum(x.nbytes for x in self._entries.values() if x.slot >= 0)

        while True:
            free = [i for i, o in enumerate(self._slot_owner) if o is None]
            if free and (self.max_bytes is None or resident_bytes() + need_bytes <= self.max_bytes):
                return free[0]
            victims = [x for x in self._entries.values()
                       if x.state == "ready" and not x.pinned and x.refs == 0 and x.slot >= 0]
            if not victims:
                why = "slots" if not free else "bytes (max_bytes)"
                raise PoolFullError(f"adapter pool is out of {why}: all {self.capacity} resident adapters are "
                                    "pinned, loading or in use; unload or unpin one, or raise the capacity")
            victim = min(victims, key=lambda x: x.last_used)
            self._release_slot(victim)
            victim.state = "evicted"
            self.counters["evictions"] += 1

    def _release_slot(self, e: _Entry) -> None:
        if e.slot >= 0:
            for t in self._tables.values():
                t.ranks[e.slot] = 0  # nothing reads this slot any more; keep the table tidy
                t.scales_host[e.slot] = 0.0
            self._slot_owner[e.slot] = None
            e.slot = -1
            self._shrink_tables()

    def _shrink_tables(self) -> None:
        """Cut every table's padded rank R_m down to the largest rank a resident adapter
        still has in module m (lock held), so the memory bound follows the adapters that
        are resident now, not the highest rank ever loaded: table bytes stay at most
        capacity × max rank resident × (H_in + H_out) × itemsize per module. New tensors
        replace the old ones; a forward still holding the old table reads it unchanged."""
        owners = [self._entries[o] for o in self._slot_owner if o is not None and o in self._entries]
        for module, t in list(self._tables.items()):
            need = max([x.spec.modules[module].rank for x in owners if module in x.spec.modules] or [1])
            if need < t.r_max:
                self._tables[module] = _Table(A=t.A[:, :need].clone(), B=t.B[:, :, :need].clone(),
                                              ranks=t.ranks, scales=t.scales, scales_host=t.scales_host)
                self.counters["table_shrinks"] += 1

    def _drop(self, e: _Entry) -> None:
        self._release_slot(e)
        e.state = "evicted"
        self._entries.pop(e.name, None)

    def _load_job(self, e: _Entry, generation: int) -> None:
        t0 = time.perf_counter()
        try:
            weights = read_weights(e.spec)  # disk -> host, outside the lock
            staged = {}
            for module, (a, b) in weights.items():
                a = a.to(self.dtype)
                b = b.to(self.dtype)
                if self._stream is not None:
                    a, b = a.pin_memory(), b.pin_memory()
                staged[module] = (a, b)
            with self._lock:
                if e.generation != generation or self._entries.get(e.name) is not e:
                    return  # unloaded (or reloaded) meanwhile
                self._publish(e, staged)
                e.state = "ready"
                self.counters["loads"] += 1
                e.load_seconds = time.perf_counter() - t0
                self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported through the entry and the Future
            with self._lock:
                if e.generation == generation and self._entries.get(e.name) is e:
                    self._release_slot(e)
                    e.state, e.error = "failed", exc
                    self.counters["load_failures"] += 1
                    self._changed.notify_all()
            raise

    def _publish(self, e: _Entry, staged: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy staged host tensors into slot e.slot of every table (lock held)."""
        s = e.slot
        # Grow / create tables first (new tensors; readers holding the old ones stay valid).
        for module, (a, b) in staged.items():
            r, h_in = a.shape
            h_out = b.shape[0]
            t = self._tables.get(module)
            if t is None:
                r_tab = max(r, 1)
                t = _Table(A=torch.zeros(self.capacity, r_tab, h_in, dtype=self.dtype, device=self.device),
                           B=torch.zeros(self.capacity, h_out, r_tab, dtype=self.dtype, device=self.device),
                           ranks=torch.zeros(self.capacity, dtype=torch.int32, device=self.device),
                           scales=torch.zeros(self.capacity, dtype=torch.float32, device=self.device),
                           scales_host=[0.0] * self.capacity)
                self._tables[module] = t
            elif r > t.r_max:
                A = torch.zeros(self.capacity, r, h_in, dtype=self.dtype, device=self.device)
                B = torch.zeros(self.capacity, h_out, r, dtype=self.dtype, device=self.device)
                A[:, : t.r_max].copy_(t.A)
                B[:, :, : t.r_max].copy_(t.B)
                # ranks/scales are shared so concurrent readers of the old A/B see the same metadata
                self._tables[module] = _Table(A=A, B=B, ranks=t.ranks, scales=t.scales, scales_host=t.scales_host)
        if self._stream is not None:
            # the side stream must see the zero-initialised tables made on the current stream
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
        with ctx:
            for module, t in self._tables.items():
                ab = staged.get(module)
                if ab is None:
                    t.ranks[s] = 0
                    t.scales_host[s] = 0.0
                    continue
                a, b = ab
                r = a.shape[0]
                t.A[s].zero_()
                t.B[s].zero_()
                t.A[s, :r].copy_(a, non_blocking=True)
                t.B[s, :, :r].copy_(b, non_blocking=True)
                m = e.spec.modules[module]
                t.scales[s] = float(m.scale)
                t.scales_host[s] = float(m.scale)
                t.ranks[s] = r
        if self._stream is not None:
            self._stream.synchronize()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
