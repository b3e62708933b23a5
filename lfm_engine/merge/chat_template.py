"""`chat_template:` of a merge config: the chat template written into the output tokenizer.

Accepted values (mergekit's vocabulary where we have it):

* a literal Jinja template (any string containing ``{{`` or ``{%``);
* ``auto``: the template most of the input models carry (tokenizer_config.json's
  ``chat_template`` or a chat_template.jinja file; ties go to the base, then to
  the models in config order); an error when no input has one;
* ``chatml``: the ChatML format (``<|im_start|>role\\n...<|im_end|>\\n``), written here.

The template is stored in the output's tokenizer_config.json (``chat_template``) and,
when the copied tokenizer has a chat_template.jinja (which transformers prefers),
there too, so the two never disagree.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}


def check(value) -> Optional[str]:
    """An error message for a bad ``chat_template`` value, else None."""
    if not isinstance(value, str) or not value.strip():
        return f"chat_template: expected a template name or a Jinja template, got {value!r}"
    if is_literal(value) or value in NAMED or value == "auto":
        return None
    return (f"chat_template: unknown template name '{value}' (known: auto, "
            f"{', '.join(sorted(NAMED))}; or give the Jinja template itself)")


def is_literal(value: str) -> bool:
    return "{{" in value or "{%" in value


def model_template(folder: str) -> Optional[str]:
    """The chat template a model folder carries, if any."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            t = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return t if isinstance(t, str) else None


def resolve(value: str, folders: Iterable[str]) -> str:
    """The template text for ``value`` (raises ValueError for `auto` without templates)."""
    if is_literal(value):
        return value
    if value in NAMED:
        return NAMED[value]
    found: List[str] = [t for t in (model_template(f) for f in folders) if t]
    if not found:
        raise ValueError("chat_template: auto: none of the input models has a chat template")
    return max(found, key=lambda t: (found.count(t), -found.index(t)))


def write(folder: str, template: str) -> None:
    """Store ``template`` in folder's tokenizer_config.json (created if absent) and in
    its chat_template.jinja if that file exists."""
    p = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    cfg["chat_template"] = template
    with open(p, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, "w", encoding="utf-8") as f:
            f.write(template)
