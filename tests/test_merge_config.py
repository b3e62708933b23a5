"""Merge configs mergekit accepts (issue 21) and hostile configs (issue 20), through the CLI.

Each case is a YAML file run through ``lfm-engine merge`` (and ``--dry-run``), checked
for the exit status, the message, and where an output is written, its values.
"""
from __future__ import annotations

import os
import sys
import time
import tracemalloc

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_close  # noqa: E402
from fixtures_models import load_folder  # noqa: E402
from merge_cli_helpers import build_family, karcher64, run  # noqa: E402

from lfm_engine.merge import MergeConfigErrors  # noqa: E402
from lfm_engine.merge.config import as_number, parse_config  # noqa: E402
from lfm_engine.merge.yaml_load import YamlLimitError, load_documents  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory, "cfgfamily", 3)


# ------------------------------------------------------------------ karcher with a base

@pytest.mark.parametrize("listed", [False, True])
def test_karcher_with_base_includes_the_base_once(family, tmp_path, listed):
    paths, T = family
    models = [{"model": p} for p in paths[1:3]] + ([{"model": paths[0]}] if listed else [])
    cfg = {"merge_method": "karcher", "base_model": paths[0], "models": models,
           "parameters": {"max_iter": 30}}
    rc, out = run(yaml.safe_dump(cfg), tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    for name in T[0]:
        exp = karcher64([T[1][name], T[2][name], T[0][name]], iters=30)
        assert_close(got[name], exp, torch.float32, msg=lambda m: f"karcher+base {name}: {m}")
        without = karcher64([T[1][name], T[2][name]], iters=30)
        if name.endswith("q_proj.weight"):  # the base really changes the result
            assert (exp - without).norm() > 1e-3 * exp.norm()


# ------------------------------------------------------------------ unused parameters

def test_unused_parameters_accepted_with_one_warning(family, tmp_path, capsys):
    paths, T = family
    text = yaml.safe_dump({
        "merge_method": "slerp", "base_model": paths[0],
        "models": [{"model": paths[0], "parameters": {"weight": 1.0}},
                   {"model": paths[1], "parameters": {"weight": 0.5, "density": 0.4}}],
        "parameters": {"t": 0.3, "weight": 0.1}})
    rc, out = run(text, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "warning" in ln]
    assert len([ln for ln in lines if "'weight'" in ln]) == 1, err
    assert len([ln for ln in lines if "'density'" in ln]) == 1, err
    assert "not used by method 'slerp'" in err and "did you mean" not in err
    rc, out = run(text, tmp_path)
    assert rc == 0 and out.is_dir()


def test_misspelled_parameter_still_an_error_without_self_suggestion(family, tmp_path, capsys):
    paths, _ = family
    text = yaml.safe_dump({"merge_method": "ties", "base_model": paths[0],
                           "models": [{"model": paths[1], "parameters": {"weight": 1, "densty": 0.5}}]})
    rc, _ = run(text, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2 and "densty: unknown parameter" in err and "did you mean 'density'" in err


@pytest.mark.parametrize("method", ["model_stock", "karcher"])
def test_weight_under_methods_without_weights(family, tmp_path, capsys, method):
    paths, _ = family
    text = yaml.safe_dump({"merge_method": method, "base_model": paths[0],
                           "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths[1:]]})
    rc, out = run(text, tmp_path)
    err = capsys.readouterr().err
    assert rc == 0 and out.is_dir(), err
    assert err.count("parameter 'weight' is not used") == 1, err


# ------------------------------------------------------------------ numbers written as strings

def test_scientific_notation_everywhere(family, tmp_path, capsys):
    paths, T = family
    # PyYAML (YAML 1.1) reads 5e-1, 1e-8, 1e-5 as strings
    assert yaml.safe_load("t: 5e-1")["t"] == "5e-1"
    text = (f"merge_method: slerp\nbase_model: {paths[0]}\nmodels:\n  - model: {paths[1]}\n"
            f"parameters:\n  t: 5e-1\ndtype: float32\n")
    rc, out = run(text, tmp_path, name="s1")
    assert rc == 0, capsys.readouterr().err
    text_ref = text.replace("5e-1", "0.5")
    rc, out_ref = run(text_ref, tmp_path, name="s2")
    a, b = load_folder(str(out)), load_folder(str(out_ref))
    assert all(torch.equal(a[n], b[n]) for n in a)
    for method, params in (("multislerp", "  eps: 1e-8\n"), ("karcher", "  tol: 1e-5\n  max_iter: 1e1\n")):
        w = "    parameters: {weight: 5e-1}\n" if method == "multislerp" else ""
        text = (f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n"
                + "".join(f"  - model: {p}\n{w}" for p in paths[1:]) + f"parameters:\n{params}")
        rc, out = run(text, tmp_path, "--dry-run", name=method)
        assert rc == 0, capsys.readouterr().err
    text = (f"merge_method: ties\nbase_model: {paths[0]}\nmodels:\n  - model: {paths[1]}\n"
            f"    parameters: {{weight: 1e0, density: [2e-1, 8e-1]}}\n")
    rc, _ = run(text, tmp_path, "--dry-run", name="t")
    assert rc == 0, capsys.readouterr().err
    assert as_number("1e9") == 10**9 and as_number("5e-1") == 0.5 and as_number("abc") == "abc"


def test_non_numeric_string_still_refused(family, tmp_path, capsys):
    paths, _ = family
    text = f"merge_method: slerp\nbase_model: {paths[0]}\nmodels:\n  - model: {paths[1]}\nparameters:\n  t: half\n"
    rc, _ = run(text, tmp_path, "--dry-run")
    assert rc == 2 and "parameters.t: must be a number, got 'half'" in capsys.readouterr().err


# ------------------------------------------------------------------ multi-document and moe configs

def test_multi_document_to_parse_config_names_the_stages(family):
    paths, _ = family
    one = {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1}} for p in paths[:2]]}
    text = "name: first\n" + yaml.safe_dump(one) + "---\nname: second\n" + yaml.safe_dump(one)
    with pytest.raises(MergeConfigErrors) as ei:
        parse_config(text)   # one config; lfm-engine merge runs the stages (test_mergekit_parity)
    msg = str(ei.value)
    assert "2 YAML documents" in msg and "first, second" in msg and "multi-stage" in msg


def test_mergekit_moe_config_recognised(family, tmp_path, capsys):
    paths, _ = family
    text = yaml.safe_dump({"base_model": paths[0], "gate_mode": "hidden", "dtype": "bfloat16",
                           "experts": [{"source_model": paths[1], "positive_prompts": ["code"]}]})
    rc, _ = run(text, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2 and "mergekit-moe config" in err and "gate_mode" in err
    assert "did you mean" not in err


# ------------------------------------------------------------------ hostile configs (issue 20)

def test_huge_layer_range_is_an_error_not_a_spin(family, tmp_path, capsys):
    paths, _ = family
    for lr in ("[0, 1000000000]", "[0, 1e9]"):
        text = "merge_method: linear\n" + (
            f"slices:\n  - sources:\n      - model: {paths[1]}\n        layer_range: {lr}\n"
            f"        parameters: {{weight: 1}}\n")
        t0 = time.monotonic()
        rc, out = run(text, tmp_path, "--dry-run")
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < 20
        assert rc == 2 and "beyond the 3 layers" in err, err


def test_alias_bomb_refused_with_bounded_memory(tmp_path, capsys):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    # 9^10 strings once expanded; anchors precede their aliases
    bomb = "\n".join(lines) + "\nmerge_method: linear\nmodels: *a9\n"
    assert len(bomb) < 1000
    tracemalloc.start()
    rc, _ = run(bomb, tmp_path, "--dry-run")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = capsys.readouterr().err
    assert rc == 2 and "alias bomb" in err, err
    assert peak < 50 << 20


def test_recursive_and_deep_yaml_refused():
    with pytest.raises(YamlLimitError, match="recursive"):
        load_documents("a: &x [1, *x]\n")
    with pytest.raises(YamlLimitError, match="nested"):
        load_documents("a: " + "[" * 100 + "]" * 100 + "\n")
    # ordinary anchors (a shared parameter block) still work
    docs = load_documents("p: &p {weight: 0.5}\nq: *p\n")
    assert docs == [{"p": {"weight": 0.5}, "q": {"weight": 0.5}}]


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: 3\nmodels: [x]\n", "base_model: expected a model folder path"),
    ("merge_method: ties\nmodels: {a: 1}\n", "models: must be a non-empty list"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: x, layer_range: [3, 1]}\n",
     "layer_range: must be [start, end)"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: x, layer_range: [a, b]}\n",
     "layer_range: must be [start, end)"),
    ("merge_method: [ties]\nmodels: [x]\n", "merge_method: unknown method"),
    ("merge_method: linear\nmodels: [x]\ndtype: 12\n", "dtype: unknown dtype"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("merge_method: ties\n  bad: indent\n", "invalid YAML"),
])
def test_bad_values_are_clear_errors(tmp_path, capsys, text, message):
    rc, _ = run(text, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_parse_config_reports_everything_at_once(family):
    paths, _ = family
    cfg = {"merge_method": "ties", "base_model": paths[0], "modelz": 1,
           "models": [{"model": paths[1], "parameters": {"densty": 1, "weight": 1}},
                      {"model": paths[2]}]}
    with pytest.raises(MergeConfigErrors) as ei:
        parse_config(cfg)
    msgs = "\n".join(ei.value.errors)
    assert "modelz: unknown key" in msgs and "densty" in msgs and "models[1].parameters.weight: missing" in msgs


def test_int8_mask_accepted_with_a_note(family, tmp_path, capsys):
    paths, _ = family
    text = yaml.safe_dump({"merge_method": "ties", "base_model": paths[0], "parameters": {"int8_mask": True},
                           "models": [{"model": paths[1], "parameters": {"weight": 1, "density": 0.5}}]})
    rc, _ = run(text, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 0 and err.count("int8_mask (given in parameters.int8_mask) has no effect") == 1, err


def test_fuzzed_configs_give_config_errors_only(family):
    """Seeded fuzzer: random mixes of mergekit keys and hostile values never raise
    anything but MergeConfigErrors (no traceback, hang or huge allocation)."""
    import random
    paths, _ = family
    rnd = random.Random(1234)
    values = [None, 0, -1, 1e9, "1e9", "5e-1", float("nan"), float("inf"), True, "", "x", [], {}, [[]], [{}],
              {"a": 1}, [1, "a"], [0, 10**12], paths[0], paths[1] + "+" + paths[2], "org/x@",
              [{"filter": 3, "value": "z"}], [{"value": []}], {"value": {"value": 1}}, "a" * 300]
    keys = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name", "gate_mode"]
    methods = ["ties", "slerp", "karcher", "passthrough", "sce", "nearswap", "linear", "bogus"]
    from lfm_engine.merge import merge_models
    from lfm_engine.io.model_folder import CheckpointError
    for i in range(200):
        cfg = {}
        for k in rnd.sample(keys, rnd.randint(1, len(keys))):
            cfg[k] = rnd.choice(values)
        cfg["merge_method"] = rnd.choice(methods + values)
        if rnd.random() < 0.6:
            cfg["models"] = [{"model": rnd.choice([paths[1], paths[2]] + values),
                              "parameters": {rnd.choice(["weight", "density", "t", "scale", "zz"]): rnd.choice(values)}}
                             for _ in range(rnd.randint(0, 3))]
        elif rnd.random() < 0.5:
            cfg["slices"] = [{"sources": [{"model": rnd.choice([paths[1]] + values),
                                           "layer_range": rnd.choice(values + [[0, 2], [1, 3]])}]}]
        try:
            parse_config(cfg)
        except MergeConfigErrors:
            pass
        if i % 4 == 0:  # the whole dry run too (planning, per-tensor parameter checks)
            try:
                merge_models(cfg, os.path.join(paths[0], "..", "never"), dry_run=True, quiet=True)
            except (MergeConfigErrors, CheckpointError):
                pass


@pytest.mark.parametrize("method, params, glob", [
    ("task_arithmetic", {"weight": 1.0}, {"lambda": 1e39}),
    ("linear", {"weight": 1e38}, {"normalize": False}),
    ("ties", {"weight": 1.0, "density": 0.5}, {"lambda": 1e39}),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameters_that_overflow_the_result_are_an_error(family, tmp_path, capsys, method, params, glob, dtype):
    """Finite inputs, parameters that push the fused kernels' result past the output dtype's
    range: an error naming the tensor and the parameters, no output folder (it exited 0 with
    Inf weights before)."""
    paths, _ = family
    cfg = {"merge_method": method, "dtype": dtype, "parameters": glob,
           "models": [{"model": p, "parameters": params} for p in paths[1:]]}
    if method != "linear":
        cfg["base_model"] = paths[0]
    rc, out = run(cfg, tmp_path)
    err = capsys.readouterr().err
    assert rc != 0 and "overflow" in err and "merge parameters" in err, err
    assert not out.exists()
