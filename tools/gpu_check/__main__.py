"""Entry point: `python tools/gpu_check` (what tools/gpu_check.sh runs)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a path: import the package by name from tools/
    here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from gpu_check.cli import main  # noqa: E402

sys.exit(main())
