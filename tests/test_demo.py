"""`lfm-engine demo` end to end at a tiny size, and the generated demo files themselves."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lfm_engine.demo.data import load_folder, make_demo_set


def test_demo_set_is_real_hf_and_peft(tmp_path):
    ds = make_demo_set(str(tmp_path), hidden=32, layers=1, intermediate=64, vocab=64, heads=4, kv_heads=2)
    cfg = json.load(open(os.path.join(ds.base, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 32
    base = load_folder(ds.base)
    assert set(base) == set(ds.base_weights)
    for ft_path, ft in zip(ds.finetunes, ds.finetune_weights):
        got = load_folder(ft_path)
        for n, t in got.items():
            assert torch.equal(t, ft[n])
            assert not torch.equal(t, base[n])  # every tensor carries a task vector
    assert len(ds.adapters) == 4
    for name, path in ds.adapters.items():
        acfg = json.load(open(os.path.join(path, "adapter_config.json")))
        ad = ds.adapter_weights[name]
        assert acfg["peft_type"] == "LORA" and acfg["r"] == ad.rank
        from safetensors.torch import load_file

        sd = load_file(os.path.join(path, "adapter_model.safetensors"))
        for m, (A, B) in ad.modules.items():
            assert torch.equal(sd[f"base_model.model.{m}.lora_A.weight"], A)
            assert torch.equal(sd[f"base_model.model.{m}.lora_B.weight"], B)
            assert B.abs().sum() > 0
    # no temporary folders left behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft uses APIs newer transformers deprecate
def test_demo_adapters_load_in_peft(tmp_path):
    """The written adapter folders are what PEFT itself reads: same output as the dense W + s·B·A."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from torch.func import functional_call

    ds = make_demo_set(str(tmp_path), hidden=32, layers=1, intermediate=64, vocab=64, heads=4, kv_heads=2)
    model = transformers.LlamaForCausalLM.from_pretrained(ds.base, dtype=torch.float32).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(ds.base, dtype=torch.float32).eval()
    name = "lora4"  # rsLoRA, MLP only
    pm = peft.PeftModel.from_pretrained(model, ds.adapters[name]).eval()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ad = ds.adapter_weights[name]
    params = {m + ".weight": ds.base_weights[m + ".weight"] + ad.delta(m) for m in ad.modules}
    with torch.no_grad():
        got = pm(ids).logits
        exp = functional_call(ref, params, (ids,)).logits
    torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)


def test_demo_end_to_end_tiny(capsys):
    pytest.importorskip("transformers")
    from lfm_engine.cli import main

    import importlib.util

    has_peft = importlib.util.find_spec("peft") is not None
    rc = main(["demo", "--model", "generated", "--rows", "64", "--cols", "128", "--hidden", "64", "--layers", "1",
               "--intermediate", "128", "--vocab", "128", "--batch", "5", "--prompt-len", "6",
               "--new-tokens", "4"] + (["--peft"] if has_peft else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    if has_peft:
        assert "vs PEFT's mixed batch" in out
    for marker in ("[2/4]", "[3/4]", "[4/4]", "All checks passed"):
        assert marker in out, out
    assert "int4" in out and "sign1" in out and "tokens/s" in out


def test_demo_fails_when_a_check_fails(capsys, monkeypatch):
    """The exit code follows the checks: a merge that is not the one checked must give rc 1
    (here the YAML asks for another density than the reference is computed with)."""
    from lfm_engine.demo import runner as cli_demo
    from lfm_engine.cli import main

    real = cli_demo.ties_config
    monkeypatch.setattr(cli_demo, "ties_config", lambda ds: real(ds).replace("density: 0.5", "density: 0.9", 1))
    rc = main(["demo", "--model", "generated", "--skip", "tensors", "compress", "serve", "--hidden", "32", "--layers", "1",
               "--intermediate", "64", "--vocab", "64"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED: model merge" in out


def test_demo_rejects_bad_sizes(capsys):
    from lfm_engine.cli import main

    assert main(["demo", "--model", "generated", "--hidden", "30", "--batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch must be >= 1" in err and "--hidden must be a multiple of 4" in err


def test_demo_without_the_example_model_says_how_to_fetch_it(capsys, monkeypatch, tmp_path):
    """auto with an empty cache: the fetch hint, then the generated-weights demo (no network)."""
    from lfm_engine.cli import main

    monkeypatch.setenv("LFM_ENGINE_CACHE", str(tmp_path))
    rc = main(["demo", "--skip", "tensors", "compress", "serve", "--hidden", "32", "--layers", "1",
               "--intermediate", "64", "--vocab", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lfm-engine fetch-example-model" in out and "generated weights" in out and "[2/4]" in out
    assert main(["demo", "--model", "example", "--cache-dir", str(tmp_path)]) == 2
    assert "fetch-example-model" in capsys.readouterr().err
