"""`lfm-engine extract-lora` (mergekit-extract-lora): the adapter's B @ A reproduces the
fine-tune's deltas, PEFT loads it, ranks and errors are reported."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import llama_config, random_weights, write_model  # noqa: E402
from merge_cli_helpers import assert_same_logits  # noqa: E402

from lfm_engine.cli import main as cli_main  # noqa: E402
from lfm_engine.merge.lora_merge import adapter_delta, load_peft_adapter  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=64)
    base = random_weights(cfg, 0)
    g = torch.Generator().manual_seed(1)
    ft, deltas = {}, {}
    for n, w in base.items():
        if any(f".{m}." in n for m in LINEAR):
            d = torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.01
            deltas[n[:-len(".weight")]] = d
            ft[n] = w + d
        else:
            ft[n] = w.clone()
    return (write_model(str(root / "base"), cfg, base), write_model(str(root / "ft"), cfg, ft), deltas)


def test_exact_low_rank_deltas_are_recovered(pair, tmp_path, capsys):
    b, f, deltas = pair
    out = tmp_path / "lora"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", "3"]) == 0
    text = capsys.readouterr().out
    assert "worst relative error" in text and "model.layers.1.mlp.down_proj" in text
    ad = load_peft_adapter(str(out))
    assert set(ad.modules) == set(deltas)     # embeddings and norms did not change: not listed
    for m, d in deltas.items():
        torch.testing.assert_close(adapter_delta(ad, m), d, rtol=1e-4, atol=1e-6)
    report = json.loads((out / "extraction_report.json").read_text())
    assert all(r["rank"] == 3 and r["rel_error"] < 1e-4 for r in report)


def test_energy_picks_the_rank_and_peft_loads_it(pair, tmp_path):
    b, f, deltas = pair
    out = tmp_path / "lora_e"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", "8", "--energy", "0.9999", "--quiet"]) == 0
    report = json.loads((out / "extraction_report.json").read_text())
    assert all(r["rank"] <= 3 for r in report) and all(r["rel_error"] < 1e-2 for r in report)
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_m = transformers.AutoModelForCausalLM.from_pretrained(b)
    model = peft.PeftModel.from_pretrained(base_m, str(out))
    assert_same_logits(model, transformers.AutoModelForCausalLM.from_pretrained(f), [1, 5, 9, 2], 1e-3, 1e-3)


def test_rank_truncation_error_reported(pair, tmp_path):
    b, f, _ = pair
    out = tmp_path / "lora1"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", "1", "--quiet"]) == 0
    report = json.loads((out / "extraction_report.json").read_text())
    assert all(0.05 < r["rel_error"] < 1.0 for r in report)


def test_bad_inputs_are_clear_errors(pair, tmp_path, capsys):
    b, f, _ = pair
    assert cli_main(["extract-lora", b, f, str(tmp_path / "o"), "--rank", "0"]) == 2
    assert "--rank must be an integer >= 1" in capsys.readouterr().err
    assert cli_main(["extract-lora", b, str(tmp_path / "nope"), str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["extract-lora", b, b, str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    other = write_model(str(tmp_path / "other"), llama_config(hidden=16, layers=2, intermediate=48, vocab=64),
                        random_weights(llama_config(hidden=16, layers=2, intermediate=48, vocab=64), 3))
    assert cli_main(["extract-lora", b, other, str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "the fine-tune has shape" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
