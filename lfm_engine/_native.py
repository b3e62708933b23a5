"""Access to the compiled core (lfm_engine._C) without making import fail.

A build problem must not break `import lfm_engine`: the reference backend and the
pure-Python parts keep working, and calling a native op raises a clear error.
"""
from __future__ import annotations

import functools


class NativeUnavailableError(RuntimeError):
    """The compiled extension lfm_engine._C could not be loaded."""


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from lfm_engine import _C  # noqa: WPS433 (import inside function on purpose)
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        return None, exc
    return _C, None


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
