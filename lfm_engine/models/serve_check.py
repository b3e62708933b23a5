"""Greedy generation of the example adapters: lfm_engine's Engine against PEFT, token for token.

All adapters' prompts go through one Engine (one AdapterPool, mixed batch: each row its
own adapter); the reference is PEFT's ``generate()`` for one prompt at a time with that
adapter active (no padding, so nothing but the LoRA arithmetic can differ). A mismatch is
reported with the first differing position; equal token lists are the expected result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch


def adapter_folders(ft_dir) -> Dict[str, Path]:
    root = Path(ft_dir) / "adapters"
    return {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()} if root.is_dir() else {}


def prompts_for(tok, task: str, n: int) -> List[List[int]]:
    from .finetunes import prompt_ids
    from .tasks import TASKS

    return [prompt_ids(tok, p) for p, _ in TASKS[task].examples(n, "eval")]


def engine_generate(model_dir, adapters: Dict[str, Path], requests: Sequence[tuple], new_tokens: int,
                    dtype=torch.float32) -> List[List[int]]:
    """requests: (adapter name or None, prompt ids); greedy token ids per request, one Engine batch."""
    from transformers import AutoModelForCausalLM

    from lfm_engine.serve import AdapterPool, Engine, Request, attach

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pool = AdapterPool(capacity=max(1, len(adapters)), device="cpu", dtype=dtype)
    attach(model, pool)
    for name, folder in adapters.items():
        pool.load(name, str(folder), wait=True)
    engine = Engine(model, pool, max_batch_size=len(requests))
    reqs = [Request(prompt=list(ids), adapter=a, max_new_tokens=new_tokens) for a, ids in requests]
    with torch.inference_mode():
        results = engine.generate(reqs)
    bad = [r for r in results if r.finish_reason == "error"]
    if bad:
        raise RuntimeError(f"Engine failed: {bad[0].error}")
    return [list(r.token_ids) for r in results]


def peft_generate(model_dir, adapters: Dict[str, Path], requests: Sequence[tuple], new_tokens: int,
                  dtype=torch.float32) -> List[List[int]]:
    """The same requests through PEFT (one prompt at a time), stop token removed like Engine does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    model.eval()
    eos = base.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    with torch.inference_mode():
        for a, ids in requests:
            x = torch.tensor([list(ids)])
            kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(x))
            if a is None:
                with model.disable_adapter():
                    g = model.generate(input_ids=x, **kw)
            else:
                model.set_adapter(a)
                g = model.generate(input_ids=x, **kw)
            toks = g[0, x.shape[1]:].tolist()
            cut = next((i for i, t in enumerate(toks) if t in eos), len(toks))
            out.append(toks[:cut])
    return out


def engine_vs_peft(model_dir, ft_dir, new_tokens: int = 12, per_adapter: int = 3,
                   adapters: Optional[Dict[str, Path]] = None) -> List[dict]:
    """Per adapter: {"adapter", "prompts", "equal", "first_mismatch", "example"} (Engine vs PEFT)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    adapters = adapters or adapter_folders(ft_dir)
    if not adapters:
        raise FileNotFoundError(f"no adapters in {Path(ft_dir) / 'adapters'}")
    requests = [(a, ids) for a in adapters for ids in prompts_for(tok, a, per_adapter)]
    mine = engine_generate(model_dir, adapters, requests, new_tokens)
    ref = peft_generate(model_dir, adapters, requests, new_tokens)
    rows = []
    for a in adapters:
        idx = [i for i, (name, _) in enumerate(requests) if name == a]
        eq = [mine[i] == ref[i] for i in idx]
        first = None
        for i in idx:
            if mine[i] != ref[i]:
                first = {"engine": tok.decode(mine[i]), "peft": tok.decode(ref[i])}
                break
        rows.append({"adapter": a, "prompts": len(idx), "equal": sum(eq), "first_mismatch": first,
                     "example": tok.decode(mine[idx[0]])})
    return rows
