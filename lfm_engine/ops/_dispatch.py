"""Backend choice, shared by every ops/<op>.py.

Each op keeps a visible table {backend name: callable}. The backend is chosen by, in
order: the explicit ``backend=`` argument, the ``LFM_BACKEND`` environment variable,
then the op's default for the tensors' device (``default_backends``). An explicit
choice (argument or environment) is honoured or refused, never silently replaced:
asking for a backend the op has not, one that cannot run on the tensors' device, or one
whose library is missing (Triton not installed) is a ValueError naming the op, where the
request came from and why it cannot run.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Mapping, Optional, Sequence

# no torch import: devices are only asked for .type (a torch.device, or the plain
# CPU_DEVICE below for numpy arrays), so the numpy merge path never loads torch

CPU_BACKENDS = ("cpu", "reference")
CUDA_BACKENDS = ("cuda", "triton", "reference")


class _Device:
    type = "cpu"

    def __str__(self):
        return "cpu"


CPU_DEVICE = _Device()  # the device of numpy arrays


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_backends(device: "torch.device") -> Sequence[str]:
    if device.type == "cuda":
        return CUDA_BACKENDS
    # The Triton interpreter runs Triton kernels on CPU tensors: that is how CPU-only
    # machines test them.
    return CPU_BACKENDS + (("triton",) if triton_interpret() else ())


KNOWN_BACKENDS = ("cpu", "cuda", "triton", "reference")


def pick_backend(
    op: str,
    table: Mapping[str, Callable],
    device: "torch.device",
    backend: Optional[str],
    default: Mapping[str, str],
) -> str:
    """Name of the backend to run `op` with. `default` maps device type -> backend."""
    source = f"backend='{backend}'"
    if backend is None:
        env = os.environ.get("LFM_BACKEND", "").strip()
        if env:
            backend, source = env, f"LFM_BACKEND={env}"
    if backend is None:
        backend = default.get(device.type)
        if backend is None:
            raise ValueError(f"{op}: no backend runs on device '{device}'")
        return backend
    if backend not in table:
        what = "has no" if backend in KNOWN_BACKENDS else "knows no"
        raise ValueError(f"{op}: {source}: this op {what} backend '{backend}' "
                         f"(it has: {', '.join(table)})")
    why = cannot_run(backend, device)
    if why:
        allowed = [b for b in device_backends(device) if b in table]
        raise ValueError(f"{op}: {source} cannot run: {why} (available here: {', '.join(allowed)})")
    return backend


def cannot_run(backend: str, device: "torch.device") -> Optional[str]:
    """Why `backend` cannot run on tensors on `device` (None: it can)."""
    if backend not in device_backends(device):
        if backend == "triton" and device.type == "cpu":
            return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
        return f"the tensors are on {device}"
    if backend == "triton" and not triton_importable():
        return "Triton is not installed (pip install triton)"
    return None


@functools.lru_cache(maxsize=None)
def native_has_cuda() -> bool:
    """The compiled core was built with its CUDA kernels."""
    from lfm_engine._native import has_native, native

    return has_native() and bool(json.loads(native().build_info()).get("cuda"))


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_DEFAULTS: dict = {}


def default_backends(table: Mapping[str, Callable], native_ok: bool = True,
                     device_type: Optional[str] = None) -> dict:
    """Default backend per device type for an op with this table:
    cpu -> the C++ kernel ("reference" when the core lacks the op: native_ok False);
    cuda -> the CUDA C++ kernel when this build has CUDA, else Triton, else the reference.
    With device_type, only that device's entry: a CPU call then never probes for Triton
    (importing it took 0.13 s of every `lfm-engine merge` on a build without CUDA).
    Computed once per table (a plain dict lookup afterwards, which torch.compile traces)."""
    key = (id(table), native_ok, device_type)
    if key not in _DEFAULTS:
        _DEFAULTS[key] = _compute_defaults(table, native_ok, device_type)
    return _DEFAULTS[key]


def _compute_defaults(table: Mapping[str, Callable], native_ok: bool, device_type: Optional[str]) -> dict:
    from lfm_engine._native import has_native

    out = {}
    if device_type in (None, "cpu"):
        out["cpu"] = "cpu" if (native_ok and has_native() and "cpu" in table) else "reference"
    if device_type in (None, "cuda"):
        if native_ok and "cuda" in table and native_has_cuda():
            out["cuda"] = "cuda"
        elif "triton" in table and triton_importable():
            out["cuda"] = "triton"
        else:
            out["cuda"] = "reference"
    return out
