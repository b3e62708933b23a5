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
holds a reference on each named adapter (no eviction while in use) and publishes the rows'
slots in a context variable, so it is private to the calling thread / asyncio task. Inside,
every `LoRALinear` attached to this pool (see attach.py) applies the row's adapter.
"""
from __future__ import annotations

import contextvars
import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .peft_format import AdapterSpec, open_adapter, read_weights


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


@dataclass
class Assignment:
    """What an active ``pool.assign(...)`` publishes to the attached linears."""

    names: Tuple[Optional[str], ...]
    row_slot: torch.Tensor  # int32 [rows] on the pool device, -1 = base model only
    any_adapter: bool
    _by_len: Dict[int, torch.Tensor] = field(default_factory=dict)

    def token_slot(self, lead: Tuple[int, ...]) -> torch.Tensor:
        """Slot of each token of an activation whose leading dims are `lead` (flattened
        row-major): [rows, seq, ...] uses row i's slot for all of row i's tokens; a flat
        [T] activation is taken as rows stored one after another (T a multiple of rows)."""
        rows = self.row_slot.numel()
        if len(lead) >= 2 and lead[0] != rows:
            raise ValueError(f"pool.assign() was given {rows} names but the batch has {lead[0]} rows: "
                             "give one name per batch row")
        n_tokens = 1
        for d in lead:
            n_tokens *= int(d)
        ts = self._by_len.get(n_tokens)
        if ts is None:
            if rows == 0 or n_tokens % rows != 0:
                raise ValueError(f"pool.assign() was given {rows} names but the layer input has {n_tokens} "
                                 f"tokens, not a multiple of {rows}: give one name per batch row")
            ts = self.row_slot.repeat_interleave(n_tokens // rows)
            self._by_len[n_tokens] = ts
        return ts


class AdapterPool:
    """Slot tables of LoRA adapters on one device. See the module docstring for the design.

    Args:
        capacity: number of adapter slots resident at once (>= 1).
        device: where the tables live (and where the attached model runs).
        dtype: storage dtype of A/B (adapters are converted on load). fp32 math either way.
        max_bytes: optional budget for the resident adapters' real A/B bytes.
        max_rank: optional upper bound on any module rank (a larger one fails to load).
    """

    def __init__(self, capacity: int = 8, device="cpu", dtype: torch.dtype = torch.float32, *,
                 max_bytes: Optional[int] = None, max_rank: Optional[int] = None):
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
        self._current: contextvars.ContextVar[Optional[Assignment]] = contextvars.ContextVar(
            f"lfm_pool_assignment_{id(self)}", default=None)
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
            if name in self._entries:
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

    def unload(self, name: str) -> None:
        """Forget adapter `name`. If a batch is using it, its slot is freed when the batch ends."""
        with self._lock:
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
            return [n for n, e in self._entries.items() if not e.unload_requested]

    def __contains__(self, name) -> bool:
        with self._lock:
            e = self._entries.get(name)
            return e is not None and not e.unload_requested

    def state(self, name: str) -> str:
        """'loading', 'ready', 'failed' or 'evicted'."""
        with self._lock:
            return self._get(name).state

    def info(self) -> List[dict]:
        """One dict per registered adapter: name, state, slot, pinned, in_use (references), max rank,
        modules, bytes (real A/B bytes), folder, load_seconds (last load), error."""
        with self._lock:
            return [dict(name=e.name, state=e.state, slot=e.slot, pinned=e.pinned, in_use=e.refs,
                         rank=e.spec.max_rank, modules=len(e.spec.modules), bytes=e.nbytes, folder=e.spec.folder,
                         load_seconds=round(e.load_seconds, 4), error=None if e.error is None else str(e.error))
                    for e in self._entries.values() if not e.unload_requested]

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
                    return self._entries[name].slot
                e = self._entries[name]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"adapter {name!r} not resident after {timeout} s (state {e.state})")
                self._changed.wait(left if left is not None else 1.0)

    def release(self, name: str) -> None:
        """Drop one reference taken by acquire/try_acquire."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.refs <= 0:
                raise RuntimeError(f"release({name!r}) without a matching acquire")
            e.refs -= 1
            if e.refs == 0 and e.unload_requested:
                self._drop(e)
            self._changed.notify_all()

    @contextmanager
    def assign_held(self, names: Sequence[Optional[str]]) -> Iterator[Assignment]:
        """Like assign(), for a caller that already holds a reference on every named adapter
        (try_acquire): no waiting and no new references, and an adapter unloaded meanwhile
        (hidden, its slot kept until the last reference goes) still resolves to its slot."""
        with self._lock:
            slots = []
            for n in names:
                e = None if n is None else self._entries.get(n)
                if n is not None and (e is None or e.refs <= 0 or e.slot < 0):
                    raise RuntimeError(f"assign_held({n!r}) without a reference on a resident adapter")
                slots.append(-1 if e is None else e.slot)
        row_slot = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
        token = self._current.set(Assignment(names=tuple(names), row_slot=row_slot,
                                             any_adapter=any(s >= 0 for s in slots)))
        try:
            yield self._current.get()
        finally:
            self._current.reset(token)

    @contextmanager
    def assign(self, names: Sequence[Optional[str]], *, timeout: Optional[float] = None) -> Iterator[Assignment]:
        """Run the attached model with adapter names[i] (or none) on batch row i.

        Blocks until the named adapters are resident (loading evicted ones), holds them
        (no eviction) for the duration, and is visible only to this thread / task.
        """
        if isinstance(names, str) or names is None:
            raise TypeError("pool.assign() takes a sequence with one adapter name (or None) per batch row")
        names = tuple(names)
        held: List[str] = []
        try:
            slots = []
            for n in names:
                if n is None:
                    slots.append(-1)
                    continue
                if not isinstance(n, str):
                    raise TypeError(f"adapter names must be str or None, got {type(n).__name__}")
                slots.append(self.acquire(n, timeout))
                held.append(n)
            row_slot = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
            asg = Assignment(names=names, row_slot=row_slot, any_adapter=any(s >= 0 for s in slots))
            token = self._current.set(asg)
            try:
                yield asg
            finally:
                self._current.reset(token)
        finally:
            for n in held:
                self.release(n)

    def current(self) -> Optional[Assignment]:
        """The assignment active in this thread/task, or None (base model only)."""
        return self._current.get()

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
                                              ranks=t.ranks, scales=t.scales)
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
                           scales=torch.zeros(self.capacity, dtype=torch.float32, device=self.device))
                self._tables[module] = t
            elif r > t.r_max:
                A = torch.zeros(self.capacity, r, h_in, dtype=self.dtype, device=self.device)
                B = torch.zeros(self.capacity, h_out, r, dtype=self.dtype, device=self.device)
                A[:, : t.r_max].copy_(t.A)
                B[:, :, : t.r_max].copy_(t.B)
                # ranks/scales are shared so concurrent readers of the old A/B see the same metadata
                self._tables[module] = _Table(A=A, B=B, ranks=t.ranks, scales=t.scales)
        if self._stream is not None:
            # the side stream must see the zero-initialised tables made on the current stream
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
        with ctx:
            for module, t in self._tables.items():
                ab = staged.get(module)
                if ab is None:
                    t.ranks[s] = 0
                    continue
                a, b = ab
                r = a.shape[0]
                t.A[s].zero_()
                t.B[s].zero_()
                t.A[s, :r].copy_(a, non_blocking=True)
                t.B[s, :, :r].copy_(b, non_blocking=True)
                m = e.spec.modules[module]
                t.scales[s] = float(m.scale)
                t.ranks[s] = r
        if self._stream is not None:
            self._stream.synchronize()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
