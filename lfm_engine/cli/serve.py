"""`lfm-engine serve`: OpenAI/vLLM-compatible multi-LoRA server (lfm_engine/serve/server.py).

    lfm-engine serve MODEL_DIR --lora-modules sql=adapters/sql chat=adapters/chat [--port 8000]

MODEL_DIR is a transformers causal-LM folder (config.json + weights; a tokenizer there
enables text prompts and chat) or a hub id present in the local Hugging Face cache; each
adapter is an unchanged PEFT LoRA folder (or cached hub id). vLLM's spellings work where
they mean the same: --lora-modules, --max-loras, --max-lora-rank, --max-model-len,
--max-num-seqs, --served-model-name, --api-key. Without --host the server binds to
127.0.0.1 only. Needs the serve extra: pip install "lfm_engine[serve]".
"""
from __future__ import annotations

import argparse
import os
import sys

EXTRA_HINT = 'lfm-engine serve needs the serve extra: pip install "lfm_engine[serve]"'


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a base model with many LoRA adapters over HTTP (OpenAI/vLLM API)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model folder or cached hub id")
    p.add_argument("--model", default=None, help="same as the positional MODEL")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help="adapters served as model NAME")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="one adapter (repeatable)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this adapter")
    p.add_argument("--delta", action="append", default=[], metavar="NAME=PATH.lfmd",
                   help="a compressed full fine-tune of MODEL (lfm-engine compress) served as model NAME (repeatable)")
    p.add_argument("--max-deltas", type=int, default=16, help="compressed fine-tunes resident at once")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set LFM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="name of the base model (default: folder name)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-loras", "--capacity", dest="capacity", type=int, default=16, help="adapter slots")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (bounds pool memory)")
    p.add_argument("--max-adapter-bytes", type=int, default=None, help="byte budget of resident adapters")
    p.add_argument("--max-num-seqs", "--max-batch-size", dest="max_batch_size", type=int, default=32)
    p.add_argument("--max-model-len", "--max-seq-len", dest="max_seq_len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="KV cache budget: requests wait for room, one that cannot fit alone is a 400")
    p.add_argument("--no-runtime-adapters", action="store_true", help="refuse adapter loads over HTTP")
    p.add_argument("--adapter-root", default=None, metavar="DIR", help="HTTP adapter paths must lie under DIR")
    p.add_argument("--max-prompts-per-request", type=int, default=64, help="prompts x n per request")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a generation may take")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0)
    p.add_argument("--backlog", type=int, default=2048, help="listen backlog")
    p.add_argument("--limit-concurrency", type=int, default=1024, help="connections before 503")
    p.add_argument("--adapter-check-timeout", type=float, default=10.0,
                   help="seconds to read an adapter config sent over HTTP (regex patterns)")
    return p


def _pairs(specs, flag):
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=PATH, got {s!r}")
        out.append((name, path))
    return out


def resolve_local(name: str, what: str) -> str:
    """A folder, or a hub id ("org/name") from the local Hugging Face cache (offline)."""
    if os.path.isdir(name):
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:
            raise FileNotFoundError(f"{what} {name!r}: no such folder (huggingface_hub is not installed)") from None
        try:
            return snapshot_download(name, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise FileNotFoundError(f"{what} {name!r}: no such folder and not in the local Hugging Face cache "
                                    "(download it first; the server works offline)") from None
    raise FileNotFoundError(f"{what} {name!r}: no such folder")


def _fingerprint(mdir: str):
    """lfm.base fingerprint of the served model folder (what .lfmd deltas must match);
    None when its weights are not safetensors (deltas are then checked by shape only)."""
    from lfm_engine.io.model_folder import ModelFolder

    try:
        with ModelFolder(mdir) as mf:
            return mf.fingerprint()
    except Exception:  # noqa: BLE001 - the folder reader's own errors (pickle-only folders ...)
        return None


def build(args):
    """(server, sock, app) for parsed args: ``server.run(sockets=[sock])`` then ``app.close()``."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise _MissingExtra() from None
    import torch
    from transformers import AutoModelForCausalLM

    from lfm_engine.serve import AdapterPool, Engine, attach
    from lfm_engine.serve.server import ServeApp, make_server

    model_arg = args.model or args.model_pos
    if not model_arg:
        raise ValueError("give the model folder (positional MODEL or --model)")
    adapters = _pairs(args.lora_modules, "--lora-modules") + _pairs(args.adapter, "--adapter")
    deltas = _pairs(args.delta, "--delta")
    names = [n for n, _ in adapters] + [n for n, _ in deltas]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"adapter names repeated: {dup}")
    unknown_pins = set(args.pin) - set(names)
    if unknown_pins:
        raise ValueError(f"--pin names no adapter: {sorted(unknown_pins)}")
    mdir = resolve_local(model_arg, "model")
    if not os.path.isfile(os.path.join(mdir, "config.json")):
        raise FileNotFoundError(f"model {model_arg!r}: no config.json (expected a transformers model folder)")
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (None if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype if dtype is not None else "auto").to(device).eval()
    dtype = next(model.parameters()).dtype
    tokenizer = None
    if any(os.path.isfile(os.path.join(mdir, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(mdir)
    pool = AdapterPool(capacity=args.capacity, device=device, dtype=dtype, max_bytes=args.max_adapter_bytes,
                       max_rank=args.max_lora_rank, delta_capacity=args.max_deltas,
                       base_fingerprint=_fingerprint(mdir))
    attach(model, pool)
    for n, p in deltas:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--delta {n}={p}: no such file")
        pool.load_delta(n, p)
    futs = [pool.load(n, resolve_local(p, f"adapter {n!r}"), pin=n in args.pin) for n, p in adapters]
    for f in futs:
        f.result()
    engine = Engine(model, pool, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    kv_cache_bytes=args.kv_cache_memory)
    base_name = args.served_model_name or os.path.basename(os.path.normpath(model_arg))
    app = ServeApp(engine, base_name, api_key=args.api_key or os.environ.get("LFM_API_KEY"),
                   runtime_adapters=not args.no_runtime_adapters, adapter_root=args.adapter_root,
                   chat_template=template, max_prompts_per_request=args.max_prompts_per_request,
                   max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                   adapter_check_timeout=args.adapter_check_timeout)
    if not args.no_runtime_adapters:
        app.checker.start()  # warm the adapter-config worker (it imports torch)
    server, sock = make_server(app, args.host or "127.0.0.1", args.port, backlog=args.backlog,
                               timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency)
    return server, sock, app


class _MissingExtra(Exception):
    pass


def run(args) -> int:
    try:
        server, sock, app = build(args)
    except _MissingExtra:
        print(f"lfm-engine serve: {EXTRA_HINT}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"lfm-engine serve: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if args.host is None:
        print("lfm-engine serve: binding to 127.0.0.1 only (pass --host to accept other machines)", file=sys.stderr)
    print(f"lfm-engine serve: http://{host}:{port}/v1 (model {app.base_name!r}, adapters {app.pool.names()}"
          f"{', API key required' if app.api_key else ''})", file=sys.stderr)
    try:
        server.run(sockets=[sock])  # uvicorn handles SIGINT/SIGTERM: sockets closed, then we stop the engine
    finally:
        sock.close()
        app.close()
    return 0
