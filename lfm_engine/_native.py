"""Access to the compiled core (lfm_engine._C) without making import fail.

A build problem must not break `import lfm_engine`: the reference backend and the
pure-Python parts keep working, and calling a native op raises a clear error.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path


class NativeUnavailableError(RuntimeError):
    """The compiled extension lfm_engine._C could not be loaded."""


def _installed_copy():
    """Path of an installed _C next to another lfm_engine package on sys.path.

    Running Python from a source checkout puts the uncompiled source package first on
    sys.path (e.g. `python -m lfm_engine` in the repo root after `pip install .`); the
    compiled module then lives only in site-packages. Use that one rather than fail.
    """
    here = Path(__file__).resolve().parent
    for entry in sys.path:
        pkg = Path(entry or ".").resolve() / "lfm_engine"
        if pkg == here or not pkg.is_dir():
            continue
        for cand in sorted(pkg.glob("_C.*")):
            if cand.suffix in (".so", ".pyd"):
                return cand
    return None


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from lfm_engine import _C  # noqa: WPS433 (import inside function on purpose)
        return _C, None
    except ImportError as exc:
        cand = _installed_copy()
        if cand is None:
            return None, exc
    spec = importlib.util.spec_from_file_location("lfm_engine._C", cand)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as exc2:  # pragma: no cover - broken install
        return None, exc2
    sys.modules["lfm_engine._C"] = mod
    return mod, None


def native_dir() -> Path:
    """Folder of the loaded _C (where liblfm and the installed headers live)."""
    return Path(native().__file__).resolve().parent


def native():
    """The _C module, or raise NativeUnavailableError naming the import problem."""
    mod, err = _load()
    if mod is None:
        raise NativeUnavailableError(
            f"the compiled core lfm_engine._C is not available ({err}); reinstall with "
            "`pip install .` (after `pip install torch`) or run tools/dev_build.sh in a source tree"
        )
    return mod


def has_native() -> bool:
    return _load()[0] is not None
