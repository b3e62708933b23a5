"""File names that come from inside files: the one check before any of them is used.

Container metadata (.lfmd ``lfm.layout`` / ``lfm.files``), index files
(``model.safetensors.index.json`` weight maps) and adapter or config metadata name files
that we then open or write. Such files are what users download from strangers, so a name
from them is never trusted: it must be a *bare file name*, one path component that stays
in the folder it is joined to. The rule (docs/codecs.md "File names from metadata"):

- a non-empty ``str`` of at most 255 bytes in UTF-8;
- no ``/`` or ``\\`` (so no absolute path and no sub-folder), not ``.`` or ``..``;
- no NUL, newline or other control character (U+0000-U+001F, U+007F);
- once joined to its folder, ``os.path.realpath`` of the result still lies directly in
  ``realpath(folder)`` (a symlink already in the folder cannot lead out).

Anything else raises :class:`UnsafeNameError` (a ``ValueError``) naming the entry and where
it came from, before anything is read or written.
"""
from __future__ import annotations

import os
from typing import Union

MAX_NAME_BYTES = 255  # the usual file-system limit for one path component


class UnsafeNameError(ValueError):
    """A file name from metadata is not a plain name inside its folder."""


def check_file_name(name, where: str) -> str:
    """Return `name` if it is a bare, harmless file name; raise UnsafeNameError otherwise.

    `where` says where the name came from (e.g. "x.lfmd: lfm.layout"), for the message.
    """
    if not isinstance(name, str):
        raise UnsafeNameError(f"{where}: file name {name!r} is not a string")
    shown = repr(name)
    if not name:
        raise UnsafeNameError(f"{where}: empty file name")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise UnsafeNameError(f"{where}: file name {shown} contains a control character (NUL, newline, ...)")
    if "/" in name or "\\" in name:
        raise UnsafeNameError(f"{where}: file name {shown} is a path; only a plain file name is allowed "
                              "(no folders, no absolute paths)")
    if name in (".", ".."):
        raise UnsafeNameError(f"{where}: file name {shown} names a folder, not a file")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise UnsafeNameError(f"{where}: file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def path_inside(folder: Union[str, os.PathLike], name, where: str) -> str:
    """``os.path.join(folder, name)`` after :func:`check_file_name`, refused when the joined
    path resolves (symlinks followed) outside ``folder``."""
    check_file_name(name, where)
    root = os.path.realpath(folder)
    path = os.path.join(folder, name)
    if os.path.dirname(os.path.realpath(path)) != root:
        raise UnsafeNameError(f"{where}: '{name}' is a link that leads out of {folder}")
    return path
