"""Hugging Face hub ids as model references: ``org/name`` and ``org/name@revision``.

A reference that is not an existing local path and has the shape of a hub id is
resolved with ``huggingface_hub.snapshot_download`` to the local snapshot folder
(config, tokenizer and safetensors files only: pickle weights are never fetched).
With ``HF_HUB_OFFLINE=1`` (read at call time, not at import) only the local cache
is consulted. The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``, as huggingface_hub defines it. A reference that
cannot be resolved raises :class:`HubError` naming the id and the cache.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Optional, Tuple

HUB_RE = re.compile(r"([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?")
# what a merge reads from a model repository
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(ValueError):
    """A hub reference could not be resolved; the message names the id and the cache."""


def parse_hub_ref(ref: str) -> Optional[Tuple[str, Optional[str]]]:
    """(repo_id, revision or None) when ``ref`` has the shape of a hub id and is not
    an existing local path; else None."""
    if not isinstance(ref, str) or os.path.exists(ref) or ref.startswith((".", "/", "~")):
        return None
    m = HUB_RE.fullmatch(ref)
    return (m.group(1), m.group(2)) if m else None


def cache_dir() -> str:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                              "huggingface")
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=256)
def _resolve(repo_id: str, revision: Optional[str], cache: str, local_only: bool) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise HubError(f"'{repo_id}': resolving hub ids needs huggingface_hub "
                       f"(pip install huggingface_hub)") from None
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                 local_files_only=local_only, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # the library's error types vary across versions
        ref = repo_id + (f"@{revision}" if revision else "")
        how = ("HF_HUB_OFFLINE is set, so only the cache was searched" if local_only
               else f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise HubError(f"hub model '{ref}' is not available: not in the Hugging Face cache {cache} "
                       f"and {how}; download it (`huggingface-cli download {repo_id}"
                       + (f" --revision {revision}" if revision else "")
                       + "`) or give a local folder") from None


def resolve(ref: str) -> str:
    """Local snapshot folder of hub reference ``ref`` (raises HubError)."""
    parsed = parse_hub_ref(ref)
    if parsed is None:
        raise HubError(f"'{ref}' is not a hub id (org/name or org/name@revision)")
    return _resolve(parsed[0], parsed[1], cache_dir(), offline())
