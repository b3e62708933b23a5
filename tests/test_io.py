"""lfm_engine.io: the one dtype table, safetensors reader/writer, model folder and PEFT reader,
and the torch-free `lfm-engine merge` path built on them."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from fixtures_models import llama_config, load_folder, make_family, random_weights, write_model  # noqa: E402

from lfm_engine.io import dtypes as D  # noqa: E402
from lfm_engine.io.model_folder import CheckpointError, ModelFolder  # noqa: E402
from lfm_engine.io.peft import AdapterFormatError, open_adapter  # noqa: E402
from lfm_engine.io.safetensors import (SafetensorsFile, SafetensorsFormatError, SafetensorsWriter,  # noqa: E402
                                       as_numpy, as_torch, map_array, read_array, read_tensor_infos)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- dtypes

def test_dtype_table_names_tags_codes():
    assert D.from_name("bf16") is D.BFLOAT16 and D.from_name("torch.float16") is D.FLOAT16
    assert D.from_tag("BF16") is D.BFLOAT16 and D.BFLOAT16.np == np.uint16 and D.BFLOAT16.code == 2
    assert D.of(torch.bfloat16) is D.BFLOAT16 and D.of(np.float32) is D.FLOAT32
    assert D.of(np.uint16) is D.BY_NAME["uint16"]  # raw bits are never guessed to be bf16
    with pytest.raises(ValueError, match="unknown dtype 'fp13'"):
        D.from_name("fp13")
    # every tag the header parser knows has a torch dtype of the same width
    for d in D.BY_TAG.values():
        assert torch.empty(0, dtype=d.torch).element_size() == d.itemsize


def test_convert_is_bit_identical_to_torch():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-8, 8, 20000),
                           [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, 3.5e38, 65520.0,
                            1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40]])
    floats = (D.FLOAT64, D.FLOAT32, D.FLOAT16, D.BFLOAT16)
    for src in floats:
        t = torch.from_numpy(vals).to(src.torch)
        for dst in floats:
            want, got = as_numpy(t.to(dst.torch)), D.convert(as_numpy(t), src, dst)
            # NaN stays NaN; its bits are not compared: torch's own cast writes 0xFFFF or
            # 0x7FC0 for a bf16 NaN depending on whether the vector or the scalar loop ran
            nan = np.isnan(vals)
            assert np.array_equal(want[~nan].view(np.uint8), got[~nan].view(np.uint8)), (src, dst)
            back = as_torch(np.ascontiguousarray(got), dst)
            assert bool(torch.isnan(back[torch.from_numpy(nan)]).all())


# ----------------------------------------------------------------------------- reader / writer

def test_reader_returns_raw_numpy_and_torch_views(tmp_path):
    x = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"x": x, "i": torch.arange(4)}, str(tmp_path / "a.safetensors"))
    with SafetensorsFile(tmp_path / "a.safetensors") as f:
        a = f.read("x")
        assert a.dtype == np.uint16 and a.shape == (5, 7)
        assert torch.equal(as_torch(a, D.BFLOAT16), x) and torch.equal(f.get("x"), x)
        assert f.read("i").tolist() == [0, 1, 2, 3]
        with pytest.raises(KeyError, match="no tensor named 'y'"):
            f.read("y")


def test_map_array_equals_read_array_and_checks_the_file_size(tmp_path):
    """The merge's default reader maps each tensor (copy-on-write, so writes never reach the
    file); a file shorter than its header says is a named error, not a fault on access."""
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.randn(33, 7).to(torch.bfloat16), "f": torch.randn(5000), "i": torch.arange(9),
               "e": torch.zeros(0, 4), "h": torch.randn(3).half()}, str(path))
    infos, _ = read_tensor_infos(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in infos.items():
            m, r = map_array(info, fd), read_array(info, fd)
            assert m.dtype == r.dtype and m.shape == r.shape and np.array_equal(m, r), name
        before = path.read_bytes()
        m = map_array(infos["f"], fd)
        m[:] = 0
        assert path.read_bytes() == before
    finally:
        os.close(fd)
    data = path.read_bytes()
    short = tmp_path / "short.safetensors"
    short.write_bytes(data[:-64])  # the header still names the last tensor's full extent
    last = max(infos.values(), key=lambda i: i.start + i.nbytes)
    fd = os.open(short, os.O_RDONLY)
    try:
        info = dataclasses.replace(last, file=str(short))
        with pytest.raises(SafetensorsFormatError, match="unexpected end of file"):
            map_array(info, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("planned", [True, False])
def test_writer_streams_to_a_temporary_name_and_renames(tmp_path, planned):
    x = torch.randn(3, 4).to(torch.bfloat16)
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "out.safetensors"
    plan = [("x", D.BFLOAT16, (3, 4)), ("y", np.float32, (2, 3))] if planned else None
    w = SafetensorsWriter(path, plan=plan, metadata={"format": "pt"})
    w.add("x", as_numpy(x), dtype=None if planned else D.BFLOAT16)  # raw bits: the plan names them
    assert not path.exists() and len(os.listdir(tmp_path)) == 1  # only the temporary file
    w.add("y", y)
    w.finish()
    assert os.listdir(tmp_path) == ["out.safetensors"]
    back = load_file(str(path))
    assert torch.equal(back["x"], x) and torch.equal(back["y"], torch.from_numpy(y))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and next(iter(json.loads(raw[8:8 + n]))) == "__metadata__"


def test_writer_checks_the_plan_and_abort_leaves_nothing(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", plan=[("x", "float32", (2,))])
    with pytest.raises(RuntimeError, match="expected 'x' float32 \\[2\\], got 'x' float16"):
        w.add("x", np.zeros(2, np.float16))
    w.abort()
    assert os.listdir(tmp_path) == []
    w = SafetensorsWriter(tmp_path / "o.safetensors", plan=[("x", "float32", (2,))])
    with pytest.raises(RuntimeError, match="only 0 of 1"):
        w.finish()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_model_folder_reads_a_file_or_a_folder_and_keeps_the_fingerprint(tmp_path):
    """The .lfmd base fingerprint is part of the file format: same value as before the merge
    of the two folder readers (computed then on this deterministic file)."""
    rng = np.random.default_rng(1234)
    path = tmp_path / "model.safetensors"
    save_numpy({"model.embed.weight": rng.standard_normal((33, 7)).astype(np.float32),
                "model.layers.0.w": rng.standard_normal((129,)).astype(np.float16),
                "model.pos": np.arange(10, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)},
               str(path), metadata={"format": "pt"})
    want = "sha256:c1fd00e1ff64530f674357ec9b0f0ddcc591afe89a9d873c8cce028ad3077edb"
    with ModelFolder(path, accept_file=True) as f:
        assert f.fingerprint() == want
    with ModelFolder(tmp_path) as f:
        assert f.fingerprint() == want and f.read("model.pos").tolist() == list(range(10))
    with pytest.raises(CheckpointError, match="is not a folder"):
        ModelFolder(path)
    with pytest.raises(CheckpointError, match="hub id"):
        ModelFolder("some-org/some-model")


def test_model_folder_refuses_shard_names_that_leave_the_folder(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="only a plain file name"):
        ModelFolder(tmp_path)


# ----------------------------------------------------------------------------- PEFT folders

def _adapter(folder, cfg: dict, tensors: dict):
    os.makedirs(folder, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    base.update(cfg)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(base, f)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    return str(folder)


def _ab(module, r, h=8):
    return {f"base_model.model.{module}.lora_A.weight": torch.randn(r, h),
            f"base_model.model.{module}.lora_B.weight": torch.randn(h, r)}


def test_rank_pattern_alternation_and_alpha_default(tmp_path):
    """The merge reader built the pattern regex without a group, so 'q_proj|v_proj' never
    matched a dotted name; PEFT (and the serve reader) group it. Absent lora_alpha is
    PEFT's default 8 (the merge reader used r)."""
    from lfm_engine.merge.lora_merge import load_peft_adapter

    t = {**_ab("model.layers.0.self_attn.q_proj", 2), **_ab("model.layers.0.self_attn.v_proj", 2),
         **_ab("model.layers.0.self_attn.o_proj", 4)}
    cfg = {"rank_pattern": {"q_proj|v_proj": 2}, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    d = _adapter(tmp_path / "a", cfg, t)
    spec = open_adapter(d)
    assert spec.modules["model.layers.0.self_attn.v_proj"].rank == 2
    assert spec.modules["model.layers.0.self_attn.o_proj"].rank == 4
    ad = load_peft_adapter(d)
    assert ad.scale("model.layers.0.self_attn.q_proj") == 8 / 2
    cfg2 = json.load(open(os.path.join(d, "adapter_config.json")))
    del cfg2["lora_alpha"]
    json.dump(cfg2, open(os.path.join(d, "adapter_config.json"), "w"))
    assert load_peft_adapter(d).scale("model.layers.0.self_attn.o_proj") == 8 / 4


@pytest.mark.parametrize("cfg, words", [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "lora_alpha of module"),
    ({"target_modules": [0]}, "target_modules must be a list of module names"),
])
def test_bad_adapter_config_values_are_named(tmp_path, cfg, words):
    """A NaN lora_alpha used to load and serve NaN logits; target_modules [0] escaped as a
    TypeError. Both are format errors naming the key."""
    d = _adapter(tmp_path / "a", cfg, _ab("model.layers.0.self_attn.q_proj", 4))
    with pytest.raises(AdapterFormatError, match=words):
        open_adapter(d)


def test_modules_to_save_never_dropped(tmp_path):
    """One reader, two policies: merge applies modules_to_save, serve refuses them; a tensor
    that is neither a LoRA factor nor a listed module is an error for both."""
    from lfm_engine.merge.lora_merge import load_peft_adapter
    from lfm_engine.serve import open_adapter as serve_open

    head = torch.randn(16, 8)
    t = {**_ab("model.layers.0.self_attn.q_proj", 4), "base_model.model.lm_head.weight": head}
    d = _adapter(tmp_path / "mts", {"modules_to_save": ["lm_head"]}, t)
    assert list(open_adapter(d).saved) == ["lm_head.weight"]
    assert torch.equal(load_peft_adapter(d).saved["lm_head.weight"], head)
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        serve_open(d)
    d2 = _adapter(tmp_path / "stray", {}, t)  # the head is not listed: refused, never skipped
    with pytest.raises(AdapterFormatError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        open_adapter(d2)
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        load_peft_adapter(d2)


def test_model_plus_lora_applies_modules_to_save(tmp_path):
    """`model+adapter` with modules_to_save: the saved tensor replaces the model's (cast to
    its dtype), the LoRA delta is added elsewhere, as PEFT's merge_and_unload does."""
    from lfm_engine.merge import merge_models

    cfg = llama_config(hidden=8, layers=1, intermediate=16, vocab=16, heads=2, kv_heads=1)
    w = random_weights(cfg, 0)
    model = write_model(str(tmp_path / "m"), cfg, w)
    q = "model.layers.0.self_attn.q_proj"
    t = {**_ab(q, 2), "base_model.model.lm_head.weight": torch.randn(16, 8, dtype=torch.float64)}
    ad = _adapter(tmp_path / "ad", {"modules_to_save": ["lm_head"], "r": 2, "lora_alpha": 4}, t)
    out = tmp_path / "out"
    merge_models({"merge_method": "linear", "models": [{"model": f"{model}+{ad}", "parameters": {"weight": 1.0}}]},
                 out, quiet=True)
    got = load_folder(str(out))
    assert torch.equal(got["lm_head.weight"], t["base_model.model.lm_head.weight"].float())
    delta = 2.0 * (t[f"base_model.model.{q}.lora_B.weight"] @ t[f"base_model.model.{q}.lora_A.weight"])
    assert torch.equal(got[f"{q}.weight"], w[f"{q}.weight"] + delta)
    # a saved tensor the model cannot take is refused before anything is written
    t["base_model.model.lm_head.weight"] = torch.randn(17, 8)
    ad2 = _adapter(tmp_path / "ad2", {"modules_to_save": ["lm_head"], "r": 2}, t)
    from lfm_engine.merge import MergeConfigErrors
    with pytest.raises(MergeConfigErrors, match="modules_to_save tensor 'lm_head.weight' is \\[17, 8\\]"):
        merge_models({"merge_method": "linear", "models": [{"model": f"{model}+{ad2}",
                                                            "parameters": {"weight": 1.0}}]},
                     tmp_path / "out2", quiet=True)


# ----------------------------------------------------------------------------- torch-free merge

_TORCH_IMPORT = re.compile(r"\|\s+torch(\.|$)", re.M)
_TRITON_IMPORT = re.compile(r"\|\s+triton(\.|$)", re.M)


def _run_cli(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "lfm_engine", *args],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stderr


def test_merge_help_does_not_import_torch(tmp_path):
    assert not _TORCH_IMPORT.search(_run_cli(["merge", "--help"], tmp_path))


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16fam")
    return make_family(str(root), 2, dtype=torch.bfloat16, shards=2, hidden=32, layers=2,
                       intermediate=48, vocab=64)


@pytest.mark.parametrize("method,extra", [("ties", {}), ("dare_ties", {}), ("della", {"epsilon": 0.1}),
                                          ("task_arithmetic", {})])
def test_cpu_merge_never_imports_torch_and_matches_the_torch_path(bf16_family, tmp_path, method, extra):
    from lfm_engine import merge_tensors

    paths = bf16_family
    params = [dict(weight=0.6, density=0.5, **extra), dict(weight=0.4, density=0.7, **extra)]
    if method == "task_arithmetic":
        params = [dict(weight=0.6), dict(weight=0.4)]
    cfg = {"merge_method": method, "base_model": paths[0], "out_dtype": "float16",
           "models": [{"model": p, "parameters": prm} for p, prm in zip(paths[1:], params)]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    log = _run_cli(["merge", "c.yml", "out", "--quiet", "--seed", "7", "--out-shard-size", "20KB"], tmp_path)
    assert not _TORCH_IMPORT.search(log), "lfm-engine merge imported torch on the CPU path"
    # nor Triton (probing it for the CUDA default cost 0.13 s of every merge)
    assert not _TRITON_IMPORT.search(log), "lfm-engine merge imported triton on the CPU path"
    got = load_folder(str(tmp_path / "out"))
    base, fts = load_folder(paths[0]), [load_folder(p) for p in paths[1:]]
    for n, b in base.items():
        kw = {k: [p[k] for p in params] for k in ("density", "epsilon") if k in params[0]}
        want = merge_tensors(b, [f[n] for f in fts], method, weights=[p["weight"] for p in params],
                             seed=7, name=n, out_dtype=torch.float16, **kw)
        assert torch.equal(got[n], want), n


def test_merge_arrays_takes_raw_bf16_and_every_backend():
    """merge_arrays (numpy buffers, bf16 as uint16) gives merge_tensors' bits; a non-native
    backend runs through torch."""
    from lfm_engine.ops.merge import merge_arrays, merge_tensors

    g = torch.Generator().manual_seed(3)
    b = torch.randn(64, 33, generator=g).to(torch.bfloat16)
    xs = [(b.float() + 0.01 * torch.randn(64, 33, generator=g)).to(torch.bfloat16) for _ in range(3)]
    kw = dict(weights=[0.5, 0.3, 0.2], density=0.4, seed=5, name="w")
    for backend in ("cpu", "reference"):
        want = merge_tensors(b, xs, "dare_ties", backend=backend, **kw)
        got = merge_arrays((as_numpy(b), "bfloat16"), [(as_numpy(x), D.BFLOAT16) for x in xs], "dare_ties",
                           out_dtype="bfloat16", backend=backend, **kw)
        assert got.dtype == np.uint16 and torch.equal(as_torch(got, D.BFLOAT16), want), backend
    with pytest.raises(ValueError, match="model 1 has shape"):
        merge_arrays((as_numpy(b), "bfloat16"), [(as_numpy(xs[0]), "bfloat16"), (np.zeros(3, np.float32), "float32")],
                     "ties", out_dtype="float32")


def test_peft_embedding_lora_layout_and_its_errors(tmp_path):
    """Embedding LoRA (lora_embedding_A [r, num], lora_embedding_B [dim, r], no .weight suffix)
    is read with embedding=True; a module mixing both layouts, a missing factor and a
    base_layer weight without LoRA are named."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from lfm_engine.io.peft import AdapterFormatError, open_adapter

    def folder(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
        save_file({k: np.ones(s, np.float32) for k, s in tensors.items()}, str(d / "adapter_model.safetensors"))
        return str(d)

    p = "base_model.model.model.embed_tokens."
    spec = open_adapter(folder("ok", {p + "lora_embedding_A": (2, 50), p + "lora_embedding_B": (8, 2),
                                      p + "base_layer.weight": (50, 8)}))
    m = spec.modules["model.embed_tokens"]
    assert m.embedding and (m.rank, m.in_features, m.out_features, m.scale) == (2, 50, 8, 2.0)
    assert "model.embed_tokens.weight" in spec.saved
    for name, tensors, msg in [
        ("mixed", {p + "lora_embedding_A": (2, 50), p + "lora_B.weight": (8, 2)}, "both Linear LoRA"),
        ("half", {p + "lora_embedding_A": (2, 50)}, "lacks its lora_embedding_B"),
        ("orphan", {p + "base_layer.weight": (50, 8), "base_model.model.q.lora_A.weight": (2, 8),
                    "base_model.model.q.lora_B.weight": (8, 2)}, "base_layer weight of a module that carries no LoRA"),
    ]:
        with pytest.raises(AdapterFormatError, match=msg):
            open_adapter(folder(name, tensors))


@pytest.mark.parametrize("in_dtype, out_dtype", [("bfloat16", "bfloat16"), ("float32", "float32"),
                                                 ("bfloat16", "float16"), ("float32", "bfloat16")])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_linear"])
def test_merge_arrays_counted_counts_the_overflow_it_writes(in_dtype, out_dtype, method):
    """The kernel counts the NaN/Inf it writes (the runner's overflow check, without a
    second sweep over the output): one-dtype inputs take the one-sweep path, mixed ones
    the blockwise path; both must count exactly what the output holds."""
    from lfm_engine.ops.merge import merge_arrays_counted

    g = torch.Generator().manual_seed(4)
    n = 5000
    b = torch.randn(n, generator=g)
    xs = [b + torch.randn(n, generator=g) for _ in range(2)]
    xs[0][::7] = b[::7] + 2e5  # past float16's range (even halved by TIES); within bfloat16's
    dt = D.of(in_dtype)
    arr = lambda t: as_numpy(t.to(dt.torch))  # noqa: E731
    kw = dict(density=0.5, seed=1, name="w", weights=[1.0, 1.0])
    for lam, overflow in ((1.0, out_dtype == "float16"), (1e39, True)):  # 1e39: inf in float32
        out, n_bad = merge_arrays_counted((arr(b), in_dtype), [(arr(x), in_dtype) for x in xs], method,
                                          out_dtype=out_dtype, lam=lam, **kw)
        held = int((~torch.isfinite(as_torch(out, D.of(out_dtype)).float())).sum())
        assert n_bad == held
        assert (held > 0) == overflow, (lam, held)
    out, n_bad = merge_arrays_counted((arr(b), in_dtype), [(arr(x), in_dtype) for x in xs], method,
                                      out_dtype=out_dtype, backend="reference", **kw)
    assert n_bad is None  # the torch-run backends do not count


def test_merge_read_modes_give_the_same_output_and_a_bad_mode_is_named(bf16_family, tmp_path):
    paths = bf16_family
    cfg = {"merge_method": "ties", "base_model": paths[0],
           "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.6}} for p in paths[1:]]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outs = {}
    for mode in ("mmap", "pread", "bogus"):
        p = subprocess.run([sys.executable, "-m", "lfm_engine", "merge", "c.yml", f"out_{mode}", "--quiet"],
                           capture_output=True, text=True, cwd=str(tmp_path), env=dict(env, LFM_MERGE_READ=mode))
        outs[mode] = p
    assert outs["mmap"].returncode == 0 and outs["pread"].returncode == 0, outs["mmap"].stderr + outs["pread"].stderr
    a, b = load_folder(str(tmp_path / "out_mmap")), load_folder(str(tmp_path / "out_pread"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert outs["bogus"].returncode != 0 and "LFM_MERGE_READ='bogus'" in outs["bogus"].stderr
    assert not (tmp_path / "out_bogus").exists()
