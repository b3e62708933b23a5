"""Engine: continuous-batching generation over a LoRA-attached causal LM.

    engine = Engine(model, pool, tokenizer=None)
    results = engine.generate([Request(prompt=[1, 2, 3], adapter="sql"), Request("hi", adapter=None), ...])

Scheduling (one `step()`):
  1. every running sequence decodes one token, all rows in one forward: input [B, 1], each
     row with its own adapter through ``pool.assign(names)``;
  2. waiting requests join while there is room (``max_batch_size``) and their adapter is
     resident; a request whose adapter is evicted triggers its reload and waits without
     stalling the running batch (head-of-line blocking is avoided: later requests whose
     adapters are ready join first). Joining requests are prefilled together in one
     left-padded forward and their KV rows are appended to the running cache;
  3. finished sequences leave (their KV rows are dropped, common left padding trimmed).

KV cache: one transformers Cache for the whole running batch, rows left-padded to a common
length L. Each row r keeps pad[r] leading masked slots, so its attention mask is
``col >= pad[r]`` and its next position id is ``L - pad[r]`` (the number of real tokens),
which makes the padding invisible to the result. The cache layers keep capacity headroom
so a decode step writes one column in place instead of re-concatenating the whole cache.

Sampling per request (sampling.py): repetition / presence / frequency penalties, then
temperature < 1e-5 -> greedy (argmax); otherwise softmax(logits / T) restricted by top_k,
top_p (nucleus) and min_p, drawn with the request's own torch.Generator seeded by ``seed``
(reproducible whatever else is in the batch). With ``logprobs`` the raw log-probability of
each chosen token and the top ones are recorded; with ``prompt_logprobs`` also those of the
prompt tokens (the prefill then keeps every position's logits). Stops: ``stop_token_ids``,
the model's EOS (unless ``ignore_eos``), text ``stop`` strings (needs a tokenizer; the text
is cut before the stop string), or ``max_new_tokens`` (finish_reason "length"). A stop
token is not included in ``token_ids``/``text``.

Text is detokenized incrementally (the prefix/read offset scheme: each step decodes only
the last few tokens and appends the new characters once they no longer end in a partial
UTF-8 character), and stop strings are searched only in the new text plus the
len(stop) - 1 characters before it.

Threading: `submit` may be called from any thread; `step` runs one thread at a time (an
internal lock serialises callers); `run_forever` is the loop the HTTP server uses.
"""
from __future__ import annotations

import inspect
import itertools
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

import torch
from . import sampling
from .pool import AdapterNotReadyError, AdapterPool


# ----------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One generation request. `prompt` is token ids, or text when the engine has a tokenizer."""

    prompt: Union[str, Sequence[int]]
    adapter: Optional[str] = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    request_id: Optional[str] = None
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # report the chosen token's logprob and this many top ones
    prompt_logprobs: Optional[int] = None  # also for every prompt token after the first (echo)


@dataclass
class Result:
    request_id: str
    adapter: Optional[str]
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: Optional[str]
    finish_reason: str  # "stop" | "length" | "error" | "cancelled"
    error: Optional[str] = None
    # with finish_reason "error": "adapter_not_found" (unloaded while queued), "adapter_failed"
    # (its weights could not be loaded) or "internal" (the forward raised)
    error_type: Optional[str] = None
    time_to_first_token_s: float = 0.0
    latency_s: float = 0.0
    queue_s: float = 0.0
    # with Request.logprobs: per generated token (logprob, [(id, logprob), ...top]); with
    # prompt_logprobs: the same for prompt tokens 1.. (token 0 has no context)
    logprobs: Optional[List[Tuple[float, List[Tuple[int, float]]]]] = None
    prompt_logprobs: Optional[List[Tuple[float, List[Tuple[int, float]]]]] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first divided by the time after the first (the decode rate)."""
        dt = self.latency_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / dt if len(self.token_ids) > 1 and dt > 0 else 0.0


class Handle:
    """A submitted request: `tokens` grows as they are generated; `events` receives each
    new token id and finally None; `result()` waits for the end. `on_event` (optional,
    called from the engine thread after each event) lets an asyncio server wake up."""

    def __init__(self, request: Request, request_id: str, prompt_ids: List[int],
                 on_event: Optional[Callable[[], None]] = None):
        self.request = request
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.tokens: List[int] = []
        self.text = ""  # detokenized so far (with a tokenizer); a stop string is cut off
        self.logprobs: List[Tuple[float, List[Tuple[int, float]]]] = []
        self.prompt_logprobs: Optional[List[Tuple[float, List[Tuple[int, float]]]]] = None
        self.events: "queue.Queue[Optional[int]]" = queue.Queue()
        self.on_event = on_event
        self._done = threading.Event()
        self._result: Optional[Result] = None
        self._finish_reason: Optional[str] = None
        self._stops: List[str] = []
        self.cancelled = False

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: Optional[float] = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return self._result

    def cancel(self) -> None:
        """Stop generating (the row leaves the batch at the next step; finish_reason "cancelled")."""
        self.cancelled = True

    def _event(self, item: Optional[int]) -> None:
        self.events.put(item)
        if self.on_event is not None:
            try:
                self.on_event()
            except Exception:  # noqa: BLE001 - a closed client loop must not stop the engine
                pass


@dataclass
class _Seq:
    handle: Handle
    adapter: Optional[str]
    stop_ids: frozenset
    generator: Optional[torch.Generator]
    t_submit: float
    t_admit: float = 0.0
    t_first: float = 0.0
    held: bool = False  # holds a pool reference on its adapter
    reserve: int = 0  # prompt + max_new_tokens: the KV columns this row may need
    text: str = ""  # detokenized so far (incremental: see _detok)
    prefix_off: int = 0
    read_off: int = 0


# ----------------------------------------------------------------------------- engine


def _kv_columns(rows: int, longest: int) -> int:
    """Token columns a cache of `rows` rows may hold when its longest row reaches `longest`:
    padding to the longest row, GrowLayer's 1/4 + 64 growth headroom, the 16 of a join."""
    return rows * (longest + longest // 4 + 80)


def _check_sampling(r: Request) -> None:
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(r.top_k, int) and not isinstance(r.top_k, bool) and r.top_k >= -1):
        raise ValueError(f"top_k must be an integer >= -1 (0 or -1: off), got {r.top_k!r}")
    if not (num(r.min_p) and 0 <= r.min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {r.min_p!r}")
    if not (num(r.repetition_penalty) and 0 < r.repetition_penalty <= 100):
        raise ValueError(f"repetition_penalty must be in (0, 100], got {r.repetition_penalty!r}")
    for k in ("presence_penalty", "frequency_penalty"):
        v = getattr(r, k)
        if not (num(v) and -2 <= v <= 2):
            raise ValueError(f"{k} must be in [-2, 2], got {v!r}")
    for k in ("logprobs", "prompt_logprobs"):
        v = getattr(r, k)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 20):
            raise ValueError(f"{k} must be an integer in [0, 20], got {v!r}")


class Engine:
    """Continuous-batching generation with per-request LoRA adapters (module docstring).

    Args:
        model: a transformers causal LM already `attach()`-ed to `pool`, on pool.device.
        pool: the AdapterPool.
        tokenizer: optional; enables text prompts, `text` in results and text stops.
        max_batch_size: most sequences decoded together.
        max_seq_len: longest prompt + generation (default: config.max_position_embeddings).
        kv_cache_bytes: optional KV memory budget. Each request reserves R = prompt +
            max_new_tokens tokens; the running batch's cache holds at most B rows of
            (max R) · 5/4 + 80 token columns (left padding to the longest row, growth
            headroom), each 2 · layers · kv_heads · head_dim · itemsize bytes. A request that
            would push that over the budget waits for rows to finish; one that cannot fit
            even alone is refused at submit (ValueError). Transient copies while rows join
            are not counted.
    """

    def __init__(self, model, pool: AdapterPool, tokenizer=None, *, max_batch_size: int = 32,
                 max_seq_len: Optional[int] = None, kv_cache_bytes: Optional[int] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        from . import _kv  # needs transformers; imported here so `lfm_engine.serve` imports without it

        self._kv = _kv
        self.model = model.eval()
        self.pool = pool
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        cfg = getattr(model, "config", None)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        self.max_seq_len = int(max_seq_len or getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            gcfg = getattr(model, "generation_config", None)
            eos = getattr(gcfg, "eos_token_id", None) if gcfg is not None else None
            if eos is None:
                eos = getattr(cfg, "eos_token_id", None)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", heads) // heads)
        layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
        itemsize = next(model.parameters()).element_size()
        self.kv_bytes_per_token = 2 * layers * kv_heads * head_dim * itemsize
        if kv_cache_bytes is not None and kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {kv_cache_bytes}")
        self.kv_budget_tokens = None if kv_cache_bytes is None else int(kv_cache_bytes) // self.kv_bytes_per_token
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        params = inspect.signature(model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x names the cache argument `cache` (past_key_values is deprecated)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._submit_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._wake = threading.Condition(self._submit_lock)
        self._waiting: Deque[_Seq] = deque()
        self._running: List[_Seq] = []
        self._cache = None  # _kv.EngineCache of the running rows
        self._pads: List[int] = []
        self._ids = itertools.count()
        self._stats = dict(steps=0, prefill_tokens=0, decode_tokens=0, generated_tokens=0, finished=0, cancelled=0,
                           busy_s=0.0, batch_rows=0)

    # ------------------------------------------------------------------ submission

    def _prompt_ids(self, prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ValueError("prompt must be a string or a list of integer token ids") from None
            if any(isinstance(t, bool) or not float(t).is_integer() for t in prompt):
                raise ValueError("prompt token ids must be integers")
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def submit(self, request: Request, on_event: Optional[Callable[[], None]] = None) -> Handle:
        """Queue a request (validated now: ValueError / KeyError for bad input)."""
        r = request
        _check_sampling(r)
        if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {r.max_new_tokens!r}")
        if not (isinstance(r.temperature, (int, float)) and math.isfinite(r.temperature) and r.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {r.temperature!r}")
        if not (isinstance(r.top_p, (int, float)) and 0 < r.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {r.top_p!r}")
        if r.seed is not None and not isinstance(r.seed, int):
            raise ValueError(f"seed must be an integer, got {r.seed!r}")
        if r.stop and self.tokenizer is None:
            raise ValueError("text stop strings need a tokenizer; use stop_token_ids")
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of them")
        try:
            stop_ids = {int(t) for t in r.stop_token_ids}
        except (TypeError, ValueError):
            raise ValueError("stop_token_ids must be integers") from None
        ids = self._prompt_ids(r.prompt)
        if len(ids) + r.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({r.max_new_tokens}) exceeds the "
                             f"model's maximum sequence length {self.max_seq_len}")
        reserve = len(ids) + r.max_new_tokens
        if self.kv_budget_tokens is not None and _kv_columns(1, reserve) > self.kv_budget_tokens:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({r.max_new_tokens}) needs "
                             f"{_kv_columns(1, reserve) * self.kv_bytes_per_token} bytes of KV cache, more than the "
                             f"budget of {self.kv_budget_tokens * self.kv_bytes_per_token} bytes (kv_cache_bytes)")
        if r.adapter is not None and r.adapter not in self.pool:
            raise KeyError(f"no adapter named {r.adapter!r} (known: {sorted(self.pool.names())})")
        if not r.ignore_eos:
            stop_ids |= self.eos_ids
        gen = None
        if r.temperature >= sampling.GREEDY_EPS:
            gen = torch.Generator()
            # no seed: a fresh one from the OS (the global torch RNG of the caller is left alone)
            gen.manual_seed(r.seed % (1 << 64) if r.seed is not None else int.from_bytes(os.urandom(8), "little"))
        rid = r.request_id or f"req-{next(self._ids)}"
        h = Handle(r, rid, ids, on_event)
        h._stops = stops
        seq = _Seq(handle=h, adapter=r.adapter, stop_ids=frozenset(stop_ids), generator=gen, t_submit=time.perf_counter(),
                   reserve=reserve)
        with self._submit_lock:
            self._waiting.append(seq)
            self._wake.notify_all()
        return h

    def generate(self, requests: Sequence[Union[Request, dict]]) -> List[Result]:
        """Run the requests to completion with continuous batching; results in input order."""
        handles = [self.submit(r if isinstance(r, Request) else Request(**r)) for r in requests]
        t0 = time.perf_counter()
        while not all(h.done() for h in handles):
            if self.step() == 0 and not all(h.done() for h in handles):
                time.sleep(0.002)  # nothing runnable: waiting for an adapter load
        self.last_generate_s = time.perf_counter() - t0
        return [h.result() for h in handles]

    def has_work(self) -> bool:
        with self._submit_lock:
            return bool(self._waiting) or bool(self._running)

    def run_forever(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Step while there is work; sleep on new submissions otherwise; return when `stop` is set."""
        while not stop.is_set():
            if self.step() == 0:
                with self._submit_lock:
                    # requests waiting for an adapter load: poll soon; otherwise sleep until a submit
                    self._wake.wait(min(idle_wait, 0.005) if self._waiting else idle_wait)

    def stats(self) -> dict:
        """Aggregate counters: steps, prefill/decode/generated tokens, finished requests,
        busy seconds inside step(), generated tokens per busy second, mean decode batch."""
        s = dict(self._stats)
        s["tokens_per_s"] = s["generated_tokens"] / s["busy_s"] if s["busy_s"] > 0 else 0.0
        s["mean_batch"] = s["batch_rows"] / s["steps"] if s["steps"] else 0.0
        s["running"] = len(self._running)
        s["waiting"] = len(self._waiting)
        return s

    # ------------------------------------------------------------------ stepping

    def step(self) -> int:
        """One scheduling step (module docstring). Returns the number of sequences that ran a
        forward in it (0: idle, or every waiting request waits for its adapter)."""
        with self._step_lock:
            t0 = time.perf_counter()
            for s in self._running:
                if s.handle.cancelled and s.handle._finish_reason is None:
                    s.handle._finish_reason = "cancelled"
            if self._running:
                self._retire()  # cancelled rows leave before the forward, freeing their slot
            n = len(self._running)
            if n:
                self._guarded(self._decode)
            joined = self._admit()
            if joined:
                self._guarded(lambda: self._prefill_apart(joined), joined)
                n += len(joined)
            if n:
                self._stats["busy_s"] += time.perf_counter() - t0
            return n

    def _guarded(self, fn: Callable[[], None], joining: Sequence[_Seq] = ()) -> None:
        # A failing forward (out of memory, a broken adapter...) ends the affected requests
        # with an error instead of killing the serving loop. The decode and prefill paths
        # first retry row by row (_decode_rows_apart, _prefill_apart), so what reaches here
        # failed alone: joining requests that never entered the batch fail by themselves;
        # anything else leaves the batch state unknown, so the running rows end too.
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            if joining and not any(s in self._running for s in joining):
                victims = [s for s in joining if not s.handle.done()]
            else:
                victims = list(self._running) + [s for s in joining if s not in self._running]
                self._running, self._cache, self._pads = [], None, []
            for s in victims:
                if not s.handle.done():
                    self._finish(s, "error", msg, "internal")

    def _admit(self) -> List[_Seq]:
        room = self.max_batch_size - len(self._running)
        joined: List[_Seq] = []
        longest = max((s.reserve for s in self._running), default=0)
        with self._submit_lock:
            keep: Deque[_Seq] = deque()
            while self._waiting:
                s = self._waiting.popleft()
                if s.handle.cancelled:
                    self._finish(s, "cancelled")
                    continue
                if len(joined) >= room:
                    keep.append(s)
                    continue
                if self.kv_budget_tokens is not None and _kv_columns(
                        len(self._running) + len(joined) + 1, max(longest, s.reserve)) > self.kv_budget_tokens:
                    keep.append(s)  # waits until finished rows free KV memory
                    continue
                if s.adapter is not None:
                    try:
                        ok = self.pool.try_acquire(s.adapter)
                    except (KeyError, AdapterNotReadyError) as e:
                        kind = "adapter_not_found" if isinstance(e, KeyError) else "adapter_failed"
                        self._finish(s, "error", e.args[0] if isinstance(e, KeyError) else str(e), kind)
                        continue
                    if not ok:
                        keep.append(s)  # loading: others go ahead
                        continue
                    s.held = True
                s.t_admit = time.perf_counter()
                joined.append(s)
                longest = max(longest, s.reserve)
            self._waiting = keep
        return joined

    def _forward(self, seqs: Sequence[_Seq], input_ids, attention_mask, position_ids, cache, last_only: bool):
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        kw[self._cache_kw] = cache
        if last_only and self._has_logits_to_keep:
            kw["logits_to_keep"] = 1
        # the rows already hold references on their adapters (taken at admission): an unload
        # meanwhile only hides the name, so this batch still finds every row's slot
        with torch.inference_mode(), self.pool.assign_held([s.adapter for s in seqs]):
            out = self.model(**kw)
        return out.logits if not last_only else out.logits[:, -1, :]

    def _decode(self) -> None:
        seqs = self._running
        dev = self.pool.device
        B = len(seqs)
        L = self._cache.get_seq_length()
        pads = torch.tensor(self._pads, dtype=torch.long)
        ids = torch.tensor([s.handle.tokens[-1] for s in seqs], dtype=torch.long).view(B, 1)
        mask = (torch.arange(L + 1)[None, :] >= pads[:, None]).long()
        pos = (L - pads).view(B, 1)
        lens = self._kv.lengths(self._cache)
        try:
            logits = self._forward(seqs, ids.to(dev), mask.to(dev), pos.to(dev), self._cache, last_only=False)[:, -1, :]
        except Exception:  # noqa: BLE001
            if B == 1:
                raise
            self._kv.restore(self._cache, lens)
            seqs, logits = self._decode_rows_apart(ids.to(dev), mask.to(dev), pos.to(dev))
            if not seqs:
                return
        self._stats["steps"] += 1
        self._stats["batch_rows"] += B
        self._stats["decode_tokens"] += B
        self._emit(seqs, logits)
        self._retire()

    def _decode_rows_apart(self, ids, mask, pos):
        """The batched decode failed (out of memory, a broken adapter ...): run every row
        alone on a copy of its cache rows, so only the rows that fail on their own end
        with an error; the others continue as if nothing happened."""
        keep, logits, caches, pads = [], [], [], []
        for i, s in enumerate(self._running):
            c = self._kv.select(self._cache, [i])
            try:
                lg = self._forward([s], ids[i:i + 1], mask[i:i + 1], pos[i:i + 1], c, last_only=False)[:, -1, :]
            except Exception as e:  # noqa: BLE001 - this row's own failure
                self._finish(s, "error", f"{type(e).__name__}: {e}", "internal")
                continue
            keep.append(s)
            logits.append(lg)
            caches.append(c)
            pads.append(self._pads[i])
        if not keep:
            self._running, self._cache, self._pads = [], None, []
            return [], None
        self._running, self._cache, self._pads = keep, self._kv.concat(caches), pads
        return keep, torch.cat(logits)

    def _prefill_apart(self, joined: List[_Seq]) -> None:
        """Prefill the joining requests together; when that fails, one at a time, so only
        a request that fails alone ends with an error."""
        try:
            self._prefill(joined)
            return
        except Exception:  # noqa: BLE001
            if len(joined) == 1:
                raise
        for s in joined:
            try:
                self._prefill([s])
            except Exception as e:  # noqa: BLE001
                if s not in self._running:
                    self._finish(s, "error", f"{type(e).__name__}: {e}", "internal")
                else:
                    raise

    def _prefill(self, seqs: List[_Seq]) -> None:
        dev = self.pool.device
        lens = [len(s.handle.prompt_ids) for s in seqs]
        L = max(lens)
        pads = [L - n for n in lens]
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, pads[i]:] = torch.tensor(s.handle.prompt_ids, dtype=torch.long)
        p = torch.tensor(pads, dtype=torch.long)
        cols = torch.arange(L)[None, :]
        mask = (cols >= p[:, None]).long()
        pos = (cols - p[:, None]).clamp(min=0)
        cache = self._kv.EngineCache()
        want_prompt = any(s.handle.request.prompt_logprobs is not None for s in seqs)
        logits = self._forward(seqs, ids.to(dev), mask.to(dev), pos.to(dev), cache, last_only=not want_prompt)
        if want_prompt:  # logits[i, c] predicts the token at column c + 1
            cpu = logits.float().cpu()
            for i, s in enumerate(seqs):
                k = s.handle.request.prompt_logprobs
                if k is not None:
                    s.handle.prompt_logprobs = [sampling.logprobs_of(cpu[i, c - 1], int(ids[i, c]), k)
                                                for c in range(pads[i] + 1, L)]
            logits = logits[:, -1, :]
        self._stats["prefill_tokens"] += sum(lens)
        if self._running:
            self._cache, self._pads = self._kv.merge_caches(self._cache, self._pads, cache, pads)
        else:
            self._cache, self._pads = cache, pads
        self._running = self._running + seqs
        self._emit(seqs, logits)
        self._retire()

    def _emit(self, seqs: Sequence[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's next token and record it (or the stop)."""
        greedy = torch.argmax(logits, dim=-1).tolist()
        cpu = None
        now = time.perf_counter()
        for i, s in enumerate(seqs):
            r = s.handle.request
            h = s.handle
            if sampling.needs_processing(r) or r.logprobs is not None:
                if cpu is None:
                    cpu = logits.float().cpu()
            tok = greedy[i]
            if sampling.needs_processing(r):
                tok = sampling.choose(cpu[i], r, h.prompt_ids, h.tokens, s.generator)
            if not s.t_first:
                s.t_first = now
            if tok in s.stop_ids:
                h._finish_reason = "stop"
                continue
            if r.logprobs is not None:
                h.logprobs.append(sampling.logprobs_of(cpu[i], tok, r.logprobs))
            h.tokens.append(tok)
            self._stats["generated_tokens"] += 1
            if self.tokenizer is not None:
                new = self._detok(s)
                if h._stops and new:
                    # a stop string ends in the new text: search it plus len(stop) - 1 before it
                    back = max(len(x) for x in h._stops) - 1
                    start = max(0, len(s.text) - len(new) - back)
                    cut = min((k for k in (s.text.find(x, start) for x in h._stops) if k >= 0), default=-1)
                    if cut >= 0:
                        s.text = h.text = s.text[:cut]
                        h._finish_reason = "stop"
                        h._event(tok)
                        continue
            h._event(tok)
            if len(h.tokens) >= r.max_new_tokens:
                h._finish_reason = "length"
            elif h.cancelled:
                h._finish_reason = "cancelled"

    def _detok(self, s: _Seq, final: bool = False) -> str:
        """Append the characters the newest token completes to s.text and return them.

        Decodes tokens[prefix_off:] and tokens[prefix_off:read_off] (a few tokens, so the
        tokenizer's spacing rules see the previous token); the difference is new text
        unless it ends in U+FFFD (half a UTF-8 character: wait for the next token)."""
        toks = s.handle.tokens
        dec = self.tokenizer.decode
        prev = dec(toks[s.prefix_off:s.read_off], skip_special_tokens=True)
        full = dec(toks[s.prefix_off:], skip_special_tokens=True)
        if len(full) > len(prev) and (final or not full.endswith("\ufffd")):
            new = full[len(prev):]
            s.text += new
            s.handle.text = s.text
            s.prefix_off, s.read_off = s.read_off, len(toks)
            return new
        return ""

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.handle._finish_reason is None]
        if len(keep) == len(self._running):
            return
        done = [s for s in self._running if s.handle._finish_reason is not None]
        if keep:
            idx = torch.tensor(keep, dtype=torch.long, device=self.pool.device)
            for layer in self._cache.layers:
                layer.batch_select_indices(idx)
            pads = [self._pads[i] for i in keep]
            m = min(pads)
            if m:
                for layer in self._cache.layers:
                    layer.trim_left(m)
                pads = [p - m for p in pads]
            self._running = [self._running[i] for i in keep]
            self._pads = pads
        else:
            self._running, self._cache, self._pads = [], None, []
        for s in done:
            self._finish(s, s.handle._finish_reason)

    def _finish(self, s: _Seq, reason: str, error: Optional[str] = None, error_type: Optional[str] = None) -> None:
        h = s.handle
        if s.held:
            s.held = False
            try:
                self.pool.release(s.adapter)
            except RuntimeError:
                pass  # the adapter was force-dropped; nothing to release
        now = time.perf_counter()
        text = None
        if self.tokenizer is not None:
            if reason != "stop" or not h._stops:
                self._detok(s, final=True)  # the tail held back for a partial character
            text = s.text
        start = s.t_admit or now
        h._result = Result(request_id=h.request_id, adapter=s.adapter, prompt_token_ids=list(h.prompt_ids),
                           token_ids=list(h.tokens), text=text, finish_reason=reason, error=error, error_type=error_type,
                           time_to_first_token_s=(s.t_first - s.t_submit) if s.t_first else 0.0,
                           latency_s=now - s.t_submit, queue_s=start - s.t_submit,
                           logprobs=list(h.logprobs) if h.request.logprobs is not None else None,
                           prompt_logprobs=h.prompt_logprobs)
        if reason in ("stop", "length"):
            self._stats["finished"] += 1
        elif reason == "cancelled":
            self._stats["cancelled"] += 1
        h._done.set()
        h._event(None)
