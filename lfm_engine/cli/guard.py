"""One exit-status convention for the file-producing subcommands (extract-lora, moe).

``guarded(call, what)`` runs ``call()`` and maps what it raises: configuration or
input problems (MergeConfigError, CheckpointError, and the command's own
``user_errors``) -> 2 with the message; Ctrl-C -> 130; anything else -> 1 naming the
exception (the commands write through a temporary folder, so nothing is left behind).
Returns (exit status, the call's result or None).
"""
from __future__ import annotations

import sys


def guarded(call, what: str, user_errors=()):
    from lfm_engine.core.merge_methods import MergeConfigError
    from lfm_engine.io.model_folder import CheckpointError
    try:
        return 0, call()
    except (MergeConfigError, CheckpointError) + tuple(user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130, None
    except Exception as e:
        print(f"error: {what} failed: {type(e).__name__}: {e} (no output written)", file=sys.stderr)
        return 1, None
