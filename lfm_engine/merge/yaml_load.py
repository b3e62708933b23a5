"""Reading merge-config YAML with bounded work: no alias bomb, no runaway nesting.

PyYAML's ``safe_load`` builds aliases as shared references, so a 400-byte
"billion laughs" document composes quickly, but every walk over the result
(validation, ``safe_dump`` of the config into the model card) visits the
expanded tree, whose size grows exponentially with the alias depth. We compose
the node graph first (linear in the text), count the nodes the document would
have once every alias is expanded (memoised per node, so the count itself is
linear), and refuse documents above :data:`MAX_EXPANDED_NODES` or nested deeper
than :data:`MAX_DEPTH` before constructing any Python object. Anchors and aliases
of ordinary size (shared parameter blocks) keep working.
"""
from __future__ import annotations

from typing import Dict, List

import yaml

MAX_CONFIG_BYTES = 16 << 20       # a merge config is a few kB; 16 MiB is far beyond any real one
MAX_EXPANDED_NODES = 200_000      # nodes after alias expansion (a 1000-model config has ~20k)
MAX_DEPTH = 64                    # nesting depth of mappings/sequences


class YamlLimitError(ValueError):
    """The YAML text is too large, too deeply nested or expands too far (message says which)."""


def _expanded_size(node, memo: Dict[int, int], depth: int, active: set) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if depth > MAX_DEPTH:
        raise YamlLimitError(f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, yaml.ScalarNode):
        size = 1
    else:
        if key in active:
            raise YamlLimitError("a YAML alias refers to a node that contains it (recursive structure)")
        active.add(key)
        size = 1
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for kv in node.value for n in kv]
        for child in children:
            size += _expanded_size(child, memo, depth + 1, active)
            if size > MAX_EXPANDED_NODES:
                raise YamlLimitError(
                    f"the document expands to more than {MAX_EXPANDED_NODES} nodes once its "
                    f"aliases are resolved (a YAML alias bomb?); write the values out instead")
        active.discard(key)
    memo[key] = size
    return size


def load_documents(text: str) -> List[object]:
    """All documents of ``text`` as plain Python objects (safe types only).

    Raises :class:`YamlLimitError` for the bounds above and ``yaml.YAMLError`` for
    syntax errors. Empty documents (a stray ``---``) are dropped.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise YamlLimitError(f"the file is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    loader = yaml.SafeLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _expanded_size(node, {}, 0, set())
            docs.append(loader.construct_document(node))
    finally:
        loader.dispose()
    return [d for d in docs if d is not None]
