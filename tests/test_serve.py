"""lfm_engine.serve: PEFT fidelity of mixed batches, pool behaviour, engine, HTTP server.

Adapters are made with the real peft library (random non-zero LoRA weights) and saved to
folders; our attach()+pool must give PEFT's own mixed-batch logits.
"""
from __future__ import annotations

import copy
import json
import os
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.cache_utils import DynamicCache  # noqa: E402

from conftest import assert_close  # noqa: E402
from lfm_engine.serve import (AdapterFormatError, AdapterPool, Engine, PoolFullError, Request,  # noqa: E402
                              attach, detach, open_adapter)

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def _adapter_configs():
    return {
        # list targets, per-module rank and alpha patterns
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}),
        # regex targets, rsLoRA
        "b": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(k_proj|gate_proj|up_proj|o_proj)",
                        init_lora_weights=False),
        # every linear but lm_head, small rank
        "c": LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False),
    }


def _base(arch: str, seed: int = 0):
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**SMALL)).eval()


def _save_adapters(base, root, configs):
    paths = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(100 + i)
        m = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():  # larger LoRA weights so adapters clearly change the logits
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        m.save_pretrained(os.path.join(root, name))
        # PEFT saves a named adapter under a sub-folder; the default one at the root
        sub = os.path.join(root, name)
        paths[name] = sub if os.path.isfile(os.path.join(sub, "adapter_config.json")) else os.path.join(sub, name)
    return paths


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    base = _base("llama")
    paths = _save_adapters(base, str(tmp_path_factory.mktemp("adapters")), _adapter_configs())
    return base, paths


def _ours(base, paths, capacity=4, **kw):
    model = copy.deepcopy(base)
    pool = AdapterPool(capacity=capacity, **kw)
    attach(model, pool)
    for n, p in paths.items():
        pool.load(n, p, wait=True)
    return model, pool


# ----------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("arch", list(ARCHS))
def test_mixed_batch_matches_peft_prefill_and_decode(arch, tmp_path):
    base = _base(arch)
    paths = _save_adapters(base, str(tmp_path), _adapter_configs())
    pm = PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(paths[n], adapter_name=n)
    pm.eval()
    ours, pool = _ours(base, paths)
    # both group paths of route.py run here: q/k/v tables of different widths (a: q, v r=4;
    # b: k r=8) are computed per member, gate/up (b and c on both) share one shrink
    if arch == "llama":
        widths = lambda leaves: {pool._tables[f"model.layers.0.{leaf}"].r_max for leaf in leaves}  # noqa: E731
        assert len(widths(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])) > 1
        assert len(widths(["mlp.gate_proj", "mlp.up_proj"])) == 1
    names = ["a", None, "b", "c", "a"]
    peft_names = [n or "__base__" for n in names]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (len(names), 9), generator=g)
    nxt = torch.randint(0, V, (len(names), 1), generator=g)
    with torch.no_grad():
        c_ref, c_got = DynamicCache(), DynamicCache()
        ref = pm(ids, adapter_names=peft_names, cache=c_ref, use_cache=True).logits
        with pool.assign(names):
            got = ours(ids, cache=c_got, use_cache=True).logits
        assert_close(got, ref)
        ref2 = pm(nxt, adapter_names=peft_names, cache=c_ref, use_cache=True).logits
        with pool.assign(names):
            got2 = ours(nxt, cache=c_got, use_cache=True).logits
        assert_close(got2, ref2)
        plain = base(ids).logits
    # the adapters really act (each adapted row differs from the base), base rows are exact
    for i, n in enumerate(names):
        if n is None:
            torch.testing.assert_close(got[i], plain[i], rtol=0, atol=0)
        else:
            assert (got[i] - plain[i]).abs().max() > 1e-2
    # outside an assignment the model is the base model
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, plain, rtol=0, atol=0)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False)
    paths = _save_adapters(base, str(tmp_path), {"g": cfg})
    pm = PeftModel.from_pretrained(copy.deepcopy(base), paths["g"], adapter_name="g").eval()
    ours, pool = _ours(base, paths)
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad(), pool.assign(["g", None]):
        got = ours(ids).logits
    with torch.no_grad():
        ref = pm(ids, adapter_names=["g", "__base__"]).logits
    assert_close(got, ref)


def test_assign_is_private_to_each_thread(llama_setup):
    base, paths = llama_setup
    model, pool = _ours(base, paths)
    ids = torch.randint(0, V, (2, 6))
    want = {}
    with torch.no_grad():
        for names in (("a", "b"), ("c", None)):
            with pool.assign(names):
                want[names] = model(ids).logits
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(names):
        try:
            with torch.no_grad(), pool.assign(names):
                barrier.wait(10)  # both assignments are active at once
                got[names] = model(ids).logits
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in want]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    for names in want:
        torch.testing.assert_close(got[names], want[names], rtol=0, atol=0)


def test_low_precision_pool_on_fp32_model(llama_setup):
    base, paths = llama_setup
    m32, p32 = _ours(base, paths)
    m16, p16 = _ours(base, paths, dtype=torch.bfloat16)
    ids = torch.randint(0, V, (3, 5))
    with torch.no_grad():
        with p32.assign(["a", "b", "c"]):
            want = m32(ids).logits
        with p16.assign(["a", "b", "c"]):
            got = m16(ids).logits
    assert p16.table("model.layers.0.self_attn.q_proj").A.dtype == torch.bfloat16
    assert_close(got, want, dtype=torch.bfloat16)  # adapters rounded to bf16, math in fp32


# ----------------------------------------------------------------------------- engine


def _naive_greedy(model, pool, prompt, adapter, n):
    ids, out = list(prompt), []
    with torch.no_grad(), pool.assign([adapter]):
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_engine_continuous_batching_matches_single_sequence(arch, llama_setup, tmp_path):
    if arch == "llama":
        base, paths = llama_setup
    else:  # a sliding-window architecture: padding must stay invisible there too
        base = _base(arch)
        paths = _save_adapters(base, str(tmp_path), _adapter_configs())
    model, pool = _ours(base, paths)
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(6):  # varied prompt lengths and budgets: rows join and leave at different steps
        L = int(torch.randint(1, 10, (1,), generator=g))
        n = int(torch.randint(1, 7, (1,), generator=g))
        reqs.append(Request(prompt=torch.randint(0, V, (L,), generator=g).tolist(), adapter=[None, "a", "b", "c"][i % 4],
                            max_new_tokens=n, ignore_eos=True))
    eng = Engine(model, pool, max_batch_size=3)
    res = eng.generate(reqs)
    for r, q in zip(res, reqs):
        assert r.finish_reason == "length"
        assert r.token_ids == _naive_greedy(model, pool, q.prompt, q.adapter, q.max_new_tokens)
        assert r.prompt_tokens == len(q.prompt) and r.latency_s > 0
    st = eng.stats()
    assert st["generated_tokens"] == sum(q.max_new_tokens for q in reqs)
    assert st["finished"] == len(reqs) and st["running"] == 0 and 1 < st["mean_batch"] <= 3
    assert all(i["in_use"] == 0 for i in pool.info())  # every reference released


def test_engine_sampling_seeds_stops_and_validation(llama_setup):
    base, paths = llama_setup
    model, pool = _ours(base, paths)
    eng = Engine(model, pool, max_batch_size=8)
    p = [5, 6, 7, 8]
    mk = lambda **kw: Request(prompt=p, adapter="b", max_new_tokens=8, ignore_eos=True, **kw)  # noqa: E731
    alone = eng.generate([mk(temperature=1.3, top_p=0.9, seed=11)])[0].token_ids
    mixed = eng.generate([Request(prompt=[1, 2], max_new_tokens=3, temperature=0.7, seed=2, ignore_eos=True),
                          mk(temperature=1.3, top_p=0.9, seed=11),
                          mk(temperature=1.3, top_p=0.9, seed=12)])
    assert mixed[1].token_ids == alone  # a seed fixes the draw whatever shares the batch
    greedy = eng.generate([mk()])[0].token_ids
    # a nucleus this small keeps only the most likely token: sampling equals greedy
    assert eng.generate([mk(temperature=2.0, top_p=1e-6, seed=1)])[0].token_ids == greedy
    assert mixed[2].token_ids != alone or mixed[1].token_ids != greedy
    # a stop token ends the request before it; it is not part of the output
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    r = eng.generate([Request(prompt=p, adapter="b", max_new_tokens=8, stop_token_ids=[stop_at], ignore_eos=True)])[0]
    assert r.finish_reason == "stop" and r.token_ids == greedy[:first]
    with pytest.raises(ValueError, match="vocabulary"):
        eng.submit(Request(prompt=[V + 3]))
    with pytest.raises(ValueError, match="maximum sequence length"):
        eng.submit(Request(prompt=[1] * 120, max_new_tokens=20))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.submit(Request(prompt="text without tokenizer"))
    with pytest.raises(KeyError, match="nope"):
        eng.submit(Request(prompt=[1], adapter="nope"))
    with pytest.raises(ValueError, match="top_p"):
        eng.submit(Request(prompt=[1], top_p=0))


def test_engine_survives_a_failing_forward(llama_setup, monkeypatch):
    base, paths = llama_setup
    model, pool = _ours(base, paths)
    eng = Engine(model, pool, max_batch_size=4)
    real = model.forward
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step fails once: retried row by row
            raise RuntimeError("simulated device error")
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky)
    reqs = [Request(prompt=[1, 2, 3], adapter="a", max_new_tokens=4, ignore_eos=True),
            Request(prompt=[4, 5], max_new_tokens=4, ignore_eos=True)]
    res = eng.generate(reqs)
    for r, q in zip(res, reqs):
        assert r.finish_reason == "length" and r.token_ids == _naive_greedy(model, pool, q.prompt, q.adapter, 4)

    # a row that fails on its own (here: every forward that includes adapter "b") ends with
    # an error; the rows it shared the prefill and the decode steps with never notice
    def poisoned(*a, **kw):
        asg = pool.current()
        if asg is not None and "b" in asg.names and kw["input_ids"].shape[1] == calls["poison_len"]:
            raise RuntimeError("simulated out of memory")
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", poisoned)
    reqs = [Request(prompt=[1, 2, 3], adapter="a", max_new_tokens=5, ignore_eos=True),
            Request(prompt=[6, 7, 8], adapter="b", max_new_tokens=5, ignore_eos=True),
            Request(prompt=[4, 5], max_new_tokens=5, ignore_eos=True)]
    for where in (3, 1):  # 3: the joint prefill fails; 1: a decode step fails
        calls["poison_len"] = where
        res = eng.generate(reqs)
        assert res[1].finish_reason == "error" and "simulated out of memory" in res[1].error, where
        assert res[1].error_type == "internal"
        for i in (0, 2):
            assert res[i].finish_reason == "length", (where, res[i].error)
            assert res[i].token_ids == _naive_greedy(model, pool, reqs[i].prompt, reqs[i].adapter, 5)
        assert all(i["in_use"] == 0 for i in pool.info())  # references released


# ----------------------------------------------------------------------------- pool


def test_pool_lru_pinning_capacity_and_reload(llama_setup):
    base, paths = llama_setup
    model, pool = _ours(base, {}, capacity=2)
    pool.load("a", paths["a"], wait=True, pin=True)
    pool.load("b", paths["b"], wait=True)
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad(), pool.assign(["b"]):
        want_b = model(ids).logits
    pool.load("c", paths["c"], wait=True)  # no free slot: evicts b (a is pinned)
    assert pool.state("b") == "evicted" and pool.state("a") == "ready" and pool.state("c") == "ready"
    with torch.no_grad(), pool.assign(["b"]):  # reloads b, evicting c
        torch.testing.assert_close(model(ids).logits, want_b, rtol=0, atol=0)
    assert pool.state("c") == "evicted"
    pool.pin("b")
    with pytest.raises(PoolFullError, match="pinned"):
        pool.wait("c", timeout=1)
    pool.unpin("b")
    # in use -> not evictable; unload while in use frees the slot at release
    with pool.assign(["b"]):
        pool.unload("b")
        assert "b" not in pool
        assert pool.info() and all(i["name"] != "b" for i in pool.info())
    assert pool._slot_owner.count(None) == 1
    with pytest.raises(ValueError, match="already registered"):
        pool.load("a", paths["a"])
    with pytest.raises(KeyError, match="zzz"):
        with pool.assign(["zzz"]):
            pass
    # byte budget: a and c fit by slot count but not together in the byte budget
    need = [open_adapter(paths[n]).nbytes(4) for n in ("a", "c")]
    m2, small = _ours(base, {}, capacity=4, max_bytes=max(need) + 100)
    small.load("a", paths["a"], wait=True)
    small.load("c", paths["c"], wait=True)
    assert small.state("a") == "evicted" and small.resident_bytes() <= small.max_bytes


def test_pool_tables_grow_for_higher_ranks(llama_setup):
    base, paths = llama_setup
    model, pool = _ours(base, {"c": paths["c"]})  # r=2 everywhere
    q = "model.layers.0.self_attn.q_proj"
    assert pool.table(q).r_max == 2
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad(), pool.assign(["c", None]):
        before = model(ids).logits
    pool.load("a", paths["a"], wait=True)  # r=4 on q/v/down: those tables grow, c's rows move along
    assert pool.table(q).r_max == 4 and pool.table("model.layers.0.self_attn.k_proj").r_max == 2
    ref, ref_pool = _ours(base, {"a": paths["a"]})
    with torch.no_grad():
        with pool.assign(["c", "a"]):
            after = model(ids).logits
        with ref_pool.assign([None, "a"]):
            want_a = ref(ids).logits
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert_close(after[1], want_a[1])


def test_pool_async_load_does_not_stall_running_batches(llama_setup, monkeypatch):
    import lfm_engine.serve.pool as pool_mod

    base, paths = llama_setup
    model, pool = _ours(base, {"a": paths["a"]})
    gate = threading.Event()
    real = pool_mod.read_weights

    def slow_read(spec):
        assert gate.wait(30)
        return real(spec)

    monkeypatch.setattr(pool_mod, "read_weights", slow_read)
    fut = pool.load("b", paths["b"])
    assert pool.state("b") == "loading" and not fut.done()
    eng = Engine(model, pool, max_batch_size=4)
    hb = eng.submit(Request(prompt=[1, 2, 3], adapter="b", max_new_tokens=2, ignore_eos=True))
    ha = eng.submit(Request(prompt=[4, 5], adapter="a", max_new_tokens=3, ignore_eos=True))
    for _ in range(10):
        eng.step()
        if ha.done():
            break
    assert ha.done() and not hb.done()  # a's request finished while b's weights were held back
    gate.set()
    fut.result(30)
    while not hb.done():
        eng.step()
    assert hb.result().finish_reason == "length" and len(hb.result().token_ids) == 2


def test_pool_load_errors(llama_setup, tmp_path):
    base, paths = llama_setup
    src = paths["a"]
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    st = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        c = dict(cfg)
        c.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(c))
        (d / "adapter_model.safetensors").write_bytes(st)
        return str(d)

    for name, changes, msg in [
        ("broken", dict(use_dora=True), "DoRA"),
        ("bias", dict(bias="all"), "bias"),
        ("mts", dict(modules_to_save=["lm_head"]), "modules_to_save"),
        ("ia3", dict(peft_type="IA3"), "IA3"),
        ("rank", dict(r=16, rank_pattern={}), "rank"),
        ("targets", dict(target_modules=["o_proj"]), "target_modules"),
    ]:
        with pytest.raises(AdapterFormatError, match=msg):
            open_adapter(variant(name, **changes))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_adapter(str(tmp_path / "missing"))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(AdapterFormatError, match="safetensors"):
        open_adapter(str(bad))
    # embedding LoRA and lm_head LoRA made by peft itself
    torch.manual_seed(0)
    for name, targets, msg in [("emb", ["embed_tokens"], "embedding"), ("head", ["lm_head"], "lm_head")]:
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        m.save_pretrained(str(tmp_path / name))
        with pytest.raises(AdapterFormatError, match=msg):
            open_adapter(str(tmp_path / name))
    # NaN weights: the background load fails, the slot is released, assign names the cause
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    k = sorted(sd)[0]
    sd[k][0, 0] = float("nan")
    d = variant("nan")
    save_file(sd, os.path.join(d, "adapter_model.safetensors"))
    model, pool = _ours(base, {}, capacity=1)
    fut = pool.load("nan", d)
    with pytest.raises(AdapterFormatError, match="NaN"):
        fut.result(30)
    assert pool.state("nan") == "failed" and pool._slot_owner == [None]
    with pytest.raises(RuntimeError, match="failed to load"):
        with pool.assign(["nan"]):
            pass
    pool.unload("nan")
    pool.load("a", src, wait=True)
    with pytest.raises(ValueError, match="2 names"):  # one name per batch row
        with torch.no_grad(), pool.assign(["a", None]):
            model(torch.randint(0, V, (3, 4)))
    # an adapter for another architecture is refused against the attached model
    other = _base("llama")
    other.model.layers = other.model.layers[:1]
    m1 = copy.deepcopy(other)
    p1 = AdapterPool(capacity=2)
    attach(m1, p1)
    with pytest.raises(ValueError, match="not an attached linear"):
        p1.load("a", src)
    assert detach(m1) == 7
    assert len(attach(m1, p1)) == 7


# ----------------------------------------------------------------------------- CLI
# (the HTTP server is tested in test_server_api.py and test_server_robust.py)


def _tokenizer(folder, chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V - 2)}
    vocab["<unk>"] = V - 2
    vocab["</s>"] = V - 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def test_cli_serve_bad_arguments(tmp_path, capsys):
    import argparse

    from lfm_engine.cli import serve as cli_serve

    ap = argparse.ArgumentParser()
    cli_serve.add_parser(ap.add_subparsers())
    for argv, msg in [(["--model", str(tmp_path)], "config.json"),
                      (["--model", str(tmp_path), "--adapter", "x"], "NAME=PATH"),
                      ([str(tmp_path / "nope")], "no such folder"),
                      (["org/not-cached"], "Hugging Face cache"),
                      (["--model", str(tmp_path), "--adapter", "x=/a", "--adapter", "x=/b"], "repeated"),
                      (["--model", str(tmp_path), "--pin", "y"], "--pin")]:
        assert cli_serve.run(ap.parse_args(["serve"] + argv)) == 2
        assert msg in capsys.readouterr().err


def test_cli_serve_without_the_serve_extra(tmp_path, capsys, monkeypatch):
    import argparse
    import sys

    from lfm_engine.cli import serve as cli_serve

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    ap = argparse.ArgumentParser()
    cli_serve.add_parser(ap.add_subparsers())
    assert cli_serve.run(ap.parse_args(["serve", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert 'pip install "lfm_engine[serve]"' in err and "Traceback" not in err and err.count("\n") == 1


def test_engine_kv_budget_queues_and_refuses(llama_setup):
    from lfm_engine.serve.engine import _kv_columns

    base, paths = llama_setup
    model, pool = _ours(base, paths)
    probe = Engine(model, pool)
    per_tok = probe.kv_bytes_per_token  # 2 layers x 2 kv heads x 8 dims x 2 (K, V) x 4 bytes
    assert per_tok == 2 * 2 * 2 * 8 * 4
    reqs = [Request(prompt=[i + 1] * 4, adapter=[None, "a"][i % 2], max_new_tokens=6, ignore_eos=True)
            for i in range(5)]
    eng = Engine(model, pool, max_batch_size=8, kv_cache_bytes=_kv_columns(2, 10) * per_tok)
    hs = [eng.submit(r) for r in reqs]
    most = 0
    for _ in range(200):
        if all(h.done() for h in hs):
            break
        eng.step()
        most = max(most, len(eng._running))
    assert most == 2  # the budget holds two rows of 10 reserved tokens, never more
    for h, r in zip(hs, reqs):
        assert h.result(0).token_ids == _naive_greedy(model, pool, r.prompt, r.adapter, 6)
    with pytest.raises(ValueError, match="KV cache"):
        eng.submit(Request(prompt=[1] * 60, max_new_tokens=60))


def test_hub_ids_resolve_from_the_local_cache(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from lfm_engine.cli.serve import resolve_local

    snap = tmp_path / "models--org--tiny" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert os.path.samefile(resolve_local("org/tiny", "model"), snap)
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        resolve_local("org/absent", "model")
