"""The HTTP server through the official `openai` client: completions, chat, streaming, n,
logprobs, echo, stop, adapters by `model`, dynamic load/unload, API key, metrics, errors;
greedy output token-for-token equal to PEFT's own generate() for each adapter."""
from __future__ import annotations

import copy
import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
peft = pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from server_harness import CHAT_TEMPLATE, Running  # noqa: E402
from test_serve import V, _adapter_configs, _base, _save_adapters, _tokenizer  # noqa: E402

KEY = "sekret-key"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = _base("llama")
    root = tmp_path_factory.mktemp("srv")
    paths = _save_adapters(base, str(root / "adapters"), _adapter_configs())
    mdir = str(root / "tiny-llama")
    base.config.eos_token_id = V - 1
    base.save_pretrained(mdir)
    _tokenizer(mdir, CHAT_TEMPLATE)
    run = Running([mdir, "--lora-modules", f"a={paths['a']}", f"b={paths['b']}", "--api-key", KEY,
                   "--adapter-root", str(root), "--max-prompts-per-request", "8", "--max-body-bytes", "100000"])
    client = openai.OpenAI(base_url=run.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield run, client, base, paths
    run.close()


def _peft_greedy(base, paths, name, ids, n):
    pm = PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval() if name else copy.deepcopy(base).eval()
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_completions_match_peft_greedy_per_adapter(srv):
    run, client, base, paths = srv
    ids = [3, 4, 5, 6]
    for model, name in (("tiny-llama", None), ("a", "a"), ("b", "b")):
        r = client.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0,
                                      extra_body=dict(ignore_eos=True))
        got = r.choices[0].model_extra["token_ids"]
        assert got == _peft_greedy(base, paths, name, ids, 6), model
        assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 6
        # incremental detokenization gives the same text as decoding the whole sequence
        assert r.choices[0].text == run.app.engine.tokenizer.decode(got, skip_special_tokens=True)


def test_completions_n_logprobs_echo_stop_stream(srv):
    run, client, _, _ = srv
    plain = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, temperature=0,
                                      extra_body=dict(ignore_eos=True))
    text = plain.choices[0].text
    # n samples with a seed: n distinct choices, reproducible
    r1 = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, n=3, temperature=1.5, seed=7,
                                   extra_body=dict(ignore_eos=True))
    r2 = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, n=3, temperature=1.5, seed=7,
                                   extra_body=dict(ignore_eos=True))
    assert [c.index for c in r1.choices] == [0, 1, 2] and [c.text for c in r1.choices] == [c.text for c in r2.choices]
    assert r1.usage.prompt_tokens == 3 and r1.usage.completion_tokens == 15
    # logprobs: top-k per token, the chosen greedy token is the most likely one
    r = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body=dict(ignore_eos=True))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.top_logprobs[0]) == 3
    for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert l <= 0 and abs(max(top.values()) - l) < 1e-5 and t in top
    # echo + logprobs + max_tokens=0: prompt scoring (lm-eval-harness loglikelihood)
    e = client.completions.create(model="a", prompt="w1 w2 w3 " + text, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    elp = e.choices[0].logprobs
    assert e.choices[0].text.startswith("w1 w2 w3") and elp.token_logprobs[0] is None
    assert len(elp.token_logprobs) == 3 + 5
    torch.testing.assert_close(torch.tensor(elp.token_logprobs[3:]), torch.tensor(lp.token_logprobs),
                               rtol=1e-4, atol=1e-4)
    # stop string: text ends before it, streamed or not
    word = text.split()[2]
    cut = client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, temperature=0, stop=[word],
                                    extra_body=dict(ignore_eos=True))
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].text
    chunks = list(client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, temperature=0, stop=[word],
                                            stream=True, extra_body=dict(ignore_eos=True)))
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    full = list(client.completions.create(model="a", prompt="w1 w2 w3", max_tokens=5, temperature=0, stream=True,
                                          stream_options=dict(include_usage=True), extra_body=dict(ignore_eos=True)))
    assert "".join(c.choices[0].text for c in full if c.choices) == text
    assert full[-1].usage.completion_tokens == 5 and full[-2].choices[0].finish_reason == "length"


def test_chat_and_sampling_fields(srv):
    run, client, _, _ = srv
    msgs = [dict(role="user", content="w5 w6")]
    r = client.chat.completions.create(model="b", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body=dict(ignore_eos=True))
    m = r.choices[0].message
    assert m.role == "assistant" and len(m.content.split()) == 4 and r.object == "chat.completion"
    assert len(r.choices[0].logprobs.content) == 4 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    # the chat template's text through the completions route gives the same tokens
    tmpl = "user w5 w6 w3"
    c = client.completions.create(model="b", prompt=tmpl, max_tokens=4, temperature=0,
                                  extra_body=dict(ignore_eos=True))
    assert c.choices[0].text == m.content
    chunks = list(client.chat.completions.create(model="b", messages=msgs, max_tokens=4, temperature=0, stream=True,
                                                 extra_body=dict(ignore_eos=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == m.content
    # top_k=1 and min_p=1 keep only the argmax: sampling equals greedy; a tiny temperature is greedy
    for extra in (dict(top_k=1), dict(min_p=1.0)):
        s = client.completions.create(model="b", prompt=tmpl, max_tokens=4, temperature=1.7, seed=3,
                                      extra_body=dict(ignore_eos=True, **extra))
        assert s.choices[0].text == c.choices[0].text, extra
    t = client.completions.create(model="b", prompt=tmpl, max_tokens=4, temperature=1e-300,
                                  extra_body=dict(ignore_eos=True))
    assert t.choices[0].text == c.choices[0].text
    # a strong repetition / frequency penalty forbids repeating any token of the context
    for extra in (dict(repetition_penalty=100.0), ):
        s = client.completions.create(model="b", prompt=tmpl, max_tokens=6, temperature=0,
                                      extra_body=dict(ignore_eos=True, **extra))
        toks = s.choices[0].model_extra["token_ids"]
        assert len(set(toks)) == len(toks) and not set(toks) & {5, 6, 3}
    s = client.completions.create(model="b", prompt=tmpl, max_tokens=8, temperature=0, frequency_penalty=2.0,
                                  presence_penalty=2.0, extra_body=dict(ignore_eos=True))
    assert len(s.choices[0].model_extra["token_ids"]) == 8


def test_models_dynamic_adapters_key_metrics(srv):
    run, client, _, paths = srv
    ms = {m.id: m for m in client.models.list().data}
    assert set(ms) >= {"tiny-llama", "a", "b"} and ms["a"].model_extra["parent"] == "tiny-llama"
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=run.url, timeout=60) as hc:
        r = hc.post("/v1/load_lora_adapter", json=dict(lora_name="c", lora_path=paths["c"]), headers=h)
        assert r.status_code == 200 and "Success" in r.text
        assert "c" in [m.id for m in client.models.list().data]
        out = client.completions.create(model="c", prompt=[1, 2], max_tokens=2, extra_body=dict(ignore_eos=True))
        assert len(out.choices[0].model_extra["token_ids"]) == 2
        assert hc.post("/v1/unload_lora_adapter", json=dict(lora_name="c"), headers=h).status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="c", prompt=[1])
        # paths outside --adapter-root are refused after resolving '..'
        r = hc.post("/v1/load_lora_adapter", json=dict(lora_name="x", lora_path=paths["c"] + "/../../../.."), headers=h)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        # API key: every route but /health
        assert hc.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = hc.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        assert hc.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        text = hc.get("/metrics", headers=h).text
        for name in ("lfm_requests_total", "lfm_prompt_tokens_total", "lfm_generation_tokens_total",
                     "lfm_time_to_first_token_seconds_bucket", "lfm_inter_token_latency_seconds_bucket",
                     "lfm_num_requests_running", "lfm_num_requests_waiting", "lfm_adapters_resident",
                     "lfm_adapter_loads_total", "lfm_adapter_evictions_total"):
            assert name in text, name


def test_errors_are_openai_shaped(srv):
    run, _, _, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ("POST", "/v1/completions", dict(model="a", prompt=[1], logit_bias={"1": 2}), 400, "logit_bias"),
        ("POST", "/v1/completions", dict(model="a", prompt=[1], suffix="x"), 400, "suffix"),
        ("POST", "/v1/completions", dict(model="a", prompt=[1], best_of=3), 400, "best_of"),
        ("POST", "/v1/completions", dict(model="a"), 400, "prompt"),
        ("POST", "/v1/completions", dict(model="a", prompt=[1], temperature="hot"), 400, "temperature"),
        ("POST", "/v1/completions", dict(model="a", prompt=[V + 5]), 400, "vocabulary"),
        ("POST", "/v1/completions", dict(model="nope", prompt=[1]), 404, "not found"),
        ("POST", "/v1/completions", dict(model="a", prompt=[[1]] * 9), 400, "max-prompts-per-request"),
        ("POST", "/v1/chat/completions", dict(model="a", messages=[dict(role="user", content="w1")], tools=[]), 400, "tools"),
        ("POST", "/v1/completions", dict(model="a", prompt="w1 " * 60000), 413, "larger"),
        ("GET", "/v1/completions", None, 405, ""),
        ("GET", "/nowhere", None, 404, "no route"),
    ]
    with httpx.Client(base_url=run.url, timeout=60, headers=h) as hc:
        for method, path, body, code, msg in cases:
            r = hc.request(method, path, json=body)
            err = r.json()["error"]
            assert r.status_code == code and err["code"] == code and msg in err["message"], (path, body, r.text)
            assert set(err) == {"message", "type", "param", "code"}
        r = hc.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert hc.get("/health").json()["status"] == "ok"
