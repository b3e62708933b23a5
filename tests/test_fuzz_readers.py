"""Seeded, bounded fuzzing of every file reader through the public CLI (issues: fuzzing
the readers gave tracebacks, hangs and huge allocations).

Each case mutates a valid file (truncation, byte flips in the header or the data, a lying
header length, lying offsets and shapes, values of the wrong JSON type) and runs the
command a user would: the command must return an exit status (never raise), and a status
other than 0 must be 2, a clear error, with no traceback. Exit 1 ("... failed:
SomeError") counts as a failure here: it means an input problem was not recognised as
one. The YAML config reader has its own fuzzer in test_merge_config.py.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lfm_engine.cli import main as cli_main
from lfm_engine.compress import compress_model
from lfm_engine.compress.lfmd import META_DIGEST, _meta_digest

CASES = 40  # per reader; each case is a few milliseconds to a few tens of milliseconds

WRONG_VALUES = [-1, 2 ** 63, 2 ** 64 + 5, "x", None, [], {}, 1.5, [0], [2 ** 40, 2 ** 40], True, [-3, 4], "F32",
                [1, 2, 3], {"a": 1}, 0]


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _mutate(raw: bytes, rnd: random.Random) -> bytes:
    """One random corruption of a safetensors-layout file."""
    kind = rnd.randrange(6)
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == 0:                                   # truncation
        return raw[:rnd.randrange(len(raw))]
    if kind == 1:                                   # byte flips in the header
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(8, 8 + n)] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if kind == 2:                                   # a lying header length
        return struct.pack("<Q", rnd.choice([0, 1, n - 1, n + 8, len(raw), 2 ** 63, 2 ** 64 - 1])) + raw[8:]
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    name = rnd.choice(names)
    if kind == 3:                                   # a field of the wrong type or a lying value
        field = rnd.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rnd.choice(WRONG_VALUES)
    elif kind == 4:                                 # a missing field, or an entry that is not an object
        if rnd.random() < 0.5:
            header[name].pop(rnd.choice(["dtype", "shape", "data_offsets"]))
        else:
            header[name] = rnd.choice(WRONG_VALUES)
    else:                                           # metadata of the wrong type, or data cut short
        if rnd.random() < 0.5:
            header["__metadata__"] = rnd.choice([{"format": 1}, ["pt"], "pt", {"a": None}])
        else:
            data = data[:rnd.randrange(len(data))]
    return _join(header, data)


def _retype(text: str, rnd: random.Random) -> str:
    """A JSON metadata value with one inner value replaced by one of the wrong type."""
    try:
        v = json.loads(text)
    except ValueError:
        return text
    node = v
    for _ in range(4):
        if not isinstance(node, (dict, list)) or not node:
            break
        k = rnd.choice(sorted(node)) if isinstance(node, dict) else rnd.randrange(len(node))
        if rnd.random() < 0.4 or not isinstance(node[k], (dict, list)):
            node[k] = rnd.choice(WRONG_VALUES)
            break
        node = node[k]
    return json.dumps(v)


def _clear(rc, capsys, case) -> None:
    err = capsys.readouterr().err
    assert rc in (0, 2), f"case {case}: exit {rc}: {err}"
    assert "Traceback" not in err, f"case {case}: {err}"
    if rc == 2:
        assert err.strip(), f"case {case}: exit 2 without a message"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.ones(16)}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    for name, t in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(t, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}')
    compress_model(root / "base", root / "ft", root / "good.lfmd", codec="int4", group_size=8)
    return root


def test_fuzzed_safetensors_through_merge_and_compress(models, tmp_path, capsys):
    rnd = random.Random(20)
    good = (models / "ft" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}')
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\nmodels:\n"
                   f"  - model: {bad}\n    parameters: {{weight: 0.5}}\n")
    for case in range(CASES):
        (bad / "model.safetensors").write_bytes(_mutate(good, rnd))
        out = tmp_path / f"m{case}"
        _clear(cli_main(["merge", str(cfg), str(out), "--quiet"]), capsys, case)
        _clear(cli_main(["compress", "--base", str(models / "base"), "--model", str(bad), "--quiet",
                         str(tmp_path / f"c{case}.lfmd")]), capsys, case)
    assert not list(tmp_path.glob(".*tmp-*"))  # nothing half-written left behind


def test_fuzzed_lfmd_through_inspect_and_decompress(models, tmp_path, capsys):
    rnd = random.Random(21)
    good = (models / "good.lfmd").read_bytes()
    bad = tmp_path / "bad.lfmd"
    for case in range(CASES):
        raw = _mutate(good, rnd)
        if rnd.random() < 0.4:  # wrong types inside the lfm.* metadata values
            try:
                header, data = _split(raw)
                meta = header["__metadata__"]
                key = rnd.choice(sorted(k for k in meta if k.startswith("lfm.")))
                meta[key] = rnd.choice(["", "{", "[]", "null", "1e999", json.dumps({"x": rnd.choice(WRONG_VALUES)}),
                                        json.dumps(rnd.choice(WRONG_VALUES)), _retype(meta[key], rnd)])
                if rnd.random() < 0.8:  # an attacker also recomputes the digest, so the checks behind it run
                    meta[META_DIGEST] = _meta_digest(meta)
                raw = _join(header, data)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error):
                pass  # the byte-level mutation already broke the header
        bad.write_bytes(raw)
        _clear(cli_main(["inspect", str(bad)]), capsys, case)
        out = tmp_path / f"d{case}"
        _clear(cli_main(["decompress", "--base", str(models / "base"), str(bad), str(out)]), capsys, case)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_fuzzed_peft_folders_through_model_plus_lora(models, tmp_path, capsys):
    """adapter_config.json values and adapter_model.safetensors bytes, through a
    model+lora reference (the merge planner's check reads both)."""
    from lfm_engine.merge.lora_merge import LoraAdapter, save_peft_adapter
    g = torch.Generator().manual_seed(1)
    ad = LoraAdapter({"model.layers.0.mlp.up_proj": (torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g))},
                     {"model.layers.0.mlp.up_proj": 0.5})
    src = tmp_path / "lora_good"
    save_peft_adapter(ad, str(src))
    good_cfg = json.loads((src / "adapter_config.json").read_text())
    good_st = (src / "adapter_model.safetensors").read_bytes()
    rnd = random.Random(22)
    lora = tmp_path / "lora"
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {models / 'base'}+{lora}\n"
                   f"    parameters: {{weight: 1.0}}\n")
    for case in range(CASES):
        shutil.rmtree(lora, ignore_errors=True)
        shutil.copytree(src, lora)
        if rnd.random() < 0.5:
            c = dict(good_cfg)
            key = rnd.choice(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type",
                              "modules_to_save", "fan_in_fan_out", "bias"])
            c[key] = rnd.choice(WRONG_VALUES + [float("nan"), float("inf"), {"up_proj": "x"}, {"(": 2}])
            (lora / "adapter_config.json").write_text(json.dumps(c) if rnd.random() < 0.9 else "{\"r\": ")
        else:
            (lora / "adapter_model.safetensors").write_bytes(_mutate(good_st, rnd))
        _clear(cli_main(["merge", str(cfg), str(tmp_path / f"m{case}"), "--quiet"]), capsys, case)
    assert not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("header", [
    '{"w":{"dtype":{},"shape":[4],"data_offsets":[0,16]}}',
    '{"w":{"dtype":["F32"],"shape":[4],"data_offsets":[0,16]}}',
    '{"w":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}}',
    '{"w":{"dtype":"F32","shape":[1e400],"data_offsets":[0,16]}}',
    pytest.param('{"w":' * 20000 + '1' + '}' * 20000, id="nested-20000"),
])
def test_header_values_json_allows_but_safetensors_does_not(models, tmp_path, capsys, header):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}')
    h = header.encode()
    h += b" " * ((-len(h)) % 8)
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {bad}\n    parameters: {{weight: 1.0}}\n")
    rc = cli_main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors" in err, err
    rc = cli_main(["compress", "--base", str(models / "base"), "--model", str(bad), str(tmp_path / "x.lfmd")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors" in err, err
