"""HTTP load test of `lfm-engine serve`: concurrency 1, 8, 32 with mixed adapters.

Builds a random Llama (default hidden 256, 4 layers, vocab 2000) and 8 PEFT adapters (r=8
on q/v) in a temporary folder, starts the server in this process on 127.0.0.1 (ephemeral
port), and runs `--requests` streaming completions per concurrency level through HTTP
(httpx, asyncio), each on a round-robin adapter or the base model. Reports generated
tokens per second (wall), mean / p50 / p90 time to first token and mean inter-token
latency as the client sees them.

Baselines in the same run, on the same requests (same prompts, greedy, the same number of
new tokens), in static batches of the concurrency level (no continuous batching, no HTTP):
plain transformers ``generate()`` on the base model alone (adapters ignored: the cost of
the model without any LoRA work), and PEFT with every adapter loaded and a mixed batch
per ``generate(adapter_names=[...])`` (PEFT's own multi-adapter inference). Reported:
tokens per second and the mean wall time of one batch (its whole generation).

    python bench/bench_serve_http.py [--quick] [--no-baselines] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _build(root, a):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 2,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    mdir = os.path.join(root, "base")
    base.save_pretrained(mdir)
    mods = []
    for i in range(a.adapters):
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
        d = os.path.join(root, f"lora{i}")
        m.save_pretrained(d)
        mods.append(f"lora{i}={d}")
    return mdir, mods


async def _one(client, model, a, i):
    body = dict(model=model, prompt=[(i * 7 + k) % 1000 + 3 for k in range(a.prompt)], max_tokens=a.new,
                temperature=0, ignore_eos=True, stream=True)
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                n = len(json.loads(line[6:])["choices"][0]["token_ids"])
                stamps += [time.perf_counter()] * n
    ttft = stamps[0] - t0
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return len(stamps), ttft, itl


async def _level(url, names, a, conc):
    import httpx

    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=conc)) as client:
        async def job(i):
            async with sem:
                return await _one(client, names[i % len(names)], a, i)

        t0 = time.perf_counter()
        out = await asyncio.gather(*(job(i) for i in range(a.requests)))
        wall = time.perf_counter() - t0
    ttfts = sorted(o[1] for o in out)
    return dict(concurrency=conc, requests=a.requests, tokens=sum(o[0] for o in out), wall_s=round(wall, 3),
                tokens_per_s=round(sum(o[0] for o in out) / wall, 1),
                ttft_mean_ms=round(1e3 * statistics.mean(ttfts), 1),
                ttft_p50_ms=round(1e3 * ttfts[len(ttfts) // 2], 1), ttft_p90_ms=round(1e3 * ttfts[int(len(ttfts) * 0.9)], 1),
                itl_mean_ms=round(1e3 * statistics.mean(o[2] for o in out), 2))


def _baselines(mdir, mods, a, levels):
    """transformers generate() (base only) and PEFT mixed-adapter batches on the HTTP test's requests."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(mdir).eval()
    names = ["base"] + [m.split("=")[0] for m in mods]
    pm = None
    for m in mods:
        n, path = m.split("=", 1)
        if pm is None:
            pm = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=n).eval()
        else:
            pm.load_adapter(path, adapter_name=n)
    prompts = [[(i * 7 + k) % 1000 + 3 for k in range(a.prompt)] for i in range(a.requests)]
    rows = []
    for conc in levels:
        for label, model in (("transformers generate (base only)", base), ("peft mixed batch", pm)):
            toks, batches = 0, []
            t0 = time.perf_counter()
            for s in range(0, a.requests, conc):
                ids = torch.tensor(prompts[s:s + conc])
                kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
                if model is pm:
                    kw["adapter_names"] = ["__base__" if names[i % len(names)] == "base" else names[i % len(names)]
                                           for i in range(s, s + ids.shape[0])]
                tb = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
                batches.append(time.perf_counter() - tb)
                toks += (out.shape[1] - ids.shape[1]) * ids.shape[0]
            wall = time.perf_counter() - t0
            rows.append(dict(concurrency=conc, provider=label, tokens=toks, wall_s=round(wall, 3),
                             tokens_per_s=round(toks / wall, 1),
                             batch_ms=round(1e3 * statistics.mean(batches), 1)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-baselines", action="store_true", help="skip transformers generate() and PEFT")
    a = ap.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.adapters, a.prompt, a.new, a.requests = 64, 2, 3, 8, 8, 16
    from server_harness import Running

    with tempfile.TemporaryDirectory() as root:
        mdir, mods = _build(root, a)
        run = Running([mdir, "--lora-modules", *mods, "--max-num-seqs", "32", "--max-loras", str(a.adapters)])
        try:
            names = ["base"] + [m.split("=")[0] for m in mods]
            rows = [asyncio.run(_level(run.url, names, a, int(c))) for c in a.levels.split(",")]
        finally:
            run.close()
        base_rows = [] if a.no_baselines else _baselines(mdir, mods, a, [int(c) for c in a.levels.split(",")])
    print("lfm-engine serve over HTTP (continuous batching, streaming)")
    print("concurrency  tokens/s  TTFT mean/p50/p90 ms     ITL mean ms")
    for r in rows:
        print(f"{r['concurrency']:>11}  {r['tokens_per_s']:>8}  {r['ttft_mean_ms']:>6}/{r['ttft_p50_ms']}/"
              f"{r['ttft_p90_ms']:<10}  {r['itl_mean_ms']}")
    if base_rows:
        print("baselines in this run (static batches of the concurrency level, no HTTP)")
        print("concurrency  provider                            tokens/s  batch ms")
        for r in base_rows:
            print(f"{r['concurrency']:>11}  {r['provider']:<34}  {r['tokens_per_s']:>8}  {r['batch_ms']:>8}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), device=str(torch.device("cpu")), rows=rows, baselines=base_rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
