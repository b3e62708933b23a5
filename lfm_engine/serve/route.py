"""Route: the per-step routing of a mixed batch, computed once and read by every attached linear.

``pool.assign(names)`` builds one Route for the forward step: each batch row r gets

    row_slot[r]   the LoRA slot of its adapter (-1: none)
    row_delta[r]  the delta slot of its compressed fine-tune (-1: none)

and every `LoRALinear` of the step calls ``route.apply(layer, x, y)`` on its base output
y = base(x), x [..., H_in] with leading size a multiple of the rows (token t of a [rows, seq]
activation belongs to row t // seq). Per step (not per linear) the route caches:
  * the token -> slot map of each token count (one tensor per distinct T, usually one);
  * the segment plan: runs of consecutive tokens with one adapter. When every adapted run
    is at least GEMM_MIN_TOKENS long (prefill, or a batch sharing few adapters) the LoRA term
    runs as two platform GEMMs per run (addmm), otherwise as one grouped lora_apply kernel;
  * the fused calls of projections that share an input: q/k/v and gate/up are attached as
    a group; the first member called computes u = x·Aᵀ of the whole group in one multi-slice
    shrink call (u fp32 [members, T, R]), and each member's expand then adds its term straight
    into its own output (u found by identity of x, so a group called on different inputs, or
    whose tables differ in width, is computed per member);
  * the delta_apply calls of each module (one per codec signature present in the batch).

LoRA term (ops/lora.py): y[t] += scale[s] · (x[t] · A[s][:r]ᵀ) · B[s][:, :r]ᵀ, s = slot of t.
Delta term (ops/codec.py): y[t] += x[t] · decode(Δ[d])ᵀ, d = delta slot of t.

Under torch.compile the route takes the plain path (no caches, one custom-op call per
linear), which traces into one graph; the eager path is the fast one for Python dispatch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lfm_engine._tensor import view as _view
from lfm_engine.ops.lora import lora_apply, lora_apply_prepared, lora_expand_prepared, lora_shrink_prepared
from .deltas import delta_calls

# runs this long (prefill-size segments) go to the platform GEMM: the per-adapter matmul
# loop there is at parity with the grouped kernel (bench_lora prefill-512x1, fp32), and its
# cost follows the GEMM library's tuning for large T; shorter runs use the kernel
GEMM_MIN_TOKENS = 64


class Route:
    """What an active ``pool.assign(...)`` publishes to the attached linears (module doc)."""

    def __init__(self, pool, names: Sequence[Optional[str]], slots: Sequence[int], deltas: Sequence[int]):
        self.pool = pool
        self.names = tuple(names)
        self.rows = len(self.names)
        self._slots = list(slots)
        self._deltas = list(deltas)
        self._deltas_key = tuple(self._deltas)
        dev = pool.device
        self.row_slot = torch.tensor(self._slots, dtype=torch.int32).to(dev, non_blocking=True)
        self.row_delta = torch.tensor(self._deltas, dtype=torch.int32).to(dev, non_blocking=True)
        self.any_adapter = any(s >= 0 for s in self._slots)
        self.any_delta = any(d >= 0 for d in self._deltas)
        self.active = self.any_adapter or self.any_delta
        self._by_len: Dict[int, torch.Tensor] = {}
        self._runs: Dict[int, Optional[List[Tuple[int, int, int]]]] = {}
        self._group_out: Dict[int, tuple] = {}
        self._dcalls: Dict[Tuple[str, int], list] = {}
        # LoRA tables: the pool's live dict (a load copies into a new table object, and a
        # slot's rows are written before the slot becomes assignable); deltas: the dict of
        # this moment (load/unload publish a new one)
        self._tables = pool._tables
        self._dtables = pool._deltas.by_module

    # ------------------------------------------------------------------ token maps

    def _tokens(self, lead: Tuple[int, ...]) -> int:
        rows = self.rows
        if len(lead) >= 2 and lead[0] != rows:
            raise ValueError(f"pool.assign() was given {rows} names but the batch has {lead[0]} rows: "
                             "give one name per batch row")
        n = 1
        for d in lead:
            n *= int(d)
        if rows == 0 or n % rows != 0:
            raise ValueError(f"pool.assign() was given {rows} names but the layer input has {n} "
                             f"tokens, not a multiple of {rows}: give one name per batch row")
        return n

    def token_slot(self, lead: Tuple[int, ...]) -> torch.Tensor:
        """LoRA slot of each token of an activation whose leading dims are `lead` (flattened
        row-major): [rows, seq, ...] uses row i's slot for all of row i's tokens; a flat [T]
        activation is taken as rows stored one after another (T a multiple of rows)."""
        n = self._tokens(tuple(lead))
        ts = self._by_len.get(n)
        if ts is None:
            ts = self.row_slot.repeat_interleave(n // self.rows)
            self._by_len[n] = ts
        return ts

    def _gemm_runs(self, n: int) -> Optional[List[Tuple[int, int, int]]]:
        """[(slot, t0, t1)] of the adapted token runs when all are long enough for a GEMM."""
        if n in self._runs:
            return self._runs[n]
        per = n // self.rows
        runs: List[Tuple[int, int, int]] = []
        for r, s in enumerate(self._slots):
            if runs and runs[-1][0] == s and runs[-1][2] == r * per:
                runs[-1] = (s, runs[-1][1], (r + 1) * per)
            else:
                runs.append((s, r * per, (r + 1) * per))
        runs = [x for x in runs if x[0] >= 0]
        out = runs if runs and all(t1 - t0 >= GEMM_MIN_TOKENS for _, t0, t1 in runs) else None
        self._runs[n] = out
        return out

    # ------------------------------------------------------------------ the per-linear term

    def apply(self, lin, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (= lin.base(x)) plus the rows' LoRA / delta terms of linear `lin`."""
        if x.shape[-1] != lin.in_features:
            raise ValueError(f"{lin.key}: input has {x.shape[-1]} features, expected {lin.in_features}")
        t = self._tables.get(lin.key) if self.any_adapter else None
        dslots = self._dtables.get(lin.key) if self.any_delta else None
        if t is None and not dslots:
            return y
        lead = tuple(x.shape[:-1])
        n = self._tokens(lead)
        x2 = x.reshape(n, lin.in_features)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and y.requires_grad):
            return self._apply_plain(lin, t, dslots, x2, y, n)
        if not y.is_contiguous():
            y = y.contiguous()
        y2 = y.view(n, lin.out_features)
        if x2.stride(-1) != 1 or x2.stride(0) != lin.in_features:
            x2 = x2.contiguous()
        if t is not None:
            runs = self._gemm_runs(n)
            if runs is not None and t.A.dtype == x2.dtype == y2.dtype:
                for s, t0, t1 in runs:
                    sc = t.scales_host[s]
                    if sc != 0.0:
                        y2[t0:t1].addmm_(x2[t0:t1] @ t.A[s].t(), t.B[s].t(), alpha=sc)
            elif lin.group is not None:
                self._apply_group(lin, x, x2, y2, n, self.token_slot(lead))
            else:
                lora_apply_prepared(x2, t.prepared(), self.token_slot(lead), y2, [0])
        if dslots:
            self._apply_deltas(lin.key, dslots, x2, y2, n)
        return y

    def _apply_group(self, lin, x, x2, y2, n, ts) -> None:
        g = lin.group
        hit = self._group_out.get(id(g))
        if hit is None or hit[0] is not x or lin.key not in hit[2]:
            members = [(m, self._tables.get(m.key)) for m in g]
            members = [(m, t) for m, t in members if t is not None]
            if len({t.r_max for _, t in members}) != 1:
                # tables of different widths cannot share one u: this member alone
                t = self._tables[lin.key]
                lora_apply_prepared(x2, t.prepared(), ts, y2, [0])
                return
            # the group's shrink in one call (x read once for all members); each member's
            # expand then adds straight into its own output (no scratch, no slice adds)
            preps = {m.key: t.prepared() for m, t in members}
            u = torch.empty(len(members), n, members[0][1].r_max, dtype=torch.float32, device=y2.device)
            lora_shrink_prepared(x2, _join(list(preps.values())), ts, u)
            hit = (x, u, {k: (i, p) for i, (k, p) in enumerate(preps.items())})
            self._group_out[id(g)] = hit
        _, u, idx = hit
        i, prep = idx[lin.key]
        lora_expand_prepared(u[i], prep, ts, y2, [0])

    def _apply_deltas(self, key, dslots, x2, y2, n) -> None:
        calls = self._dcalls.get((key, n))
        if calls is None:
            # decode steps repeat one assignment for many steps: the call plans live in a
            # pool-level cache keyed by the module's delta dict (replaced, never mutated, on
            # load/unload) and the rows' delta slots
            ck = (key, n, self._deltas_key)
            hit = self.pool._delta_plans.get(ck)
            if hit is not None and hit[0] is dslots:
                calls = hit[1]
            else:
                calls = delta_calls(dslots, self._deltas, n // self.rows, y2.device)
                if len(self.pool._delta_plans) > 4096:
                    self.pool._delta_plans.clear()
                self.pool._delta_plans[ck] = (dslots, calls)
            self._dcalls[(key, n)] = calls
        run_delta_calls(calls, x2, y2)

    def _apply_plain(self, lin, t, dslots, x2, y, n) -> torch.Tensor:
        """One op per term, no caches: what torch.compile traces, and the grad-mode path
        (the terms are added out of place so gradients reach the base weights)."""
        ts = self.row_slot.repeat_interleave(n // self.rows)
        delta = torch.zeros(n, lin.out_features, dtype=y.dtype, device=y.device)
        xd = x2.detach().contiguous()
        with torch.no_grad():
            self._plain_terms(t, dslots, xd, ts, delta, n)
        return y + delta.view(y.shape)

    def _plain_terms(self, t, dslots, xd, ts, delta, n) -> None:
        if t is not None:
            lora_apply(xd, t.A, t.B, ts, t.ranks, t.scales, delta, validate=False)
        if dslots:
            # one call per delta slot present in the module (compile-friendly: no Python
            # bookkeeping on tensors); rows of other slots map to -1
            for s, m in dslots.items():
                tsd = torch.where(self.row_delta == s, 0, -1).to(torch.int32).repeat_interleave(n // self.rows)
                code, g, per_tensor, _ = m.sig
                torch.ops.lfm.delta_apply_packed(xd, [m.data], [m.scales], tsd, delta, code, g, per_tensor, 1.0)


def run_delta_calls(calls, x2: torch.Tensor, y2: torch.Tensor) -> None:
    """y2 += each planned delta_apply call's term (deltas.delta_calls: (signature, data
    views, scale views, data, scales, token map)). Eager CPU calls go straight to the C ABI
    with the prepared views (torch.library's dispatch costs tens of microseconds a call);
    CUDA tensors, and what torch.compile traces, go through the registered op."""
    if x2.device.type == "cpu" and not torch.compiler.is_compiling():
        from lfm_engine._native import native

        xv, yv = _view(x2), _view(y2)
        for (code, g, per_tensor, _sdt), dv, sv, _d, _s, ts in calls:
            native().delta_apply(xv, dv, sv, _view(ts), yv, code, g, per_tensor, 1.0, 0)
    else:
        for (code, g, per_tensor, _sdt), _dv, _sv, data, scales, ts in calls:
            torch.ops.lfm.delta_apply_packed(x2, data, scales, ts, y2, code, g, per_tensor, 1.0)


def _join(preps):
    """Concatenate prepared single-slice argument bundles into one multi-slice bundle."""
    if len(preps) == 1:
        return preps[0]
    return tuple([v for p in preps for v in p[i]] for i in range(len(preps[0])))
