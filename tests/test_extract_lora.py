"""`lfm-engine extract-lora` (mergekit-extract-lora): the adapter's B @ A reproduces the
fine-tune's deltas, PEFT loads it, ranks and errors are reported."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import llama_config, load_folder, random_weights, write_model  # noqa: E402
from merge_cli_helpers import assert_same_logits  # noqa: E402

from lfm_engine.cli import main as cli_main  # noqa: E402
from lfm_engine.merge.lora_merge import adapter_delta, load_peft_adapter  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rank3_finetune(base, changes, seed):
    """(fine-tune, {module: delta}): rank-3 deltas on the tensors where changes(name, w)."""
    g = torch.Generator().manual_seed(seed)
    ft, deltas = {}, {}
    for n, w in base.items():
        if changes(n, w):
            d = torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.01
            deltas[n[:-len(".weight")]] = d
            ft[n] = w + d
        else:
            ft[n] = w.clone()
    return ft, deltas


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=64)
    base = random_weights(cfg, 0)
    ft, deltas = _rank3_finetune(base, lambda n, w: any(f".{m}." in n for m in LINEAR), 1)
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


# ------------------------------------------------------------------ embeddings and lm_head

@pytest.fixture(scope="module")
def embed_pair(tmp_path_factory):
    """A fine-tune whose embeddings and lm_head changed too (rank-3 deltas)."""
    root = tmp_path_factory.mktemp("extract_embed")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=64)
    base = random_weights(cfg, 0)
    ft, _ = _rank3_finetune(base, lambda n, w: w.dim() == 2, 2)
    return write_model(str(root / "base"), cfg, base), write_model(str(root / "ft"), cfg, ft), cfg, base, ft


def _peft_model(base, out):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(out))


def test_embeddings_saved_in_full_by_default(embed_pair, tmp_path, capsys):
    b, f, _, _, ft = embed_pair
    out = tmp_path / "lora"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", "3"]) == 0
    assert "saved  full" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.embed_tokens"] and "embed_tokens" not in cfg["target_modules"]
    report = {r["module"]: r for r in json.loads((out / "extraction_report.json").read_text())}
    assert report["model.embed_tokens"]["kind"] == "saved" and report["model.embed_tokens"]["rank"] is None
    assert report["lm_head"]["rel_error"] == 0.0
    ad = load_peft_adapter(str(out))            # our reader: modules_to_save tensors are kept
    assert torch.equal(ad.saved["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    assert torch.equal(ad.saved["lm_head.weight"], ft["lm_head.weight"])
    transformers = pytest.importorskip("transformers")
    assert_same_logits(_peft_model(b, out), transformers.AutoModelForCausalLM.from_pretrained(f),
                       [1, 5, 9, 2], 1e-3, 1e-4)


@pytest.mark.parametrize("rank", [3, 1])
def test_embed_lora_low_rank_embeddings(embed_pair, tmp_path, rank):
    """--embed-lora: PEFT's embedding LoRA layout; what PEFT adds is B @ A transposed, and its
    distance to the fine-tune is the reported error."""
    b, f, cfg, base, ft = embed_pair
    out = tmp_path / f"lora{rank}"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", str(rank), "--embed-lora", "--quiet"]) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["modules_to_save"] is None and {"embed_tokens", "lm_head"} <= set(conf["target_modules"])
    t = load_folder(str(out))
    A, B = t["base_model.model.model.embed_tokens.lora_embedding_A"], t["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert A.shape == (rank, cfg["vocab_size"]) and B.shape == (cfg["hidden_size"], rank)
    assert t["base_model.model.lm_head.lora_A.weight"].shape == (rank, cfg["hidden_size"])
    report = {r["module"]: r for r in json.loads((out / "extraction_report.json").read_text())}
    assert report["model.embed_tokens"]["kind"] == "embedding_lora" and report["lm_head"]["kind"] == "lora"
    merged = _peft_model(b, out).merge_and_unload().state_dict()
    for name, module in (("model.embed_tokens.weight", "model.embed_tokens"), ("lm_head.weight", "lm_head")):
        d = ft[name] - base[name]
        err = float((merged[name] - ft[name]).norm() / d.norm())
        assert abs(err - report[module]["rel_error"]) < 1e-4 + 1e-3 * err, (name, err, report[module])
        assert err < 1e-4 if rank == 3 else 0.05 < err < 1.0
    # our own reader (merge's MODEL+ADAPTER) applies it as PEFT does
    mout = tmp_path / f"merged{rank}"
    cfgm = tmp_path / f"m{rank}.yaml"
    cfgm.write_text(json.dumps({"merge_method": "linear", "dtype": "float32",
                                "models": [{"model": f"{b}+{out}", "parameters": {"weight": 1.0}}]}))
    assert cli_main(["merge", str(cfgm), str(mout), "--quiet"]) == 0
    ours = load_folder(str(mout))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(ours[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)
    if rank == 3:
        transformers = pytest.importorskip("transformers")
        assert_same_logits(_peft_model(b, out), transformers.AutoModelForCausalLM.from_pretrained(f),
                           [1, 5, 9, 2], 1e-3, 1e-4)


def test_exclude_save_module_and_include_options(embed_pair, tmp_path, capsys):
    b, f, _, _, _ = embed_pair
    out = tmp_path / "ex"
    assert cli_main(["extract-lora", b, f, str(out), "--rank", "3", "-e", "embed_tokens", "--exclude-regex",
                     "lm_head", "--save-module", "o_proj", "-i", r"\.(q|o)_proj$", "--quiet"]) == 0
    report = {r["module"]: r["kind"] for r in json.loads((out / "extraction_report.json").read_text())}
    assert report == {**{f"model.layers.{i}.self_attn.q_proj": "lora" for i in range(2)},
                      **{f"model.layers.{i}.self_attn.o_proj": "saved" for i in range(2)}}
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert cli_main(["extract-lora", b, f, str(tmp_path / "o"), "--rank", "3", "--save-module", "nope"]) == 2
    assert "--save-module nope: no weight of the base" in capsys.readouterr().err
    assert cli_main(["extract-lora", b, f, str(tmp_path / "o"), "--rank", "3", "-e", "("]) == 2
    assert "--exclude-regex '(': not a regular expression" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_grown_vocabulary_is_saved_in_full(embed_pair, tmp_path, capsys):
    b, _, cfg, _, ft = embed_pair
    big = dict(cfg, vocab_size=72)
    grown = dict(ft)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[n] = torch.cat([ft[n], torch.full((8, cfg["hidden_size"]), 0.01)])
    f2 = write_model(str(tmp_path / "ft_big"), big, grown)
    out = tmp_path / "big"
    assert cli_main(["extract-lora", b, f2, str(out), "--rank", "3", "--embed-lora"]) == 0
    assert "resize the base's embeddings" in capsys.readouterr().out
    t = load_folder(str(out))
    assert t["base_model.model.model.embed_tokens.weight"].shape == (72, cfg["hidden_size"])


def test_changed_norms_saved_unless_skip_undecomposable(pair, tmp_path, capsys):
    b, f, _ = pair
    tensors = load_folder(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.1
    cfg = llama_config(hidden=32, layers=2, intermediate=48, vocab=64)
    f2 = write_model(str(tmp_path / "ft_norm"), cfg, tensors)
    out = tmp_path / "n"
    assert cli_main(["extract-lora", b, f2, str(out), "--rank", "3", "--quiet"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    transformers = pytest.importorskip("transformers")
    assert_same_logits(_peft_model(b, out), transformers.AutoModelForCausalLM.from_pretrained(f2),
                       [1, 5, 9, 2], 1e-3, 1e-4)
    only = write_model(str(tmp_path / "ft_norm_only"), cfg, {**load_folder(b), "model.norm.weight": tensors["model.norm.weight"]})
    assert cli_main(["extract-lora", b, only, str(tmp_path / "o"), "--rank", "3"]) == 2
    assert "needs at least one low-rank module" in capsys.readouterr().err and not (tmp_path / "o").exists()
    out2 = tmp_path / "n2"
    assert cli_main(["extract-lora", b, f2, str(out2), "--rank", "3", "--quiet", "--skip-undecomposable"]) == 0
    assert json.loads((out2 / "adapter_config.json").read_text())["modules_to_save"] is None


@pytest.mark.parametrize("embed_lora", [False, True])
def test_same_deltas_as_mergekit_extract_lora(embed_pair, tmp_path, embed_lora):
    """mergekit-extract-lora 0.1.5 (full SVD) on the same pair: the same B @ A per module
    (factors may differ by the SVD's signs) and the same embeddings saved in full."""
    import subprocess
    b, f, _, _, _ = embed_pair
    try:
        import mergekit.scripts.extract_lora  # noqa: F401
    except Exception as e:
        pytest.skip(f"mergekit-extract-lora is not importable here (optional test dependency): {e}")
    mk = tmp_path / "mk"
    flag = ["--embed-lora"] if embed_lora else []
    r = subprocess.run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", f, "--base-model", b,
                        "--out-path", str(mk), "--max-rank", "3", *flag], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode:
        pytest.skip(f"mergekit-extract-lora failed here: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    out = tmp_path / "ours"
    assert cli_main(["extract-lora", "--model", f, "--base-model", b, "--out-path", str(out), "--max-rank", "3",
                     "--quiet", *flag]) == 0
    a, m = load_folder(str(out)), load_folder(str(mk))
    for k in a:
        if k.endswith(("lora_A.weight", "lora_embedding_A")):
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            torch.testing.assert_close(a[kb] @ a[k], m[kb] @ m[k], rtol=1e-4, atol=1e-6, msg=k)
        elif not k.endswith(("lora_B.weight", "lora_embedding_B")):
            torch.testing.assert_close(a[k], m[k], rtol=0, atol=0, msg=k)     # saved in full
    # mergekit also saves the unchanged norms; every module it decomposes, we do too
    assert {k for k in m if "lora" in k} == {k for k in a if "lora" in k}


def test_mergekit_spellings_sv_epsilon_and_undistributed_scale(pair, tmp_path, capsys):
    b, f, deltas = pair
    out = tmp_path / "mk_style"
    assert cli_main(["extract-lora", "--model", f, "--base-model", b, "--out-path", str(out), "--max-rank", "4",
                     "--no-distribute-scale", "--sv-epsilon", "1e-6", "--quiet"]) == 0
    report = json.loads((out / "extraction_report.json").read_text())
    assert all(r["rank"] == 3 for r in report)            # the 4th singular value is ~0 (rank-3 deltas)
    t = load_folder(str(out))
    ad = load_peft_adapter(str(out))
    for m, d in deltas.items():
        B = t[f"base_model.model.{m}.lora_B.weight"]
        torch.testing.assert_close(B.T @ B, torch.eye(3), rtol=0, atol=1e-5)     # B = U: orthonormal columns
        torch.testing.assert_close(adapter_delta(ad, m), d, rtol=1e-4, atol=1e-6)
    assert cli_main(["extract-lora", b, f, str(tmp_path / "o"), "--sv-epsilon", "1e9"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert cli_main(["extract-lora", b, f, str(tmp_path / "o"), "--model", b]) == 2
    assert "FINETUNE (--model) given twice" in capsys.readouterr().err
    assert cli_main(["extract-lora", "--model", f, "--out-path", str(tmp_path / "o")]) == 2
    assert "BASE (--base-model) is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
