"""The .lfmd container and whole-model compress / decompress (docs/spec/codec.md "Container").

An .lfmd file is a safetensors file (any safetensors reader opens it):
  tensors   `<param name>::<field>`, e.g. `model.layers.0.mlp.up_proj.weight::packed`;
  __metadata__ (string values):
    lfm.format  "lfmd/1"
    lfm.codecs  JSON map param -> {codec, shape, dtype, fields: [names], sha256, stats,
                <codec options: group_size, scale_dtype, rank, ...>}; codec is one of the
                codecs of reference/codec.py, or "raw" (field `value`: the fine-tuned
                tensor itself, stored as is) or "zero" (no fields: x == b bit for bit);
                stats = {rel_error, bits_per_param}; sha256 = SHA-256 over the param's
                field bytes in `fields` order (detects corrupted data).
    lfm.base    fingerprint of the base folder (lfm_engine.io.model_folder.ModelFolder.fingerprint).
    lfm.source  free-form JSON: tool version, model and base paths, creation time.
    lfm.layout  JSON map output file -> [param names]: the fine-tuned model's shard layout,
                so decompress writes the same files (and index) back.
    lfm.files   JSON map file name -> text of the model folder's small config files
                (config.json, generation_config.json, tokenizer_config.json, ... under 256 KiB).
    lfm.meta_sha256  SHA-256 of the other lfm.* values (see _meta_digest): a container whose
                metadata was altered after writing is refused.

Every file name in lfm.layout and lfm.files is checked before use (lfm_engine/io/names.py:
a bare name, no path, no '..', no control characters); lfm.layout must place every
tensor of lfm.codecs exactly once in .safetensors shards, and lfm.files may not name a
weight file or the index (docs/codecs.md "File names from metadata").

Decisions where the spec is silent:
- Which tensors are encoded: tensors with ndim >= 2 present in both folders with the
  same shape; everything else (norms, biases, tensors new in the fine-tune or with another
  shape) is stored raw. An override codec "raw" excludes a tensor.
- The delta is float32(x) - float32(b); the rebuilt tensor is round(b + decode(delta))
  in the fine-tune's dtype. A delta that is exactly zero is stored as "zero".
- Overrides are `filter=codec[:key=value,...]`, filter an fnmatch glob on the param name
  or `re:<regex>` (re.search); the first matching override wins.
- decompress writes into a temporary sibling folder and renames it to out_dir; an
  existing out_dir is an error unless overwrite=True. Non-weight files missing from the
  container (tokenizer.json, ...) are copied from the base folder.
- "masks" needs K fine-tunes at once and is not offered by compress_model (one model).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from lfm_engine.io import dtypes
from lfm_engine.io.model_folder import ModelFolder
from lfm_engine.io.safetensors import SafetensorsFile, SafetensorsFormatError, SafetensorsWriter, array_bytes
from lfm_engine.io.names import UnsafeNameError, check_file_name, path_inside
from lfm_engine.merge.outdir import sweep_stale
from lfm_engine.ops.codec import Encoded, decode_add, decode_delta, encode_delta
from lfm_engine.reference.codec import CODECS, CodecError

FORMAT = "lfmd/1"
SEP = "::"
SMALL_FILE_LIMIT = 256 << 10
META_DIGEST = "lfm.meta_sha256"
INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


class LfmdError(ValueError):
    """An .lfmd container is corrupt, truncated, of an unknown version, or inconsistent."""


class FingerprintMismatchError(LfmdError):
    """The base folder is not the base the container's deltas were made against."""


# ---------------------------------------------------------------------------
# codec specs and overrides


def parse_codec_spec(spec: str) -> tuple[str, dict]:
    """"int4" -> ("int4", {}); "lowrank:rank=16,factor_dtype=float32" -> ("lowrank", {...}).
    Values are parsed as int, then float, then true/false, else kept as strings."""
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if name not in CODECS + ("raw",):
        raise CodecError(f"unknown codec '{name}' (known: {', '.join(CODECS + ('raw',))})")
    opts = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq:
            raise CodecError(f"codec option '{part}' in '{spec}' is not key=value")
        opts[k.strip()] = _parse_value(v.strip())
    return name, opts


def _parse_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _match(filt: str, name: str) -> bool:
    if filt.startswith("re:"):
        return re.search(filt[3:], name) is not None
    return fnmatch.fnmatchcase(name, filt)


# ---------------------------------------------------------------------------
# report


@dataclass
class TensorStat:
    name: str
    codec: str
    shape: tuple
    dtype: str
    numel: int
    stored_bytes: int
    rel_error: float          # ||delta - delta_hat||_F / ||delta||_F (0 for raw/zero)
    delta_sq: float           # ||delta||_F^2 (for the total)
    err_sq: float             # ||delta - delta_hat||_F^2

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.stored_bytes / self.numel if self.numel else 0.0

    @property
    def ratio(self) -> float:
        orig = self.numel * 8 * dtypes.from_name(self.dtype).itemsize if self.numel else 0
        return orig / (8.0 * self.stored_bytes) if self.stored_bytes else float("inf")


@dataclass
class CompressReport:
    path: str
    tensors: list = field(default_factory=list)
    file_bytes: int = 0

    def totals(self, encoded_only: bool = False) -> dict:
        ts = [t for t in self.tensors if not encoded_only or t.codec not in ("raw", "zero")]
        numel = sum(t.numel for t in ts)
        stored = sum(t.stored_bytes for t in ts)
        orig_bits = sum(t.numel * 8 * dtypes.from_name(t.dtype).itemsize for t in ts)
        dsq = sum(t.delta_sq for t in ts)
        esq = sum(t.err_sq for t in ts)
        return {"tensors": len(ts), "params": numel, "stored_bytes": stored,
                "bits_per_param": 8.0 * stored / numel if numel else 0.0,
                "ratio": orig_bits / (8.0 * stored) if stored else float("inf"),
                "rel_error": math.sqrt(esq / dsq) if dsq > 0 else 0.0}

    def table(self, max_rows: Optional[int] = None) -> str:
        lines = [f"{'tensor':<56} {'codec':<10} {'shape':<16} {'bits/param':>10} {'ratio':>8} {'rel.err':>9}"]
        rows = self.tensors if max_rows is None else self.tensors[:max_rows]
        for t in rows:
            shape = "x".join(map(str, t.shape)) or "scalar"
            lines.append(f"{t.name[-56:]:<56} {t.codec:<10} {shape:<16} {t.bits_per_param:10.3f} "
                         f"{t.ratio:7.2f}x {t.rel_error:9.4f}")
        if max_rows is not None and len(self.tensors) > max_rows:
            lines.append(f"... {len(self.tensors) - max_rows} more tensors")
        for label, enc in (("total (encoded tensors)", True), ("total (all tensors)", False)):
            s = self.totals(enc)
            lines.append(f"{label:<56} {'':<10} {s['params']:<16d} {s['bits_per_param']:10.3f} "
                         f"{s['ratio']:7.2f}x {s['rel_error']:9.4f}")
        lines.append(f"container: {self.path} ({self.file_bytes / 2**20:.2f} MiB)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"path": self.path, "file_bytes": self.file_bytes, "total": self.totals(False),
                "total_encoded": self.totals(True),
                "tensors": [dict(name=t.name, codec=t.codec, shape=list(t.shape), dtype=t.dtype, numel=t.numel,
                                 stored_bytes=t.stored_bytes, bits_per_param=t.bits_per_param, ratio=t.ratio,
                                 rel_error=t.rel_error) for t in self.tensors]}


# ---------------------------------------------------------------------------
# compress


def _field_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(array_bytes(t))
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """SHA-256 over the lfm.* metadata values except the digest itself, in key order."""
    h = hashlib.sha256()
    for k in sorted(meta):
        if k.startswith("lfm.") and k != META_DIGEST:
            h.update(k.encode("utf-8") + b"\0" + str(meta[k]).encode("utf-8") + b"\0")
    return h.hexdigest()


def _small_files(folder: Path) -> dict:
    out = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if (p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME
                and p.stat().st_size <= SMALL_FILE_LIMIT and p.suffix in (".json", ".txt", ".model", ".jinja", ".md")):
            try:
                out[p.name] = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return out


def compress_model(base_dir, model_dir, out_path, codec: str = "int4", *, group_size: Optional[int] = None,
                   overrides: Optional[dict] = None, options: Optional[dict] = None, n_threads: int = 0,
                   source: Optional[str] = None, progress=None, distill=None) -> CompressReport:
    """Encode every weight of `model_dir` as a delta against `base_dir` into an .lfmd file.

    Streams tensor by tensor (one base tensor, one fine-tuned tensor and one delta in
    memory at a time). Args:
        codec: default codec spec for matrices ("int4", "sign1", "lowrank:rank=32", ...).
        group_size: shorthand for the intN / sparse_int group size option.
        overrides: {filter: codec spec}, filter an fnmatch glob or "re:<regex>"; "raw" keeps
            the fine-tuned tensor as is. First match wins (dict order).
        options: extra options for the default codec.
        progress: optional callable(i, n, name).
        distill: optional compress.distill.DistillConfig: the scales of every sign1 entry are
            then trained BitDelta-style (signs frozen) to match the fine-tune's logits on the
            config's calibration texts (needs transformers and a model folder); the sign1
            entries are written after that step, with stats.distilled = {steps, lr, texts,
            loss_before, loss_after}.
    Returns a CompressReport (per-tensor and total bits/param, ratio vs the delta in the
    tensor's own dtype, relative error). The file is written to a temporary name and
    renamed when complete.
    """
    dname, dopts = parse_codec_spec(codec)
    if dname == "masks":
        raise CodecError("compress_model: the 'masks' codec encodes K fine-tunes at once; use encode_delta on a "
                         "stack of deltas")
    dopts.update(options or {})
    if group_size is not None and dname in ("int8", "int4", "int2", "nf4", "sparse_int"):
        dopts.setdefault("group_size", int(group_size))
    rules = []
    for filt, spec in (overrides or {}).items():
        name, o = parse_codec_spec(spec)
        if name == "masks":
            raise CodecError(f"override {filt}={spec}: 'masks' is not available per tensor")
        if group_size is not None and name in ("int8", "int4", "int2", "nf4", "sparse_int"):
            o.setdefault("group_size", int(group_size))
        rules.append((filt, name, o))
    out_path = Path(out_path)
    if distill is not None and not Path(model_dir).is_dir():
        raise ValueError("scale distillation runs the fine-tuned model: --model must be a model folder")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    codecs_meta = {}
    deferred = {}  # sign1 entries held back for the scale distillation: name -> (Encoded, entry)
    report = CompressReport(str(out_path))
    with ModelFolder(base_dir, accept_file=True) as base, ModelFolder(model_dir, accept_file=True) as model:
        fp = base.fingerprint()
        layout = model.layout()
        sweep_stale(out_path)  # .NAME.tmp-PID files of compress runs killed mid-write
        writer = SafetensorsWriter(out_path)
        try:
            names = model.names()
            for i, name in enumerate(names):
                if SEP in name:
                    raise LfmdError(f"tensor name '{name}' contains '{SEP}', which the container uses as separator")
                if progress:
                    progress(i, len(names), name)
                x = model.get(name)
                cname, copts = dname, dopts
                for filt, rn, ro in rules:
                    if _match(filt, name):
                        cname, copts = rn, ro
                        break
                b = None
                if name in base and base.info(name)[1] == tuple(x.shape) and x.dtype.is_floating_point:
                    b = base.get(name)
                if b is None or x.ndim < 2 or not b.dtype.is_floating_point:
                    cname = "raw"
                entry = {"shape": list(x.shape), "dtype": dtypes.of(x.dtype).name}
                delta_sq = err_sq = 0.0
                if (b is not None and b.dtype == x.dtype and x.numel() > 0
                        and torch.equal(x.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))):
                    entry.update(codec="zero", fields=[])
                    fields = {}
                elif cname == "raw":
                    entry.update(codec="raw", fields=["value"])
                    fields = {"value": x}
                else:
                    delta = x.to(torch.float32) - b.to(torch.float32)
                    if not bool(torch.isfinite(delta).all()):
                        raise CodecError(f"tensor '{name}': the delta holds NaN or Inf (check both checkpoints)")
                    enc = encode_delta(delta, cname, dtype=x.dtype, n_threads=n_threads, **copts)
                    if distill is not None and cname == "sign1":
                        entry.update(codec=cname, fields=list(enc.fields), **enc.options)
                        deferred[name] = (enc, entry)
                        del x, b, delta
                        continue
                    d_hat = decode_delta(enc, n_threads=n_threads)
                    delta_sq = float((delta.double() ** 2).sum())
                    err_sq = float(((delta - d_hat).double() ** 2).sum())
                    del d_hat, delta
                    fields = enc.fields
                    entry.update(codec=cname, fields=list(fields), **enc.options)
                _write_entry(writer, report, codecs_meta, name, entry, fields, x.numel(), delta_sq, err_sq)
                del x, b, fields
            if deferred:
                _distill_and_write(base, model, model_dir, deferred, distill, writer, report, codecs_meta,
                                   n_threads)
            from lfm_engine import __version__
            meta = {
                "lfm.format": FORMAT,
                "lfm.codecs": json.dumps(codecs_meta, separators=(",", ":")),
                "lfm.base": fp,
                "lfm.source": source if source is not None else json.dumps({
                    "tool": f"lfm_engine {__version__}", "model": str(model_dir), "base": str(base_dir),
                    "codec": codec, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **({"distill_scales": {"texts": len(distill.prompts), "chat": distill.chat, "steps": distill.steps,
                                           "lr": distill.lr}} if distill is not None else {})}),
                "lfm.layout": json.dumps(layout, separators=(",", ":")),
                "lfm.files": json.dumps(_small_files(Path(model_dir))),
            }
            meta[META_DIGEST] = _meta_digest(meta)
            writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
    report.file_bytes = out_path.stat().st_size
    return report


def _write_entry(writer, report, codecs_meta, name, entry, fields, numel, delta_sq, err_sq) -> None:
    """Add one tensor's fields to the container and its entry (sha256, stats) to the table."""
    for fname, t in fields.items():
        writer.add(f"{name}{SEP}{fname}", t)
    stored = sum(t.numel() * t.element_size() for t in fields.values())
    rel = math.sqrt(err_sq / delta_sq) if delta_sq > 0 else (0.0 if err_sq == 0 else float("inf"))
    entry["sha256"] = _field_digest(list(fields.values()))
    entry.setdefault("stats", {}).update(rel_error=rel, bits_per_param=8.0 * stored / max(1, numel))
    codecs_meta[name] = entry
    report.tensors.append(TensorStat(name, entry["codec"], tuple(entry["shape"]), entry["dtype"], numel,
                                     stored, rel, delta_sq, err_sq))


def _distill_and_write(base, model, model_dir, deferred, cfg, writer, report, codecs_meta, n_threads) -> None:
    """Train the deferred sign1 entries' scales (compress/distill.py), then write them."""
    from lfm_engine.compress import distill as ds

    lm, tok = ds.load_causal_lm(model_dir)
    encs = {n: e for n, (e, _) in deferred.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = ds.lm_batches(ds.tokenize(tok, cfg), cfg.batch_size, pad)
    new, rep = ds.distill_sign1_scales(lm, {n: base.get(n) for n in encs}, encs, batches, cfg)
    del lm
    info = {"steps": cfg.steps, "lr": cfg.lr, "texts": len(cfg.prompts), "loss_before": rep.loss_before,
            "loss_after": rep.loss_after}
    for name, (_, entry) in deferred.items():
        x, b = model.get(name), base.get(name)
        delta = x.to(torch.float32) - b.to(torch.float32)
        d_hat = decode_delta(new[name], n_threads=n_threads)
        delta_sq = float((delta.double() ** 2).sum())
        err_sq = float(((delta - d_hat).double() ** 2).sum())
        entry["stats"] = {"distilled": info}
        _write_entry(writer, report, codecs_meta, name, entry, new[name].fields, x.numel(), delta_sq, err_sq)


# ---------------------------------------------------------------------------
# reading


@dataclass
class Container:
    """An opened .lfmd container (validated header); use as a context manager."""

    path: Path
    file: SafetensorsFile
    codecs: dict
    base_fingerprint: str
    source: str
    layout: dict
    files: dict

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def params(self) -> list:
        return list(self.codecs)

    def fields(self, name: str, verify: bool = True) -> dict:
        entry = self.codecs[name]
        out = {}
        for f in entry["fields"]:
            key = f"{name}{SEP}{f}"
            if key not in self.file:
                raise LfmdError(f"{self.path}: tensor '{key}' listed in lfm.codecs is missing")
            out[f] = self.file.get(key)
        if verify and _field_digest(list(out.values())) != entry.get("sha256"):
            raise LfmdError(f"{self.path}: corrupt data for '{name}' (SHA-256 of its fields does not match)")
        return out

    def encoded(self, name: str, verify: bool = True) -> Encoded:
        e = self.codecs[name]
        opts = {k: v for k, v in e.items() if k not in ("codec", "shape", "dtype", "fields", "sha256", "stats")}
        return Encoded(e["codec"], tuple(e["shape"]), dtypes.from_name(e["dtype"]).torch, self.fields(name, verify),
                       opts)


def open_container(path) -> Container:
    """Open and validate an .lfmd file: format version, codec table, tensor list."""
    path = Path(path)
    try:
        sf = SafetensorsFile(path)
    except SafetensorsFormatError as exc:
        raise LfmdError(f"not a readable .lfmd container: {exc}") from None
    try:
        meta = sf.metadata
        fmt = meta.get("lfm.format")
        if fmt is None:
            raise LfmdError(f"{path}: not an .lfmd container (no lfm.format in the safetensors metadata)")
        if fmt != FORMAT:
            raise LfmdError(f"{path}: unsupported .lfmd format version '{fmt}' (this lfm_engine reads {FORMAT})")
        try:
            codecs = json.loads(meta["lfm.codecs"])
            layout = json.loads(meta.get("lfm.layout", "{}"))
            files = json.loads(meta.get("lfm.files", "{}"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise LfmdError(f"{path}: corrupt lfm.codecs / lfm.layout metadata ({exc})") from None
        if META_DIGEST in meta and meta[META_DIGEST] != _meta_digest(meta):
            raise LfmdError(f"{path}: the container's metadata was altered after it was written "
                            f"({META_DIGEST} does not match)")
        if not isinstance(codecs, dict):
            raise LfmdError(f"{path}: corrupt lfm.codecs (not a JSON object)")
        known = set(CODECS) | {"raw", "zero"}
        for name, e in codecs.items():
            if not isinstance(e, dict) or not {"codec", "shape", "dtype", "fields"} <= set(e):
                raise LfmdError(f"{path}: corrupt lfm.codecs entry for '{name}'")
            if (not isinstance(e["codec"], str) or not isinstance(e["dtype"], str)
                    or not isinstance(e["shape"], list)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
                    or not isinstance(e["fields"], list) or not all(isinstance(f, str) for f in e["fields"])):
                raise LfmdError(f"{path}: corrupt lfm.codecs entry for '{name}' (codec and dtype must be names, "
                                "shape a list of sizes, fields a list of names)")
            try:
                dtypes.from_name(e["dtype"])
            except dtypes.UnknownDTypeError:
                raise LfmdError(f"{path}: lfm.codecs entry for '{name}' has unknown dtype '{e['dtype']}'") from None
            if e["codec"] not in known:
                raise LfmdError(f"{path}: '{name}' uses codec '{e['codec']}' which this lfm_engine does not know")
            if not isinstance(e.get("sha256"), str):
                raise LfmdError(f"{path}: lfm.codecs entry for '{name}' has no SHA-256 of its data")
        if "lfm.base" not in meta:
            raise LfmdError(f"{path}: no lfm.base fingerprint in the metadata")
        if "lfm.layout" not in meta:
            layout = {"model.safetensors": list(codecs)}  # one shard, as the fine-tune had
        try:
            _check_layout(layout, codecs, f"{path}: lfm.layout")
            _check_files(files, layout, f"{path}: lfm.files")
        except UnsafeNameError as exc:
            raise LfmdError(str(exc)) from None
        return Container(path, sf, codecs, meta["lfm.base"], meta.get("lfm.source", ""), layout, files)
    except BaseException:
        sf.close()
        raise


def _check_layout(layout, codecs: dict, where: str) -> None:
    """lfm.layout must be {shard.safetensors: [param, ...]} with bare shard names that place
    every param of lfm.codecs exactly once: decompress never publishes a folder that lacks
    weights the container holds."""
    if not isinstance(layout, dict) or not all(isinstance(v, list) for v in layout.values()):
        raise LfmdError(f"{where}: not a JSON object of shard name -> list of tensor names")
    if codecs and not layout:
        raise LfmdError(f"{where}: names no shard, but the container holds {len(codecs)} tensors")
    placed = {}
    for shard, names in layout.items():
        check_file_name(shard, where)
        if not shard.endswith(".safetensors"):
            raise LfmdError(f"{where}: shard '{shard}' is not a .safetensors file name")
        for n in names:
            if n not in codecs:
                raise LfmdError(f"{where}: shard '{shard}' lists '{n}' which lfm.codecs lacks")
            if n in placed:
                raise LfmdError(f"{where}: '{n}' is placed in two shards ('{placed[n]}' and '{shard}')")
            placed[n] = shard
    missing = [n for n in codecs if n not in placed]
    if missing:
        raise LfmdError(f"{where}: {len(missing)} tensors of lfm.codecs are in no shard (first: '{missing[0]}'); "
                        "decompressing would leave them out")


def _check_files(files, layout: dict, where: str) -> None:
    """lfm.files must be {bare file name: text}, never a weight file, the index or a shard."""
    if not isinstance(files, dict):
        raise LfmdError(f"{where}: not a JSON object of file name -> text")
    for fname, text in files.items():
        check_file_name(fname, where)
        if not isinstance(text, str):
            raise LfmdError(f"{where}: the content of '{fname}' is not text")
        if fname.endswith(WEIGHT_SUFFIXES) or fname == INDEX_NAME or fname in layout:
            raise LfmdError(f"{where}: '{fname}' would replace a weight file or the index; "
                            "only small config files may travel in lfm.files")


def inspect_container(path) -> dict:
    """Summary of a container: format, base fingerprint, source, per-param codec and stats."""
    with open_container(path) as c:
        total_numel = sum(math.prod(e["shape"]) for e in c.codecs.values())
        stored = 0
        rows = []
        for name, e in c.codecs.items():
            nb = 0
            for f in e["fields"]:
                key = f"{name}{SEP}{f}"
                nb += c.file.tensors[key].nbytes if key in c.file else 0
            stored += nb
            rows.append({"name": name, "codec": e["codec"], "shape": e["shape"], "dtype": e["dtype"],
                         "stored_bytes": nb, **e.get("stats", {})})
        return {"path": str(path), "format": FORMAT, "base": c.base_fingerprint, "source": c.source,
                "files": sorted(c.layout), "params": total_numel, "stored_bytes": stored,
                "bits_per_param": 8.0 * stored / total_numel if total_numel else 0.0,
                "file_bytes": path.stat().st_size if isinstance(path, Path) else Path(path).stat().st_size,
                "tensors": rows}


# ---------------------------------------------------------------------------
# decompress


def decompress_model(base_dir, path, out_dir, *, force: bool = False, overwrite: bool = False,
                     n_threads: int = 0, progress=None) -> Path:
    """Rebuild the fine-tuned model folder from `base_dir` and the container `path`.

    x_hat = round_to_dtype(b + decode(delta)) per tensor ("raw": the stored value; "zero":
    b). Streams tensor by tensor into the files of lfm.layout (with a
    model.safetensors.index.json when there are several), writes the config files kept in
    the container, copies other small non-weight files from the base folder, all into a
    temporary folder renamed to out_dir at the end.
    Raises FingerprintMismatchError if the base is not the one the container was made
    against (unless force=True), LfmdError for corrupt/truncated/unknown-version files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists (pass overwrite=True to replace it)")
    with open_container(path) as c, ModelFolder(base_dir, accept_file=True) as base:
        fp = base.fingerprint()
        if fp != c.base_fingerprint and not force:
            raise FingerprintMismatchError(
                f"{path} was made against a base with fingerprint {c.base_fingerprint}, but {base_dir} has {fp}; "
                "pass force=True (--force) to decode against this base anyway")
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        sweep_stale(out_dir)  # temporaries of decompress runs killed mid-write (merge/outdir.py)
        tmp.mkdir(parents=True)
        try:
            weight_map = {}
            total_size = 0
            done = 0
            for fname, names in c.layout.items():  # names checked by open_container
                plan = []
                for n in names:
                    e = c.codecs[n]
                    plan.append((n, dtypes.from_name(e["dtype"]).torch, tuple(e["shape"])))
                    weight_map[n] = fname
                writer = SafetensorsWriter(path_inside(tmp, fname, f"{path}: lfm.layout"), plan=plan,
                                      metadata={"format": "pt"})
                try:
                    for n, dt, shape in plan:
                        if progress:
                            progress(done, len(c.codecs), n)
                        done += 1
                        e = c.codecs[n]
                        if e["codec"] == "raw":
                            v = c.fields(n)["value"]
                            if v.dtype != dt or tuple(v.shape) != shape:
                                raise LfmdError(f"{path}: raw value of '{n}' is {v.dtype} {tuple(v.shape)}, "
                                                f"metadata says {dt} {shape}")
                        else:
                            if n not in base or base.info(n)[1] != shape:
                                raise LfmdError(f"'{n}' needs a base tensor of shape {shape}, which {base_dir} "
                                                "lacks" + (" (forced past a fingerprint mismatch)" if force else ""))
                            b = base.get(n)
                            if e["codec"] == "zero":
                                c.fields(n)  # checks the entry's SHA-256 (of no fields) too
                                v = b.to(dt)
                            else:
                                enc = c.encoded(n)
                                try:
                                    v = decode_add(enc, b, out_dtype=dt, n_threads=n_threads)
                                except (CodecError, KeyError) as exc:
                                    raise LfmdError(f"{path}: cannot decode '{n}': {exc}") from None
                        writer.add(n, v)
                        total_size += v.numel() * v.element_size()
                    writer.finish()
                except BaseException:
                    writer.abort()
                    raise
            if len(c.layout) > 1:
                (tmp / INDEX_NAME).write_text(json.dumps(
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
            for fname, text in c.files.items():  # bare, non-weight names (open_container)
                Path(path_inside(tmp, fname, f"{path}: lfm.files")).write_text(text, encoding="utf-8")
            bdir = Path(base_dir)
            if bdir.is_dir():
                for p in bdir.iterdir():
                    if (p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INDEX_NAME
                            and not (tmp / p.name).exists()):
                        shutil.copy2(p, tmp / p.name)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir
