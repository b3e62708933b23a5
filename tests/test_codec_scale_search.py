"""intN scale_search="mse": the encoder's clip search (decode unchanged; decision in docs/spec/codec.md)."""
from __future__ import annotations

import pytest
import torch

from lfm_engine import decode_delta, encode_delta
from lfm_engine.reference import codec as ref
from lfm_engine.reference.codec import CodecError


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "nf4"])
@pytest.mark.parametrize("g", [7, 32, 128])
def test_mse_search_never_loses_to_absmax_per_group(codec, g):
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(33, 257, generator=gen) * 0.02
    d[0, :5] = 0.5  # outliers: where clipping pays
    a = decode_delta(encode_delta(d, codec, group_size=g))
    m_enc = encode_delta(d, codec, group_size=g, scale_search="mse")
    m = decode_delta(m_enc)
    ng = (d.shape[1] + g - 1) // g
    pad = lambda x: torch.nn.functional.pad(x, (0, ng * g - x.shape[1])).reshape(x.shape[0], ng, g)  # noqa: E731
    err_a = (pad(a) - pad(d)).square().sum(-1)
    err_m = (pad(m) - pad(d)).square().sum(-1)
    assert bool((err_m <= err_a).all())
    # decoding is the ordinary decoder: the C++ kernel and the reference agree bit for bit
    torch.testing.assert_close(m, decode_delta(m_enc, backend="reference"), rtol=0, atol=0)


def test_mse_search_lowers_int4_g128_error_on_gaussians():
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(256, 4096, generator=gen) * 0.01
    rel = lambda x: float((x - d).norm() / d.norm())  # noqa: E731
    a = rel(decode_delta(encode_delta(d, "int4", group_size=128)))
    m = rel(decode_delta(encode_delta(d, "int4", group_size=128, scale_search="mse")))
    assert a > 0.115 and m < 0.108  # 0.117 -> 0.106 (the symmetric 15-level grid's floor is ~0.105)


def test_scale_search_options_are_checked():
    d = torch.randn(4, 64)
    with pytest.raises(CodecError, match="scale_search"):
        encode_delta(d, "int4", scale_search="l1")
    with pytest.raises(CodecError, match="reference encoder"):
        encode_delta(d, "int4", backend="cpu", scale_search="mse")
    # absmax is the default and what the C++ encoder computes
    e = encode_delta(d, "int4", backend="cpu", scale_search="absmax")
    r = ref.encode(d, "int4")
    assert all(torch.equal(e.fields[k], r[0][k]) for k in r[0])
