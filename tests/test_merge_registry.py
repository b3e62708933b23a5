"""The merge-method registry is the one declaration: the C table, the docs table, the
config parser and the C++ planner all agree with it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm_engine.core import merge_registry as R
from lfm_engine.core.merge_methods import MergeConfigError, resolve_merge_params
from lfm_engine.merge import config as C
from lfm_engine.reference import merge as ref

ROOT = Path(__file__).resolve().parents[1]


def _native():
    from lfm_engine._native import has_native, native
    if not has_native():
        pytest.skip("the compiled core lfm_engine._C is not built")
    return native()


def test_generated_tables_are_fresh():
    # csrc/kernels/merge/merge_methods_table.h and docs/merge.md's table come from the registry
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_merge_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compiled_c_table_equals_the_registry():
    rows, defaults, ranges = _native().merge_method_table()
    assert [r["name"] for r in rows] == list(R.FUSED_METHODS)
    for r in rows:
        m = R.METHODS[r["name"]]
        assert r["code"] == m.code == R.METHOD_CODES[m.name]
        assert r["sparsifier"] == m.sparsifier
        assert (r["consensus"], r["normalize_default"], r["rescale_default"], r["uses_base"]) == \
            (m.consensus, m.normalize_default, m.rescale_default, m.uses_base)
        assert (r["checks_gamma"], r["checks_epsilon"]) == (m.has("gamma"), m.has("epsilon"))
    assert defaults == {"weight": R.WEIGHT.default, "density": R.DENSITY.default, "gamma": R.GAMMA.default,
                        "epsilon": R.EPSILON.default, "lambda": R.LAMBDA.default}
    assert ranges["density"] == (R.DENSITY.lo, R.DENSITY.hi)
    assert ranges["gamma"] == (R.GAMMA.lo, R.GAMMA.hi)
    assert ranges["epsilon"] == (R.EPSILON.lo, None)


def test_c_and_python_word_parameter_errors_alike():
    from lfm_engine._tensor import view
    C_ = _native()
    base = torch.zeros(8)
    xs = [torch.ones(8), torch.ones(8)]
    out = torch.empty(8)
    for kw, py in (({"densities": [0.5, 1.5]}, {"density": [0.5, 1.5]}),
                   ({"gammas": [0.5, -0.1]}, {"gamma": [0.5, -0.1]})):
        with pytest.raises(ValueError) as c_err:
            C_.merge(view(base), [view(x) for x in xs], view(out), method=R.METHOD_CODES["breadcrumbs"],
                     model_names=["a", "b"], **kw)
        with pytest.raises(MergeConfigError) as py_err:
            resolve_merge_params("breadcrumbs", 2, model_names=["a", "b"], **py)
        assert str(py_err.value) in str(c_err.value), (str(c_err.value), str(py_err.value))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_model_names_reach_every_error(backend):
    import lfm_engine
    base = torch.zeros(16)
    xs = [torch.ones(16), torch.ones(16)]
    xs[1][3] = float("nan")
    with pytest.raises(ValueError, match="model folder/ft2"):
        lfm_engine.merge_tensors(base, xs, "ties", density=0.5, backend=backend, model_names=["ft1", "folder/ft2"])
    with pytest.raises(ValueError, match="model 1"):
        lfm_engine.merge_tensors(base, xs, "ties", density=0.5, backend=backend)


def test_every_method_is_parsed_with_its_declared_parameters():
    for name, m in R.METHODS.items():
        assert C.INPUT_PARAMS[name] == m.input_params
        assert C.SHARED_PARAMS[name] == m.shared_params
        assert (name in C.BASE_REQUIRED) == (m.base == R.BASE_REQUIRED)
        for p in m.params:
            if p.numeric:
                assert p.name in C.NUMERIC_PARAMS
    assert C.ALL_METHODS == R.ALL_METHODS
    assert set(R.ALL_METHODS) == set(R.FUSED_METHODS) | set(R.TORCH_METHODS)


def _outside(p: R.Param):
    """A value just outside p's declared range, or None when it has none."""
    if p.kind == "bool":
        return "maybe"
    if p.kind == "choice":
        return "no-such-choice"
    if p.lo is not None:
        return p.lo if p.lo_open else p.lo - 0.5
    if p.hi is not None:
        return p.hi + 0.5
    return None


@pytest.mark.parametrize("method", R.TORCH_METHODS)
def test_torch_method_ranges_are_enforced(method):
    m = R.METHODS[method]
    good = {p.name: (0.5 if p.default is R.REQUIRED and p.numeric else None) for p in m.params if not p.per_model}
    m.shared_values(good)   # the defaults (and a value for required ones) pass
    for p in m.params:
        if p.per_model:
            continue
        bad = _outside(p)
        if bad is None:
            continue
        with pytest.raises(MergeConfigError, match=f"'{p.name}'"):
            m.shared_values(dict(good, **{p.name: bad}))
        if p.default is R.REQUIRED:
            with pytest.raises(MergeConfigError, match="required"):
                m.shared_values({k: v for k, v in good.items() if k != p.name})


def test_param_range_text():
    assert R.DENSITY.range_text() == "[0, 1]"
    assert R.EPSILON.range_text() == ">= 0"
    assert R.METHODS["karcher"].param("max_iter").range_text() == "an integer >= 1"
    assert R.METHODS["multislerp"].param("eps").range_text() == "a positive number"


# ---------------------------------------------------------------- the C++ planner


def _answer(v: torch.Tensor, pos: int):
    """(value, c_lt, c_eq) of ascending position pos of v (int64 bit patterns)."""
    s = torch.sort(v).values
    value = int(s[pos])
    return value, int((v < value).sum()), int((v == value).sum())


def _planned_mask(method: str, delta: torch.Tensor, d: float, gamma: float) -> torch.Tensor:
    C_ = _native()
    code = R.METHOD_CODES[method]
    n = delta.numel()
    v = delta.reshape(-1).abs().view(torch.int32).to(torch.int64)
    cuts, queries = C_.merge_plan_cuts(code, n, [d], [gamma])
    for model, pos, upper in queries:
        value, c_lt, c_eq = _answer(v, pos)
        cut, field, ordinal = C_.merge_apply_cut_answer(code, n, model, pos, upper, value, c_lt, c_eq, cuts[model])
        if field:
            cut[field] = int((v == value).nonzero()[ordinal])
        cuts[model] = cut
    c = cuts[0]
    if c["all"]:
        return torch.ones(delta.shape, dtype=torch.bool)
    if c["none"]:
        return torch.zeros(delta.shape, dtype=torch.bool)
    e = torch.arange(n)
    keep = (v >= c["lo_v"]) & (v <= c["hi_v"])
    keep &= ~((v == c["lo_v"]) & ((e < c["lo_emin"]) | (e > c["lo_emax"])))
    keep &= ~((v == c["hi_v"]) & ((e < c["hi_emin"]) | (e > c["hi_emax"])))
    return keep.reshape(delta.shape)


@pytest.mark.parametrize("n", [1, 7, 129, 1000])
@pytest.mark.parametrize("d", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_planner_cuts_equal_the_reference_masks(n, d):
    g = torch.Generator().manual_seed(n)
    # few distinct values, so the cuts fall inside runs of ties
    delta = (torch.randint(-4, 5, (n,), generator=g).float() * 0.25)
    assert torch.equal(_planned_mask("ties", delta, d, 0.0), ref.magnitude_mask(delta, d))
    for gamma in (0.0, 0.05, 0.3):
        if d + gamma > 1.0:
            continue
        assert torch.equal(_planned_mask("breadcrumbs", delta, d, gamma),
                           ref.magnitude_outliers_mask(delta, d, gamma)), (d, gamma)


@pytest.mark.parametrize("cols", [1, 2, 7, 300])
def test_planner_della_thresholds_equal_the_reference(cols):
    p = ref.della_keep_probabilities(torch.arange(cols, dtype=torch.float32).reshape(1, cols), 0.4, 0.15)
    want = [int(x) for x in torch.floor(p.reshape(-1).clamp(0, 1) * 4294967296.0).to(torch.int64)]
    assert _native().merge_della_thresholds(cols, 0.4, 0.15) == want


def test_planner_coefficients():
    co = _native().merge_coefficients(R.METHOD_CODES["ties"], [0.5, 0.3, 0.2], [1.0, 2.0, 1.0], True, False, False)
    assert co["coef"] == [float(torch.tensor(x, dtype=torch.float32)) for x in (0.5, 0.6, 0.2)]
    assert co["table"] and len(co["inv_div"]) == 8
    assert co["inv_div"][0b101] == float(torch.tensor(1.0 / (0.5 + 0.2), dtype=torch.float32))
    assert co["inv_div"][0] == 1.0   # no agreeing model: divisor 0 counts as 1
    co = _native().merge_coefficients(R.METHOD_CODES["ties"], [1.0] * 9, [1.0] * 9, True, True, True)
    assert not co["table"] and co["dshare"] == [1.0] * 9


def test_cli_help_lists_every_method():
    from lfm_engine.cli.merge import methods_help
    text = methods_help()
    for name in R.ALL_METHODS:
        assert f"  {name} " in text


def test_spec_citations_point_at_files_that_exist():
    # every docs/spec file a source file cites is in the repository, and no file cites
    # the old shared-docs path (spec/ without docs/ before it)
    import re
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    cited, bare = set(), []
    for f in files:
        if not f.endswith((".py", ".cpp", ".h", ".cu", ".inc", ".c", ".toml")):
            continue
        text = (ROOT / f).read_text(encoding="utf-8", errors="replace")
        cited |= set(re.findall(r"docs/spec/\w+\.md", text))
        bare += [f for _ in re.finditer(r"(?<![\w/.-])spec/\w+\.md", text)]
    assert not bare, f"cite docs/spec/...: {sorted(set(bare))}"
    missing = [c for c in cited if not (ROOT / c).is_file()]
    assert not missing, missing
