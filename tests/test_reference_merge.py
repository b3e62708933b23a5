"""Tests of the plain-torch merge reference (lfm_engine/reference/merge.py) and of the
engine's Philox/stream rule (lfm_engine/reference/philox.py).

Expected values are worked out by hand in each test from docs/spec/merge.md, so these
tests pin the definition the compiled backends are compared against.
"""
import math

import numpy as np
import pytest
import torch

from lfm_engine.core.merge_methods import MergeParams, resolve_merge_params
from lfm_engine.reference import philox as ph
from lfm_engine.reference.merge import (
    della_keep_probabilities,
    della_mask,
    magnitude_mask,
    magnitude_outliers_mask,
    merge_tensors_reference,
    random_mask,
    round_from_float64,
    task_vector,
)

F32 = torch.float32
F64 = torch.float64


def t32(*v):
    return torch.tensor(v, dtype=F32)


def expect(values, dtype=F32):
    """Exact expected output: the float64 value rounded once to dtype."""
    return round_from_float64(torch.tensor(values, dtype=F64), dtype)


def merge(method, base, others, out_dtype=None, **kw):
    p = resolve_merge_params(method, len(others), **kw)
    return merge_tensors_reference(base, others, p, out_dtype)


# ---------------------------------------------------------------------------
# Philox4x32-10, FNV-1a, stream ids


# Random123 kat_vectors, "philox4x32 10": counter, key, output (hex words)
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,out", KATS)
def test_philox_known_answers(ctr, key, out):
    got = ph.philox4x32_10(*ctr, *key)
    assert got.dtype == np.uint32 and got.shape == (4,)
    assert tuple(int(v) for v in got) == out


def test_philox_vectorised_matches_scalar_calls():
    ctrs = np.array([k[0] for k in KATS], dtype=np.uint64).T  # [4, 3]
    keys = np.array([k[1] for k in KATS], dtype=np.uint64).T  # [2, 3]
    got = ph.philox4x32_10(*ctrs, *keys)
    assert got.shape == (4, 3)
    for j, (_, _, out) in enumerate(KATS):
        assert tuple(int(v) for v in got[:, j]) == out


def test_fnv1a64_published_vectors():
    assert ph.fnv1a64(b"") == 0xCBF29CE484222325
    assert ph.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert ph.fnv1a64(b"foobar") == 0x85944171F73967E8


def test_stream_id_rule():
    # low 32 bits of FNV-1a-64 XOR (position << 24), truncated to 32 bits
    assert ph.stream_id("a", 0) == 0x8601EC8C
    assert ph.stream_id("a", 1) == 0x8701EC8C
    assert ph.stream_id("a", 255) == 0x8601EC8C ^ 0xFF000000
    assert ph.stream_id("", 3) == 0x84222325 ^ 0x03000000
    assert ph.stream_id("a", 256) == ph.stream_id("a", 0)  # bits above 32 fall off
    # the name is hashed as UTF-8 bytes
    assert ph.stream_id("é", 0) == ph.fnv1a64(b"\xc3\xa9") & 0xFFFFFFFF
    with pytest.raises(ValueError, match="position"):
        ph.stream_id("a", -1)


def test_philox_draws_element_layout():
    # seed 0, stream 0, elements 0..3 are the first KAT block word by word
    assert [int(v) for v in ph.philox_draws(0, 0, 4)] == list(KATS[0][2])
    seed = (0x299F31D0 << 32) | 0xA4093822
    stream = 0x13198A2E
    # start past 2^34 so q's high word is 1; odd start/length cut blocks in the middle
    start, n = 4 * (2**32) + 6, 11
    got = ph.philox_draws(seed, stream, n, start=start)
    for j in range(n):
        e = start + j
        q = e // 4
        block = ph.philox4x32_10(q & 0xFFFFFFFF, q >> 32, stream, 0,
                                 seed & 0xFFFFFFFF, seed >> 32)
        assert int(got[j]) == int(block[e % 4]), e


def test_philox_draws_chunking_is_invisible(monkeypatch):
    whole = ph.philox_draws(7, 9, 1001, start=3)
    monkeypatch.setattr(ph, "_CHUNK_BLOCKS", 5)
    assert np.array_equal(ph.philox_draws(7, 9, 1001, start=3), whole)
    assert np.array_equal(ph.philox_draws(7, 9, 500, start=504), whole[501:])


def test_philox_draws_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        ph.philox_draws(2**64, 0, 4)
    with pytest.raises(ValueError, match="stream"):
        ph.philox_draws(0, 2**32, 4)


def test_keep_threshold():
    assert ph.keep_threshold(0.3) == 1288490188  # floor(0.3 * 2^32 = 1288490188.8)
    assert ph.keep_threshold(0.5) == 2**31
    assert ph.keep_threshold(1.0) == 2**32  # every draw is below it
    assert ph.keep_threshold(0.0) == 0
    draws = np.array([0, 2**32 - 1], dtype=np.uint32)
    assert ph.keep_mask_np(draws, ph.keep_threshold(1.0)).all()
    assert not ph.keep_mask_np(draws, 0).any()


# ---------------------------------------------------------------------------
# task vector, rounding


def test_task_vector_is_one_fp32_subtraction():
    # fp32(1 - 1e8) = -1e8 (99999999 is not representable), so the task vector is -1e8
    # and b + delta gives 0, not 1: the engine's definition, shared by every backend.
    b, x = t32(1e8), t32(1.0)
    assert task_vector(x, b).item() == -1e8
    assert merge("task_arithmetic", b, [x]).item() == 0.0
    # mixed dtypes: each input is widened to fp32 first
    bb = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    xh = torch.tensor([1.25, 0.5], dtype=torch.float16)
    assert task_vector(xh, bb).tolist() == [-0.25, 2.5]


def test_round_from_float64_rounds_once():
    x = torch.tensor([1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8], dtype=F64)
    # torch goes through fp32 (1 + 2^-8 exactly, a tie) and rounds to 1.0; the exact
    # value lies above the tie so the correct bf16 result is 1 + 2^-7.
    assert round_from_float64(x, torch.bfloat16).tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0]
    y = torch.tensor([1 + 2**-11 + 2**-40], dtype=F64)
    assert round_from_float64(y, torch.float16).item() == 1 + 2**-10
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, dtype=F64, generator=g) * 300
    for dt in (torch.float16, torch.bfloat16, F32):
        r = round_from_float64(z, dt)
        assert r.dtype == dt
        # never farther from the exact value than torch's own conversion
        assert ((r.to(F64) - z).abs() <= (z.to(dt).to(F64) - z).abs()).all()


# ---------------------------------------------------------------------------
# task_arithmetic and linear

B6 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_task_arithmetic_hand_example():
    b = t32(*B6)
    d0 = [1, -2, 0, 3, 0.5, -1]
    d1 = [2, 2, -1, -3, 0.5, 1]
    x0, x1 = b + t32(*d0), b + t32(*d1)
    # 2 * (0.5*d0 + d1) = 2 * [2.5, 1, -1, -1.5, 0.75, 0.5]
    out = merge("task_arithmetic", b, [x0, x1], weights=[0.5, 1.0], lam=2.0)
    assert torch.equal(out, expect([6, 4, 1, 1, 6.5, 7]))
    # normalize: divide by 0.5 + 1 = 1.5
    out = merge("task_arithmetic", b, [x0, x1], weights=[0.5, 1.0], normalize=True)
    assert torch.equal(out, expect([1 + 2.5 / 1.5, 2 + 1 / 1.5, 3 - 1 / 1.5, 4 - 1.5 / 1.5,
                                    5 + 0.75 / 1.5, 6 + 0.5 / 1.5]))
    # weights summing to 0: |divisor| < 1e-8 -> 1
    out = merge("task_arithmetic", b, [x0, x1], weights=[1.0, -1.0], normalize=True)
    assert torch.equal(out, expect([b_ + a - c for b_, a, c in zip(B6, d0, d1)]))


def test_linear_hand_example():
    x0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    x1 = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float16)
    out = merge("linear", None, [x0, x1], weights=[1.0, 3.0])
    assert out.dtype == torch.float16  # no base: first model's dtype
    assert out.tolist() == [2.5, 2.0, 1.5]  # (x0 + 3 x1) / 4
    out = merge("linear", None, [x0, x1], weights=[1.0, 3.0], normalize=False)
    assert out.tolist() == [10.0, 8.0, 6.0]
    out = merge("linear", None, [x0, x1], weights=[1.0, -1.0])  # sum 0 -> divide by 1
    assert out.tolist() == [-2.0, 0.0, 2.0]
    # a base is not an input of linear; it only sets the default output dtype
    base = torch.full((3,), 100.0, dtype=torch.bfloat16)
    out = merge("linear", base, [x0, x1], weights=[1.0, 3.0])
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.5, 2.0, 1.5]


# ---------------------------------------------------------------------------
# magnitude (ties)

TIES_D0 = [3, -1, 2, -5, 0.5, 1]
TIES_D1 = [-1, 4, -2, 1, 1, 0.25]


def _ties_inputs():
    b = t32(*B6)
    return b, [b + t32(*TIES_D0), b + t32(*TIES_D1)]


def test_ties_hand_example():
    b, xs = _ties_inputs()
    # density 0.5, n = 6 -> k = 3.
    # model 0 keeps |5|, |3|, |2|      -> [3, 0, 2, -5, 0, 0]
    # model 1 keeps |4|, |2| and one |1|: the tie among i0, i3, i4 goes to i0
    #                                  -> [-1, 4, -2, 0, 0, 0]
    # weights 1, 3: t0 = [3, 0, 2, -5, 0, 0], t1 = [-3, 12, -6, 0, 0, 0]
    # S = [0, 12, -4, -5, 0, 0] -> s = [+, +, -, -, +, +]   (S = 0 elects +)
    # agree: m0 = [1, 0, 0, 1, 0, 0], m1 = [0, 1, 1, 0, 0, 0]
    # mixed = [3, 12, -6, -5, 0, 0], divisor = [1, 3, 3, 1, 0->1, 0->1]
    out = merge("ties", b, xs, weights=[1, 3], density=0.5)  # normalize defaults to true
    assert torch.equal(out, expect([v + m for v, m in zip(B6, [3, 4, -2, -5, 0, 0])]))
    out = merge("ties", b, xs, weights=[1, 3], density=0.5, normalize=False)
    assert torch.equal(out, expect([v + m for v, m in zip(B6, [3, 12, -6, -5, 0, 0])]))
    out = merge("ties", b, xs, weights=[1, 3], density=0.5, normalize=False, lam=0.5)
    assert torch.equal(out, expect([v + m / 2 for v, m in zip(B6, [3, 12, -6, -5, 0, 0])]))


def test_ties_peft_options_hand_example():
    b, xs = _ties_inputs()
    # unweighted election: S = d0' + d1' = [2, 4, 0, -5, 0, 0] -> s = [+, +, +, -, +, +]
    # agree on sign(d'_i): m0 = [1, 0, 1, 1, 0, 0], m1 = [0, 1, 0, 0, 0, 0]
    # mixed = sum m_i t_i = [3, 12, 2, -5, 0, 0]; count divisor = [1, 1, 1, 1, 1, 1]
    out = merge("ties", b, xs, weights=[1, 3], density=0.5,
                consensus_weighting="unweighted", disjoint="count")
    assert torch.equal(out, expect([v + m for v, m in zip(B6, [3, 12, 2, -5, 0, 0])]))
    # weighted election with count divisor: mixed [3, 12, -6, -5, 0, 0], count [1,1,1,1,1,1]
    out = merge("ties", b, xs, weights=[1, 3], density=0.5, disjoint="count")
    assert torch.equal(out, expect([v + m for v, m in zip(B6, [3, 12, -6, -5, 0, 0])]))


def test_magnitude_ties_lower_index_wins():
    b = torch.zeros(6)
    x = t32(1, -1, 1, -1, 1, -1)
    assert merge("ties", b, [x], density=0.5).tolist() == [1, -1, 1, 0, 0, 0]
    # floor(0.1 * 6) = 0 -> k = max(1, 0) = 1
    assert merge("ties", b, [x], density=0.1).tolist() == [1, 0, 0, 0, 0, 0]
    assert merge("ties", b, [x], density=0.0).tolist() == [0] * 6
    assert merge("ties", b, [x], density=1.0).tolist() == x.tolist()
    assert magnitude_mask(t32(3, 2, 2, 2, 1, 0.5), 0.5).tolist() == [1, 1, 1, 0, 0, 0]
    assert magnitude_mask(t32(0.5, 2, 3, 2, 1, 2), 0.5).tolist() == [0, 1, 1, 1, 0, 0]


def test_magnitude_k_uses_one_double_multiply():
    delta = torch.arange(1, 101, dtype=F32)
    # 0.29 * 100 = 28.999999999999996 in double -> k = 28 (not 29)
    assert int(magnitude_mask(delta, 0.29).sum()) == 28
    assert magnitude_mask(delta, 0.29)[-28:].all()
    # 0.7 * 10 = 7.000000000000001 -> 7
    assert int(magnitude_mask(torch.arange(10, dtype=F32), 0.7).sum()) == 7


# ---------------------------------------------------------------------------
# magnitude_outliers (breadcrumbs)


def test_breadcrumbs_hand_example():
    x = t32(0.1, -5, 0.3, 0.2, -0.4, 7, 0.6, -0.7, 0.8, 0.05)
    b = torch.zeros(10)
    # n = 10, d = 0.5 -> target 5; gamma 0.1 -> n_top 1; n_bot = 10 - 5 - 1 = 4.
    # ascending |delta|: i9 .05, i0 .1, i3 .2, i2 .3, i4 .4, i6 .6, i7 .7, i8 .8, i1 5, i5 7
    # drop the 4 smallest (i9 i0 i3 i2) and the largest (i5); keep i4 i6 i7 i8 i1
    keep = [0, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    out = merge("breadcrumbs", b, [x], density=0.5, gamma=0.1)
    assert torch.equal(out, x * torch.tensor(keep, dtype=F32))
    # target + n_top > n: n_bot = 0, keep the 9 smallest, drop only the largest (i5)
    m = magnitude_outliers_mask(x, 0.95, 0.1)
    assert m.tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    # d = 1 keeps everything whatever gamma
    assert magnitude_outliers_mask(x, 1.0, 0.1).all()
    assert not magnitude_outliers_mask(x, 0.0, 0.1).any()


def test_breadcrumbs_ties_drop_lower_index_first_at_the_bottom():
    x = torch.ones(10)
    # ascending order by (|delta|, index) is i0..i9: drop i0..i3 and i9
    assert magnitude_outliers_mask(x, 0.5, 0.1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    out = merge("breadcrumbs", torch.zeros(10), [-x], density=0.5, gamma=0.1)
    assert out.tolist() == [0, 0, 0, 0, -1, -1, -1, -1, -1, 0]


def test_breadcrumbs_ties_method_two_models():
    b = torch.zeros(5)
    x0 = t32(1, -2, 3, -4, 5)
    x1 = t32(-5, 4, 3, -2, -1)
    # d 0.6 -> target 3, gamma 0.2 -> n_top 1, n_bot 1:
    #   model 0 drops i0 (|1|) and i4 (|5|) -> [0, -2, 3, -4, 0]
    #   model 1 drops i4 (|1|) and i0 (|5|) -> [0, 4, 3, -2, 0]
    # S = [0, 2, 6, -6, 0] -> s = [+, +, +, -, +]; consensus without normalize:
    # i1: only model 1 agrees -> 4; i2: 6; i3: -6
    out = merge("breadcrumbs_ties", b, [x0, x1], density=0.6, gamma=0.2)
    assert out.tolist() == [0, 4, 6, -6, 0]


# ---------------------------------------------------------------------------
# random (DARE)

NAME = "model.layers.3.mlp.down_proj.weight"


def test_dare_mask_is_the_philox_rule():
    n = 1001  # not a multiple of 4: the last block is cut
    g = torch.Generator().manual_seed(1)
    b = torch.randn(n, generator=g)
    x = b + torch.randn(n, generator=g)
    delta = task_vector(x, b).to(F64)
    draws = ph.philox_draws(12345, ph.stream_id(NAME, 2), n)
    keep = torch.from_numpy(draws.astype(np.int64) < 1288490188)  # floor(0.3 * 2^32)
    # model at position 2 (e.g. the third non-base model of a config)
    p = resolve_merge_params("dare_linear", 1, density=0.3, rescale=False, seed=12345,
                             name=NAME, model_positions=[2])
    out = merge_tensors_reference(b, [x], p)
    assert torch.equal(out, round_from_float64(b.to(F64) + delta * keep, F32))
    # default rescale l1: kept entries times ||delta||_1 / ||delta'||_1
    p = resolve_merge_params("dare_linear", 1, density=0.3, seed=12345, name=NAME,
                             model_positions=[2])
    kept = delta * keep
    factor = float(delta.abs().sum()) / float(kept.abs().sum())
    out = merge_tensors_reference(b, [x], p)
    assert torch.equal(out, round_from_float64(b.to(F64) + kept * factor, F32))
    # inverse_density: kept / 0.3, as multiplication by 1/0.3
    p = resolve_merge_params("dare_linear", 1, density=0.3, rescale="inverse_density",
                             seed=12345, name=NAME, model_positions=[2])
    out = merge_tensors_reference(b, [x], p)
    assert torch.equal(out, round_from_float64(b.to(F64) + kept * (1.0 / 0.3), F32))


def test_dare_mask_statistics_and_streams():
    shape = (400, 500)
    m0 = random_mask(shape, 0.3, 99, ph.stream_id(NAME, 0))
    m1 = random_mask(shape, 0.3, 99, ph.stream_id(NAME, 1))
    n = m0.numel()
    sigma = math.sqrt(0.3 * 0.7 / n)
    for m in (m0, m1):
        assert abs(m.float().mean().item() - 0.3) < 6 * sigma
    # independent streams: overlap ~ d^2
    assert abs((m0 & m1).float().mean().item() - 0.09) < 6 * math.sqrt(0.09 * 0.91 / n)
    # deterministic, and the seed matters
    assert torch.equal(m0, random_mask(shape, 0.3, 99, ph.stream_id(NAME, 0)))
    assert not torch.equal(m0, random_mask(shape, 0.3, 100, ph.stream_id(NAME, 0)))
    assert random_mask(shape, 1.0, 99, 0).all() and not random_mask(shape, 0.0, 99, 0).any()


def test_dare_ties_uses_each_models_stream():
    g = torch.Generator().manual_seed(2)
    b = torch.randn(64, 33, generator=g)
    xs = [b + torch.randn(64, 33, generator=g) for _ in range(2)]
    p = resolve_merge_params("dare_ties", 2, density=0.5, seed=7, name=NAME, rescale=False,
                             normalize=True)
    out = merge_tensors_reference(b, xs, p)
    # rebuild by hand: masks from positions 0 and 1, then weighted consensus
    ds = [task_vector(x, b).to(F64) for x in xs]
    ks = [random_mask(b.shape, 0.5, 7, ph.stream_id(NAME, i)) for i in range(2)]
    t = [d * k for d, k in zip(ds, ks)]
    s = torch.where(t[0] + t[1] >= 0, 1.0, -1.0).to(F64)
    ms = [torch.sign(ti) == s for ti in t]
    mixed = t[0] * ms[0] + t[1] * ms[1]
    div = ms[0].to(F64) + ms[1].to(F64)
    div[div == 0] = 1
    assert torch.equal(out, round_from_float64(b.to(F64) + mixed / div, F32))


# ---------------------------------------------------------------------------
# della_magprune


def test_della_probabilities_by_hand():
    # |delta| ranks: i1 .1 -> 1, i3 .2 -> 2, i2 .3 -> 3, i0 .4 -> 4, i4 .5 -> 5
    delta = t32(0.4, -0.1, 0.3, 0.2, -0.5)
    p = della_keep_probabilities(delta, 0.5, 0.2)
    assert p.dtype == F64
    rn = [0.75, 0.0, 0.5, 0.25, 1.0]
    assert p.tolist() == [(0.5 - 0.2) + (2.0 * 0.2) * r for r in rn]
    # ties: lower index takes the lower rank
    assert della_keep_probabilities(t32(1, 1, 1), 0.5, 0.2).tolist() == \
        [(0.5 - 0.2) + 0.4 * r for r in (0.0, 0.5, 1.0)]
    # 2-D: each row ranked on its own
    d2 = torch.tensor([[3.0, 1.0, 2.0], [0.1, -0.3, 0.2]])
    assert della_keep_probabilities(d2, 0.5, 0.2).tolist() == \
        [[0.3 + 0.4 * r for r in row] for row in ([1.0, 0.0, 0.5], [0.0, 1.0, 0.5])]
    # 3-D [2, 2, 2] -> rows of 4
    d3 = torch.tensor([4.0, 3, 2, 1, 1, 2, 3, 4]).reshape(2, 2, 2)
    assert della_keep_probabilities(d3, 0.5, 0.3).reshape(-1).tolist() == \
        [0.2 + 0.6 * r for r in (1, 2 / 3, 1 / 3, 0, 0, 1 / 3, 2 / 3, 1)]
    # a row of one entry gets rank_norm 0
    assert della_keep_probabilities(t32(5, 1, 3).reshape(3, 1), 0.5, 0.2).reshape(-1).tolist() \
        == [0.5 - 0.2] * 3


def test_della_mask_is_the_philox_rule():
    delta = t32(0.4, -0.1, 0.3, 0.2, -0.5, 0.05, 0.9)
    sid = ph.stream_id(NAME, 1)
    draws = ph.philox_draws(3, sid, 7).astype(np.int64)
    ranks = [5, 2, 4, 3, 6, 1, 7]
    thr = [math.floor(((0.5 - 0.2) + (2.0 * 0.2) * ((r - 1) / 6)) * 2**32) for r in ranks]
    assert della_mask(delta, 0.5, 0.2, 3, sid).tolist() == [bool(d < t) for d, t in zip(draws, thr)]
    # through merge: della_linear, no rescale, weight 1 -> b + delta * keep
    b = torch.zeros(7)
    p = resolve_merge_params("della_linear", 1, density=0.5, epsilon=0.2, seed=3, name=NAME,
                             model_positions=[1], rescale=False)
    keep = torch.tensor([bool(d < t) for d, t in zip(draws, thr)])
    assert torch.equal(merge_tensors_reference(b, [delta], p), delta * keep)


def test_della_keep_rate_per_rank():
    rows, cols = 20000, 5
    g = torch.Generator().manual_seed(5)
    # each row is a random permutation of magnitudes 1..5 with random signs
    mags = torch.argsort(torch.rand(rows, cols, generator=g), dim=1).to(F32) + 1
    signs = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    delta = mags * signs
    keep = della_mask(delta, 0.5, 0.2, 11, ph.stream_id("x", 0))
    for r in range(1, cols + 1):
        rate = keep[mags == r].float().mean().item()
        p = 0.3 + 0.4 * (r - 1) / (cols - 1)
        assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / rows), (r, rate, p)


def test_della_hand_consensus():
    # della (consensus + normalize + l1 rescale by default) on a tensor whose masks we rebuild
    g = torch.Generator().manual_seed(8)
    b = torch.randn(16, 9, generator=g)
    xs = [b + torch.randn(16, 9, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    p = resolve_merge_params("della", 3, weights=w, density=0.6, epsilon=0.1, seed=4, name=NAME)
    out = merge_tensors_reference(b, xs, p)
    t = []
    for i, x in enumerate(xs):
        d = task_vector(x, b)
        k = della_mask(d, 0.6, 0.1, 4, ph.stream_id(NAME, i))
        kept = d.to(F64) * k
        kept = kept * (float(d.to(F64).abs().sum()) / float(kept.abs().sum()))
        t.append(w[i] * kept)
    s = torch.where(t[0] + t[1] + t[2] >= 0, 1.0, -1.0).to(F64)
    ms = [(torch.sign(ti) == s).to(F64) for ti in t]
    mixed = sum(ti * mi for ti, mi in zip(t, ms))
    div = sum(wi * mi for wi, mi in zip(w, ms))
    div[div == 0] = 1
    torch.testing.assert_close(out, round_from_float64(b.to(F64) + mixed / div, F32),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# rescale


def test_rescale_l1_and_inverse_density_by_hand():
    b = torch.zeros(6)
    x = t32(4, -2, 1, -1, 0.5, 0.5)
    # k = 3 keeps [4, -2, 1, 0, 0, 0] (|1| tie: i2 before i3); ||delta||_1 = 9, kept 7
    out = merge("ties", b, [x], weights=2.0, density=0.5, rescale=True)
    assert torch.equal(out, expect([4 * (9 / 7), -2 * (9 / 7), 1 * (9 / 7), 0, 0, 0]))
    out = merge("ties", b, [x], density=0.5, rescale="inverse_density")
    assert out.tolist() == [8, -4, 2, 0, 0, 0]
    out = merge("ties", b, [x], density=0.5, rescale=False)
    assert out.tolist() == [4, -2, 1, 0, 0, 0]


def test_rescale_l1_skipped_for_tiny_norms():
    b = torch.zeros(4)
    # whole norm 6e-8 + ... = 1.8e-7 >= 1e-7 but kept norm 6e-8 < 1e-7: no rescale
    x = t32(6e-8, 5e-8, 4e-8, 3e-8)
    out = merge("ties", b, [x], density=0.25, rescale=True)
    assert out.tolist() == [x[0].item(), 0, 0, 0]
    # whole norm below 1e-7: no rescale
    x = t32(4e-8, 2e-8, 1e-8, 1e-8)
    out = merge("ties", b, [x], density=0.5, rescale=True)
    assert out.tolist() == [x[0].item(), x[1].item(), 0, 0]
    # density 0 with inverse_density: nothing kept, no division by zero
    out = merge("ties", b, [x], density=0.0, rescale="inverse_density")
    assert out.tolist() == [0, 0, 0, 0]


def test_task_arithmetic_ignores_density_and_rescale():
    b, xs = _ties_inputs()
    a = merge("task_arithmetic", b, xs, weights=[1, 3])
    assert torch.equal(a, merge("task_arithmetic", b, xs, weights=[1, 3], density=0.2,
                                rescale="inverse_density"))


# ---------------------------------------------------------------------------
# dtypes, shapes, errors


def test_mixed_dtypes_and_out_dtype():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(7, 5, generator=g).to(torch.bfloat16)
    x0 = (b.float() + 0.01 * torch.randn(7, 5, generator=g)).to(torch.float16)
    x1 = b.float() + 0.01 * torch.randn(7, 5, generator=g)
    out = merge("task_arithmetic", b, [x0, x1], weights=[0.7, 0.4])
    assert out.dtype == torch.bfloat16 and out.shape == (7, 5)
    exact = b.to(F64) + 0.7 * task_vector(x0, b).to(F64) + 0.4 * task_vector(x1, b).to(F64)
    assert torch.equal(out, round_from_float64(exact, torch.bfloat16))
    out32 = merge("task_arithmetic", b, [x0, x1], out_dtype=F32, weights=[0.7, 0.4])
    assert out32.dtype == F32 and torch.equal(out32, round_from_float64(exact, F32))


def test_non_contiguous_inputs_use_logical_order():
    g = torch.Generator().manual_seed(4)
    b = torch.randn(6, 8, generator=g).t()  # [8, 6] view, not contiguous
    x = b + torch.randn(8, 6, generator=g)
    for method in ("ties", "dare_ties", "della", "breadcrumbs"):
        kw = dict(density=0.5, epsilon=0.1, gamma=0.1, name=NAME) if method != "ties" \
            else dict(density=0.5)
        kw = {k: v for k, v in kw.items() if not (k == "epsilon" and method != "della")}
        a = merge(method, b, [x], **kw)
        c = merge(method, b.contiguous(), [x.contiguous()], **kw)
        assert torch.equal(a, c), method


def test_empty_and_scalar_tensors():
    e = torch.empty(0, 4)
    out = merge("ties", e, [e.clone()], density=0.5)
    assert out.shape == (0, 4) and out.dtype == F32
    s = torch.tensor(2.0)
    out = merge("della", s, [torch.tensor(3.0)], density=0.5, epsilon=0.1, name="n")
    assert out.shape == () and out.item() in (2.0, 3.0)


def test_bad_inputs_raise_clear_errors():
    b = torch.zeros(4)
    x = torch.ones(4)
    p1 = resolve_merge_params("ties", 1, density=0.5)
    with pytest.raises(ValueError, match="shape"):
        merge_tensors_reference(b, [torch.ones(5)], p1)
    with pytest.raises(ValueError, match="2 tensors"):
        merge_tensors_reference(b, [x, x], p1)
    with pytest.raises(ValueError, match="non-finite.*index 2"):
        merge_tensors_reference(b, [t32(0, 1, float("nan"), 3)], p1)
    with pytest.raises(ValueError, match="base"):
        merge_tensors_reference(None, [x], p1)
    with pytest.raises(TypeError, match="dtype"):
        merge_tensors_reference(b, [torch.ones(4, dtype=torch.int32)], p1)
    with pytest.raises(TypeError, match="MergeParams"):
        merge_tensors_reference(b, [x], {"method": "ties"})
    with pytest.raises(TypeError, match="out_dtype"):
        merge_tensors_reference(b, [x], p1, torch.int8)
    with pytest.raises(ValueError, match="empty"):
        merge_tensors_reference(b, [], p1)
    assert isinstance(p1, MergeParams)
