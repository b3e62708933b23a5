"""Merged vocabularies: the output tokenizer and the embedding rows re-mapped to it.

When a config has a tokenizer section (``tokenizer_source:`` or ``tokenizer:``, parsed by
:mod:`.vocab_config`), the output vocabulary is built as mergekit 0.1.5 builds it and
every vocabulary tensor (``embed_tokens``, ``lm_head``, ``wte``, ... : axis 0 indexes
tokens) of every model is re-mapped to it before the merge method runs; all other
tensors stream unchanged. Definitions (docs/spec/merge.md "Tokenizer and vocabulary"):

* **Vocabularies.** A model's vocabulary is its tokenizer's ``get_vocab()`` (added tokens
  included) restricted to ids below its config's ``vocab_size`` (the rows it has).
* **Output vocabulary** (N tokens). ``base``: the base model's (the first model's without
  a base); ``<model>``: that model's tokenizer; ``union``: the base's, then every token of
  the other models it lacks, model by model in config order and, within a model, by id
  (an added token keeps its settings: special, normalized, ...). Tokens named in
  ``tokens:`` that are still missing are appended. Rows: R = N rounded up to
  ``pad_to_multiple_of``.
* **Permutation** of model m: ``P_m[j]`` = m's id of output token j, or −1.
* **Default row** ``d_j`` of token j, used for model m when ``P_m[j] = −1`` or the token's
  rule has ``force``; from its ``tokens:`` rule (a model's row of the same token, zero, or a
  model's row of another token ``model_token``), else automatically: the one model that has
  it; zero when none has it (warning); the base's row when the config has a ``base_model``
  that has it; else the mean of the rows of the models that have it.
* **Re-mapped matrix** of model m, [R, ...]: ``Y_m[j] = X_m[P_m[j]]`` when present and not
  forced, else ``d_j``; rows N..R−1 are the mean of ``Y_m[0:N]``. The merge method then
  runs on the ``Y_m`` like on any other tensor.

Defaults are computed in float64 and rounded once to each model's dtype; rows are copied
bit for bit. Peak memory of a vocabulary tensor: the K input matrices, their K re-mapped
copies and 4096 float64 default rows at a time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from lfm_engine.io import dtypes
from lfm_engine.merge.config import MergeConfigErrors
from lfm_engine.merge.vocab_config import TokenizerSpec

ZERO, MODEL, MODEL_TOKEN = "zero", "model", "model_token"
CHUNK = 4096   # default rows computed per step (bounds the float64 scratch)
INSTALL_HINT = "pip install 'lfm_engine[tokenizer]' (transformers)"


@dataclass
class Vocabulary:
    """The output vocabulary and how each model's rows map to it."""
    spec: TokenizerSpec
    size: int                                  # N tokens
    rows: int                                  # R = N padded to pad_to_multiple_of
    perms: Dict[str, np.ndarray]               # folder -> [N] int64, its row of each token or -1
    base_folder: Optional[str]                 # the config's base_model (None: no base rule)
    forced: np.ndarray                         # [N] bool
    explicit: Dict[int, Tuple[str, Optional[str], int]]   # token id -> (kind, folder, row)
    tokenizer: object = None                   # transformers tokenizer to save; None: copy files
    copy_from: Optional[str] = None            # folder whose tokenizer files are the output's
    warnings: List[str] = field(default_factory=list)
    summary: str = ""

    @property
    def identity(self) -> bool:
        """Every model's ids are the output ids and nothing is forced or padded."""
        ar = np.arange(self.size)
        return (self.rows == self.size and not self.forced.any()
                and all(np.array_equal(p, ar) for p in self.perms.values()))


@dataclass
class VocabTask:
    """The re-mapping of one vocabulary tensor: the inputs (with their folders) whose rows
    are permuted; ``extra`` are read only to compute default rows (mergekit adds the base
    to every tensor's inputs, also for methods that do not merge it)."""
    vocab: Vocabulary
    members: List[Tuple[tuple, str]]           # ((file, start), folder), base first
    infos: Dict[tuple, object]                 # (file, start) -> TensorInfo
    extra: List[object] = field(default_factory=list)


# ------------------------------------------------------------------ planning

def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _vocab_rows(folder) -> Optional[int]:
    cfg = folder.config or {}
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _strip(tok, limit: int) -> Optional[str]:
    """Drop the tokens with ids >= limit from a fast tokenizer (its model vocabulary, added
    tokens and BPE merges), as mergekit does for the base; an error text when impossible."""
    import tokenizers

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "it is not a fast tokenizer"
    d = json.loads(backend.to_str())
    model = d.get("model") or {}
    if not isinstance(model.get("vocab"), dict):
        return f"its model type {model.get('type')!r} has no token -> id table (BPE, WordLevel, WordPiece do)"
    drop = {t for t, i in model["vocab"].items() if i >= limit}
    drop |= {a["content"] for a in d.get("added_tokens", []) if a["id"] >= limit}
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < limit}
    d["added_tokens"] = [a for a in d.get("added_tokens", []) if a["id"] < limit]
    if "merges" in model:
        model["merges"] = [m for m in model["merges"]
                           if not set(m.split(" ") if isinstance(m, str) else m) & drop]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return None


def plan_vocabulary(cfg, plan) -> Optional[Vocabulary]:
    """The output vocabulary of ``cfg.tokenizer`` (None without one); every problem is
    raised together as MergeConfigErrors."""
    spec: Optional[TokenizerSpec] = cfg.tokenizer
    if spec is None:
        return None
    tf = _transformers()
    if tf is None:
        raise MergeConfigErrors([f"{spec.where}: building the merged vocabulary needs transformers "
                                 f"to read the tokenizers; {INSTALL_HINT}"])
    errors: List[str] = []
    base = plan.layout_path
    order = [base] + [p for p in plan.folders if p != base]
    refs = {p: fo.ref for p, fo in plan.folders.items()}
    toks, warns = _load_tokenizers(tf, spec, order, refs)
    limits = {}
    stripped = False
    base_rows = _vocab_rows(plan.folders[base]) or len(toks[base].get_vocab())
    if spec.source in ("union", "base") and max(toks[base].get_vocab().values()) >= base_rows:
        why = _strip(toks[base], base_rows)
        if why:
            raise MergeConfigErrors([f"{spec.where}: the tokenizer of the base model '{refs[base]}' "
                                     f"has ids beyond its {base_rows} embedding rows and cannot "
                                     f"be cut down: {why}"])
        stripped = True
    # each model's vocabulary, before the output tokenizer (one of these objects) grows
    vocabs = {p: (toks[p] or toks[base]).get_vocab() for p in order}
    for p in order:
        limits[p] = _vocab_rows(plan.folders[p]) or len(vocabs[p])
    out = toks[spec.source_path] if spec.is_model else toks[base]
    n_before = len(out.get_vocab())
    if spec.source == "union":
        out.add_tokens(_union_additions(order, toks, vocabs, limits))
    missing = [t for t in spec.tokens if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    vocab_out = out.get_vocab()
    n = len(vocab_out)
    if set(vocab_out.values()) != set(range(n)):
        raise MergeConfigErrors([f"{spec.where}: the output vocabulary's ids are not 0..{n - 1} "
                                 f"(the tokenizer has gaps); it cannot index embedding rows"])
    id_tok = sorted(vocab_out, key=vocab_out.get)
    perms = {}
    for p in order:
        mv = vocabs[p]
        perm = np.fromiter((mv.get(t, -1) for t in id_tok), dtype=np.int64, count=n)
        perm[perm >= limits[p]] = -1
        perms[p] = perm
    pad = spec.pad_to_multiple_of
    rows = -(-n // pad) * pad if pad else n
    changed = stripped or len(vocab_out) != n_before
    voc = Vocabulary(spec, n, rows, perms, cfg.base_path, np.zeros(n, dtype=bool), {},
                     tokenizer=out if changed else None,
                     copy_from=None if changed else (spec.source_path if spec.is_model else base))
    _compile_rules(voc, vocab_out, vocabs, limits, refs, errors)
    if errors:
        raise MergeConfigErrors(errors)
    present = np.stack([voc.perms[p] >= 0 for p in order]).any(axis=0)
    auto_none = [id_tok[j] for j in np.flatnonzero(~present) if int(j) not in voc.explicit]
    if auto_none:
        warns.append(f"{len(auto_none)} token(s) of the output vocabulary are in no model and get "
                     f"zero rows (first: {auto_none[0]!r}); give them a source under tokenizer.tokens")
    voc.warnings = warns
    n_base = int((perms[base] >= 0).sum())
    voc.summary = (f"vocabulary: {spec.source}, {n} tokens ({n - n_base} not in the base's), "
                   f"{rows} embedding rows" + (f" (padded to a multiple of {pad})" if rows != n else ""))
    return voc


def _load_tokenizers(tf, spec: TokenizerSpec, order: List[str], refs) -> Tuple[dict, List[str]]:
    """{folder: tokenizer or None} of the models (base first) and of a `tokenizer_source`
    model, and the warnings; a base or source tokenizer that does not load is an error."""
    toks, errors, warns = {}, [], []
    for p in order + ([spec.source_path] if spec.is_model and spec.source_path not in order else []):
        try:
            toks[p] = tf.AutoTokenizer.from_pretrained(p, use_fast=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types; the message names the cause
            toks[p] = None
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if p == order[0] or p == spec.source_path:
                who = "the base model" if p == order[0] else spec.where
                errors.append(f"{spec.where}: cannot load the tokenizer of {who} "
                              f"'{refs.get(p, spec.source)}': {why}")
            else:
                warns.append(f"{spec.where}: cannot load the tokenizer of '{refs[p]}' ({why}); its "
                             f"token ids are assumed to be the base's (as mergekit)")
    if errors:
        raise MergeConfigErrors(errors)
    return toks, warns


def _union_additions(order, toks, vocabs, limits) -> list:
    """The tokens the other models add to the base's vocabulary, in config order and, within
    a model, by id; added tokens keep their settings (special, normalized, ...)."""
    have = set(vocabs[order[0]])
    new = []
    for p in order[1:]:
        tk = toks[p]
        if tk is None:
            continue
        added = tk.added_tokens_decoder
        for t, i in sorted(vocabs[p].items(), key=lambda kv: kv[1]):
            if i >= limits[p] or t in have:
                continue
            a = added.get(i)
            new.append(a if a is not None and a.content == t else t)
            have.add(t)
    return new


def _compile_rules(voc: Vocabulary, vocab_out, vocabs, limits, refs, errors: List[str]) -> None:
    """The `tokens:` rules as (kind, folder, row) per token id, checked against the
    vocabularies (a model without the token, a token or id a model does not have)."""
    for t, rule in voc.spec.tokens.items():
        j = vocab_out[t]
        voc.forced[j] = rule.force
        s = rule.source
        if s is None:
            continue
        if s.kind == ZERO:
            voc.explicit[j] = (ZERO, None, -1)
            continue
        name = refs.get(s.path, s.ref)
        if s.kind == MODEL:
            row = int(voc.perms[s.path][j])
            if row < 0:
                errors.append(f"{rule.where}.source: model '{name}' has no token {t!r} (use "
                              f"{{kind: model_token, model: ..., token: ...}} to take another token's row)")
            voc.explicit[j] = (MODEL, s.path, row)
            continue
        if s.token is not None:
            row = vocabs[s.path].get(s.token, -1)
            if row < 0:
                errors.append(f"{rule.where}.source.token: model '{name}' has no token {s.token!r}")
        else:
            row = s.token_id
        if row >= limits[s.path]:
            errors.append(f"{rule.where}.source: row {row} is beyond the {limits[s.path]} embedding "
                          f"rows of '{name}'")
        voc.explicit[j] = (MODEL_TOKEN, s.path, row)


# ------------------------------------------------------------------ tasks

def attach(plan, voc: Vocabulary, vocab_re, base_path: Optional[str]) -> None:
    """Give every vocabulary tensor of the plan (names matching ``vocab_re``) its re-mapping:
    new shape [R, ...], inputs permuted before the method runs. A tensor whose inputs are
    already in the output order (same ids, N rows) is left alone."""
    where = {}
    for path, fo in plan.folders.items():
        for name, ti in fo.tensors.items():
            if vocab_re.search(name):
                where[(ti.file, ti.start)] = path
    errors: List[str] = []
    needed = {f for kind, f, _ in voc.explicit.values() if f is not None}
    for task in plan.tasks:
        if not vocab_re.search(task.name) or not task.shape:
            continue
        infos = [task.base] if task.kind == "copy" else \
            ([task.base] if task.base is not None else []) + [i.info for i in task.inputs]
        if voc.identity and all(i.shape[0] == voc.size for i in infos):
            continue
        if not task.dtype.is_floating_point:
            errors.append(f"'{task.name}': {task.dtype} rows cannot be re-mapped to a new vocabulary")
            continue
        members, seen = [], {}
        for i in infos:
            key = (i.file, i.start)
            if key not in seen:
                seen[key] = i
                members.append((key, where[key]))
        extra = []
        if base_path in plan.folders and base_path not in {f for _, f in members} and task.kind != "copy":
            bi = plan.folders[base_path].tensors.get(task.name)
            if bi is not None and bi.shape[1:] == infos[0].shape[1:]:
                extra.append(bi)
                seen[(bi.file, bi.start)] = bi
                members.insert(0, ((bi.file, bi.start), base_path))
        trailing = {tuple(i.shape[1:]) for i in seen.values()}
        if len(trailing) > 1:
            errors.append(f"'{task.name}': the models' rows differ in shape ({sorted(trailing)})")
            continue
        lacking = [plan.folders[f].ref for f in needed if f not in {m for _, m in members}]
        if lacking:
            errors.append(f"tokenizer.tokens: '{task.name}' of {lacking[0]} is not merged into the "
                          f"output's '{task.name}', so its rows cannot be a token's source")
            continue
        rows_of = {f: seen[k].shape[0] for k, f in members}
        short = [(r, f) for kind, f, r in voc.explicit.values() if kind == MODEL_TOKEN and r >= rows_of[f]]
        if short:
            errors.append(f"tokenizer.tokens: row {short[0][0]} is beyond the {rows_of[short[0][1]]} rows "
                          f"of '{task.name}' in {plan.folders[short[0][1]].ref}")
            continue
        task.vocab = VocabTask(voc, members, seen, extra)
        task.shape = (voc.rows,) + trailing.pop()
        task.region = None
        task.fill = None
    if errors:
        raise MergeConfigErrors(errors)


# ------------------------------------------------------------------ rows

def remap(task, arrays: Dict) -> Dict:
    """The loaded inputs of a vocabulary task, keyed by (file, start) like ``arrays``, with
    every member replaced by its re-mapped [R, ...] matrix (same dtype; numpy raw bits or
    torch tensors as given)."""
    vt: VocabTask = task.vocab
    sample = arrays[vt.members[0][0]]
    if not isinstance(sample, np.ndarray):       # torch (CUDA path): remap on the host
        from lfm_engine.io.safetensors import as_numpy, as_torch
        host = {k: as_numpy(arrays[k]) for k, _ in vt.members}
        done = _remap_numpy(vt, host)
        return {**arrays, **{k: as_torch(v, vt.infos[k].dtype).to(sample.device) for k, v in done.items()}}
    return {**arrays, **_remap_numpy(vt, arrays)}


def _remap_numpy(vt: VocabTask, arrays: Dict) -> Dict:
    voc = vt.vocab
    keys = [k for k, _ in vt.members]
    xs = [arrays[k] for k in keys]
    dts = [vt.infos[k].dtype for k in keys]
    folders = [f for _, f in vt.members]
    n = voc.size
    P = np.stack([np.where(voc.perms[f] < x.shape[0], voc.perms[f], -1) for f, x in zip(folders, xs)])
    present = P >= 0
    count = present.sum(axis=0)
    need = voc.forced | (count < len(keys))
    src_kind, src_member, src_row = _default_sources(voc, folders, P, present, count, need)
    trailing = xs[0].shape[1:]
    outs = []
    ident = np.arange(n)
    for x, p in zip(xs, P):
        if voc.rows == n == x.shape[0] and not voc.forced.any() and np.array_equal(p, ident):
            outs.append(x)   # already in the output order, no default rows: no copy
            continue
        y = np.empty((voc.rows,) + trailing, dtype=x.dtype)
        y[:n] = x[np.maximum(p, 0)]
        outs.append(y)
    for start in range(0, n, CHUNK):
        js = np.flatnonzero(need[start:start + CHUNK]) + start
        if js.size == 0:
            continue
        d = np.zeros((js.size,) + trailing, dtype=np.float64)
        for m, (x, dt) in enumerate(zip(xs, dts)):
            avg = (src_kind[js] == 0) & present[m, js]
            if avg.any():
                d[avg] += _f64(x[P[m, js[avg]]], dt)
            own = (src_kind[js] == 1) & (src_member[js] == m)
            if own.any():
                d[own] = _f64(x[src_row[js[own]]], dt)
        avg_rows = src_kind[js] == 0
        d[avg_rows] /= count[js[avg_rows]].reshape((-1,) + (1,) * len(trailing))
        for y, p, dt in zip(outs, P, dts):
            use = voc.forced[js] | (p[js] < 0)
            if use.any():
                y[js[use]] = dtypes.convert(d[use], dtypes.FLOAT64, dt)
    if voc.rows > n:
        for y, dt in zip(outs, dts):
            y[n:] = dtypes.convert(_f64(y[:n], dt).mean(axis=0), dtypes.FLOAT64, dt)
    return dict(zip(keys, outs))


def _default_sources(voc: Vocabulary, folders, P, present, count, need):
    """Per token: kind (0 mean of the models that have it, 1 one member's row, 2 zero), the
    member and its row (mergekit's order of rules, see the module docstring)."""
    n = voc.size
    kind = np.full(n, 0, dtype=np.int8)
    member = np.full(n, -1, dtype=np.int64)
    row = np.full(n, -1, dtype=np.int64)
    one = count == 1
    kind[one] = 1
    member[one] = np.argmax(present[:, one], axis=0)
    kind[count == 0] = 2
    if voc.base_folder in folders:
        b = folders.index(voc.base_folder)
        use = (count > 1) & present[b]
        kind[use] = 1
        member[use] = b
    sel = kind == 1
    row[sel] = P[member[sel], np.flatnonzero(sel)]
    for j, (k, f, r) in voc.explicit.items():
        if k == ZERO:
            kind[j] = 2
        else:
            kind[j], member[j] = 1, folders.index(f)
            row[j] = r if k == MODEL_TOKEN else P[member[j], j]
    return kind, member, row


def _f64(a: np.ndarray, dt) -> np.ndarray:
    return dtypes.convert(a, dt, dtypes.FLOAT64)


# ------------------------------------------------------------------ outputs

def save(voc: Vocabulary, folder: str) -> None:
    """Write the output tokenizer (a changed vocabulary: transformers' save_pretrained)."""
    voc.tokenizer.save_pretrained(folder)


def set_vocab_size(cfg_json: dict, voc: Vocabulary) -> None:
    """config.json's vocab_size (top level, or text_config's where only that has one)."""
    tc = cfg_json.get("text_config")
    if "vocab_size" not in cfg_json and isinstance(tc, dict) and "vocab_size" in tc:
        cfg_json["text_config"] = {**tc, "vocab_size": voc.rows}
    else:
        cfg_json["vocab_size"] = voc.rows
