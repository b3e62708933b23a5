"""Shared by the merge-config and mergekit-parity tests: a model family fixture,
running `lfm-engine merge` on a config, and float64 readings of mergekit's methods."""
from __future__ import annotations

import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import load_folder, make_family  # noqa: E402

from lfm_engine.cli.merge import main as cli_main  # noqa: E402


def build_family(tmp_path_factory, name: str, n_finetunes: int):
    """(paths, tensors) of a base and n fine-tunes (Llama-shaped, 3 layers, fp32)."""
    root = tmp_path_factory.mktemp(name)
    paths = make_family(str(root), n_finetunes, hidden=32, layers=3, intermediate=48, vocab=96)
    return paths, [load_folder(p) for p in paths]


def run(cfg, tmp_path, *extra, name="c"):
    """`lfm-engine merge` on cfg (YAML text or a dict) -> (exit status, output folder)."""
    p = tmp_path / f"{name}.yml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / f"out_{name}"
    return cli_main(["merge", str(p), str(out), "--quiet", *extra]), out


def karcher64(xs, iters=10, tol=1e-5):
    """mergekit's karcher_merge_tensors read in float64 (alphas 1/K, no zero inputs)."""
    X = torch.stack([x.double().flatten() for x in xs])
    n = X.norm(dim=1)
    U = X / n[:, None]
    mu = U.mean(0)
    mu = mu / mu.norm()
    for _ in range(iters):
        c = (U @ mu).clamp(-1, 1)
        th = torch.acos(c)
        coef = torch.where(th < tol, torch.zeros_like(th), th / torch.sin(th)) / len(xs)
        g = (coef[:, None] * (U - c[:, None] * mu[None])).sum(0)
        if g.norm() < tol:
            break
        mu = torch.cos(g.norm()) * mu + torch.sin(g.norm()) * g / g.norm()
        mu = mu / mu.norm()
    return (n.mean() * mu).reshape(xs[0].shape)


def assert_same_logits(model_a, model_b, ids, rtol, atol):
    """Two transformers models give the same logits on token ids ``ids`` [1, T]."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model_a(ids).logits, model_b(ids).logits, rtol=rtol, atol=atol)
