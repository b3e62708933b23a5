"""Multi-stage merge configs (mergekit-multi): several YAML documents, run in order.

Format (mergekit-multi's): each document is an ordinary merge config plus an
optional ``name:``. A later stage names an earlier one's output by writing its
name where a model is expected (``model:``, ``base_model:``, ``tokenizer_source``,
``tokenizer.source``, a ``tokenizer.tokens`` entry's model). Decisions:

* The final stage is the unnamed document (at most one); when every document is
  named, the one no other stage uses (it must be unique). It is written to OUT_DIR.
* Named stages are written to ``intermediate_dir/NAME`` when an intermediate folder
  is given (kept afterwards; a stage whose folder already holds a config.json and
  safetensors is reused, as mergekit-multi does), otherwise to a temporary folder
  next to OUT_DIR that is removed when the run ends, successful or not.
* Stages run in dependency order (a cycle or a duplicate name is an error). Every
  stage is validated before the first one runs; stages that read an earlier stage's
  output are checked without their files (those do not exist yet).
"""
from __future__ import annotations

import copy
import os
import shutil
from typing import Dict, List, Optional, Tuple

from lfm_engine.merge import config as C
from lfm_engine.merge.outdir import make_temp_dir
from lfm_engine.merge.yaml_load import load_documents


def load_stages(config) -> Optional[Tuple[List[Tuple[Optional[str], dict]], Optional[str]]]:
    """([(name, document)], origin dir) for a multi-document YAML path or text; None when
    ``config`` is a dict or holds a single document (the ordinary path handles it)."""
    if isinstance(config, dict):
        return None
    s = os.fspath(config)
    origin_dir = None
    if "\n" not in s and os.path.isfile(s):
        origin_dir = os.path.dirname(os.path.abspath(s))
        try:
            with open(s, encoding="utf-8") as f:
                s = f.read()
        except (OSError, UnicodeDecodeError):
            return None  # parse_config reports it
    try:
        docs = load_documents(s)
    except Exception:  # parse_config reports YAML problems with their context
        return None
    if len(docs) < 2:
        return None
    errors = []
    out: List[Tuple[Optional[str], dict]] = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            errors.append(f"document {i + 1}: must be a YAML mapping")
            continue
        d = dict(d)
        name = d.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            errors.append(f"document {i + 1}: name: must be a non-empty string, got {name!r}")
            continue
        if any(n == name for n, _ in out):
            errors.append(f"document {i + 1}: " + (f"duplicate stage name '{name}'" if name else
                                                   "more than one unnamed (final) stage"))
            continue
        out.append((name, d))
    if errors:
        raise C.MergeConfigErrors(errors)
    return out, origin_dir


def _refs(doc: dict):
    """(container, key) of every place a model reference can sit in one document."""
    places = [(doc, "base_model"), (doc, "tokenizer_source")]
    if isinstance(doc.get("tokenizer"), dict):
        places.append((doc["tokenizer"], "source"))
        tokens = doc["tokenizer"].get("tokens")
        for rule in tokens.values() if isinstance(tokens, dict) else ():
            if isinstance(rule, dict):   # a token's row from a model: {source: M} / {source: {model: M}}
                places.append((rule, "source"))
                if isinstance(rule.get("source"), dict):
                    places.append((rule["source"], "model"))
    for m in doc.get("models") or [] if isinstance(doc.get("models"), list) else []:
        if isinstance(m, dict):
            places.append((m, "model"))
    for s in doc.get("slices") or [] if isinstance(doc.get("slices"), list) else []:
        if isinstance(s, dict):
            places.append((s, "base_model"))
            for src in s.get("sources") or [] if isinstance(s.get("sources"), list) else []:
                if isinstance(src, dict):
                    places.append((src, "model"))
    return [(c, k) for c, k in places if isinstance(c.get(k), str)]


def _order(stages, names) -> Tuple[List[str], Dict[Optional[str], set]]:
    deps = {n: {c[k] for c, k in _refs(d) if c[k] in names and c[k] != n} for n, d in stages}
    order: List = []
    state: Dict = {}

    def visit(n, chain):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise C.MergeConfigErrors([f"stages: circular dependency {' -> '.join(map(str, chain + [n]))}"])
        state[n] = 1
        for d in sorted(deps[n], key=str):
            visit(d, chain + [n])
        state[n] = 2
        order.append(n)

    for n, _ in stages:
        visit(n, [])
    return order, deps


def run_stages(stages, origin_dir, out_dir: str, intermediate_dir: Optional[str], run_one, dry_run: bool):
    """Run every stage with ``run_one(config_dict, out, dry_run, check_files)``; the
    result of the final stage is returned."""
    names = {n for n, _ in stages if n is not None}
    order, deps = _order(stages, names)
    used = set().union(*deps.values()) if deps else set()
    finals = [n for n, _ in stages if n is None] or [n for n, _ in stages if n not in used]
    if len(finals) != 1:
        raise C.MergeConfigErrors([f"stages: cannot tell the final stage: {len(finals)} candidates "
                                   f"({', '.join(map(str, finals))}); leave the final one unnamed"])
    final = finals[0]
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = None
    if intermediate_dir is None and not dry_run:
        tmp = make_temp_dir(out_dir, "stages")
    work = intermediate_dir or tmp or os.path.join(parent, ".stages")
    where = {n: (os.path.abspath(out_dir) if n == final else os.path.join(work, str(n))) for n, _ in stages}
    docs = dict(stages)
    try:
        patched = {}
        errors: List[str] = []
        for n in order:
            d = copy.deepcopy(docs[n])
            for c, k in _refs(d):
                if c[k] in names:
                    c[k] = where[c[k]]
                elif origin_dir and not os.path.isabs(c[k]):
                    alt = os.path.join(origin_dir, c[k])
                    if os.path.exists(alt) and not os.path.exists(c[k]):
                        c[k] = alt
            patched[n] = d
            try:
                C.parse_config(d, check_files=not deps[n])
            except C.MergeConfigErrors as e:
                errors += [f"stage {n or '(final)'}: {m}" for m in e.errors]
        if errors:
            raise C.MergeConfigErrors(errors)
        result = None
        for n in order:
            if n != final and intermediate_dir is not None and _complete(where[n]):
                continue  # reuse a finished intermediate, as mergekit-multi does
            if dry_run and deps[n]:
                continue  # its inputs do not exist yet; checked without files above
            r = run_one(patched[n], where[n], dry_run)
            if n == final:
                result = r
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(folder))
