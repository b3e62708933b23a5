"""`lfm-engine serve`: OpenAI-compatible multi-LoRA server (see lfm_engine/serve/server.py).

    lfm-engine serve --model DIR --adapter NAME=DIR [--adapter ...] [--host 127.0.0.1 --port 8000]

DIR is a transformers causal-LM folder (config.json + weights; a tokenizer in the same
folder enables text prompts); each adapter DIR is an unchanged PEFT LoRA folder.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a base model with many LoRA adapters over HTTP (OpenAI API)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="transformers causal-LM folder")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="PEFT LoRA folder served as model NAME (repeatable)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this adapter")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="name of the base model in requests (default: the model folder's name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model and adapter dtype (auto: the model's config dtype, float32 on CPU)")
    p.add_argument("--capacity", type=int, default=16, help="adapter slots resident at once")
    p.add_argument("--max-adapter-bytes", type=int, default=None, help="byte budget of resident adapters")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=None)
    return p


def _parse_adapters(specs):
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=DIR, got {s!r}")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"--adapter names repeated: {sorted(dup)}")
    return out


def build(args):
    """(httpd, app) for parsed args; the caller runs httpd.serve_forever() and app.close()."""
    import torch
    from transformers import AutoModelForCausalLM

    from lfm_engine.serve import AdapterPool, Engine, attach
    from lfm_engine.serve.server import ServeApp, make_server

    adapters = _parse_adapters(args.adapter)
    unknown_pins = set(args.pin) - {n for n, _ in adapters}
    if unknown_pins:
        raise ValueError(f"--pin names no --adapter: {sorted(unknown_pins)}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json (expected a transformers model folder)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = None if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype if dtype is not None else "auto")
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    tokenizer = None
    if any(os.path.isfile(os.path.join(args.model, f))
           for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    pool = AdapterPool(capacity=args.capacity, device=device, dtype=dtype, max_bytes=args.max_adapter_bytes)
    attach(model, pool)
    futs = [pool.load(name, path, pin=name in args.pin) for name, path in adapters]
    for f in futs:
        f.result()
    engine = Engine(model, pool, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len)
    base_name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = ServeApp(engine, base_name=base_name)
    return make_server(app, args.host, args.port), app


def run(args) -> int:
    try:
        httpd, app = build(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"lfm-engine serve: {e}", file=sys.stderr)
        return 2
    host, port = httpd.server_address[:2]
    print(f"lfm-engine serve: http://{host}:{port}/v1 (model {app.base_name!r}, adapters {app.pool.names()})",
          file=sys.stderr)
    def _term(signum, frame):  # SIGTERM ends the server like Ctrl-C: sockets closed, loop stopped
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _term)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        app.close()
    return 0
