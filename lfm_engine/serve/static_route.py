"""StaticRoute: the per-step routing metadata as fixed-capacity device buffers updated in place.

A captured CUDA graph replays the kernels it recorded with the tensors it recorded: the
dynamic `Route` (route.py) builds new routing tensors every step and chooses its calls from
the rows' values (GEMM runs, fused groups, which delta signatures are present), so a graph
captured under one batch cannot serve the next. A StaticRoute fixes the shape of a step,

    rows            batch rows (pad unused rows with None: they add nothing)
    tokens_per_row  tokens of each row in the step (1 for decode)

and owns, for its lifetime, the buffers every attached linear reads:

    row_slot    int32 [rows]         LoRA slot of row r (-1: none)
    row_delta   int32 [rows]         delta slot of row r (-1: none)
    token_slot  int32 [rows·tpr]     row_slot repeated per token (the lora_apply map)
    delta maps  int32 [rows·tpr]     per delta call: the index of token t's delta in the
                                     call's slot list (-1: none); one buffer per distinct
                                     (codec signature, resident slots) of the modules

``with sr.assign(names):`` resolves the names like ``pool.assign`` (holding a reference on
each adapter), writes the new values into these buffers with ``copy_`` (no buffer is
reallocated: their data_ptr stays the same from step to step) and publishes a route whose
calls do not depend on the values: every attached linear with a LoRA table runs one
lora_apply over all tokens (rows with slot -1 skip), every linear with resident deltas one
delta_apply per codec signature over all of its resident delta slots. The terms are the
dynamic route's (y[t] += LoRA_s(x[t]), y[t] += x[t]·decode(Δ_d)ᵀ), summed in another order
when the dynamic route would have used GEMMs or fused calls: equal within dtype tolerance.

Layout: what the calls read besides these buffers (the pool's LoRA tables and the resident
deltas' fields) changes when an adapter is loaded, evicted or unloaded. ``version`` counts
layout changes seen by assign(); a graph captured at another version must be re-captured
(``capture`` below does not check it for you: compare ``sr.version`` before replaying).

CUDA graphs (``capture``): run ``fn`` (a forward over static input tensors) a few times on a
side stream, then capture it; afterwards ``with sr.assign(new_names): graph.replay()``
replays the step with the new routing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lfm_engine.ops.lora import lora_apply, lora_apply_prepared
from .route import Route, run_delta_calls


class StaticRoute:
    """Fixed-shape routing buffers of one pool, updated in place (see the module doc)."""

    def __init__(self, pool, rows: int, tokens_per_row: int = 1):
        if int(rows) < 1 or int(tokens_per_row) < 1:
            raise ValueError(f"StaticRoute needs rows >= 1 and tokens_per_row >= 1, got {rows} and {tokens_per_row}")
        self.pool = pool
        self.rows = int(rows)
        self.tokens_per_row = int(tokens_per_row)
        self.tokens = self.rows * self.tokens_per_row
        dev = pool.device
        self.row_slot = torch.full((self.rows,), -1, dtype=torch.int32, device=dev)
        self.row_delta = torch.full((self.rows,), -1, dtype=torch.int32, device=dev)
        self.token_slot = torch.full((self.tokens,), -1, dtype=torch.int32, device=dev)
        self.version = 0
        self._layout: Optional[tuple] = None
        # module -> [(sig, data views, scale views, data, scales, map buffer)]
        self._calls: Dict[str, list] = {}
        # (sig, member slots) -> (map buffer, {slot: index})
        self._maps: Dict[tuple, Tuple[torch.Tensor, Dict[int, int]]] = {}

    # ------------------------------------------------------------------ layout

    def _layout_key(self) -> tuple:
        p = self.pool
        return (tuple((k, id(t)) for k, t in p._tables.items()), id(p._deltas.by_module))

    def _rebuild(self) -> None:
        """Delta call plans over every resident delta slot (the values do not choose them)."""
        dev = self.pool.device
        self._calls, self._maps = {}, {}
        for key, slots in self.pool._deltas.by_module.items():
            groups: Dict[tuple, List[int]] = {}
            for s in sorted(slots):
                groups.setdefault(slots[s].sig, []).append(s)
            calls = []
            for sig, members in groups.items():
                mk = (sig, tuple(members))
                if mk not in self._maps:
                    buf = torch.full((self.tokens,), -1, dtype=torch.int32, device=dev)
                    self._maps[mk] = (buf, {s: i for i, s in enumerate(members)})
                ms = [slots[s] for s in members]
                calls.append((sig, [m.data_view for m in ms], [m.scales_view for m in ms], [m.data for m in ms],
                              [m.scales for m in ms], self._maps[mk][0]))
            self._calls[key] = calls

    def _write(self, slots: Sequence[int], deltas: Sequence[int]) -> None:
        """The step's values into the fixed buffers (copy_, same storage every step)."""
        tpr = self.tokens_per_row
        self.row_slot.copy_(torch.tensor(slots, dtype=torch.int32), non_blocking=True)
        self.row_delta.copy_(torch.tensor(deltas, dtype=torch.int32), non_blocking=True)
        self.token_slot.copy_(torch.tensor(slots, dtype=torch.int32).repeat_interleave(tpr), non_blocking=True)
        for buf, index in self._maps.values():
            per_row = torch.tensor([index.get(d, -1) for d in deltas], dtype=torch.int32)
            buf.copy_(per_row.repeat_interleave(tpr), non_blocking=True)

    # ------------------------------------------------------------------ per step

    @contextmanager
    def assign(self, names: Sequence[Optional[str]], *, timeout: Optional[float] = None) -> Iterator["_StaticStep"]:
        """Like ``pool.assign(names)`` with exactly ``rows`` names (None pads a row)."""
        pool = self.pool
        with pool.holding(names, timeout=timeout, what="StaticRoute.assign()") as names:
            if len(names) != self.rows:
                raise ValueError(f"this StaticRoute has {self.rows} rows but assign() got {len(names)} names: "
                                 "pad the batch with None rows")
            slots, deltas = pool._resolve_held(names)
            key = self._layout_key()
            if key != self._layout:
                self._rebuild()
                self._layout = key
                self.version += 1
            self._write(slots, deltas)
            with pool._publish_route(_StaticStep(self, names, slots, deltas)) as r:
                yield r

    def capture(self, fn, names: Sequence[Optional[str]], *, warmup: int = 3):
        """Capture ``fn()`` as a CUDA graph under ``assign(names)``; returns (graph, output).

        ``fn`` must read only tensors that stay in place (static inputs, a static KV cache);
        replay with ``with sr.assign(other_names): graph.replay()`` after checking that
        ``sr.version`` is still the captured one. CUDA only."""
        if self.pool.device.type != "cuda":
            raise RuntimeError(f"StaticRoute.capture needs a CUDA pool, this one is on {self.pool.device}")
        with self.assign(names):
            side = torch.cuda.Stream(device=self.pool.device)
            side.wait_stream(torch.cuda.current_stream(self.pool.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(self.pool.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
        return graph, out


class _StaticStep(Route):
    """The route a StaticRoute publishes: value-independent calls on its fixed buffers."""

    def __init__(self, sr: StaticRoute, names, slots, deltas):
        self._sr = sr
        self.pool = sr.pool
        self.names = tuple(names)
        self.rows = sr.rows
        self._slots, self._deltas = list(slots), list(deltas)
        self.row_slot, self.row_delta = sr.row_slot, sr.row_delta
        self.any_adapter = self.any_delta = self.active = True
        self._tables = sr.pool._tables
        self._dtables = sr.pool._deltas.by_module

    def token_slot(self, lead) -> torch.Tensor:
        self._check_tokens(self._tokens(tuple(lead)))
        return self._sr.token_slot

    def _check_tokens(self, n: int) -> None:
        if n != self._sr.tokens:
            raise ValueError(f"this StaticRoute serves {self._sr.rows} rows x {self._sr.tokens_per_row} tokens "
                             f"({self._sr.tokens} tokens) but a layer input has {n} tokens")

    def apply(self, lin, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != lin.in_features:
            raise ValueError(f"{lin.key}: input has {x.shape[-1]} features, expected {lin.in_features}")
        t = self._tables.get(lin.key)
        calls = self._sr._calls.get(lin.key)
        if t is None and not calls:
            return y
        n = self._tokens(tuple(x.shape[:-1]))
        self._check_tokens(n)
        x2 = x.reshape(n, lin.in_features).contiguous()
        inplace = not (torch.compiler.is_compiling() or (torch.is_grad_enabled() and y.requires_grad))
        if inplace:
            y = y.contiguous()
            out = y.view(n, lin.out_features)
        else:
            out = torch.zeros(n, lin.out_features, dtype=y.dtype, device=y.device)
            x2 = x2.detach()
        with torch.no_grad():
            self._terms(t, calls, x2, out)
        return y if inplace else y + out.view(y.shape)

    def _terms(self, t, calls, x2, out) -> None:
        ts = self._sr.token_slot
        cpu_native = x2.device.type == "cpu" and not torch.compiler.is_compiling()
        if t is not None:
            if cpu_native:
                lora_apply_prepared(x2, t.prepared(), ts, out, [0])
            else:
                lora_apply(x2, t.A, t.B, ts, t.ranks, t.scales, out, validate=False)
        run_delta_calls(calls or (), x2, out)
