"""lfm_engine.merge.lora_merge: merging PEFT LoRA adapters into weights and into a new LoRA (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from lfm_engine.merge.lora_merge import (LoraAdapter, load_peft_adapter, merge_adapters_into, merge_adapters_to_lora,
                                   merged_delta, randomized_svd, save_peft_adapter)
from lfm_engine.core.merge_methods import resolve_merge_params
from lfm_engine.reference.merge import merge_tensors_reference

MODS = {"model.layers.0.self_attn.q_proj": (24, 40), "model.layers.0.mlp.down_proj": (40, 56)}


def _adapters(ranks=(4, 6, 8), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j, r in enumerate(ranks):
        mods = {}
        for m, (o, i) in MODS.items():
            if j == 2 and "down_proj" in m:
                continue  # adapter 2 does not adapt down_proj
            mods[m] = ((0.1 * torch.randn(r, i, generator=g)).to(dtype), (0.1 * torch.randn(o, r, generator=g)).to(dtype))
        out.append(LoraAdapter(mods, {m: 16.0 / r for m in mods}, name=f"a{j}"))
    return out


def _full_deltas(ads, m):
    o, i = MODS[m]
    return [(ad.modules[m][1].float() @ ad.modules[m][0].float()) * ad.scale(m) if m in ad.modules
            else torch.zeros(o, i) for ad in ads]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic", "breadcrumbs"])
def test_merged_delta_matches_reference(method):
    ads = _adapters()
    kw = dict(weights=[1.0, 0.6, 0.8], seed=3)
    if method != "task_arithmetic":
        kw["density"] = 0.5
    if method == "della":
        kw["epsilon"] = 0.1
    for m in MODS:
        got = merged_delta(ads, m, method, backend="cpu", **kw)
        deltas = _full_deltas(ads, m)
        p = resolve_merge_params(method, 3, name=f"{m}.weight", **kw)
        want = merge_tensors_reference(torch.zeros_like(deltas[0]), deltas, p)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_adapters_into_updates_weights_in_place(dtype):
    ads = _adapters()
    g = torch.Generator().manual_seed(1)
    W = {f"{m}.weight": torch.randn(o, i, generator=g).to(dtype) for m, (o, i) in MODS.items()}
    orig = {k: v.clone() for k, v in W.items()}
    ptrs = {k: v.data_ptr() for k, v in W.items()}
    names = merge_adapters_into(W, ads, "ties", density=0.3, weights=[1.0, 1.0, 0.5], backend="cpu")
    assert sorted(names) == sorted(W)
    for m in MODS:
        key = f"{m}.weight"
        assert W[key].data_ptr() == ptrs[key] and W[key].dtype == dtype
        d = merged_delta(ads, m, "ties", density=0.3, weights=[1.0, 1.0, 0.5], backend="cpu")
        assert torch.equal(W[key], (orig[key].float() + d).to(dtype))
        assert not torch.equal(W[key], orig[key])


def test_merge_adapters_into_errors():
    ads = _adapters()
    with pytest.raises(KeyError, match="down_proj.weight"):
        merge_adapters_into({"model.layers.0.self_attn.q_proj.weight": torch.zeros(24, 40)}, ads, backend="cpu")
    W = {f"{m}.weight": torch.zeros(o + 1, i) for m, (o, i) in MODS.items()}
    with pytest.raises(ValueError, match="has shape"):
        merge_adapters_into(W, ads, backend="cpu")


def test_to_lora_task_arithmetic_is_exact_when_rank_suffices():
    ads = _adapters(ranks=(2, 3, 4))
    new = merge_adapters_to_lora(ads, rank=9, method="task_arithmetic", weights=[1.0, -0.5, 0.25], lam=0.7)
    for m in MODS:
        a, b = new.modules[m]
        assert a.shape == (9, MODS[m][1]) and b.shape == (MODS[m][0], 9)
        want = merged_delta(ads, m, "task_arithmetic", weights=[1.0, -0.5, 0.25], lam=0.7, backend="cpu")
        torch.testing.assert_close(b @ a, want, atol=1e-5, rtol=1e-4)


def test_to_lora_ties_is_near_optimal_rank_r():
    ads = _adapters()
    r = 6
    new = merge_adapters_to_lora(ads, rank=r, method="ties", density=0.4, backend="cpu", n_iter=3)
    for m in MODS:
        d = merged_delta(ads, m, "ties", density=0.4, backend="cpu")
        S = torch.linalg.svdvals(d)
        best = S[r:].square().sum().sqrt()  # Eckart-Young: the optimal rank-r error
        a, b = new.modules[m]
        err = torch.linalg.matrix_norm(d - b @ a)
        assert err <= best * 1.02 + 1e-6, (m, float(err), float(best))


def test_randomized_svd_exact_for_low_rank_and_checks():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(60, 5, generator=g) @ torch.randn(5, 80, generator=g)
    U, S, Vh = randomized_svd(M, 5, oversample=2, n_iter=1)
    torch.testing.assert_close((U * S) @ Vh, M, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        randomized_svd(M, 61)


def test_peft_roundtrip(tmp_path):
    ads = _adapters()
    new = merge_adapters_to_lora(ads, rank=4, method="ties", density=0.5, backend="cpu")
    new.scales = {"model.layers.0.mlp.down_proj": 0.5}
    save_peft_adapter(new, str(tmp_path), base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    back = load_peft_adapter(str(tmp_path))
    assert set(back.modules) == set(new.modules)
    for m in new.modules:
        assert torch.equal(back.modules[m][0], new.modules[m][0])
        assert back.scale(m) == pytest.approx(new.scale(m))
    peft = pytest.importorskip("peft")
    pc = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert pc.r == 4


def test_load_peft_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot parse JSON"):
        load_peft_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_peft_adapter(str(tmp_path))


@pytest.mark.cuda
def test_lora_merge_on_gpu_matches_cpu():
    ads = _adapters()
    gpu = [ad.to("cuda") for ad in ads]
    for m in MODS:
        for backend in ("cuda", "triton"):
            got = merged_delta(gpu, m, "dare_ties", density=0.5, seed=2, backend=backend)
            want = merged_delta(ads, m, "dare_ties", density=0.5, seed=2, backend="cpu")
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    new = merge_adapters_to_lora(gpu, rank=6, method="ties", density=0.4)
    assert next(iter(new.modules.values()))[0].device.type == "cuda"
