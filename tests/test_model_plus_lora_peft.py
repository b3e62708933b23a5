"""`model+lora` references with adapters saved by the real PEFT library: the merged output
equals PEFT's own merge_and_unload (including GPT-2's Conv1D weights, stored [in, out],
whose adapters set fan_in_fan_out: the square c_proj was silently added untransposed), and
an adapter that makes the weights non-finite (a NaN lora_alpha loaded) is refused by name."""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import load_folder  # noqa: E402
from merge_cli_helpers import run  # noqa: E402


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2lora")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(str(root / "base"))
    lcfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                           init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(root / "lora"))
    merged = pm.merge_and_unload()
    return root, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _changed_copy(src, dst, change: dict):
    """A copy of the adapter folder `src` at `dst` with adapter_config.json updated."""
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    c = json.loads((dst / "adapter_config.json").read_text())
    c.update(change)
    (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def test_conv1d_adapter_matches_peft_merge_and_unload(gpt2, tmp_path):
    root, want = gpt2
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{root / 'base'}+{root / 'lora'}", "parameters": {"weight": 1.0}}]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    checked = 0
    for name, t in got.items():
        if name in want:
            torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-6, msg=name)
            checked += ".c_attn." in name or ".c_proj." in name
    assert checked >= 4  # the adapted Conv1D weights were compared, not only untouched ones


@pytest.mark.parametrize("alpha", [float("nan"), 1e40])  # 1e40: finite (float64), s * B @ A overflows float32
def test_adapter_that_makes_a_weight_non_finite_is_named(gpt2, tmp_path, capsys, alpha):
    root, _ = gpt2
    big = _changed_copy(root / "lora", tmp_path / "big", dict(lora_alpha=alpha))
    cfg = {"merge_method": "linear", "models": [{"model": f"{root / 'base'}+{big}", "parameters": {"weight": 1}}]}
    rc, out = run(cfg, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "gives NaN or Inf" in err and str(big) in err and "Traceback" not in err, err
    assert not out.exists()
