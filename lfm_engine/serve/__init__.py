"""Multi-LoRA serving: adapter pool, PEFT folders, mixed-batch forward, generation, HTTP.

    pool = AdapterPool(capacity=16, device="cuda", dtype=torch.bfloat16)
    attach(model, pool)                      # model's nn.Linear -> LoRALinear
    pool.load("sql", "adapters/sql")         # unchanged PEFT folder, loaded in the background
    pool.load_delta("ft", "ft.lfmd")         # a compressed full fine-tune of the same base
    with pool.assign(["sql", None, "chat"]): # one adapter (or None) per batch row
        logits = model(input_ids).logits
    sr = pool.static_route(rows=8)           # CUDA-graph friendly: fixed buffers updated in place
    with sr.assign(names8): graph.replay()   # (static_route.py; sr.capture(fn, names8) captures)
    Engine(model, pool, tokenizer).generate([Request(prompt="...", adapter="sql"), ...])
"""
from .attach import LoRALinear, attach, detach
from .deltas import DeltaLoadError
from .engine import Engine, Handle, Request, Result
from .peft_format import AdapterFormatError, AdapterSpec, open_adapter
from .pool import AdapterNotReadyError, AdapterPool, Assignment, PoolFullError
from .route import Route
from .static_route import StaticRoute

__all__ = [
    "AdapterPool", "PoolFullError", "AdapterNotReadyError", "Assignment", "attach", "detach", "LoRALinear",
    "Engine", "Request", "Result", "Handle", "AdapterFormatError", "AdapterSpec", "open_adapter", "DeltaLoadError",
    "Route", "StaticRoute",
]
