"""Multi-LoRA batched ops (docs/spec/lora.md): every backend vs reference/lora.py.

Cases: dtypes, mixed heterogeneous ranks, odd and real hidden sizes, T in {1, 7, 64, 513},
uniform / zipf / single-adapter slot mixes with no-adapter tokens, multi-slice offsets,
segment form == token form, bad inputs -> clear errors, torch.compile, Triton under
TRITON_INTERPRET=1 (small sizes, fp32/fp16), CUDA and Triton on a GPU (`cuda` marker).
"""
from __future__ import annotations


import pytest
import torch

from conftest import assert_close, poison, triton_available
from lfm_engine._native import has_native
from lfm_engine.ops.lora import lora_apply, lora_apply_slices, lora_expand, lora_shrink
from lfm_engine.reference.lora import (lora_apply_reference, lora_expand_reference, lora_shrink_reference,
                                       segments_to_token_slot)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = [1, 4, 8, 16, 64, 128, 256]


def native_ready() -> bool:
    if not has_native():
        return False
    from lfm_engine._native import native

    return hasattr(native(), "lora_apply")


needs_native = pytest.mark.skipif(not native_ready(), reason="lfm_engine._C without the lora ops")


def make_slots(T: int, n_slots: int, mix: str, gen: torch.Generator, p_none: float = 0.15) -> torch.Tensor:
    """token_slot[T] int32 for a slot mix; about p_none of the tokens use no adapter (-1)."""
    if mix == "uniform":
        s = torch.randint(0, n_slots, (T,), generator=gen)
    elif mix == "zipf":  # Punica's skewed mix: slot k drawn with weight 1/(k+1)^1.5
        w = 1.0 / torch.arange(1, n_slots + 1, dtype=torch.float64) ** 1.5
        s = torch.multinomial(w, T, replacement=True, generator=gen)
    elif mix == "single":
        s = torch.full((T,), n_slots - 1, dtype=torch.long)
    else:
        raise ValueError(mix)
    none = torch.rand(T, generator=gen) < p_none
    s[none] = -1
    return s.to(torch.int32)


def make_tables(n_slots, R_max, H_in, H_out, dtype, ranks, gen, device="cpu"):
    """A, B with garbage (large values) in the padding beyond each rank: it must never be read."""
    A = torch.randn(n_slots, R_max, H_in, generator=gen) / H_in ** 0.5
    B = torch.randn(n_slots, H_out, R_max, generator=gen) / max(1, R_max) ** 0.5
    for s, r in enumerate(ranks):
        A[s, r:] = 1e4
        B[s, :, r:] = 1e4
    return A.to(dtype).to(device), B.to(dtype).to(device)


def run_case(backend, T, H_in, H_out, dtype, ranks, mix, *, extra_cols=3, off=2, seed=0, device="cpu",
             check_shrink=True):
    gen = torch.Generator().manual_seed(seed)
    n_slots = len(ranks)
    R_max = max(max(ranks), 1)
    A, B = make_tables(n_slots, R_max, H_in, H_out, dtype, ranks, gen, device)
    x = torch.randn(T, H_in, generator=gen).to(dtype).to(device)
    ts = make_slots(T, n_slots, mix, gen).to(device)
    rk = torch.tensor(ranks, dtype=torch.int32, device=device)
    sc = (torch.rand(n_slots, generator=gen) + 0.5).to(device)
    y0 = torch.randn(T, H_out + extra_cols, generator=gen).to(dtype).to(device)

    if check_shrink:
        u = poison(torch.empty(T, R_max))
        u = lora_shrink(x, A, ts, rk, backend=backend)
        ur = lora_shrink_reference(x.cpu(), A.cpu(), ts.cpu(), rk.cpu())
        assert u.dtype == torch.float32 and u.shape == (T, R_max)
        assert_close(u, ur, torch.float32, atol=2e-5, rtol=2e-5)
        y = y0.clone()
        lora_expand(ur.to(device), B, ts, rk, sc, y, off, backend=backend)
        yr = lora_expand_reference(ur, B.cpu(), ts.cpu(), rk.cpu(), sc.cpu(), y0.cpu().clone(), off)
        assert_close(y, yr, dtype)
    y = y0.clone()
    lora_apply(x, A, B, ts, rk, sc, y, off, backend=backend)
    yr = lora_apply_reference(x.cpu(), A.cpu(), B.cpu(), ts.cpu(), rk.cpu(), sc.cpu(), y0.cpu().clone(), off)
    assert_close(y, yr, dtype)
    # columns outside the slice and rows of no-adapter tokens are untouched, bit for bit
    keep = torch.ones_like(y0, dtype=torch.bool)
    keep[:, off:off + H_out] = False
    keep[(ts < 0)] = True
    assert torch.equal(y[keep].cpu(), y0[keep].cpu())


# ---- native CPU kernel --------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H_in,H_out", [(1, 33, 21), (7, 129, 77), (64, 257, 130), (513, 64, 96)])
@pytest.mark.parametrize("mix", ["uniform", "zipf", "single"])
def test_cpu_mixed_ranks(dtype, T, H_in, H_out, mix):
    run_case("cpu", T, H_in, H_out, dtype, RANKS, mix)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H_in,H_out,T", [(4096, 4096, 7), (4096, 11008, 3), (14336, 4096, 2)])
def test_cpu_real_sizes(dtype, H_in, H_out, T):
    run_case("cpu", T, H_in, H_out, dtype, [16, 8, 64], "uniform", check_shrink=(H_in == 4096))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_zero_rank_and_all_none(dtype):
    run_case("cpu", 9, 40, 24, dtype, [0, 3, 0], "uniform")
    gen = torch.Generator().manual_seed(1)
    A, B = make_tables(2, 4, 16, 8, dtype, [4, 4], gen)
    x = torch.randn(5, 16).to(dtype)
    y = torch.randn(5, 8).to(dtype)
    y0 = y.clone()
    ts = torch.full((5,), -1, dtype=torch.int32)
    lora_apply(x, A, B, ts, [4, 4], [1.0, 1.0], y)
    assert torch.equal(y, y0)
    u = lora_shrink(x, A, ts, [4, 4])
    assert torch.equal(u, torch.zeros(5, 4))


@needs_native
def test_cpu_mixed_dtypes_and_strided_x():
    """fp32 adapter on a bf16 model; x a column slice of a wider activation."""
    gen = torch.Generator().manual_seed(3)
    A, B = make_tables(3, 8, 48, 20, torch.float32, [8, 2, 5], gen)
    big = torch.randn(11, 60, generator=gen).to(torch.bfloat16)
    x = big[:, 5:53]
    ts = make_slots(11, 3, "uniform", gen)
    y = torch.randn(11, 20).to(torch.bfloat16)
    yr = lora_apply_reference(x, A, B, ts, torch.tensor([8, 2, 5]), torch.tensor([1.0, 2.0, 0.5]), y.clone())
    lora_apply(x, A, B, ts, [8, 2, 5], [1.0, 2.0, 0.5], y)
    assert_close(y, yr, torch.bfloat16)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_thread_count_invariant(dtype):
    """Bit-identical for any number of threads (the H_in split depends on shapes only)."""
    gen = torch.Generator().manual_seed(4)
    A, B = make_tables(2, 16, 3000, 300, dtype, [16, 9], gen)
    x = torch.randn(3, 3000, generator=gen).to(dtype)
    ts = torch.tensor([1, 0, 1], dtype=torch.int32)
    outs = []
    for nt in (1, 2, 3):
        y = torch.zeros(3, 300, dtype=dtype)
        lora_apply(x, A, B, ts, [16, 9], [0.5, 2.0], y, n_threads=nt)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_slot", [1, 2, 3])
@pytest.mark.parametrize("H_in,H_out", [(1024, 1024), (1030, 70), (2816, 1029)])
def test_cpu_decode_tiles(dtype, per_slot, H_in, H_out):
    """Mixed decode: 1, 2 or 3 tokens per adapter (the four-row shrink and the token-pair
    expand), ranks that are not multiples of four, interleaved rows, H tails, 16 slots and 5
    slots (the expand's runs of column chunks then end inside a tile or span two)."""
    for n_slots in (16, 5):
        ranks = [16, 6, 3, 5, 16][:n_slots] if n_slots == 5 else [16, 6, 3, 5] * 4
        gen = torch.Generator().manual_seed(per_slot * 7 + H_in)
        R = max(ranks)
        A, B = make_tables(n_slots, R, H_in, H_out, dtype, ranks, gen)
        T = n_slots * per_slot
        x = torch.randn(T, H_in, generator=gen).to(dtype)
        ts = (torch.arange(T) % n_slots).to(torch.int32)  # rows of one adapter far apart
        ts[1] = -1
        rk = torch.tensor(ranks, dtype=torch.int32)
        sc = torch.rand(n_slots, generator=gen) + 0.5
        y0 = torch.randn(T, H_out, generator=gen).to(dtype)
        y = y0.clone()
        lora_apply(x, A, B, ts, rk, sc, y)
        yr = lora_apply_reference(x, A, B, ts, rk, sc, y0.clone())
        assert_close(y, yr, dtype)
        assert torch.equal(y[1], y0[1])
        u = lora_shrink(x, A, ts, rk)
        assert_close(u, lora_shrink_reference(x, A, ts, rk), torch.float32, atol=2e-5, rtol=2e-5)


@needs_native
def test_prepared_shrink_expand_equal_public_ops():
    """lora_shrink_prepared / lora_expand_prepared (the served group path) give the public ops' bits."""
    from lfm_engine.ops.lora import lora_expand_prepared, lora_prepare, lora_shrink_prepared
    from lfm_engine.serve.route import _join

    gen = torch.Generator().manual_seed(9)
    tabs = [make_tables(4, 8, 96, w, torch.float32, [8, 3, 0, 5], gen) for w in (40, 24)]
    rk = torch.tensor([8, 3, 0, 5], dtype=torch.int32)
    sc = torch.tensor([1.0, 2.0, 0.5, 0.25])
    x = torch.randn(6, 96, generator=gen)
    ts = torch.tensor([0, 1, -1, 3, 1, 0], dtype=torch.int32)
    preps = [lora_prepare(A, B, rk, sc) for A, B in tabs]
    u = poison(torch.empty(2, 6, 8))
    lora_shrink_prepared(x, _join(preps), ts, u)
    assert torch.equal(u, lora_shrink(x, [A for A, _ in tabs], ts, [rk, rk]))
    for i, (A, B) in enumerate(tabs):
        y0 = torch.randn(6, B.shape[1], generator=gen)
        y, ye = y0.clone(), y0.clone()
        lora_expand_prepared(u[i], preps[i], ts, y, [0])
        lora_expand(u[i], B, ts, rk, sc, ye)
        assert torch.equal(y, ye)


# ---- multi-slice and segment form (every CPU backend) ----------------------------------------

CPU_BACKENDS = ["reference"] + (["cpu"] if native_ready() else [])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_slice_qkv(backend, dtype):
    """q/k/v (GQA widths) in one call == three single-slice calls at their offsets."""
    gen = torch.Generator().manual_seed(5)
    T, H, n_slots = 13, 64, 4
    widths = [64, 16, 16]
    ranks_q, ranks_kv = [8, 4, 16, 1], [8, 0, 16, 1]  # slot 1 has no k/v LoRA
    tabs = [make_tables(n_slots, 16, H, w, dtype, rk, gen) for w, rk in zip(widths, [ranks_q, ranks_kv, ranks_kv])]
    x = torch.randn(T, H, generator=gen).to(dtype)
    ts = make_slots(T, n_slots, "uniform", gen)
    sc = torch.rand(n_slots, generator=gen)
    y0 = torch.randn(T, sum(widths) + 5, generator=gen).to(dtype)
    offs = [5, 69, 85]
    ranks = [ranks_q, ranks_kv, ranks_kv]
    y = y0.clone()
    lora_apply_slices(x, [(a, b, o) for (a, b), o in zip(tabs, offs)], ts, ranks, sc, y, backend=backend)
    yr = y0.clone()
    for (a, b), o, rk in zip(tabs, offs, ranks):
        lora_apply_reference(x, a, b, ts, torch.tensor(rk), sc, yr, o)
    assert_close(y, yr, dtype)
    # stacked shrink / expand with the same slices
    u = lora_shrink(x, [a for a, _ in tabs], ts, ranks, backend=backend)
    assert u.shape == (3, T, 16)
    y2 = y0.clone()
    lora_expand(u, [b for _, b in tabs], ts, ranks, sc, y2, offs, backend=backend)
    assert_close(y2, yr, dtype)
    # default offsets: side by side from column 0
    y3 = torch.zeros(T, sum(widths), dtype=dtype)
    lora_apply(x, [a for a, _ in tabs], [b for _, b in tabs], ts, ranks, sc, y3, backend=backend)
    yr3 = torch.zeros(T, sum(widths), dtype=dtype)
    for (a, b), o, rk in zip(tabs, [0, 64, 80], ranks):
        lora_apply_reference(x, a, b, ts, torch.tensor(rk), sc, yr3, o)
    assert_close(y3, yr3, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_form_equals_token_form(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    ranks = [4, 16, 8]
    A, B = make_tables(3, 16, 72, 40, dtype, ranks, gen)
    seg_start = torch.tensor([0, 5, 5, 17, 18, 30], dtype=torch.int32)  # includes an empty segment
    seg_slot = torch.tensor([2, 0, -1, 1, 2], dtype=torch.int32)
    T = 30
    x = torch.randn(T, 72, generator=gen).to(dtype)
    ts = segments_to_token_slot(seg_start, seg_slot)
    sc = [0.5, 1.0, 2.0]
    y0 = torch.randn(T, 40, generator=gen).to(dtype)
    ya, yb = y0.clone(), y0.clone()
    lora_apply(x, A, B, ts, ranks, sc, ya, backend=backend)
    lora_apply(x, A, B, None, ranks, sc, yb, seg_start=seg_start, seg_slot=seg_slot, backend=backend)
    assert torch.equal(ya, yb)
    ua = lora_shrink(x, A, ts, ranks, backend=backend)
    ub = lora_shrink(x, A, ranks=ranks, seg_start=seg_start, seg_slot=seg_slot, backend=backend)
    assert torch.equal(ua, ub)
    yc = y0.clone()
    lora_expand(ub, B, None, ranks, sc, yc, seg_start=seg_start, seg_slot=seg_slot, backend=backend)
    assert_close(yc, ya, dtype)  # shrink -> expand rounds u to fp32; the reference's apply keeps float64


# ---- errors ----------------------------------------------------------------------------------

def _small(dtype=torch.float32):
    A = torch.randn(3, 8, 16, dtype=dtype)
    B = torch.randn(3, 12, 8, dtype=dtype)
    x = torch.randn(4, 16, dtype=dtype)
    y = torch.zeros(4, 12, dtype=dtype)
    ts = torch.tensor([0, 1, -1, 2], dtype=torch.int32)
    return x, A, B, y, ts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors(backend):
    x, A, B, y, ts = _small()
    r, sc = [8, 4, 2], [1.0, 1.0, 1.0]
    kw = dict(backend=backend)
    with pytest.raises(IndexError, match=r"token_slot\[1\] = 3 is out of range"):
        lora_apply(x, A, B, torch.tensor([0, 3, 0, 0], dtype=torch.int32), r, sc, y, **kw)
    with pytest.raises(IndexError, match="out of range"):
        lora_shrink(x, A, torch.tensor([0, -2, 0, 0], dtype=torch.int32), r, **kw)
    with pytest.raises(IndexError, match="outside the int32 range"):  # would wrap to slot 0
        lora_shrink(x, A, torch.tensor([0, 2 ** 32, 0, 0]), r, **kw)
    with pytest.raises(IndexError, match="outside the int32 range"):
        lora_shrink(x, A, [0, 2 ** 32, 0, 0], r, **kw)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 9 is outside 0..R_max = 8"):
        lora_apply(x, A, B, ts, [8, 9, 1], sc, y, **kw)
    with pytest.raises(ValueError, match=r"ranks\[1\] = -1 is outside"):
        lora_shrink(x, A, ts, [8, -1, 1], **kw)
    with pytest.raises(ValueError, match="H_in"):
        lora_apply(x[:, :15], A, B, ts, r, sc, y, **kw)
    with pytest.raises(ValueError, match="B has shape"):
        lora_apply(x, A, B[:, :, :4].contiguous(), ts, r, sc, y, **kw)
    with pytest.raises(ValueError, match="token_slot has 3 entries"):
        lora_apply(x, A, B, ts[:3], r, sc, y, **kw)
    with pytest.raises(TypeError, match="integer tensor"):
        lora_apply(x, A, B, ts.float(), r, sc, y, **kw)
    with pytest.raises(TypeError, match="dtype torch.int32"):
        lora_apply(x, A.int(), B, ts, r, sc, y, **kw)
    with pytest.raises(TypeError, match="u must be a float32"):
        lora_expand(torch.zeros(4, 8, dtype=torch.float16), B, ts, r, sc, y, **kw)
    with pytest.raises(ValueError, match="y has 3 rows"):
        lora_apply(x, A, B, ts, r, sc, y[:3], **kw)
    with pytest.raises(IndexError, match="writes columns"):
        lora_apply(x, A, B, ts, r, sc, y, 1, **kw)
    with pytest.raises(ValueError, match="overlapping"):
        lora_apply(x, [A, A], [B, B], ts, r, sc, torch.zeros(4, 30), [0, 10], **kw)
    with pytest.raises(ValueError, match="unit stride"):
        lora_apply(x, A, B, ts, r, sc, torch.zeros(12, 4).t(), **kw)
    with pytest.raises(ValueError, match=r"scales\[1\] = nan is not finite"):
        lora_apply(x, A, B, ts, r, [1.0, float("nan"), 1.0], y, **kw)
    with pytest.raises(ValueError, match="scales must have shape"):
        lora_apply(x, A, B, ts, r, [1.0, 1.0], y, **kw)
    with pytest.raises(ValueError, match="not both"):
        lora_apply(x, A, B, ts, r, sc, y, seg_start=[0, 4], seg_slot=[0], **kw)
    with pytest.raises(ValueError, match="no slot map"):
        lora_apply(x, A, B, None, r, sc, y, **kw)
    with pytest.raises(ValueError, match="end at T = 4"):
        lora_apply(x, A, B, None, r, sc, y, seg_start=[0, 2, 3], seg_slot=[0, 1], **kw)
    with pytest.raises(ValueError, match="non-decreasing"):
        lora_apply(x, A, B, None, r, sc, y, seg_start=[0, 3, 2, 4], seg_slot=[0, 1, 2], **kw)
    with pytest.raises(IndexError, match=r"seg_slot\[1\] = 7"):
        lora_apply(x, A, B, None, r, sc, y, seg_start=[0, 2, 4], seg_slot=[0, 7], **kw)
    with pytest.raises(ValueError, match="contiguous"):
        lora_apply(x, A.transpose(1, 2).contiguous().transpose(1, 2), B, ts, r, sc, y, **kw)
    assert torch.equal(y, torch.zeros(4, 12))  # nothing was written by the failed calls


@needs_native
def test_c_abi_checks_values_itself():
    """validate=False skips the Python value checks; the C ABI still refuses bad slots/ranks."""
    from lfm_engine._native import native
    from lfm_engine import _tensor

    x, A, B, y, ts = _small()
    bad = torch.tensor([0, 5, 0, 0], dtype=torch.int32)
    r = torch.tensor([8, 4, 2], dtype=torch.int32)
    sc = torch.ones(3)
    with pytest.raises(IndexError, match=r"lfm_lora_apply: token_slot\[1\] = 5"):
        native().lora_apply(_tensor.view(x), [_tensor.view(A)], [_tensor.view(B)], [_tensor.view(r)],
                            [_tensor.view(sc)], [0], _tensor.view(bad), None, None, _tensor.view(y), 1, 0, 0)
    bad_r = torch.tensor([8, 99, 1], dtype=torch.int32)  # held alive: views are raw pointers
    u = torch.empty(4, 8)
    with pytest.raises(ValueError, match="outside 0..R_max = 8"):
        native().lora_shrink(_tensor.view(x), [_tensor.view(A)], [_tensor.view(bad_r)], _tensor.view(ts), None, None,
                             _tensor.view(u), 1, 0, 0)
    # unchecked: an out-of-range slot is "no adapter", never an out-of-bounds read
    y2 = torch.zeros(4, 12)
    native().lora_apply(_tensor.view(x), [_tensor.view(A)], [_tensor.view(B)], [_tensor.view(r)],
                        [_tensor.view(sc)], [0], _tensor.view(bad), None, None, _tensor.view(y2), 0, 0, 0)
    assert torch.equal(y2[1], torch.zeros(12))
    # unchecked malformed segments (past T, decreasing, negative): clamped, never out of bounds
    ss = torch.tensor([0, 9, -3, 4], dtype=torch.int32)
    sl = torch.tensor([1, 7, 0], dtype=torch.int32)
    y3 = torch.zeros(4, 12)
    native().lora_apply(_tensor.view(x), [_tensor.view(A)], [_tensor.view(B)], [_tensor.view(r)],
                        [_tensor.view(sc)], [0], None, _tensor.view(ss), _tensor.view(sl), _tensor.view(y3), 0, 0, 0)
    assert torch.isfinite(y3).all()
    sl[1] = 2
    with pytest.raises(ValueError, match="non-decreasing"):
        native().lora_apply(_tensor.view(x), [_tensor.view(A)], [_tensor.view(B)], [_tensor.view(r)],
                            [_tensor.view(sc)], [0], None, _tensor.view(ss), _tensor.view(sl), _tensor.view(y3), 1, 0,
                            0)


# ---- torch.compile ----------------------------------------------------------------------------

@needs_native
def test_torch_compile_cpu():
    x, A, B, y, ts = _small()
    r = torch.tensor([8, 4, 2], dtype=torch.int32)
    sc = torch.tensor([1.0, 0.5, 2.0])
    W = torch.randn(12, 16)

    def layer(x, y):
        base = x @ W.t()
        out = base + 0  # a fresh buffer the LoRA op updates in place
        lora_apply(x, A, B, ts, r, sc, out)
        u = lora_shrink(x, A, ts, r)
        return out, u

    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    out_c, u_c = compiled(x, y)
    out_e, u_e = layer(x, y)
    assert_close(out_c, out_e, torch.float32)
    assert_close(u_c, u_e, torch.float32)


def test_custom_ops_registered():
    for name in ("lora_shrink", "lora_expand", "lora_apply"):
        assert hasattr(torch.ops.lfm, name)
    x, A, B, y, ts = _small()
    r = torch.tensor([8, 4, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lfm.lora_shrink, (x, [A], ts, None, None, [r], "reference", True, 0))


# ---- Triton (interpreter on the CPU; real kernels on a GPU) -----------------------------------

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton needs a GPU or TRITON_INTERPRET=1")


@needs_triton
# bf16 is fine here: these kernels use no tl.dot (the interpreter's bf16 tl.dot is the broken part)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,mix", [(1, "single"), (7, "uniform"), (20, "zipf")])
def test_triton_interpreter_small(dtype, T, mix):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_case("triton", T, 40, 24, dtype, [1, 4, 8, 16], mix, device=device)


@needs_triton
def test_triton_multi_slice_and_segments():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(8)
    ranks = [4, 8]
    A1, B1 = make_tables(2, 8, 32, 16, torch.float32, ranks, gen, device)
    A2, B2 = make_tables(2, 8, 32, 8, torch.float32, ranks, gen, device)
    x = torch.randn(6, 32, generator=gen).to(device)
    y0 = torch.randn(6, 24, generator=gen).to(device)
    ss = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    sl = torch.tensor([1, 0], dtype=torch.int32, device=device)
    y = y0.clone()
    lora_apply(x, [A1, A2], [B1, B2], None, ranks, [1.0, 2.0], y, seg_start=ss, seg_slot=sl, backend="triton")
    yr = y0.cpu().clone()
    lora_apply(x.cpu(), [A1.cpu(), A2.cpu()], [B1.cpu(), B2.cpu()], None, ranks, [1.0, 2.0], yr,
               seg_start=ss.cpu(), seg_slot=sl.cpu(), backend="reference")
    assert_close(y, yr, torch.float32)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------

def skip_unbuilt(backend):
    from lfm_engine.ops._dispatch import native_has_cuda

    if backend == "cuda" and not native_has_cuda():
        pytest.skip("this build of lfm_engine has no CUDA kernels")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H_in,H_out,mix", [(1, 4096, 4096, "single"), (7, 129, 77, "uniform"),
                                              (64, 4096, 11008, "zipf"), (513, 257, 130, "uniform")])
def test_gpu(backend, dtype, T, H_in, H_out, mix):
    skip_unbuilt(backend)
    run_case(backend, T, H_in, H_out, dtype, RANKS, mix, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_multi_slice_segments(backend):
    skip_unbuilt(backend)
    gen = torch.Generator().manual_seed(9)
    ranks = [16, 4, 64]
    tabs = [make_tables(3, 64, 256, w, torch.bfloat16, ranks, gen, "cuda") for w in (256, 64, 64)]
    x = torch.randn(40, 256, generator=gen).to(torch.bfloat16).cuda()
    ss = torch.tensor([0, 10, 11, 40], dtype=torch.int32, device="cuda")
    sl = torch.tensor([2, -1, 0], dtype=torch.int32, device="cuda")
    y0 = torch.randn(40, 384, generator=gen).to(torch.bfloat16).cuda()
    y = y0.clone()
    lora_apply(x, [a for a, _ in tabs], [b for _, b in tabs], None, ranks, [1.0, 2.0, 0.5], y,
               seg_start=ss, seg_slot=sl, backend=backend)
    yr = y0.cpu().clone()
    lora_apply(x.cpu(), [a.cpu() for a, _ in tabs], [b.cpu() for _, b in tabs], None, ranks, [1.0, 2.0, 0.5], yr,
               seg_start=ss.cpu(), seg_slot=sl.cpu(), backend="reference")
    assert_close(y, yr, torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS + (["triton"] if triton_available() and not torch.cuda.is_available()
                                                    else []))
@pytest.mark.parametrize("case", ["no_tokens", "rmax_0", "h_in_0", "no_slots"])
def test_empty_shapes(backend, case):
    """Degenerate but legal shapes: nothing to do, nothing written, u all zero."""
    T, H_in, n, R, H_out = {"no_tokens": (0, 16, 2, 4, 8), "rmax_0": (3, 16, 2, 0, 8), "h_in_0": (3, 0, 2, 4, 8),
                            "no_slots": (3, 16, 0, 4, 8)}[case]
    x = torch.randn(T, H_in)
    A = torch.randn(n, R, H_in)
    B = torch.randn(n, H_out, R)
    ts = torch.full((T,), -1 if n == 0 else 1, dtype=torch.int32)
    y = torch.randn(T, H_out)
    y0 = y.clone()
    lora_apply(x, A, B, ts, None, [1.0] * n, y, backend=backend)
    assert torch.equal(y, y0)
    u = lora_shrink(x, A, ts, backend=backend)
    assert u.shape == (T, R) and not u.any()


@needs_native
@pytest.mark.parametrize("seed", range(12))
def test_cpu_random_configs(seed):
    """Random shapes, dtypes, ranks, slot maps (token or segment form) and slices vs the reference."""
    g = torch.Generator().manual_seed(100 + seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    dt_x = DTYPES[ri(0, 2)]
    dt_w = DTYPES[ri(0, 2)]
    T, H_in, n_slots, R = ri(1, 70), ri(1, 300), ri(1, 6), ri(1, 40)
    n_sl = ri(1, 3)
    widths = [ri(1, 90) for _ in range(n_sl)]
    ranks = [[ri(0, R) for _ in range(n_slots)] for _ in range(n_sl)]
    tabs = [make_tables(n_slots, R, H_in, w, dt_w, rk, g) for w, rk in zip(widths, ranks)]
    x = torch.randn(T, H_in, generator=g).to(dt_x)
    sc = torch.rand(n_slots, generator=g) * 4
    gap = ri(0, 5)
    offs, pos = [], gap
    for w in widths:
        offs.append(pos)
        pos += w + ri(0, 3)
    y0 = torch.randn(T, pos, generator=g).to(dt_x)
    if ri(0, 1):
        cuts = sorted(ri(0, T) for _ in range(ri(0, 5)))
        seg_start = torch.tensor([0] + cuts + [T], dtype=torch.int32)
        seg_slot = torch.randint(-1, n_slots, (len(cuts) + 1,), generator=g, dtype=torch.int32)
        ts = segments_to_token_slot(seg_start, seg_slot)
        form = dict(seg_start=seg_start, seg_slot=seg_slot)
        slots_arg = None
    else:
        ts = torch.randint(-1, n_slots, (T,), generator=g, dtype=torch.int32)
        form, slots_arg = {}, ts
    y = y0.clone()
    lora_apply(x, [a for a, _ in tabs], [b for _, b in tabs], slots_arg, ranks, sc, y, offs, **form)
    yr = y0.clone()
    for (a, b), rk, o in zip(tabs, ranks, offs):
        lora_apply_reference(x, a, b, ts, torch.tensor(rk), sc, yr, o)
    assert_close(y, yr, dt_x)
    u = lora_shrink(x, [a for a, _ in tabs], slots_arg, ranks, **form)
    for i, ((a, _), rk) in enumerate(zip(tabs, ranks)):
        assert_close(u[i], lora_shrink_reference(x, a, ts, torch.tensor(rk)), torch.float32, atol=2e-5, rtol=2e-5)
