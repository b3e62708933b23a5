""".lfmd container and whole-model compress / decompress: round trips (single-file and
sharded folders), raw/zero tensors, overrides, safetensors compatibility, fingerprint,
version, corruption and truncation errors, CLI."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lfm_engine.cli.compress import main as cli_main
from lfm_engine.cli.compress import register
from lfm_engine.compress import (
    FORMAT, FingerprintMismatchError, LfmdError, compress_model, decompress_model, inspect_container, open_container,
    parse_codec_spec,
)
from lfm_engine.ops.codec import decode_add
from lfm_engine.reference.codec import CodecError


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(40, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(64, dtype=torch.float32),
    }


def _finetune(base, seed=1):
    g = torch.Generator().manual_seed(seed)
    ft = {}
    for k, v in base.items():
        ft[k] = (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype)
    ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"].clone()  # frozen: a zero delta
    ft["lm_head.weight"] = torch.randn(40, 64, generator=g).to(torch.bfloat16)   # new in the fine-tune
    return ft


def _write(folder: Path, tensors: dict, shards: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    wm = {}
    per = (len(names) + shards - 1) // shards
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.fixture
def models(tmp_path):
    base = _tensors()
    ft = _finetune(base)
    _write(tmp_path / "base", base)
    _write(tmp_path / "ft", ft, shards=2)
    (tmp_path / "base" / "config.json").write_text('{"model_type": "base"}')
    (tmp_path / "base" / "tokenizer.json").write_text('{"tok": 1}')
    (tmp_path / "ft" / "config.json").write_text('{"model_type": "ft"}')
    return tmp_path, base, ft


@pytest.mark.parametrize("codec", ["int4", "nf4", "sign1", "int8", "lowrank:rank=8", "ternary:density=0.2", "sparse_int",
                                   "lowrank:bands=float16:4+int8:8"])
def test_roundtrip(models, codec):
    root, base, ft = models
    out = root / "m.lfmd"
    rep = compress_model(root / "base", root / "ft", out, codec=codec, group_size=32)
    name = codec.split(":")[0]
    by = {t.name: t for t in rep.tensors}
    assert by["model.embed_tokens.weight"].codec == "zero"
    assert by["lm_head.weight"].codec == "raw"
    assert by["model.norm.weight"].codec == "raw"
    assert by["model.layers.0.mlp.up_proj.weight"].codec == name
    dec = decompress_model(root / "base", out, root / "rec")
    # the fine-tune's shard layout and index come back; config from the container, tokenizer from base
    assert (dec / "model.safetensors.index.json").is_file()
    assert json.loads((dec / "config.json").read_text())["model_type"] == "ft"
    assert (dec / "tokenizer.json").is_file()
    idx = json.loads((dec / "model.safetensors.index.json").read_text())["weight_map"]
    rec = {}
    for f in set(idx.values()):
        rec.update(load_file(str(dec / f)))
    assert set(rec) == set(ft)
    with open_container(out) as c:
        for k, x in ft.items():
            assert rec[k].dtype == x.dtype and rec[k].shape == x.shape
            if by[k].codec in ("raw", "zero"):
                assert torch.equal(rec[k], x)
            else:
                # exactly round(b + decode(delta)) in the fine-tune's dtype
                assert torch.equal(rec[k], decode_add(c.encoded(k), base[k], out_dtype=x.dtype))
                d = x.float() - base[k].float()
                err = float((rec[k].float() - x.float()).norm() / d.norm())
                assert err <= by[k].rel_error + 0.02  # + the final rounding to bf16/fp16
    tot = rep.totals(encoded_only=True)
    assert tot["rel_error"] <= max(t.rel_error for t in rep.tensors)
    assert "total (all tensors)" in rep.table()


def test_report_figures(models):
    root, base, ft = models
    rep = compress_model(root / "base", root / "ft", root / "s.lfmd", codec="sign1")
    t = {x.name: x for x in rep.tensors}["model.layers.0.mlp.up_proj.weight"]
    # 96 x 64: 2 uint32 words per row + one fp16 scale per row
    assert t.stored_bytes == 96 * 2 * 4 + 96 * 2
    assert t.bits_per_param == pytest.approx(8 * t.stored_bytes / (96 * 64))
    assert t.ratio == pytest.approx(16 / t.bits_per_param)
    d = ft[t.name].float() - base[t.name].float()
    assert t.rel_error == pytest.approx(0.6, abs=0.05)  # sign code of a Gaussian delta
    assert t.delta_sq == pytest.approx(float((d.double() ** 2).sum()), rel=1e-9)
    info = inspect_container(root / "s.lfmd")
    assert info["format"] == FORMAT and len(info["tensors"]) == len(ft)
    assert info["stored_bytes"] == sum(x.stored_bytes for x in rep.tensors)


def test_container_is_plain_safetensors(models):
    root, _, _ = models
    out = root / "m.lfmd"
    compress_model(root / "base", root / "ft", out, codec="int4", overrides={"*down_proj*": "int8"})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert meta["lfm.format"] == "lfmd/1"
        assert meta["lfm.base"].startswith("sha256:") and len(meta["lfm.base"]) == 7 + 64
        codecs = json.loads(meta["lfm.codecs"])
        assert codecs["model.layers.0.mlp.down_proj.weight"]["codec"] == "int8"
        assert codecs["model.layers.0.mlp.up_proj.weight"]["group_size"] == 128
        assert "model.layers.0.mlp.up_proj.weight::packed" in keys
        assert "model.layers.0.mlp.down_proj.weight::q" in keys
        assert "model.norm.weight::value" in keys
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight::scales").dtype == torch.float16
    assert not list(root.glob(".m.lfmd.tmp*"))


def test_overrides_and_specs(models):
    root, _, _ = models
    rep = compress_model(root / "base", root / "ft", root / "o.lfmd", codec="int2",
                         overrides={"re:self_attn": "lowrank:rank=4,factor_dtype=float32", "*up_proj*": "raw"})
    by = {t.name: t.codec for t in rep.tensors}
    assert by["model.layers.0.self_attn.q_proj.weight"] == "lowrank"
    assert by["model.layers.0.mlp.up_proj.weight"] == "raw"
    assert by["model.layers.0.mlp.down_proj.weight"] == "int2"
    assert parse_codec_spec("sparse_int:density=0.05,bits=4,method=dare") == (
        "sparse_int", {"density": 0.05, "bits": 4, "method": "dare"})
    with pytest.raises(CodecError, match="unknown codec"):
        parse_codec_spec("int3")
    with pytest.raises(CodecError, match="masks"):
        compress_model(root / "base", root / "ft", root / "x.lfmd", codec="masks")
    with pytest.raises(CodecError, match="unknown option"):
        compress_model(root / "base", root / "ft", root / "x.lfmd", codec="int4:rank=3")
    assert not (root / "x.lfmd").exists() and not list(root.glob(".x.lfmd.tmp*"))


def test_fingerprint_mismatch_and_force(models):
    root, base, ft = models
    out = root / "m.lfmd"
    compress_model(root / "base", root / "ft", out, codec="int8")
    other = dict(base)
    other["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"] + 1
    _write(root / "other", other)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        decompress_model(root / "other", out, root / "rec")
    assert not (root / "rec").exists()
    decompress_model(root / "other", out, root / "rec", force=True)
    assert (root / "rec" / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError):
        decompress_model(root / "base", out, root / "rec")
    decompress_model(root / "base", out, root / "rec", overwrite=True)
    # the same base written with other shards has the same fingerprint
    _write(root / "base2", base, shards=3)
    decompress_model(root / "base2", out, root / "rec2")


def _rewrite_metadata(path: Path, **changes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def test_unknown_version_and_foreign_files(models):
    root, _, _ = models
    out = root / "m.lfmd"
    compress_model(root / "base", root / "ft", out, codec="int4")
    v2 = root / "v2.lfmd"
    v2.write_bytes(out.read_bytes())
    _rewrite_metadata(v2, **{"lfm.format": "lfmd/2"})
    with pytest.raises(LfmdError, match="unsupported .lfmd format version 'lfmd/2'"):
        decompress_model(root / "base", v2, root / "rec")
    with pytest.raises(LfmdError, match="unsupported"):
        inspect_container(v2)
    plain = root / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(LfmdError, match="not an .lfmd container"):
        inspect_container(plain)
    bad_codec = root / "bc.lfmd"
    bad_codec.write_bytes(out.read_bytes())
    _rewrite_metadata(bad_codec, **{"lfm.codecs": "{not json"})
    with pytest.raises(LfmdError, match="corrupt lfm.codecs"):
        inspect_container(bad_codec)
    assert not (root / "rec").exists()


def test_truncated_and_corrupted(models):
    root, _, _ = models
    out = root / "m.lfmd"
    compress_model(root / "base", root / "ft", out, codec="int4")
    raw = out.read_bytes()
    for cut in (4, 100, len(raw) - 10):
        t = root / f"t{cut}.lfmd"
        t.write_bytes(raw[:cut])
        with pytest.raises(LfmdError, match="truncated"):
            decompress_model(root / "base", t, root / "rec")
    # a flipped byte in the tensor data: caught by the per-param SHA-256
    c = root / "c.lfmd"
    data = bytearray(raw)
    data[-5] ^= 0xFF
    c.write_bytes(bytes(data))
    with pytest.raises(LfmdError, match="corrupt data"):
        decompress_model(root / "base", c, root / "rec")
    # garbage in the header
    g = root / "g.lfmd"
    data = bytearray(raw)
    data[12:20] = b"\xff" * 8
    g.write_bytes(bytes(data))
    with pytest.raises(LfmdError, match="corrupt"):
        decompress_model(root / "base", g, root / "rec")
    assert not (root / "rec").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".rec")]


def test_missing_inputs(tmp_path, models):
    root, _, _ = models
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compress_model(tmp_path / "nope", root / "ft", tmp_path / "x.lfmd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        compress_model(root / "base", tmp_path / "empty", tmp_path / "x.lfmd")
    (root / "ft" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        compress_model(root / "base", root / "ft", tmp_path / "x.lfmd")


def test_cli(models, capsys):
    root, _, ft = models
    out = root / "cli.lfmd"
    rc = cli_main(["compress", "--base", str(root / "base"), "--model", str(root / "ft"), "--codec", "int4",
                   "--group-size", "32", "--override", "*down_proj*=sign1", "--json", str(root / "r.json"), str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "total (encoded tensors)" in text
    rep = json.loads((root / "r.json").read_text())
    assert {t["name"]: t["codec"] for t in rep["tensors"]}["model.layers.0.mlp.down_proj.weight"] == "sign1"
    assert cli_main(["inspect", str(out)]) == 0
    assert "lfmd/1" in capsys.readouterr().out
    assert cli_main(["decompress", "--base", str(root / "base"), str(out), str(root / "cli_rec")]) == 0
    assert (root / "cli_rec" / "model.safetensors.index.json").is_file()
    assert cli_main(["decompress", "--base", str(root / "ft"), str(out), str(root / "cli_rec2")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    import argparse

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["inspect", "--json", str(out)])
    assert a.func(a) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "lfmd/1"


def test_integer_buffers_are_copied_and_reported(tmp_path, capsys):
    """An int64 `position_ids` buffer is stored raw and the report counts its bits (the CLI
    printed a traceback after writing the file: torch.finfo of an integer dtype)."""
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(16, dtype=torch.int64)[None]
    base = {"w": torch.randn(32, 16, generator=g), "position_ids": pos, "mask": torch.ones(4, dtype=torch.bool)}
    ft = dict(base, w=base["w"] + 0.01 * torch.randn(32, 16, generator=g), position_ids=pos + 1)
    _write(tmp_path / "base", base)
    _write(tmp_path / "ft", ft)
    out = tmp_path / "m.lfmd"
    assert cli_main(["compress", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "ft"), "--codec",
                     "int8", str(out)]) == 0
    text = capsys.readouterr().out
    assert "position_ids" in text and "total (all tensors)" in text
    rep = {t["name"]: t for t in inspect_container(out)["tensors"]}
    assert rep["position_ids"]["codec"] == "raw" and rep["mask"]["codec"] == "raw"
    assert cli_main(["decompress", "--base", str(tmp_path / "base"), str(out), str(tmp_path / "rec")]) == 0
    rec = load_file(str(tmp_path / "rec" / "model.safetensors"))
    assert torch.equal(rec["position_ids"], pos + 1) and rec["position_ids"].dtype == torch.int64
    assert torch.equal(rec["mask"], base["mask"])
