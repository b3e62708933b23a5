"""OpenAI / vLLM-compatible HTTP server of the Engine: FastAPI (ASGI) on uvicorn.

Routes (all but /health need ``Authorization: Bearer KEY`` when an API key is set):
    POST /v1/completions        prompt (text, ids, or a list of either), n, logprobs, echo
                                (prompt logprobs), stop, stream (+ stream_options.include_usage)
    POST /v1/chat/completions   messages through the chat template of the model folder (or
                                --chat-template), logprobs + top_logprobs, stream
    GET  /v1/models             the base model and the adapters ("parent": the base)
    POST /v1/load_lora_adapter  {"lora_name", "lora_path"} (vLLM);  POST /v1/unload_lora_adapter
    GET|POST /v1/adapters, DELETE /v1/adapters/NAME   adapters with state, slot, rank, bytes
    GET  /metrics (Prometheus),  GET /health

"model" picks the adapter (or the base model). Sampling: temperature (< 1e-5 is greedy),
top_p, top_k, min_p, repetition/presence/frequency penalties, seed (choice i uses seed + i).
Fields not implemented are refused (protocol.py). Every error is OpenAI-shaped JSON
{"error": {"message", "type", "param", "code"}}: 400 bad request, 401 key, 403 path outside
--adapter-root or runtime adapters disabled, 404 unknown model/route, 405, 409 duplicate
name, 413 body too large, 422 framework validation, 424 adapter weights failed, 503 pool
full, 500 unexpected (the server keeps running).

Threads: the engine steps in its own thread; HTTP handlers only submit (in the thread pool)
and wait on an asyncio.Event the engine sets after each token, so the event loop never
blocks on a forward. Client folders are opened in a worker process with a time limit
(adapter_check.py). A client that disconnects cancels its requests (their rows leave the
batch at the next step). An unload hides the name at once and frees the slot when the
adapter's running requests end; other rows never notice.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from typing import Dict, List, Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .adapter_check import AdapterChecker
from .engine import Engine, Handle, Request
from .metrics import Metrics
from .peft_format import AdapterFormatError
from .pool import PoolFullError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _err(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
    return JSONResponse(dict(error=dict(message=message, type=type_, param=param, code=status)), status_code=status)


def _validation_message(e: ValidationError):
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "extra_forbidden":
        return f"field '{loc}' is not supported by this server", loc
    return f"'{loc}': {first.get('msg')}", loc


class ServeApp:
    """Engine + adapter management + the FastAPI app (``self.app``); owns the engine thread."""

    def __init__(self, engine: Engine, base_name: str = "base", *, api_key: Optional[str] = None,
                 runtime_adapters: bool = True, adapter_root: Optional[str] = None,
                 chat_template: Optional[str] = None, max_prompts_per_request: int = 64,
                 max_body_bytes: int = 8 << 20, request_timeout: float = 600.0, adapter_check_timeout: float = 10.0):
        self.engine = engine
        self.pool = engine.pool
        self.base_name = base_name
        self.api_key = api_key or None
        self.runtime_adapters = runtime_adapters
        self.adapter_root = os.path.realpath(adapter_root) if adapter_root else None
        self.chat_template = chat_template
        self.max_prompts = int(max_prompts_per_request)
        self.max_body = int(max_body_bytes)
        self.request_timeout = float(request_timeout)
        self.checker = AdapterChecker(adapter_check_timeout)
        self.metrics = Metrics(engine)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=engine.run_forever, args=(self._stop,), name="lfm-engine-loop",
                                      daemon=True)
        self._loop.start()
        self.app = self._build()

    def close(self) -> None:
        self._stop.set()
        self._loop.join(timeout=10)
        self.checker.close()

    # ------------------------------------------------------------------ plumbing

    def _auth(self, req: HttpRequest) -> None:
        if self.api_key is None:
            return
        got = req.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error")

    async def _json(self, req: HttpRequest, model=None):
        n = req.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > self.max_body):
            raise ApiError(413, f"request body larger than {self.max_body} bytes")
        buf = bytearray()
        async for chunk in req.stream():
            buf += chunk
            if len(buf) > self.max_body:
                raise ApiError(413, f"request body larger than {self.max_body} bytes")
        try:
            body = json.loads(bytes(buf).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        if model is None:
            return body
        try:
            return model.model_validate(body)
        except ValidationError as e:
            msg, loc = _validation_message(e)
            raise ApiError(400, msg, param=loc or None)

    def _adapter_for(self, model: Optional[str]) -> Optional[str]:
        if model is None or model == self.base_name:
            return None
        if model in self.pool:
            return model
        raise ApiError(404, f"model {model!r} not found (base: {self.base_name!r}, adapters: "
                            f"{sorted(self.pool.names())})", "not_found_error", "model")

    def _checked_path(self, path: str) -> str:
        if not self.runtime_adapters:
            raise ApiError(403, "loading adapters over HTTP is disabled (--no-runtime-adapters)", "permission_error")
        real = os.path.realpath(path)  # symlinks and '..' resolved before the check
        if self.adapter_root is not None and os.path.commonpath([real, self.adapter_root]) != self.adapter_root:
            raise ApiError(403, f"adapter path {path!r} is outside --adapter-root", "permission_error", "path")
        return real

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, name: str, path: str, pin: bool = False, wait: bool = True) -> dict:
        if name == self.base_name:
            raise ApiError(409, f"{name!r} is the base model's name", param="name")
        real = self._checked_path(path)
        try:
            if real.endswith(".lfmd"):  # a compressed full fine-tune (deltas.py), read and checked now
                fut = await run_in_threadpool(self.pool.load_delta, name, real)
            else:
                spec = await run_in_threadpool(self.checker.open, real)
                fut = self.pool.load(name, spec, pin=pin)
        except FileNotFoundError as e:
            raise ApiError(404, str(e), "not_found_error", "path")
        except PermissionError as e:
            raise ApiError(403, str(e), "permission_error", "path")
        except PoolFullError as e:
            raise ApiError(503, str(e), "server_error")
        except ValueError as e:  # AdapterFormatError, rank above the limit, duplicate name, bad .lfmd
            raise ApiError(409 if "already registered" in str(e) else 400, str(e), param="path")
        if wait:
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), self.request_timeout)
            except Exception as e:  # noqa: BLE001 - the tensors could not be read: forget the adapter
                try:
                    self.pool.unload(name)
                except KeyError:
                    pass
                raise ApiError(400, f"adapter {name!r} failed to load: {e}", param="path")
        info = [i for i in self.pool.info() if i["name"] == name]
        return info[0] if info else dict(name=name, state="unknown")

    def unload_adapter(self, name: str) -> dict:
        try:
            self.pool.unload(name)
        except KeyError as e:
            raise ApiError(404, str(e.args[0]), "not_found_error", "name")
        return dict(name=name, object="adapter", deleted=True)

    # ------------------------------------------------------------------ generation

    def _tokenizer(self, what: str):
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(400, f"{what} needs a tokenizer, and the model folder has none")
        return tok

    def _requests(self, body, prompts: List, max_tokens: int, logprobs: Optional[int], echo: bool) -> List[Request]:
        adapter = self._adapter_for(body.model)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "'stop' strings must be non-empty", param="stop")
        if len(prompts) * body.n > self.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} exceeds --max-prompts-per-request="
                                f"{self.max_prompts}", param="prompt")
        out = []
        for p in prompts:
            for i in range(body.n):
                out.append(Request(prompt=p, adapter=adapter, max_new_tokens=max_tokens, temperature=body.temperature,
                                   top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                   repetition_penalty=body.repetition_penalty,
                                   presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                   seed=None if body.seed is None else body.seed + len(out), stop=stop,
                                   stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
                                   logprobs=logprobs, prompt_logprobs=logprobs if echo and logprobs is not None else None))
        return out

    async def _submit(self, reqs: List[Request], wake: asyncio.Event) -> List[Handle]:
        loop = asyncio.get_running_loop()

        def notify():
            loop.call_soon_threadsafe(wake.set)

        def submit_all():
            hs = []
            try:
                for r in reqs:
                    hs.append(self.engine.submit(r, on_event=notify))
            except (ValueError, KeyError) as e:
                for h in hs:
                    h.cancel()
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise ApiError(404 if isinstance(e, KeyError) else 400, str(msg), param="prompt")
            return hs

        return await run_in_threadpool(submit_all)

    async def _follow(self, handles: List[Handle], wake: asyncio.Event, http: HttpRequest):
        """Yield after every engine event until all handles are done; cancel them when the
        client goes away or the request timeout passes."""
        deadline = time.monotonic() + self.request_timeout
        try:
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), 0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError
                    if time.monotonic() > deadline:
                        raise ApiError(504, f"generation did not finish within {self.request_timeout} s",
                                       "server_error")
                wake.clear()
                yield
                if all(h.done() for h in handles):
                    return
        finally:
            for h in handles:
                if not h.done():
                    h.cancel()

    def _check_result(self, res) -> None:
        if res.finish_reason == "error":
            code = {"adapter_not_found": 404, "adapter_failed": 424}.get(res.error_type, 500)
            raise ApiError(code, f"generation failed: {res.error}", "server_error" if code == 500 else
                           "invalid_request_error")

    def _tok_str(self, t: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([t]) if tok is not None else f"token_id:{t}"

    def _completion_logprobs(self, res, echo: bool, prompt_text: str) -> dict:
        ids, lps, tops = [], [], []
        if echo:
            ids += res.prompt_token_ids
            lps.append(None)
            tops.append(None)
            for lp, top in res.prompt_logprobs or []:
                lps.append(lp)
                tops.append({self._tok_str(i): v for i, v in top})
        ids += res.token_ids
        for lp, top in res.logprobs or []:
            lps.append(lp)
            tops.append({self._tok_str(i): v for i, v in top})
        toks = [self._tok_str(t) for t in ids]
        offs, o = [], 0
        for t in toks:
            offs.append(o)
            o += len(t)
        return dict(tokens=toks, token_logprobs=lps, top_logprobs=tops, text_offset=offs)

    def _prompt_text(self, p) -> str:
        tok = self.engine.tokenizer
        if isinstance(p, str):
            return p
        return tok.decode(p) if tok is not None else ""

    def _usage(self, results) -> dict:
        # the n choices of one prompt count its tokens once, as OpenAI does
        seen, pt, ct = set(), 0, 0
        for r in results:
            key = tuple(r.prompt_token_ids)
            if key not in seen:
                seen.add(key)
                pt += r.prompt_tokens
            ct += r.completion_tokens
        return dict(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)

    async def completions(self, http: HttpRequest):
        body: P.CompletionRequest = await self._json(http, P.CompletionRequest)
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "'best_of' different from n is not supported", param="best_of")
        pr = body.prompt
        prompts = [pr] if isinstance(pr, str) or (pr and isinstance(pr[0], int)) else list(pr)
        if not prompts:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "'max_tokens' = 0 needs echo=true (prompt scoring)", param="max_tokens")
        score_only = body.max_tokens == 0
        reqs = self._requests(body, prompts, max(1, body.max_tokens or 16) if not score_only else 1,
                              body.logprobs, body.echo)
        wake = asyncio.Event()
        t0 = time.perf_counter()
        handles = await self._submit(reqs, wake)
        ptexts = [self._prompt_text(p) for p in prompts for _ in range(body.n)]
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = body.model or self.base_name

        def choice(i, res):
            self._check_result(res)
            if score_only:  # prompt scoring: nothing generated
                res.token_ids, res.text, res.logprobs, res.finish_reason = [], "", [], "length"
            text = (ptexts[i] if body.echo else "") + (res.text or "")
            lp = self._completion_logprobs(res, body.echo, ptexts[i]) if body.logprobs is not None else None
            return dict(index=i, text=text, token_ids=res.token_ids, logprobs=lp, finish_reason=res.finish_reason)

        if not body.stream:
            async for _ in self._follow(handles, wake, http):
                pass
            results = [h.result(0) for h in handles]
            self._observe(results, t0)
            return dict(id=cid, object="text_completion", created=created, model=model,
                        choices=[choice(i, r) for i, r in enumerate(results)], usage=self._usage(results))

        def frame(obj) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def mk(i, text, ids, finish, lp=None):
            return dict(id=cid, object="text_completion", created=created, model=model,
                        choices=[dict(index=i, text=text, token_ids=ids, logprobs=lp, finish_reason=finish)])

        async def gen():
            async for piece in self._stream(handles, wake, http, t0, body, mk_delta=lambda i, d, ids, fin, lp:
                                            mk(i, d, ids, fin, lp), echo_texts=ptexts if body.echo else None):
                yield frame(piece)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(self, handles, wake, http, t0, body, mk_delta, echo_texts=None, chat_logprobs=None):
        """Chunks of every choice as tokens arrive. Text of a choice with stop strings is held
        back by len(stop) - 1 characters until the stop is ruled out (never streamed)."""
        hold = max((len(s) for s in ([body.stop] if isinstance(body.stop, str) else body.stop or [])), default=1) - 1
        sent = [0] * len(handles)
        ntok = [0] * len(handles)
        last = [t0] * len(handles)
        finished = [False] * len(handles)
        if echo_texts is not None:
            for i, t in enumerate(echo_texts):
                yield mk_delta(i, t, [], None, None)

        def pieces():
            # One sweep over the choices: what each produced since the last sweep.
            for i, h in enumerate(handles):
                if finished[i]:
                    continue
                done = h.done()
                ids = list(h.tokens[ntok[i]:])
                now = time.perf_counter()
                if ids:
                    (self.metrics.ttft if ntok[i] == 0 else self.metrics.itl).observe(now - last[i])
                    last[i] = now
                lp = None
                if h.request.logprobs is not None:
                    lp = chat_logprobs(h.logprobs[ntok[i]:ntok[i] + len(ids)]) if chat_logprobs else \
                        self._completion_logprobs(_Partial(ids, h.logprobs[ntok[i]:ntok[i] + len(ids)]), False, "")
                if done:
                    res = h.result(0)
                    if res.finish_reason == "error":
                        code = {"adapter_not_found": 404, "adapter_failed": 424}.get(res.error_type, 500)
                        yield dict(error=dict(message=f"generation failed: {res.error}", type="server_error",
                                              param=None, code=code))
                        finished[i] = True
                        continue
                    text = res.text or ""
                    safe = len(text)
                else:
                    text = h.text
                    safe = max(len(text) - hold, sent[i])
                if done or ids or safe > sent[i]:
                    delta = text[sent[i]:safe]
                    sent[i] = safe
                    ntok[i] += len(ids)
                    if delta or ids or done:
                        yield mk_delta(i, delta, ids, h.result(0).finish_reason if done else None, lp)
                if done:
                    finished[i] = True

        async for _ in self._follow(handles, wake, http):
            for piece in pieces():
                yield piece
        # A handle can finish between the sweep's done() check and _follow's last look:
        # one more sweep sends its final chunk (the finish_reason) and any last text.
        for piece in pieces():
            yield piece
        results = [h.result(0) for h in handles]
        self._observe(results, None)
        so = body.stream_options
        if so is not None and so.include_usage:
            u = mk_delta(0, "", [], None, None)
            u["choices"] = []
            u["usage"] = self._usage(results)
            yield u

    def _observe(self, results, t0) -> None:
        m = self.metrics
        for r in results:
            m.prompt_tokens.inc(r.prompt_tokens)
            m.generation_tokens.inc(r.completion_tokens)
            if t0 is not None and r.time_to_first_token_s:
                m.ttft.observe(r.time_to_first_token_s)
                if r.completion_tokens > 1:
                    m.itl.observe((r.latency_s - r.time_to_first_token_s) / (r.completion_tokens - 1))

    def _chat_prompt(self, body: "P.ChatRequest") -> List[int]:
        """The prompt token ids of a chat request: its messages through the chat template."""
        tok = self._tokenizer("/v1/chat/completions")
        msgs = [m.model_dump(exclude_none=True) for m in body.messages]
        template = self.chat_template or getattr(tok, "chat_template", None)
        if not template:
            raise ApiError(400, "the model folder has no chat template (tokenizer_config.json chat_template); "
                                "start the server with --chat-template FILE")
        try:
            text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                           add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template error is the request's (or template's) fault
            raise ApiError(400, f"chat template failed on these messages: {type(e).__name__}: {e}", param="messages")
        return list(tok(text, add_special_tokens=False)["input_ids"])

    async def chat(self, http: HttpRequest):
        """Phases: parse, the prompt (chat template), submit, then one response or a stream."""
        body: P.ChatRequest = await self._json(http, P.ChatRequest)
        ids = self._chat_prompt(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "'top_logprobs' needs logprobs=true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.engine.max_seq_len - len(ids))
        reqs = self._requests(body, [ids], max_tokens, (body.top_logprobs or 0) if body.logprobs else None, False)
        wake = asyncio.Event()
        t0 = time.perf_counter()
        handles = await self._submit(reqs, wake)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = body.model or self.base_name

        def lp_content(items, ids_):
            return dict(content=[dict(token=self._tok_str(t), logprob=lp, bytes=list(self._tok_str(t).encode()),
                                      top_logprobs=[dict(token=self._tok_str(i), logprob=v,
                                                         bytes=list(self._tok_str(i).encode())) for i, v in top])
                                 for t, (lp, top) in zip(ids_, items)])

        if not body.stream:
            async for _ in self._follow(handles, wake, http):
                pass
            results = [h.result(0) for h in handles]
            for r in results:
                self._check_result(r)
            self._observe(results, t0)
            choices = [dict(index=i, message=dict(role="assistant", content=r.text or ""),
                            logprobs=lp_content(r.logprobs, r.token_ids) if body.logprobs else None,
                            finish_reason=r.finish_reason) for i, r in enumerate(results)]
            return dict(id=cid, object="chat.completion", created=created, model=model, choices=choices,
                        usage=self._usage(results))

        started = set()

        def mk(i, text, ids_, finish, lp):
            delta = {}
            if i not in started:
                started.add(i)
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            return dict(id=cid, object="chat.completion.chunk", created=created, model=model,
                        choices=[dict(index=i, delta=delta, logprobs=lp, finish_reason=finish)])

        class _B:  # _stream reads logprobs as "report them"
            stop, stream_options, logprobs = body.stop, body.stream_options, body.logprobs

        async def gen():
            def chat_lp(items):
                return dict(content=[dict(token="", logprob=lp, bytes=None, top_logprobs=[
                    dict(token=self._tok_str(i), logprob=v, bytes=None) for i, v in top]) for lp, top in items])

            async for piece in self._stream(handles, wake, http, t0, _B, mk, chat_logprobs=chat_lp):
                yield b"data: " + json.dumps(piece).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def models(self) -> dict:
        now = int(time.time())
        data = [dict(id=self.base_name, object="model", created=now, owned_by="lfm_engine", root=self.base_name,
                     parent=None, max_model_len=self.engine.max_seq_len)]
        data += [dict(id=n, object="model", created=now, owned_by="lfm_engine", root=n, parent=self.base_name)
                 for n in self.pool.names()]
        return dict(object="list", data=data)

    # ------------------------------------------------------------------ the ASGI app

    def _build(self) -> FastAPI:
        app = FastAPI(title="lfm_engine", docs_url=None, redoc_url=None, openapi_url=None)
        me = self

        @app.exception_handler(ApiError)
        async def _api_error(_req, e: ApiError):
            return _err(e.status, e.message, e.type, e.param)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(req, e: StarletteHTTPException):
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
            msg = f"no route {req.method} {req.url.path}" if e.status_code == 404 else str(e.detail)
            return _err(e.status_code, msg, kind)

        @app.exception_handler(RequestValidationError)
        async def _validation(_req, e: RequestValidationError):
            first = e.errors()[0] if e.errors() else {}
            return _err(422, f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

        @app.exception_handler(Exception)
        async def _internal(_req, e: Exception):
            return _err(500, f"internal error: {type(e).__name__}: {e}", "server_error")

        app.add_middleware(_CountRequests, metrics=me.metrics)

        @app.get("/health")
        async def health():
            return dict(status="ok", stats=me.engine.stats())

        @app.get("/metrics")
        async def metrics(req: HttpRequest):
            me._auth(req)
            return Response(me.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(req: HttpRequest):
            me._auth(req)
            return me.models()

        @app.post("/v1/completions")
        async def completions(req: HttpRequest):
            me._auth(req)
            return await me.completions(req)

        @app.post("/v1/chat/completions")
        async def chat(req: HttpRequest):
            me._auth(req)
            return await me.chat(req)

        @app.post("/v1/load_lora_adapter")
        async def load_lora(req: HttpRequest):
            me._auth(req)
            b = await me._json(req, P.LoadLoraRequest)
            await me.load_adapter(b.lora_name, b.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{b.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(req: HttpRequest):
            me._auth(req)
            b = await me._json(req, P.UnloadLoraRequest)
            me.unload_adapter(b.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{b.lora_name}' removed successfully.")

        @app.get("/v1/adapters")
        async def adapters(req: HttpRequest):
            me._auth(req)
            return dict(object="list", data=me.pool.info(), capacity=me.pool.capacity,
                        resident_bytes=me.pool.resident_bytes(), table_bytes=me.pool.table_bytes(),
                        max_bytes=me.pool.max_bytes)

        @app.post("/v1/adapters")
        async def add_adapter(req: HttpRequest):
            me._auth(req)
            b = await me._json(req, P.AdapterRequest)
            return await me.load_adapter(b.name, b.path, b.pin, b.wait)

        @app.delete("/v1/adapters/{name}")
        async def del_adapter(name: str, req: HttpRequest):
            me._auth(req)
            return me.unload_adapter(name)

        return app


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
           "/v1/unload_lora_adapter", "/v1/adapters"}


class _CountRequests:
    """Plain ASGI middleware: counts responses by route and status (streaming untouched,
    unlike BaseHTTPMiddleware, so disconnects still reach the route)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in _ROUTES else "other", str(status["code"])).inc()


class _Partial:
    """The slice of a running request that one streamed completions chunk reports."""

    def __init__(self, ids, lps):
        self.token_ids, self.logprobs, self.prompt_token_ids, self.prompt_logprobs = ids, lps, [], None


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 8000, *, backlog: int = 2048,
                timeout_keep_alive: float = 5.0, limit_concurrency: Optional[int] = 1024):
    """(uvicorn.Server, bound socket): run with ``server.run(sockets=[sock])``; port 0 binds a
    free port (see sock.getsockname()); stop with ``server.should_exit = True``."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    cfg = uvicorn.Config(app.app, log_level="warning", backlog=backlog, timeout_keep_alive=int(timeout_keep_alive),
                         limit_concurrency=limit_concurrency, access_log=False, lifespan="off")
    return uvicorn.Server(cfg), sock
