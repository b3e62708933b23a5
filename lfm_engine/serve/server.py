"""OpenAI-compatible HTTP front end of the Engine (standard library http.server only).

Routes:
    POST   /v1/completions      {"model", "prompt", "max_tokens", "temperature", "top_p", "seed",
                                 "stop", "stream", ...}; "model" names an adapter or the base model
    GET    /v1/models           the base model and the adapters (OpenAI list format)
    GET    /v1/adapters         adapters with state, slot, rank, bytes, pinned, in use
    POST   /v1/adapters         {"name", "path", "pin": false, "wait": true} loads a PEFT folder
    DELETE /v1/adapters/NAME    (or DELETE /v1/adapters with {"name"}) unloads
    GET    /health              {"status": "ok", engine stats}

Prompts: a string (needs a tokenizer in the model folder), a list of token ids, or a list of
either (one choice per prompt). Each choice carries "text" ("" without a tokenizer) and the
extension field "token_ids". Extension request fields: "stop_token_ids", "ignore_eos".
Sampling defaults follow OpenAI (temperature 1, top_p 1, max_tokens 16); temperature 0 is greedy.
Streaming ("stream": true, one prompt) sends Server-Sent Events "data: {chunk}" per token and
"data: [DONE]"; with text stop strings the last len(stop)-1 characters are held back until the
stop is ruled out, so a stop string is never streamed.

Errors are JSON {"error": {"message", "type", "param", "code"}} with 400 (bad request), 404
(unknown model/adapter/route, or an adapter unloaded while the request waited), 405, 409
(duplicate adapter name), 411/413 (body), 424 (the adapter's weights failed to load), 503
(adapter pool full); an unexpected failure is a 500 and the server keeps running.
Loading adapters by path over HTTP trusts the client: bind to 127.0.0.1 (the default).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional
from urllib.parse import unquote

from .engine import Engine, Handle, Request
from .peft_format import AdapterFormatError
from .pool import PoolFullError

MAX_BODY = 8 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _opt(body: dict, key: str, kind, default, check=None, what: str = ""):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise ApiError(400, f"'{key}' must be {what or kind.__name__}", param=key)
    if check is not None and not check(v):
        raise ApiError(400, f"'{key}' must be {what}", param=key)
    return v


class ServeApp:
    """Engine + adapter management behind the HTTP routes; owns the engine loop thread."""

    def __init__(self, engine: Engine, base_name: str = "base", request_timeout: float = 600.0):
        self.engine = engine
        self.pool = engine.pool
        self.base_name = base_name
        self.request_timeout = request_timeout
        self._stop = threading.Event()
        self._loop = threading.Thread(target=engine.run_forever, args=(self._stop,), name="lfm-engine-loop",
                                      daemon=True)
        self._loop.start()

    def close(self) -> None:
        self._stop.set()
        self._loop.join(timeout=10)

    # ------------------------------------------------------------------ routes

    def models(self) -> dict:
        data = [dict(id=self.base_name, object="model", owned_by="lfm_engine", root=None)]
        data += [dict(id=n, object="model", owned_by="lfm_engine", root=self.base_name) for n in self.pool.names()]
        return dict(object="list", data=data)

    def adapters(self) -> dict:
        return dict(object="list", data=self.pool.info(), capacity=self.pool.capacity,
                    resident_bytes=self.pool.resident_bytes(), table_bytes=self.pool.table_bytes(),
                    max_bytes=self.pool.max_bytes)

    def load_adapter(self, body: dict) -> dict:
        name = body.get("name")
        path = body.get("path")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'name' (a non-empty string) is required", param="name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "'path' (the PEFT adapter folder) is required", param="path")
        if name == self.base_name:
            raise ApiError(409, f"'{name}' is the base model's name", param="name")
        pin = _opt(body, "pin", bool, False)
        wait = _opt(body, "wait", bool, True)
        try:
            fut = self.pool.load(name, path, pin=pin)
        except FileNotFoundError as e:
            raise ApiError(404, str(e), param="path")
        except AdapterFormatError as e:
            raise ApiError(400, str(e), param="path")
        except PoolFullError as e:
            raise ApiError(503, str(e), type_="server_error")
        except ValueError as e:
            raise ApiError(409 if "already registered" in str(e) else 400, str(e))
        if wait:
            try:
                fut.result(self.request_timeout)
            except Exception as e:  # the tensors could not be read: forget the adapter
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
            raise ApiError(404, str(e.args[0]), param="name")
        return dict(name=name, object="adapter", deleted=True)

    def _requests(self, body: dict) -> List[Request]:
        model = body.get("model", self.base_name)
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model == self.base_name:
            adapter = None
        elif model in self.pool:
            adapter = model
        else:
            raise ApiError(404, f"model {model!r} not found (base: {self.base_name!r}, adapters: "
                                f"{sorted(self.pool.names())})", type_="not_found_error", param="model")
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt")
        prompt = body["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in p)) for p in prompt):
            prompts = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of those",
                           param="prompt")
        for key, ok in (("n", lambda v: v in (None, 1)), ("best_of", lambda v: v in (None, 1)),
                        ("echo", lambda v: v in (None, False)), ("logprobs", lambda v: v is None),
                        ("suffix", lambda v: v is None), ("logit_bias", lambda v: not v),
                        ("presence_penalty", lambda v: v in (None, 0)),
                        ("frequency_penalty", lambda v: v in (None, 0))):
            if key in body and not ok(body[key]):
                raise ApiError(400, f"'{key}' = {body[key]!r} is not supported by this server", param=key)
        max_tokens = _opt(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1")
        temperature = _opt(body, "temperature", float, 1.0, lambda v: 0 <= v <= 100, "a number in [0, 100]")
        top_p = _opt(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        seed = _opt(body, "seed", int, None)
        ignore_eos = _opt(body, "ignore_eos", bool, False)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        stop_ids = body.get("stop_token_ids") or []
        if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
            raise ApiError(400, "'stop_token_ids' must be a list of integers", param="stop_token_ids")
        return [Request(prompt=p, adapter=adapter, max_new_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=None if seed is None else seed + i, stop=stop, stop_token_ids=stop_ids,
                        ignore_eos=ignore_eos) for i, p in enumerate(prompts)]

    def submit(self, body: dict) -> List[Handle]:
        reqs = self._requests(body)
        handles = []
        try:
            for r in reqs:
                handles.append(self.engine.submit(r))
        except (ValueError, KeyError) as e:
            for h in handles:
                h.cancel()
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ApiError(404 if isinstance(e, KeyError) else 400, str(msg), param="prompt")
        return handles

    def completion_body(self, body: dict, handles: List[Handle]) -> dict:
        created = int(time.time())
        choices, p_tok, c_tok = [], 0, 0
        for i, h in enumerate(handles):
            try:
                res = h.result(self.request_timeout)
            except TimeoutError:
                for x in handles:
                    x.cancel()
                raise ApiError(504, f"generation did not finish within {self.request_timeout} s", "server_error")
            if res.finish_reason == "error":
                code = {"adapter_not_found": 404, "adapter_failed": 424}.get(res.error_type, 500)
                raise ApiError(code, f"generation failed: {res.error}",
                               "server_error" if code == 500 else "invalid_request_error")
            choices.append(dict(index=i, text=res.text or "", token_ids=res.token_ids, logprobs=None,
                                finish_reason=res.finish_reason))
            p_tok += res.prompt_tokens
            c_tok += res.completion_tokens
        return dict(id=f"cmpl-{uuid.uuid4().hex[:24]}", object="text_completion", created=created,
                    model=body.get("model", self.base_name), choices=choices,
                    usage=dict(prompt_tokens=p_tok, completion_tokens=c_tok, total_tokens=p_tok + c_tok))


def _make_handler(app: ServeApp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "lfm-engine"
        protocol_version = "HTTP/1.0"  # one request per connection; streaming ends by closing

        def log_message(self, fmt, *args):  # keep stderr quiet; the engine reports stats instead
            pass

        # -------------------------------------------------------------- plumbing
        def _send_json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError) -> None:
            self._send_json(e.status, dict(error=dict(message=e.message, type=e.type, param=e.param, code=e.status)))

        def _body(self) -> dict:
            n = self.headers.get("Content-Length")
            if n is None:
                raise ApiError(411, "Content-Length is required")
            try:
                n = int(n)
            except ValueError:
                raise ApiError(400, "bad Content-Length")
            if n < 0 or n > MAX_BODY:
                raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ApiError(400, f"request body is not valid JSON: {e}")
            if not isinstance(body, dict):
                raise ApiError(400, "request body must be a JSON object")
            return body

        def _route(self, method: str) -> None:
            try:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                if path == "/v1/completions":
                    if method != "POST":
                        raise ApiError(405, "use POST for /v1/completions")
                    return self._completions()
                if path == "/v1/models" and method == "GET":
                    return self._send_json(200, app.models())
                if path == "/health" and method == "GET":
                    return self._send_json(200, dict(status="ok", stats=app.engine.stats()))
                if path == "/v1/adapters":
                    if method == "GET":
                        return self._send_json(200, app.adapters())
                    if method == "POST":
                        return self._send_json(200, app.load_adapter(self._body()))
                    if method == "DELETE":
                        name = self._body().get("name")
                        if not isinstance(name, str):
                            raise ApiError(400, "'name' is required", param="name")
                        return self._send_json(200, app.unload_adapter(name))
                if path.startswith("/v1/adapters/"):
                    if method != "DELETE":
                        raise ApiError(405, "use DELETE /v1/adapters/NAME to unload")
                    return self._send_json(200, app.unload_adapter(unquote(path[len("/v1/adapters/"):])))
                if path in ("/v1/models", "/health", "/v1/adapters"):
                    raise ApiError(405, f"{method} is not allowed on {path}")
                raise ApiError(404, f"no route {method} {path}", "not_found_error")
            except ApiError as e:
                self._error(e)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # noqa: BLE001 - a bug must not take the server down
                try:
                    self._error(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
                except Exception:
                    pass

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_DELETE(self):
            self._route("DELETE")

        def do_PUT(self):
            self._route("PUT")

        # -------------------------------------------------------------- completions
        def _completions(self) -> None:
            body = self._body()
            stream = _opt(body, "stream", bool, False)
            if stream and isinstance(body.get("prompt"), list) and body["prompt"] and not isinstance(
                    body["prompt"][0], int):
                raise ApiError(400, "streaming supports one prompt per request", param="stream")
            handles = app.submit(body)
            if not stream:
                return self._send_json(200, app.completion_body(body, handles))
            self._stream(body, handles[0])

        def _stream(self, body: dict, h: Handle) -> None:
            tok = app.engine.tokenizer
            stops = h._stops
            hold = max((len(s) for s in stops), default=1) - 1
            cid = f"cmpl-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            model = body.get("model", app.base_name)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            sent = ""

            def chunk(text, ids, finish):
                obj = dict(id=cid, object="text_completion", created=created, model=model,
                           choices=[dict(index=0, text=text, token_ids=ids, logprobs=None, finish_reason=finish)])
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            try:
                deadline = time.monotonic() + app.request_timeout
                new_ids: List[int] = []
                while True:
                    item = h.events.get(timeout=max(0.0, deadline - time.monotonic()))
                    if item is None:
                        break
                    new_ids.append(item)
                    delta = ""
                    if tok is not None:
                        text = tok.decode(h.tokens[: len(h.tokens)], skip_special_tokens=True)
                        safe = len(text) - hold
                        cut = min((text.find(x) for x in stops if x in text), default=-1)
                        if cut >= 0:  # a stop string completed: never stream it
                            safe = min(safe, cut)
                        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                            safe = min(safe, len(text) - 1)
                        if safe > len(sent):
                            delta = text[len(sent):safe]
                            sent += delta
                    if delta or tok is None:
                        chunk(delta, new_ids, None)
                        new_ids = []
                res = h.result(1.0)
                if res.finish_reason == "error":
                    err = dict(error=dict(message=f"generation failed: {res.error}", type="server_error",
                                          param=None, code=500))
                    self.wfile.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                else:
                    final = (res.text or "")[len(sent):] if tok is not None else ""
                    chunk(final, new_ids, res.finish_reason)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                h.cancel()  # client went away: free the batch row
            except Exception:
                h.cancel()
                raise

    return Handler


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server bound to (host, port) (port 0 = any free port: see server.server_address)."""
    httpd = ThreadingHTTPServer((host, port), _make_handler(app))
    httpd.daemon_threads = True
    return httpd
