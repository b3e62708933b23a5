"""Crafted containers and index files never write, read or replace files outside their
folder (issue: a .lfmd whose lfm.layout named '../x' or '/abs' was written there).

Each case goes through the public CLI (`lfm-engine decompress` / `merge`) and the API:
a clear error naming the entry and a non-zero exit, the parent folder unchanged, and no
output folder (or temporary) left behind."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lfm_engine.cli import main as cli_main
from lfm_engine.compress import LfmdError, compress_model, decompress_model
from lfm_engine.compress.lfmd import META_DIGEST, _meta_digest
from lfm_engine.io.names import UnsafeNameError, check_file_name, path_inside

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]


@pytest.fixture
def container(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {NAMES[0]: torch.randn(32, 16, generator=g), NAMES[1]: torch.randn(16, 32, generator=g),
            NAMES[2]: torch.ones(16)}
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, t in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "work" / "m.lfmd"
    compress_model(tmp_path / "base", tmp_path / "ft", out, codec="int8")
    return tmp_path, out


def _metadata(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"]


def _craft(path: Path, dst: Path, redigest: bool = True, **changes) -> Path:
    """Copy `path` to `dst` with metadata changed; with redigest the attacker also
    recomputes lfm.meta_sha256 (the digest detects corruption, not malice)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    meta.update({k.replace("_", "."): v for k, v in changes.items()})
    if redigest:
        meta[META_DIGEST] = _meta_digest(meta)
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return dst


def _listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _decompress_refused(tmp_path, bad: Path, match: str, capsys):
    """The CLI and the API both refuse `bad`; nothing appears outside or in the output."""
    before = _listing(tmp_path)
    out = tmp_path / "work" / "out"
    rc = cli_main(["decompress", "--base", str(tmp_path / "base"), str(bad), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err
    with pytest.raises(LfmdError, match=match.replace("(", r"\(").replace(")", r"\)")):
        decompress_model(tmp_path / "base", bad, out)
    assert _listing(tmp_path) == before  # no file written anywhere under the test root
    assert not out.exists() and not list((tmp_path / "work").glob(".out.tmp-*"))
    return err


def _layout_with(name: str) -> str:
    return json.dumps({name: NAMES})


@pytest.mark.parametrize("shard, match", [
    ("/tmp/lfm_owned.safetensors", "is a path"),
    ("../x.safetensors", "is a path"),
    ("a/../../x.safetensors", "is a path"),
    ("..", "names a folder"),
    ("x\0.safetensors", "control character"),
    ("x\n.safetensors", "control character"),
    ("config.json", "is not a .safetensors file name"),
])
def test_layout_names_are_bare_shard_names(container, shard, match, capsys):
    tmp_path, good = container
    bad = _craft(good, tmp_path / "work" / "bad.lfmd", lfm_layout=_layout_with(shard))
    _decompress_refused(tmp_path, bad, match, capsys)
    assert not Path("/tmp/lfm_owned.safetensors").exists()


def test_layout_must_place_every_tensor(container, capsys):
    tmp_path, good = container
    none = _craft(good, tmp_path / "work" / "none.lfmd", lfm_layout="{}")
    _decompress_refused(tmp_path, none, "names no shard", capsys)
    empty = _craft(good, tmp_path / "work" / "empty.lfmd", lfm_layout=json.dumps({"model.safetensors": []}))
    _decompress_refused(tmp_path, empty, "3 tensors of lfm.codecs are in no shard", capsys)
    part = _craft(good, tmp_path / "work" / "part.lfmd", lfm_layout=json.dumps({"model.safetensors": NAMES[:2]}))
    _decompress_refused(tmp_path, part, "1 tensors of lfm.codecs are in no shard", capsys)
    twice = _craft(good, tmp_path / "work" / "twice.lfmd",
                   lfm_layout=json.dumps({"a.safetensors": NAMES, "b.safetensors": NAMES[:1]}))
    _decompress_refused(tmp_path, twice, "placed in two shards", capsys)
    wrong_type = _craft(good, tmp_path / "work" / "wt.lfmd", lfm_layout=json.dumps(["model.safetensors"]))
    _decompress_refused(tmp_path, wrong_type, "not a JSON object", capsys)


@pytest.mark.parametrize("fname, match", [
    ("model.safetensors", "would replace a weight file"),
    ("model.safetensors.index.json", "would replace a weight file"),
    ("pytorch_model.bin", "would replace a weight file"),
    ("../config.json", "is a path"),
    ("/etc/lfm_owned", "is a path"),
    ("tok\nenizer.json", "control character"),
])
def test_files_cannot_replace_weights_or_escape(container, fname, match, capsys):
    tmp_path, good = container
    bad = _craft(good, tmp_path / "work" / "bad.lfmd", lfm_files=json.dumps({fname: "not weights"}))
    _decompress_refused(tmp_path, bad, match, capsys)


def test_files_content_must_be_text(container, capsys):
    tmp_path, good = container
    bad = _craft(good, tmp_path / "work" / "bad.lfmd", lfm_files=json.dumps({"config.json": {"a": 1}}))
    _decompress_refused(tmp_path, bad, "is not text", capsys)


def test_altered_metadata_fails_the_integrity_check(container, capsys):
    tmp_path, good = container
    assert _metadata(good)[META_DIGEST] == _meta_digest(_metadata(good))
    bad = _craft(good, tmp_path / "work" / "bad.lfmd", redigest=False,
                 lfm_files=json.dumps({"config.json": '{"model_type": "evil"}'}))
    _decompress_refused(tmp_path, bad, "metadata was altered", capsys)


def test_symlinked_output_parent_stays_inside(container, tmp_path):
    root, good = container
    real = root / "real_parent"
    real.mkdir()
    (root / "link_parent").symlink_to(real, target_is_directory=True)
    out = decompress_model(root / "base", good, root / "link_parent" / "out")
    assert sorted(p.name for p in (real / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in real.iterdir()) == ["out"]  # no temporary left beside it
    assert out == root / "link_parent" / "out"


def test_index_shard_names_are_checked(tmp_path, capsys):
    """An input index pointing at '../x' is refused before anything is opened."""
    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(m / "model-00001-of-00001.safetensors"))
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(outside))
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\n")
    rc = cli_main(["merge", str(cfg), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and "'../outside.safetensors' is a path" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_name_rule_unit():
    assert check_file_name("tokenizer.json", "t") == "tokenizer.json"
    assert check_file_name(".gitattributes", "t") == ".gitattributes"  # hidden files are plain names
    for bad in ["", "a/b", "a\\b", "/x", ".", "..", "a\x7f", "x" * 256, 3, None]:
        with pytest.raises(UnsafeNameError):
            check_file_name(bad, "t")


def test_path_inside_refuses_links_out(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "out").symlink_to(tmp_path)
    (tmp_path / "d" / "ok").write_text("x")
    assert path_inside(tmp_path / "d", "ok", "t") == os.path.join(tmp_path / "d", "ok")
    with pytest.raises(UnsafeNameError, match="leads out"):
        path_inside(tmp_path / "d", "out", "t")
