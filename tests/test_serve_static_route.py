"""StaticRoute: routing metadata in fixed buffers updated in place (the CUDA-graph path).

The static route must give the dynamic route's outputs (LoRA, delta and base rows mixed)
within float tolerance, keep every metadata buffer in place across steps with different
routing, re-plan (version + 1) only when the resident adapters change, and on CUDA replay a
captured graph with new routing.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_serve_deltas import CFG, _served, family  # noqa: E402,F401  (module fixture reused)


def _buffers(sr):
    return [sr.row_slot, sr.row_delta, sr.token_slot] + [b for b, _ in sr._maps.values()]


def _ids(rows, seq, seed=0):
    return torch.randint(0, CFG["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq", [1, 6])
def test_static_route_matches_dynamic_route_and_keeps_buffers_in_place(family, seq):
    model, pool = _served(family)
    sr = pool.static_route(rows=5, tokens_per_row=seq)
    ids = _ids(5, seq)
    steps = [["s1", "lora", None, "i4", "s1"], [None, "i4", "s1", None, "lora"], [None] * 5,
             ["i4", "i4", "lora", "lora", "s1"]]
    ptrs = None
    with torch.no_grad():
        for names in steps:
            with pool.assign(names):
                want = model(ids).logits
            with sr.assign(names):
                got = model(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(names))
            now = [b.data_ptr() for b in _buffers(sr)]
            assert ptrs is None or now == ptrs, "a routing buffer was reallocated between steps"
            ptrs = now
            assert sr.row_slot.tolist() == [pool._entries[n].slot if n == "lora" else -1 for n in names]
    assert sr.version == 1
    # the routing really changes the output (the test can fail)
    with torch.no_grad(), sr.assign([None] * 5):
        base = model(ids).logits
    assert (got[0] - base[0]).abs().max() > 1e-3


def test_static_route_replans_when_the_resident_adapters_change(family):
    model, pool = _served(family)
    sr = pool.static_route(rows=2)
    ids = _ids(2, 1, seed=1)
    with torch.no_grad():
        with sr.assign(["s1", "i4"]):
            model(ids)
        assert sr.version == 1
        pool.unload("s1")
        with sr.assign(["i4", None]):
            got = model(ids).logits
        assert sr.version == 2
        with pool.assign(["i4", None]):
            want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_static_route_shape_errors(family):
    model, pool = _served(family)
    sr = pool.static_route(rows=3)
    with pytest.raises(ValueError, match="3 rows but assign\\(\\) got 2 names"):
        with sr.assign(["s1", None]):
            pass
    with pytest.raises(ValueError, match="3 tokens\\) but a layer input has 6 tokens"):
        with torch.no_grad(), sr.assign(["s1", None, "lora"]):
            model(_ids(3, 2))
    with pytest.raises(ValueError, match="rows >= 1"):
        pool.static_route(rows=0)
    with pytest.raises(RuntimeError, match="needs a CUDA pool"):
        sr.capture(lambda: None, [None] * 3)
    # nothing stayed held: the adapters can be unloaded
    pool.unload("s1")


@pytest.mark.cuda
def test_cuda_graph_replays_with_new_routing(family):
    from transformers import LlamaForCausalLM

    from lfm_engine.serve import AdapterPool, attach

    dev = torch.device("cuda")
    model = LlamaForCausalLM.from_pretrained(family["base"]).eval().to(dev)
    pool = AdapterPool(capacity=2, device=dev)
    attach(model, pool)
    pool.load("lora", family["lora"], wait=True)
    pool.load_delta("s1", family["s1"])
    pool.load_delta("i4", family["i4"])
    sr = pool.static_route(rows=4)
    ids = _ids(4, 1).to(dev)
    with torch.no_grad():
        graph, out = sr.capture(lambda: model(ids).logits, ["s1", None, "lora", "i4"])
        version = sr.version
        for names in (["i4", "lora", None, "s1"], [None] * 4, ["s1", "s1", "i4", "lora"]):
            with sr.assign(names):
                graph.replay()
            assert sr.version == version
            with pool.assign(names):
                want = model(ids).logits
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, msg=str(names))
