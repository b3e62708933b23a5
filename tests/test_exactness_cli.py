"""Exactness through `lfm-engine merge` (issue: the election differed between FMA and
non-FMA hosts on `lm_head.weight` of a small model): a bf16 model whose task vectors
cancel exactly under non-dyadic weights, merged at every SIMD level this host supports,
gives the same bits at every level, and for the deterministic methods the spec's float64
reading (backend="reference") tensor by tensor."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

import lfm_engine
from lfm_engine import merge_tensors
from lfm_engine.cli import main as cli_main

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import llama_config, llama_shapes, load_folder, write_model  # noqa: E402
from test_exactness import LEVELS, WEIGHTS, _bits, _grid_models  # noqa: E402

METHODS = {
    "ties": dict(density=0.6),
    "breadcrumbs_ties": dict(density=0.8, gamma=0.05),
    "dare_ties": dict(density=0.6),
    "della": dict(density=0.6, epsilon=0.1),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    cfg = llama_config(hidden=32, layers=1, intermediate=48, vocab=67)  # odd vocab: odd lm_head size
    tensors = [{}, {}, {}, {}]
    for i, (name, shape) in enumerate(llama_shapes(cfg).items()):
        # a zero base and the grid deltas as the models: a wrong elected sign moves an output
        # by a whole delta, far beyond the output's one rounding to bf16
        base, models = _grid_models(shape, torch.bfloat16, seed=i)
        deltas = [(m.double() - base.double()).to(torch.bfloat16) for m in models]
        for j, t in enumerate([torch.zeros(shape, dtype=torch.bfloat16)] + deltas):
            tensors[j][name] = t
    paths = [write_model(str(root / n), cfg, t) for n, t in zip(["base", "m1", "m2", "m3"], tensors)]
    return root, paths, tensors


@pytest.fixture(autouse=True)
def _restore_level():
    yield
    lfm_engine.set_simd_level(None)


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_cli_same_bits_at_every_level_and_the_spec(family, tmp_path, method):
    root, paths, tensors = family
    cfg = {"merge_method": method, "base_model": paths[0], "dtype": "bfloat16",
           "models": [{"model": p, "parameters": dict(METHODS[method], weight=w)}
                      for p, w in zip(paths[1:], WEIGHTS)]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    outs = {}
    for level in LEVELS:
        lfm_engine.set_simd_level(level)
        out = tmp_path / f"out_{level}"
        assert cli_main(["merge", str(tmp_path / "c.yml"), str(out), "--quiet"]) == 0
        outs[level] = load_folder(str(out))
    first = outs[LEVELS[0]]
    for level, got in outs.items():
        for name in first:
            assert torch.equal(_bits(got[name]), _bits(first[name])), f"{name}: {LEVELS[0]} vs {level}"
    if method in ("dare_ties", "della"):
        return  # random masks: the per-level identity above; kernel-level tests compare with the spec
    kw = dict(METHODS[method], weights=WEIGHTS)
    for name, got in first.items():
        ref = merge_tensors(tensors[0][name], [t[name] for t in tensors[1:]], method, backend="reference",
                            name=name, **kw)
        # one rounding of the output to bf16 (2^-8 relative); a flipped sign is off by ~100%
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-12, msg=name)


def test_the_model_really_cancels(family):
    """Exact float64 zeros of the weighted election sum, or the test above proves nothing."""
    _, _, tensors = family
    zeros = 0
    for name in tensors[0]:
        d = [t[name].double() for t in tensors[1:]]
        # where model 3's delta is trimmed (density < 1), the election sum is this pair's sum
        pair = WEIGHTS[0] * d[0] + WEIGHTS[1] * d[1]
        zeros += int(((pair == 0) & (d[0] != 0)).sum())
    assert zeros > 200
