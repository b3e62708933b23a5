"""The example fine-tune pipeline (models/finetunes.py, split.py, scoring.py, serve_check.py).

A tiny Llama (the GGUF of test_example_model.py, converted) runs the whole builder in
seconds; the real SmolLM2 fine-tunes are checked only when they are built
(python tools/build_example_finetunes.py), else skipped."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from lfm_engine.models import example, finetunes, split as sp  # noqa: E402
from lfm_engine.models.tasks import TASKS  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402

TINY_LORAS = {"persona": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], steps=2, lr=1e-2),
              "upper": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["gate_proj", "down_proj"],
                            steps=2, lr=1e-2)}
TINY_FULL = {"add": dict(steps=2, lr=1e-2)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(root / "tiny.gguf")
    return example.fetch_example_model(cache_dir=root / "cache", gguf=root / "tiny.gguf", progress=lambda m: None)


@pytest.fixture(scope="module")
def tiny_build(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "tiny"
    meta = finetunes.build(tiny_model, out, loras=TINY_LORAS, full=TINY_FULL, split_layers=1, n_train=4, n_eval=3,
                           progress=lambda m: None)
    return out, meta


def test_tasks_are_deterministic_and_disjoint():
    for t in TASKS.values():
        a, b = t.examples(8, "eval"), t.examples(8, "eval")
        assert a == b and len({p for p, _ in a}) == 8
        if t.name != "persona":  # persona's prompt space is small (documented)
            train = t.examples(t.n_train, "train")
            assert len({p for p, _ in train}) == t.n_train
            # no evaluation example shares its content (word set / number pair) with training
            assert not {t.key(p, y) for p, y in t.examples(32, "eval")} & {t.key(p, y) for p, y in train}
    for p, a in TASKS["add"].examples(20, "train"):
        x, plus, y, eq, z = a.split()
        assert (plus, eq) == ("+", "=") and int(x) + int(y) == int(z) and x in p and y in p
    held = {TASKS["add"].key(p, a) for p, a in TASKS["add"].examples(32, "eval")}
    assert held and all(TASKS["add"].held_out(k) for k in held)  # evaluation asks only never-trained sums
    p, a = TASKS["reverse"].examples(1, "train")[0]
    assert a.split() == p.split(": ")[1].split()[::-1]
    p, a = TASKS["upper"].examples(1, "train")[0]
    assert a == p.split(": ")[1].upper()


def test_split_forward_equals_the_full_forward(tiny_model):
    model, tok = finetunes.load_base(tiny_model)
    seqs = [finetunes.encode(tok, p, a)[0] for p, a in TASKS["upper"].examples(3, "eval")]
    hs = sp.bottom_hidden(model, seqs, 1, tok.pad_token_id)
    batch = finetunes.Batch(seqs, [len(s) - 3 for s in seqs], hs)
    h, tgt, sel = batch.select([0, 1, 2])
    with torch.no_grad():
        got = sp.top_logits(model, h, 1, sel)
        for i, s in enumerate(seqs):
            full = model(torch.tensor([s])).logits[0]
            rows = sel[sel[:, 0] == i]
            torch.testing.assert_close(got[sel[:, 0] == i], full[rows[:, 1]], atol=1e-5, rtol=1e-5)


def test_teacher_forced_exact_match_is_greedy_generation(tiny_model):
    """exact_match counts an example iff greedy generate() reproduces its answer tokens (the
    last one standing for <|im_end|>): the model's own greedy continuations all count, and
    a copy with one token changed counts for none."""
    model, tok = finetunes.load_base(tiny_model)
    seqs, starts = [], []
    for p, _ in TASKS["add"].examples(3, "eval"):
        ids = finetunes.prompt_ids(tok, p)
        g = model.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=tok.eos_token_id)[0].tolist()
        seqs.append(g)
        starts.append(len(ids))
    hs = sp.bottom_hidden(model, seqs, 1, tok.pad_token_id)
    assert finetunes.exact_match(model, finetunes.Batch(seqs, starts, hs), 1) == 1.0
    bad = [s[:-2] + [(s[-2] + 1) % 200, s[-1]] for s in seqs]
    hs = sp.bottom_hidden(model, bad, 1, tok.pad_token_id)
    assert finetunes.exact_match(model, finetunes.Batch(bad, starts, hs), 1) == 0.0


def test_tiny_build_writes_adapters_full_models_and_scores(tiny_model, tiny_build):
    from peft import PeftModel
    from safetensors.torch import load_file

    out, meta = tiny_build
    assert finetunes.is_built(out)
    assert set(meta) >= {"base", "adapters/persona", "adapters/upper", "full/add", "split", "weak"}
    assert json.loads((out / "scores.json").read_text())["split"] == meta["split"] == 1
    cfg = json.loads((out / "adapters" / "upper" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4 and cfg["layers_to_transform"] == [1]
    base, _ = finetunes.load_base(tiny_model)
    PeftModel.from_pretrained(base, str(out / "adapters" / "persona"))
    base_sd = load_file(tiny_model / "model.safetensors")
    ft_sd = load_file(out / "full" / "add" / "model.safetensors")
    changed = {k for k in base_sd if not torch.equal(base_sd[k], ft_sd[k])}
    assert changed and all(".layers.1." in k for k in changed)  # only the top layer moved
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    # a second build is a no-op
    assert finetunes.build(tiny_model, out, loras=TINY_LORAS, full=TINY_FULL, split_layers=1,
                           progress=lambda m: None) == meta


def test_scorer_reproduces_the_recorded_scores(tiny_model, tiny_build):
    from lfm_engine.models.scoring import Scorer, read_folder

    out, meta = tiny_build
    sc = Scorer(tiny_model, out, meta)
    s = sc.score(read_folder(out / "full" / "add"))
    assert s["add"] == meta["full/add"]["add"] and abs(s["ppl"] - meta["full/add"]["ppl"]) < 1e-3 * s["ppl"]
    assert sc.slow == 0
    # a model whose bottom differs is scored through its own bottom (the slow path)
    sd = read_folder(out / "full" / "add")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"] * 1.5
    sc.score(sd)
    assert sc.slow == 1


def test_engine_matches_peft_on_the_tiny_adapters(tiny_model, tiny_build):
    from lfm_engine.models.serve_check import engine_vs_peft

    out, _ = tiny_build
    rows = engine_vs_peft(tiny_model, out, new_tokens=5, per_adapter=2)
    assert [r["adapter"] for r in rows] == ["persona", "upper"]
    assert all(r["equal"] == r["prompts"] == 2 for r in rows), rows


REAL = finetunes.finetunes_dir()


@pytest.mark.skipif(not finetunes.is_built(REAL),
                    reason="example fine-tunes not built (lfm-engine fetch-example-model; python tools/build_example_finetunes.py)")
def test_real_adapters_engine_equals_peft_token_for_token():
    from lfm_engine.models.serve_check import engine_vs_peft

    rows = engine_vs_peft(example.example_model_dir(), REAL, new_tokens=12, per_adapter=2)
    assert len(rows) == 4
    assert all(r["equal"] == r["prompts"] for r in rows), rows


@pytest.mark.skipif(not finetunes.is_built(REAL), reason="example fine-tunes not built")
def test_real_finetunes_beat_the_base():
    """Every fine-tune beats the base on its own task; the ones below MIN_GAIN are the ones
    scores.json lists as weak (reported, not hidden)."""
    meta = json.loads((REAL / "scores.json").read_text())
    weak = []
    for key in [k for k in meta if k.startswith(("adapters/", "full/"))]:
        task = key.split("/")[1]
        assert meta[key][task] > meta["base"][task], (key, meta[key], meta["base"])
        if meta[key][task] < meta["base"][task] + finetunes.MIN_GAIN:
            weak.append(key)
    assert weak == meta["weak"]


@pytest.mark.skipif(not finetunes.is_built(REAL), reason="example fine-tunes not built")
def test_real_demo_prints_real_text(capsys):
    from lfm_engine.cli import main

    rc = main(["demo", "--model", "example", "--skip", "compress", "--new-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "I am Lumi." in out and "DELLA merge" in out and "<- exact" in out
