"""Plain-torch reference of skinny_linear (docs/spec/skinny_linear.md).

    y[m, n] = round_y( sum_k x[m, k] * W[n, k] + bias[n] )

computed in float64 from the (already rounded) inputs and rounded once to y's dtype (x's
dtype): the definition the kernel is tested against, within the fp32 summation bound of
the spec. No validation here: lfm_engine/ops/skinny_linear.py checks the arguments.
"""
from __future__ import annotations

from typing import Optional

import torch


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> y [M, N] in x.dtype."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def skinny_linear_bound(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec's per-element error bound of an fp32 kernel against the exact result, before
    the final rounding to y's dtype: (K + 2) * 2^-24 * (sum_k |x[m, k] W[n, k]| + |bias[n]|)."""
    mag = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    return (x.shape[-1] + 2) * 2.0 ** -24 * mag
