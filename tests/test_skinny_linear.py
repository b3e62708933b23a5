"""skinny_linear (docs/spec/skinny_linear.md): y = x W^T (+ b) for M <= 16 rows, and its use as
the base matmul of the served linears (serve/attach.py).

The kernel is compared with the float64 reference within the spec's bound
(K + 2) * 2^-24 * (sum |x w| + |b|) plus the rounding of y to its dtype, for every dtype,
M = 1..16, odd N and K (vector tails), every SIMD level this host runs and 1 or 2 threads.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import lfm_engine
from lfm_engine import _tensor
from lfm_engine._native import native
from lfm_engine.ops.skinny_linear import MAX_M, native_available, skinny_linear
from lfm_engine.reference.skinny_linear import skinny_linear_bound, skinny_linear_reference

pytestmark = pytest.mark.skipif(not native_available(), reason="the compiled core lfm_engine._C is not built")

UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _levels():
    host = lfm_engine.build_info()["simd_host"]
    return {"avx512": ["baseline", "avx2", "avx512"], "avx2": ["baseline", "avx2"]}.get(host, [host])


@pytest.fixture(autouse=True)
def _restore_level():
    yield
    lfm_engine.set_simd_level(None)


def _check(y, x, w, b):
    """|y - exact| <= bound + u_y * (|exact| + bound), element-wise."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    bound = skinny_linear_bound(x, w, b)
    err = (y.double() - exact).abs()
    lim = bound + UNIT[y.dtype] * (exact.abs() + bound)
    bad = err > lim
    assert not bad.any(), (f"{int(bad.sum())} elements off; worst excess {float((err - lim).max()):.3e} "
                           f"(err {float(err.max()):.3e})")


@pytest.mark.parametrize("level", _levels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(37, 129), (5, 7), (70, 1000), (16, 16)])
def test_kernel_matches_reference_every_m_level_dtype(level, dtype, N, K):
    lfm_engine.set_simd_level(level)
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    for M in range(1, MAX_M + 1):
        x = torch.randn(M, K, generator=g).to(dtype)
        for bias in (b, None):
            y = skinny_linear(x, w, bias)
            assert y.dtype == dtype and y.shape == (M, N)
            _check(y, x, w, bias)


def test_threads_and_levels_agree_with_torch():
    """Thread count never changes the bits (each output is one task's); every level is within
    twice the bound of torch's own fp32 result."""
    g = torch.Generator().manual_seed(3)
    w, x, b = torch.randn(300, 515, generator=g), torch.randn(9, 515, generator=g), torch.randn(300, generator=g)
    one = skinny_linear(x, w, b, n_threads=1)
    assert torch.equal(skinny_linear(x, w, b, n_threads=2), one)
    ref = torch.nn.functional.linear(x, w, b)
    for level in _levels():
        lfm_engine.set_simd_level(level)
        y = skinny_linear(x, w, b)
        assert ((y.double() - ref.double()).abs() <= 2 * skinny_linear_bound(x, w, b) + 1e-30).all(), level


def test_shapes_views_mixed_dtypes_and_empty():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(2, 3, 40, generator=g)  # leading dims are rows
    y = skinny_linear(x, w)
    assert y.shape == (2, 3, 24)
    _check(y.reshape(6, 24), x.reshape(6, 40), w, None)
    xt = torch.randn(40, 4, generator=g).T  # a strided view of x is read as is
    _check(skinny_linear(xt, w), xt, w, None)
    # an fp32 weight under bf16 activations: y in x's dtype, fp32 products
    xb = torch.randn(3, 40, generator=g).to(torch.bfloat16)
    _check(skinny_linear(xb, w), xb, w, None)
    assert skinny_linear(torch.empty(0, 40), w).shape == (0, 24)
    b = torch.randn(24, generator=g)
    assert torch.equal(skinny_linear(torch.empty(3, 0), torch.empty(24, 0), b), b.expand(3, 24))
    assert skinny_linear(torch.randn(3, 40), torch.empty(0, 40)).shape == (3, 0)
    assert torch.equal(skinny_linear(x, w, backend="reference"), skinny_linear_reference(x.reshape(6, 40), w).reshape(2, 3, 24))


def test_bad_inputs_give_clear_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="at most 16"):
        skinny_linear(torch.randn(17, 16), w)
    with pytest.raises(ValueError, match="K = 15"):
        skinny_linear(torch.randn(2, 15), w)
    with pytest.raises(ValueError, match="bias has shape"):
        skinny_linear(torch.randn(2, 16), w, torch.randn(7))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        skinny_linear(torch.randn(2, 8), torch.randn(8, 16).T)
    with pytest.raises(TypeError, match="int32"):
        skinny_linear(torch.randn(2, 16), w.to(torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        skinny_linear(torch.randn(2, 16), torch.randn(2, 8, 16))
    # the C ABI refuses the same things by itself (any front end gets the message)
    C, v = native(), _tensor.view
    y = torch.empty(2, 8)
    with pytest.raises(ValueError, match="unit stride along its last dimension"):
        C.skinny_linear(v(torch.randn(16, 2).T), v(w), None, v(y), 0)
    with pytest.raises(ValueError, match="weight is not contiguous"):
        C.skinny_linear(v(torch.randn(2, 8)), v(torch.randn(8, 8).T), None, v(y), 0)
    with pytest.raises(ValueError, match=r"y has shape \[2, 7\]"):
        C.skinny_linear(v(torch.randn(2, 16)), v(w), None, v(torch.empty(2, 7)), 0)
    with pytest.raises(ValueError, match="M = 17"):
        C.skinny_linear(v(torch.randn(17, 16)), v(w), None, v(torch.empty(17, 8)), 0)
    with pytest.raises(TypeError, match="int32"):
        C.skinny_linear(v(torch.randn(2, 16)), v(w), v(torch.zeros(8, dtype=torch.int32)), v(y), 0)
    with pytest.raises(ValueError, match="n_threads"):
        C.skinny_linear(v(torch.randn(2, 16)), v(w), None, v(y), -1)


# ---------------------------------------------------------------------------------------
# the served linears
# ---------------------------------------------------------------------------------------

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (the served model)")


def _served_model(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lfm_engine.ops.codec import encode_delta
    from lfm_engine.serve import AdapterPool, LoRALinear, attach

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    pool = AdapterPool(capacity=1, delta_capacity=3, dtype=dtype)
    attach(model, pool)
    g = torch.Generator().manual_seed(1)
    lin = {n: m.base for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for k, codec in enumerate(("sign1", "int4", "sign1")):
        opts = {"group_size": 32} if codec == "int4" else {}
        pool.add_delta(f"d{k}", {n: encode_delta(0.02 * torch.randn(m.weight.shape, generator=g), codec, **opts)
                                 for n, m in lin.items()})
    return model, pool


def _count_calls(monkeypatch):
    mod = sys.modules["lfm_engine.serve.attach"]
    calls = []
    real = mod.linear_rows

    def counted(x2, w, b):
        calls.append(x2.shape[0])
        return real(x2, w, b)

    monkeypatch.setattr(mod, "linear_rows", counted)
    return calls


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_served_step_with_the_kernel_equals_the_step_without(monkeypatch, dtype):
    model, pool = _served_model(dtype)
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 96, (4, 3), generator=torch.Generator().manual_seed(2))  # 12 tokens
    names = ["d0", None, "d1", "d2"]
    with torch.no_grad(), pool.assign(names):
        on = model(ids).logits
        assert calls and set(calls) == {12}  # every projection of the step went through the kernel
        pool.skinny_base = False
        n = len(calls)
        off = model(ids).logits
        assert len(calls) == n
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(on.float(), off.float(), **tol)
    assert (on[0] - on[1]).abs().max() > 1e-3  # the delta rows still differ from the base row
    # more tokens than the kernel takes, and no assignment: torch's base(x), bit for bit
    pool.skinny_base = True
    big = torch.randint(0, 96, (4, 5), generator=torch.Generator().manual_seed(3))  # 20 tokens
    with torch.no_grad():
        with pool.assign(names):
            a = model(big).logits
        pool.skinny_base = False
        with pool.assign(names):
            b = model(big).logits
        assert torch.equal(a, b)
        calls.clear()
        pool.skinny_base = True
        model(ids)
        assert not calls


@needs_transformers
def test_grad_mode_and_env_switch_use_torch(monkeypatch):
    model, pool = _served_model()
    calls = _count_calls(monkeypatch)
    ids = torch.randint(0, 96, (4, 1))
    with pool.assign(["d0", None, "d1", "d2"]):
        model(ids)  # grad mode on: autograd needs torch's matmul
    assert not calls
    env = dict(os.environ, LFM_SKINNY_LINEAR="0")
    code = "from lfm_engine.serve import AdapterPool; print(AdapterPool().skinny_base)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_transformers
def test_compile_records_the_kernel_without_graph_breaks():
    model, pool = _served_model()
    ids = torch.randint(0, 96, (3, 2), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    try:
        with torch.no_grad(), pool.assign(["d0", None, "d2"]):
            explained = torch._dynamo.explain(model)(ids)
            want = model(ids).logits
            assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
            assert explained.graph_count == 1
            assert "skinny_linear" in explained.graphs[0].code
            torch._dynamo.reset()
            got = torch.compile(model, backend="aot_eager")(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@needs_transformers
def test_output_embedding_uses_the_kernel_inside_assignments(monkeypatch):
    """attach() wraps lm_head in a SkinnyHead: no adapter terms, the skinny base matmul inside
    an active assignment, the base layer bit for bit outside; detach() puts it back."""
    from lfm_engine.serve import LoRALinear, detach
    from lfm_engine.serve.attach import SkinnyHead

    model, pool = _served_model()
    assert isinstance(model.lm_head, SkinnyHead)
    mod = sys.modules["lfm_engine.serve.attach"]
    shapes = []
    real = mod.linear_rows
    monkeypatch.setattr(mod, "linear_rows", lambda x, w, b: shapes.append(tuple(w.shape)) or real(x, w, b))
    ids = torch.randint(0, 96, (4, 1), generator=torch.Generator().manual_seed(5))
    head = model.lm_head.base
    with torch.no_grad():
        with pool.assign(["d0", None, "d1", "d2"]):
            on = model(ids).logits
        assert (96, 64) in shapes  # the head's weight went through the kernel
        pool.skinny_base = False
        with pool.assign(["d0", None, "d1", "d2"]):
            off = model(ids).logits
        pool.skinny_base = True
        torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
        shapes.clear()
        plain = model(ids).logits  # no assignment: torch's lm_head
        assert not shapes
        h = model.model(ids).last_hidden_state
        assert torch.equal(plain, head(h))
    n_lin = sum(isinstance(m, LoRALinear) for m in model.modules())
    assert detach(model) == n_lin and model.lm_head is head
