"""The tokenizer section of a merge config: ``tokenizer_source:`` and ``tokenizer:``.

mergekit's vocabulary (mergekit 0.1.5, mergekit/tokenizer/config.py), parsed without
loading any tokenizer; what the words mean is in docs/spec/merge.md "Tokenizer and
vocabulary" and :mod:`.vocab` builds it::

    tokenizer_source: union            # union | base | a model (path, hub id, MODEL+LORA)
    tokenizer:                         # the newer spelling; `source` defaults to union
      source: union
      pad_to_multiple_of: 64           # rows of embed/lm_head rounded up
      tokens:                          # where a token's embedding row comes from
        "<|im_start|>":
          source: path/to/model        # that model's row of the same token
          force: true                  # also replace the rows of models that have it
        "<|im_end|>":
          source: {kind: zero}
        "<pad>":
          source: {kind: model_token, model: path/to/model, token: "</s>"}   # or token_id: 2

Every problem is appended to ``errors`` with its key path, so ``--dry-run`` lists them
all at once; models named in ``tokens:`` must be models of the config.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

SOURCES = ("union", "base")            # besides a model reference
SECTION_KEYS = ("source", "tokens", "pad_to_multiple_of")
RULE_KEYS = ("source", "force")
KINDS = ("zero", "model_token")


@dataclass
class TokenSource:
    """Where a token's default row comes from.

    kind ``model``: that model's row of the same token; ``zero``: a zero row;
    ``model_token``: that model's row of another token (``token``) or row index
    (``token_id``)."""
    kind: str
    ref: Optional[str] = None        # the model as written
    path: Optional[str] = None       # its resolved folder
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass
class TokenRule:
    """One entry of ``tokenizer.tokens``; ``source`` None: mergekit's automatic default."""
    token: str
    source: Optional[TokenSource]
    force: bool
    where: str


@dataclass
class TokenizerSpec:
    """A parsed tokenizer section: ``source`` is "union", "base" or a model reference."""
    source: str
    where: str                                   # "tokenizer_source" or "tokenizer.source"
    source_path: Optional[str] = None            # the resolved folder of a model source
    tokens: Dict[str, TokenRule] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None

    @property
    def is_model(self) -> bool:
        return self.source not in SOURCES


def suggest(word, choices) -> str:
    """" (did you mean 'x'?)" for the closest other choice, or "": the hint of every unknown
    key or name in a merge config (config.py uses it too; this module is the lower one)."""
    close = difflib.get_close_matches(str(word), [c for c in choices if c != word], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_ref(value, where: str, errors: List[str]) -> Optional[str]:
    if isinstance(value, dict) and set(value) == {"model"}:
        value = value["model"]       # mergekit's ModelReference also reads {model: ...}
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{where}: expected a model (path, hub id or MODEL+LORA), got {value!r}")
        return None
    return value


def parse(raw: dict, errors: List[str]) -> Optional[TokenizerSpec]:
    """The tokenizer section of a config mapping (None when it has none). With problems in
    it (reported in ``errors``) the spec still comes back, so its models are checked too."""
    tok, tsec = raw.get("tokenizer_source"), raw.get("tokenizer")
    if tok is not None and tsec is not None:
        errors.append("tokenizer, tokenizer_source: give only one of them (mergekit refuses both)")
        return None
    if tsec is None:
        if tok is None:
            return None
        src = _source(tok, "tokenizer_source", errors)
        return TokenizerSpec(src, "tokenizer_source") if src else None
    if not isinstance(tsec, dict):
        errors.append(f"tokenizer: expected a mapping (source, tokens, pad_to_multiple_of), got {tsec!r}")
        return None
    for k in tsec:
        if k not in SECTION_KEYS:
            errors.append(f"tokenizer.{k}: unknown key" + suggest(k, SECTION_KEYS)
                          + f" (known: {', '.join(SECTION_KEYS)})")
    src = _source(tsec.get("source", "union"), "tokenizer.source", errors)
    spec = TokenizerSpec(src or "union", "tokenizer.source")
    pad = tsec.get("pad_to_multiple_of")
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int) or not 1 <= pad <= 2**20:
            errors.append(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
        else:
            spec.pad_to_multiple_of = pad
    tokens = tsec.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, dict):
            errors.append("tokenizer.tokens: expected a mapping of token -> {source, force}")
        else:
            for t, rule in tokens.items():
                r = _rule(str(t), rule, f"tokenizer.tokens[{str(t)!r}]", errors)
                if r is not None:
                    spec.tokens[str(t)] = r
    return spec


def _source(value, where: str, errors: List[str]) -> Optional[str]:
    if isinstance(value, str) and value in SOURCES:
        return value
    if value is None:
        errors.append(f"{where}: expected union, base or a model, got null")
        return None
    return _model_ref(value, where, errors)


def _rule(token: str, rule, where: str, errors: List[str]) -> Optional[TokenRule]:
    if not isinstance(rule, dict):
        errors.append(f"{where}: expected a mapping with `source` and/or `force`, got {rule!r}")
        return None
    n = len(errors)
    for k in rule:
        if k not in RULE_KEYS:
            errors.append(f"{where}.{k}: unknown key" + suggest(k, RULE_KEYS)
                          + f" (known: {', '.join(RULE_KEYS)})")
    force = rule.get("force", False)
    if not isinstance(force, bool):
        errors.append(f"{where}.force: expected true or false, got {force!r}")
    src = None
    if rule.get("source") is not None:
        src = _token_source(rule["source"], f"{where}.source", errors)
    return TokenRule(token, src, force is True, where) if len(errors) == n else None


def _token_source(value, where: str, errors: List[str]) -> Optional[TokenSource]:
    if isinstance(value, dict) and "kind" in value:
        kind = value["kind"]
        if kind not in KINDS:
            errors.append(f"{where}.kind: unknown kind {kind!r}" + suggest(kind, KINDS)
                          + f" (known: {', '.join(KINDS)}; or give a model as the source)")
            return None
        allowed = ("kind",) if kind == "zero" else ("kind", "model", "token", "token_id")
        bad = [k for k in value if k not in allowed]
        for k in bad:
            errors.append(f"{where}.{k}: unknown key for kind {kind}" + suggest(k, allowed))
        if kind == "zero":
            return None if bad else TokenSource("zero")
        ref = _model_ref(value.get("model"), f"{where}.model", errors)
        token, tid = value.get("token"), value.get("token_id")
        if (token is None) == (tid is None):
            errors.append(f"{where}: kind model_token needs exactly one of `token` and `token_id`")
            return None
        if token is not None and not isinstance(token, str):
            errors.append(f"{where}.token: expected a string, got {token!r}")
            return None
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            errors.append(f"{where}.token_id: expected a non-negative integer, got {tid!r}")
            return None
        if ref is None or bad:
            return None
        return TokenSource("model_token", ref, token=token, token_id=tid)
    ref = _model_ref(value, where, errors)
    return TokenSource("model", ref) if ref else None


def resolve_models(spec: TokenizerSpec, config_models: Sequence[tuple], resolve: Callable[[str], str],
                   errors: List[str]) -> None:
    """Resolve the folders of the models the section names. ``config_models``: (ref,
    resolved path) of every model of the config; a token rule naming another model is an
    error (mergekit needs the row from a model that is merged)."""
    if spec.is_model:
        spec.source_path = resolve(spec.source)
    known = {p for _, p in config_models}
    names = ", ".join(dict.fromkeys(r for r, _ in config_models)) or "(none)"
    for rule in spec.tokens.values():
        s = rule.source
        if s is None or s.ref is None:
            continue
        s.path = resolve(s.ref)
        if s.path not in known:
            errors.append(f"{rule.where}.source: model '{s.ref}' is not one of the config's models "
                          f"({names}); a token's row must come from a model being merged")

