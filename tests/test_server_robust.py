"""Server robustness (issue 20): a hostile adapter config, concurrent clients with adapter
churn, a slow client, unload during a batch; unrelated requests succeed, /health answers,
no 500s; the pool's slot tables follow the resident ranks."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
peft = pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402

from server_harness import Running  # noqa: E402
from test_serve import (V, _adapter_configs, _base, _naive_greedy, _ours, _save_adapters,  # noqa: E402
                        _tokenizer)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = _base("llama")
    root = tmp_path_factory.mktemp("robust")
    paths = _save_adapters(base, str(root / "adapters"), _adapter_configs())
    paths.update(_save_adapters(base, str(root / "adapters"), {"r16": LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj"], init_lora_weights=False)}))
    mdir = str(root / "m")
    base.config.eos_token_id = V - 1
    base.save_pretrained(mdir)
    _tokenizer(mdir)
    run = Running([mdir, "--lora-modules", f"a={paths['a']}", f"b={paths['b']}", "--max-loras", "3",
                   "--max-lora-rank", "8", "--adapter-check-timeout", "2", "--max-num-seqs", "16"])
    yield run, paths, root
    run.close()


def _health_ok(url, within=2.0) -> bool:
    t = time.monotonic()
    r = httpx.get(url + "/health", timeout=within + 5)
    return r.status_code == 200 and time.monotonic() - t < within


def test_hostile_target_modules_regex_does_not_freeze(srv):
    run, paths, root = srv
    bad = root / "evil"
    shutil.copytree(paths["c"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = r"(.+)+z"  # exponential backtracking on every module name
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = {}

    def load():
        out["r"] = httpx.post(run.url + "/v1/load_lora_adapter", json=dict(lora_name="evil", lora_path=str(bad)),
                              timeout=120)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.3)
    assert _health_ok(run.url)  # the HTTP loop and the engine keep going meanwhile
    r = httpx.post(run.url + "/v1/completions", json=dict(model="a", prompt=[1, 2], max_tokens=2, ignore_eos=True),
                   timeout=30)
    assert r.status_code == 200
    t.join(120)
    assert out["r"].status_code == 400 and "took more than" in out["r"].json()["error"]["message"]
    # the worker was replaced: the next (good) folder loads
    r = httpx.post(run.url + "/v1/load_lora_adapter", json=dict(lora_name="c", lora_path=paths["c"]), timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.post(run.url + "/v1/unload_lora_adapter", json=dict(lora_name="c"), timeout=30).status_code == 200


def test_unload_during_a_batch_fails_no_row(srv):
    run, paths, _ = srv
    eng = run.app.engine
    assert httpx.post(run.url + "/v1/load_lora_adapter", json=dict(lora_name="c", lora_path=paths["c"]),
                      timeout=60).status_code == 200
    jobs = [("c", [4, 5, 6]), ("a", [7, 8]), ("m", [9])]
    want = {m: _naive_greedy(eng.model, run.app.pool, p, None if m == "m" else m, 12) for m, p in jobs}
    res = {}

    def call(m, p):
        res[m] = httpx.post(run.url + "/v1/completions", timeout=60,
                            json=dict(model=m, prompt=p, max_tokens=12, temperature=0, ignore_eos=True))

    ts = [threading.Thread(target=call, args=j) for j in jobs]
    with eng._step_lock:  # queue all three, then unload c once they run together
        for t in ts:
            t.start()
        deadline = time.monotonic() + 30
        while len(eng._waiting) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while len(eng._running) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert len(eng._running) == 3  # c's row is in the running batch
    assert httpx.post(run.url + "/v1/unload_lora_adapter", json=dict(lora_name="c"), timeout=30).status_code == 200
    assert "c" not in run.app.pool  # hidden at once ...
    for t in ts:
        t.join(60)
    for m, _ in jobs:  # ... but every row of the batch, c's included, finishes normally
        assert res[m].status_code == 200, res[m].text
        assert res[m].json()["choices"][0]["token_ids"] == want[m]
    assert run.app.pool._slot_owner.count("c") == 0  # slot freed when c's request ended


def test_concurrent_clients_churn_and_a_slow_client(srv):
    run, paths, _ = srv
    eng = run.app.engine
    jobs = [(m, [i + 1, i + 2], 3 + i % 3) for i, m in enumerate(["a", "b", "m"] * 4)]
    want = {j: _naive_greedy(eng.model, run.app.pool, j[1], None if j[0] == "m" else j[0], j[2])
            for j in map(tuple, [(m, tuple(p), n) for m, p, n in jobs])}
    slow = socket.create_connection(run.sock.getsockname()[:2], timeout=10)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    errors, statuses = [], []
    stop = threading.Event()

    def client(k):
        with httpx.Client(base_url=run.url, timeout=60) as hc:
            for i, (m, p, n) in enumerate(jobs):
                if (i + k) % 2:
                    continue
                body = dict(model=m, prompt=list(p), max_tokens=n, temperature=0, ignore_eos=True)
                r = hc.post("/v1/completions", json=body)
                statuses.append(r.status_code)
                if r.status_code != 200 or r.json()["choices"][0]["token_ids"] != want[(m, tuple(p), n)]:
                    errors.append((m, r.status_code, r.text[:200]))

    def churn():
        with httpx.Client(base_url=run.url, timeout=60) as hc:
            for _ in range(4):
                if stop.is_set():
                    return
                r = hc.post("/v1/load_lora_adapter", json=dict(lora_name="c", lora_path=paths["c"]))
                statuses.append(r.status_code)
                hc.post("/v1/completions", json=dict(model="c", prompt=[3], max_tokens=2, ignore_eos=True))
                statuses.append(hc.post("/v1/unload_lora_adapter", json=dict(lora_name="c")).status_code)

    ts = [threading.Thread(target=client, args=(k,)) for k in range(6)] + [threading.Thread(target=churn)]
    for t in ts:
        t.start()
    assert _health_ok(run.url, 5.0)
    for t in ts:
        t.join(120)
    stop.set()
    slow.close()
    assert not errors, errors[:3]
    assert 500 not in statuses and len(statuses) >= 6 * 6
    assert _health_ok(run.url)


def test_pool_tables_follow_resident_ranks_and_rank_limit(srv, tmp_path):
    run, paths, _ = srv
    r = httpx.post(run.url + "/v1/load_lora_adapter", json=dict(lora_name="big", lora_path=paths["r16"]), timeout=60)
    assert r.status_code == 400 and "max_rank" in r.json()["error"]["message"]
    base = _base("llama")
    model, pool = _ours(base, {"c": paths["c"]})
    q = "model.layers.0.self_attn.q_proj"
    before = pool.table_bytes()
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad(), pool.assign(["c"]):
        want = model(ids).logits
    for _ in range(3):  # a high-rank adapter comes and goes: the tables do not keep its size
        pool.load("big", paths["r16"], wait=True)
        assert pool.table(q).r_max == 16
        pool.unload("big")
        assert pool.table(q).r_max == 2 and pool.table_bytes() == before
    with torch.no_grad(), pool.assign(["c"]):
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_client_disconnect_cancels_and_frees_the_row(srv):
    run, _, _ = srv
    eng = run.app.engine
    before = eng.stats()["cancelled"]
    body = dict(model="a", prompt=[1, 2], max_tokens=100, temperature=0, ignore_eos=True, stream=True)
    fast_step = eng.step

    def slow_step():
        # the tiny model makes 100 tokens in well under the time between the first chunk and
        # the lock below; a pause per step keeps the request running until the client leaves
        time.sleep(0.02)
        return fast_step()

    eng.step = slow_step
    try:
        with httpx.Client(base_url=run.url, timeout=30) as hc:
            with hc.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                eng._step_lock.acquire()  # hold the engine while the client goes away
        try:
            assert eng._running, "the request finished before the client went away"
            deadline = time.monotonic() + 10
            while not all(s.handle.cancelled for s in eng._running) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            eng._step_lock.release()
    finally:
        del eng.step
    deadline = time.monotonic() + 10
    while eng.stats()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.stats()["cancelled"] == before + 1 and eng.stats()["running"] == 0
    assert _health_ok(run.url)
