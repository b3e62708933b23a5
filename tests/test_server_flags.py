"""`lfm-engine serve` access flags: the API key from LFM_API_KEY, --no-runtime-adapters,
the default bind address (issue: "--api-key KEY (or the LFM_API_KEY environment
variable) ... without a key the server binds to 127.0.0.1 only ... loading adapters by
path over HTTP can be disabled")."""
from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("peft")

from server_harness import CHAT_TEMPLATE, Running  # noqa: E402
from test_serve import V, _adapter_configs, _base, _save_adapters, _tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = _base("llama")
    root = tmp_path_factory.mktemp("flags")
    cfgs = _adapter_configs()
    paths = _save_adapters(base, str(root / "adapters"), {"a": cfgs["a"], "c": cfgs["c"]})
    mdir = str(root / "tiny")
    base.config.eos_token_id = V - 1
    base.save_pretrained(mdir)
    _tokenizer(mdir, CHAT_TEMPLATE)
    mp = pytest.MonkeyPatch()
    mp.setenv("LFM_API_KEY", "from-env")
    try:
        run = Running([mdir, "--lora-modules", f"a={paths['a']}", "--no-runtime-adapters"])
    finally:
        mp.undo()
    yield run, paths
    run.close()


def test_api_key_from_the_environment(srv):
    run, _ = srv
    with httpx.Client(base_url=run.url, timeout=60) as hc:
        assert hc.get("/health").status_code == 200
        r = hc.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        ok = hc.get("/v1/models", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and {m["id"] for m in ok.json()["data"]} == {"tiny", "a"}
        r = hc.post("/v1/completions", json=dict(model="a", prompt=[1, 2], max_tokens=2),
                    headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 2


def test_no_runtime_adapters_refuses_loads_by_path(srv):
    run, paths = srv
    h = {"Authorization": "Bearer from-env"}
    with httpx.Client(base_url=run.url, timeout=60, headers=h) as hc:
        for route, body in (("/v1/load_lora_adapter", dict(lora_name="c", lora_path=paths["c"])),
                            ("/v1/adapters", dict(name="c", path=paths["c"]))):
            r = hc.post(route, json=body)
            err = r.json()["error"]
            assert r.status_code == 403 and "--no-runtime-adapters" in err["message"], r.text
        assert "c" not in {m["id"] for m in hc.get("/v1/models").json()["data"]}
        # adapters given at start still serve, and unloading stays possible
        assert hc.post("/v1/unload_lora_adapter", json=dict(lora_name="a")).status_code == 200


def test_default_bind_address_is_loopback(srv):
    run, _ = srv
    assert run.url.startswith("http://127.0.0.1:")
