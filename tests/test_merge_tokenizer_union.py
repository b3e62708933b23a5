"""Merged vocabularies (issue 13): `tokenizer_source: union | base | <model>` and
`tokenizer: {source, tokens, pad_to_multiple_of}`.

Fixtures are tiny Llama models with real tokenizers (WordLevel tokenizer.json files made
with the `tokenizers` library) whose vocabularies differ: added special tokens, tokens
in another order, tokens missing. Every embedding row is checked against a float64
reading of mergekit's rule written here token by token (`remap64`), and, where mergekit
is installed, the whole output against mergekit's run_merge on the same config (rows compared
by token, since mergekit numbers the new tokens in set/hash order).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_close  # noqa: E402
from fixtures_models import finetune, llama_config, load_folder, random_weights, write_model  # noqa: E402
from merge_cli_helpers import run  # noqa: E402

from lfm_engine import merge_tensors  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers", reason="building a merged vocabulary needs transformers")

EMB = ("model.embed_tokens.weight", "lm_head.weight")
WORDS = [f"w{i}" for i in range(20)]
# name -> (regular vocabulary in id order, added tokens [(content, special)] in id order)
SPECS = {
    "base": (WORDS, []),
    "ft1": (WORDS, [("<|im_start|>", True), ("<|im_end|>", True)]),
    "ft2": (WORDS[:5] + ["v0", "v1", "v2"] + WORDS[5:18], [("<x>", False)]),   # no w18, w19
}


def write_tokenizer(path, words, added):
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                          unk_token=words[0]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    for content, special in added:   # one at a time: ids in the listed order
        (tk.add_special_tokens if special else tk.add_tokens)([tokenizers.AddedToken(content, special=special)])
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "w1", "eos_token": "w2",
                   "unk_token": "w0"}, f)


def vocab_of(words, added):
    return {t: i for i, t in enumerate(list(words) + [a for a, _ in added])}


def make_models(root, specs=SPECS, tied=False, pad_rows=0):
    """A model per spec: shared weights fine-tuned from one base; each token's embedding row
    is a common per-token row plus the model's own small delta."""
    everything = sorted({t for w, a in specs.values() for t in vocab_of(w, a)})
    g = torch.Generator().manual_seed(11)
    master = {t: 0.05 * torch.randn(16, generator=g) for t in everything}
    cfg0 = llama_config(hidden=16, layers=2, intermediate=32, vocab=8, heads=4, kv_heads=2)
    shared = {n: t for n, t in random_weights(cfg0, 0).items() if n not in EMB}
    paths = {}
    for k, (name, (words, added)) in enumerate(specs.items()):
        voc = vocab_of(words, added)
        cfg = dict(cfg0, vocab_size=len(voc) + pad_rows, tie_word_embeddings=tied)
        w = finetune(shared, 100 + k) if name != "base" else dict(shared)
        for n in EMB[: 1 if tied else 2]:
            rows = torch.stack([master[t] for t in sorted(voc, key=voc.get)])
            rows = rows + 0.01 * torch.randn(rows.shape, generator=g)
            w[n] = torch.cat([rows, 0.05 * torch.randn(pad_rows, 16, generator=g)])
        p = write_model(os.path.join(root, name), cfg, w, tokenizer=False)
        write_tokenizer(p, words, added)
        paths[name] = p
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return make_models(str(root)), {n: load_folder(os.path.join(str(root), n)) for n in SPECS}


def union_vocab(names):
    """The expected union: the first model's vocabulary, then each other model's missing
    tokens in its id order."""
    out = dict(vocab_of(*SPECS[names[0]]))
    for n in names[1:]:
        v = vocab_of(*SPECS[n])
        for t in sorted(v, key=v.get):
            out.setdefault(t, len(out))
    return out


def remap64(out_vocab, mats, base, rules=None, rows=None):
    """mergekit's PermutedVocabulary read in float64, token by token.

    mats: {model: (its vocabulary, [V, D] tensor)}; base: the config's base_model or None;
    rules: {token: (source, force)} with source None, ("zero",), ("model", m) or
    ("model_token", m, row). -> {model: [rows, D] float64}."""
    rules = rules or {}
    n = len(out_vocab)
    rows = rows or n
    D = next(iter(mats.values()))[1].shape[1]

    def has(m, t):
        v, X = mats[m]
        return t in v and v[t] < X.shape[0]

    def row(m, t):
        v, X = mats[m]
        return X[v[t]].double()

    default = {}
    for t in out_vocab:
        src, force = rules.get(t, (None, False))
        holders = [m for m in mats if has(m, t)]
        if not force and len(holders) == len(mats):
            continue
        if src is None:
            if len(holders) == 1:
                d = row(holders[0], t)
            elif not holders:
                d = torch.zeros(D, dtype=torch.float64)
            elif base in holders:
                d = row(base, t)
            else:
                d = sum(row(m, t) for m in holders) / len(holders)
        elif src[0] == "zero":
            d = torch.zeros(D, dtype=torch.float64)
        elif src[0] == "model":
            d = row(src[1], t)
        else:
            d = mats[src[1]][1][src[2]].double()
        default[t] = d
    out = {}
    for m in mats:
        Y = torch.zeros(rows, D, dtype=torch.float64)
        for t, j in out_vocab.items():
            force = rules.get(t, (None, False))[1]
            Y[j] = row(m, t) if has(m, t) and not force else default[t]
        if rows > n:
            Y[n:] = Y[:n].mean(0)
        out[m] = Y
    return out


def mats_for(T, names, tensor):
    return {n: (vocab_of(*SPECS[n]), T[n][tensor]) for n in names}


def saved_vocab(out):
    return transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()


def check_loads(out, vocab):
    """transformers loads the folder; the tokenizer encodes the new tokens to their ids and the
    model runs on them."""
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    ids = [vocab[t] for t in sorted(vocab, key=vocab.get)[-4:]]
    assert tok.convert_tokens_to_ids([t for t in sorted(vocab, key=vocab.get)[-4:]]) == ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


# ------------------------------------------------------------------ union, linear, no base

def test_union_linear_rows_and_saved_tokenizer(models, tmp_path):
    paths, T = models
    names = ["base", "ft1", "ft2"]
    w = {"base": 1.0, "ft1": 0.5, "ft2": 0.25}
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": paths[n], "parameters": {"weight": w[n]}} for n in names]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    exp_vocab = union_vocab(names)
    got_vocab = saved_vocab(out)
    assert got_vocab == exp_vocab      # the base's ids first, then config order, by id
    assert json.load(open(out / "config.json"))["vocab_size"] == len(exp_vocab) == 26
    added = transformers.AutoTokenizer.from_pretrained(str(out)).added_tokens_decoder
    assert added[exp_vocab["<|im_start|>"]].special and not added[exp_vocab["<x>"]].special
    got = load_folder(str(out))
    total = sum(w.values())
    for tensor in EMB:
        Y = remap64(exp_vocab, mats_for(T, names, tensor), base=None)
        exp = sum(w[n] * Y[n] for n in names) / total
        assert_close(got[tensor], exp.float(), torch.float32)
    for name, x in got.items():
        if name not in EMB:
            assert_close(x, (sum(w[n] * T[n][name].double() for n in names) / total).float(), torch.float32)
    check_loads(out, exp_vocab)


# ------------------------------------------------------------------ ties with a base + rules

RULES_CFG = {
    "<|im_start|>": {"source": "FT1", "force": True},
    "<x>": {"source": {"kind": "zero"}},
    "<|im_end|>": {"source": {"kind": "model_token", "model": "FT1", "token": "w2"}},
    "<new>": {"source": {"kind": "model_token", "model": "BASE", "token_id": 3}},
}


def rules_cfg(paths):
    sub = {"FT1": paths["ft1"], "BASE": paths["base"]}
    text = json.dumps(RULES_CFG)
    for k, v in sub.items():
        text = text.replace(f'"{k}"', json.dumps(v))
    return json.loads(text)


def test_ties_with_token_rules_and_padding(models, tmp_path):
    paths, T = models
    names = ["base", "ft1", "ft2"]
    cfg = {"merge_method": "ties", "base_model": paths["base"], "dtype": "float32",
           "parameters": {"density": 0.6},
           "tokenizer": {"source": "union", "tokens": rules_cfg(paths), "pad_to_multiple_of": 8},
           "models": [{"model": paths[n], "parameters": {"weight": 0.7}} for n in names[1:]]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    exp_vocab = union_vocab(names)
    exp_vocab["<new>"] = len(exp_vocab)            # a `tokens:` entry no model has: appended
    assert saved_vocab(out) == exp_vocab
    rows = 32                                       # 27 tokens padded to a multiple of 8
    assert json.load(open(out / "config.json"))["vocab_size"] == rows
    ft1_v = vocab_of(*SPECS["ft1"])
    rules = {"<|im_start|>": (("model", "ft1"), True), "<x>": (("zero",), False),
             "<|im_end|>": (("model_token", "ft1", ft1_v["w2"]), False),
             "<new>": (("model_token", "base", 3), False)}
    got = load_folder(str(out))
    for tensor in EMB:
        Y = remap64(exp_vocab, mats_for(T, names, tensor), base="base", rules=rules, rows=rows)
        exp = merge_tensors(Y["base"].float(), [Y["ft1"].float(), Y["ft2"].float()], method="ties",
                            weights=0.7, density=0.6, backend="reference")
        assert_close(got[tensor], exp, torch.float32)
        # the rules as mergekit defines them: the forced row is ft1's in every model, so the
        # task vectors vanish there and the merge keeps it
        assert_close(got[tensor][exp_vocab["<|im_start|>"]], T["ft1"][tensor][ft1_v["<|im_start|>"]],
                     torch.float32)
    check_loads(out, exp_vocab)


# ------------------------------------------------------------------ base and model sources

@pytest.mark.parametrize("source", ["base", "ft2"])
def test_base_or_model_vocabulary(models, tmp_path, source):
    paths, T = models
    names = ["base", "ft2"]
    cfg = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32",
           "tokenizer": {"source": source if source == "base" else paths[source]},
           "models": [{"model": paths["ft2"], "parameters": {"weight": 0.5}}]}
    rc, out = run(cfg, tmp_path, name=source)
    assert rc == 0
    exp_vocab = vocab_of(*SPECS[source])
    assert saved_vocab(out) == exp_vocab
    assert json.load(open(out / "config.json"))["vocab_size"] == len(exp_vocab)
    # the vocabulary is one model's, unchanged: its tokenizer files are copied as they are
    with open(os.path.join(paths[source], "tokenizer.json"), "rb") as a, open(out / "tokenizer.json", "rb") as b:
        assert a.read() == b.read()
    got = load_folder(str(out))
    for tensor in EMB:
        Y = remap64(exp_vocab, mats_for(T, names, tensor), base="base")
        exp = merge_tensors(Y["base"].float(), [Y["ft2"].float()], method="task_arithmetic", weights=0.5,
                            backend="reference")
        assert_close(got[tensor], exp, torch.float32)


def test_same_vocabulary_is_a_plain_merge(models, tmp_path):
    """Every model has the base's ids: nothing is re-mapped, the files are the base's."""
    paths, T = models
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base",
           "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1")]}
    # ft1 has two more tokens, so only a base-only pair is a plain merge
    cfg["models"][1]["model"] = paths["base"]
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    assert all(torch.equal(got[n], T["base"][n]) for n in got)
    assert json.load(open(out / "config.json"))["vocab_size"] == 20


def test_tied_embeddings_and_padded_rows(tmp_path):
    """Tied models (no lm_head) whose embeddings have rows beyond their tokenizer: the base's
    extra rows are dropped (vocab_size = its tokens, as mergekit), the union grows it."""
    paths = make_models(str(tmp_path / "m"), {k: SPECS[k] for k in ("base", "ft1")}, tied=True, pad_rows=3)
    T = {n: load_folder(p) for n, p in paths.items()}
    cfg = {"merge_method": "slerp", "base_model": paths["base"], "dtype": "float32",
           "parameters": {"t": 0.4}, "tokenizer_source": "union",
           "models": [{"model": paths["base"]}, {"model": paths["ft1"]}]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    got = load_folder(str(out))
    assert "lm_head.weight" not in got and got[EMB[0]].shape == (22, 16)
    assert json.load(open(out / "config.json"))["vocab_size"] == 22
    exp_vocab = union_vocab(["base", "ft1"])
    Y = remap64(exp_vocab, mats_for(T, ["base", "ft1"], EMB[0]), base="base")
    a, b = Y["base"].flatten(), Y["ft1"].flatten()
    om = torch.acos((a / a.norm()) @ (b / b.norm()))
    exp = (torch.sin(0.6 * om) * Y["base"] + torch.sin(0.4 * om) * Y["ft1"]) / torch.sin(om)
    assert_close(got[EMB[0]], exp.float(), torch.float32)
    check_loads(out, exp_vocab)


# ------------------------------------------------------------------ chat template, flags

def test_chat_template_and_no_copy_tokenizer_with_union(models, tmp_path, capsys):
    paths, _ = models
    cfg = {"merge_method": "linear", "tokenizer_source": "union", "chat_template": "chatml",
           "parameters": {"embed_slerp": True},
           "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1")]}
    rc, out = run(cfg, tmp_path, "--no-copy-tokenizer")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("embed_slerp (given in parameters.embed_slerp) has no effect") == 1, err
    # a vocabulary no input has is written even with --no-copy-tokenizer (as mergekit)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>" in tok.get_vocab()
    text = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nw5<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.get_vocab()["<|im_start|>"] == 20


def test_tokenizer_source_folder_without_weights(models, tmp_path):
    """A `tokenizer_source` model only lends its tokenizer: weights are not needed."""
    paths, _ = models
    tok_only = tmp_path / "tok_only"
    tok_only.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(paths["ft1"], f), tok_only / f)
    cfg = {"merge_method": "linear", "tokenizer_source": str(tok_only),
           "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1")]}
    rc, out = run(cfg, tmp_path)
    assert rc == 0 and saved_vocab(out) == vocab_of(*SPECS["ft1"])


# ------------------------------------------------------------------ --dry-run reports

def test_dry_run_lists_every_tokenizer_problem(models, tmp_path, capsys):
    paths, _ = models
    cfg = {"merge_method": "linear",
           "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1")],
           "tokenizer": {"source": {"kind": "zero"}, "pad_to_multiple_of": 0, "tokenz": {},
                         "tokens": {"a": {"source": {"kind": "zeros"}},
                                    "b": {"source": str(tmp_path / "elsewhere")},
                                    "c": {"source": {"kind": "model_token", "model": paths["ft1"]}},
                                    "d": {"force": "yes"},
                                    "e": "ft1"}}}
    rc, out = run(cfg, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2
    for needle in ("tokenizer.source: expected a model", "tokenizer.pad_to_multiple_of: expected a positive",
                   "tokenizer.tokenz: unknown key (did you mean 'tokens'?)",
                   "tokenizer.tokens['a'].source.kind: unknown kind 'zeros' (did you mean 'zero'?",
                   "tokenizer.tokens['b'].source: model", "is not one of the config's models",
                   "tokenizer.tokens['c'].source: kind model_token needs exactly one of `token` and `token_id`",
                   "tokenizer.tokens['d'].force: expected true or false",
                   "tokenizer.tokens['e']: expected a mapping"):
        assert needle in err, (needle, err)
    assert "error: 8 problems" in err, err
    cfg2 = {"merge_method": "linear", "tokenizer_source": "union", "tokenizer": {"source": "base"},
            "models": [{"model": paths["base"], "parameters": {"weight": 1}}]}
    rc, _ = run(cfg2, tmp_path, "--dry-run", name="both")
    assert rc == 2 and "give only one of them" in capsys.readouterr().err
    cfg3 = {"merge_method": "linear", "tokenizer": {"source": str(tmp_path / "nowhere")},
            "models": [{"model": paths["base"], "parameters": {"weight": 1}}]}
    rc, _ = run(cfg3, tmp_path, "--dry-run", name="nowhere")
    assert rc == 2 and "tokenizer.source: model folder" in capsys.readouterr().err


def test_dry_run_vocabulary_problems(models, tmp_path, capsys):
    """Problems that need the tokenizers (a model without the token, a token or row it does
    not have) are reported by --dry-run too, all together."""
    paths, _ = models
    cfg = {"merge_method": "linear", "tokenizer": {"tokens": {
        "<x>": {"source": paths["ft1"]},
        "<|im_end|>": {"source": {"kind": "model_token", "model": paths["base"], "token": "nope"}},
        "<y>": {"source": {"kind": "model_token", "model": paths["base"], "token_id": 99}}}},
        "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1", "ft2")]}
    rc, out = run(cfg, tmp_path, "--dry-run")
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    for needle in ("tokens['<x>'].source: model", "has no token '<x>'",
                   "tokens['<|im_end|>'].source.token: model", "has no token 'nope'",
                   "tokens['<y>'].source: row 99 is beyond the 20 embedding rows"):
        assert needle in err, (needle, err)
    cfg["tokenizer"]["tokens"] = {"<x>": {"source": paths["ft2"]}}
    rc, _ = run(cfg, tmp_path, "--dry-run", name="ok")
    text = capsys.readouterr()
    assert rc == 0 and "vocabulary: union, 26 tokens (6 not in the base's), 26 embedding rows" in text.out + text.err


# ------------------------------------------------------------------ against mergekit itself

MERGEKIT_RUN = """
import sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
for cfg_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        with open(cfg_path) as f:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
        run_merge(cfg, out, options=MergeOptions(quiet=True))
    except Exception:
        with open(out + ".failed", "w") as f:
            f.write(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory):
    """{case: (config, mergekit's output folder or the reason it failed)}: mergekit's own
    run_merge on every case, in one child process (its import costs seconds; its logging
    and caches stay out of this process)."""
    import importlib.util
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is not installed (optional test dependency: pip install lfm_engine[parity])")
    paths, _ = models
    root = tmp_path_factory.mktemp("mergekit")
    args, res = [], {}
    for case, cfg in _mk_cases(paths).items():
        cfg = dict(cfg, dtype="float32")
        p = root / f"{case}.yml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        args += [str(p), str(root / case)]
        res[case] = (cfg, root / case)
    r = subprocess.run([sys.executable, "-c", MERGEKIT_RUN, *args], capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.skip(f"mergekit could not run here: {r.stderr.strip().splitlines()[-1][:200]}")
    return res


def _mk_cases(paths):
    names = ("base", "ft1", "ft2")
    return {
        "linear_union": {"merge_method": "linear", "tokenizer_source": "union",
                         "models": [{"model": paths[n], "parameters": {"weight": w}}
                                    for n, w in zip(names, (1.0, 0.5, 0.25))]},
        # no padding here: padded rows are equal copies, so ties' top-k meets exact ties there,
        # which mergekit breaks by sort order and the engine by index (docs/merge.md)
        "ties_rules": {"merge_method": "ties", "base_model": paths["base"],
                       "parameters": {"density": 0.6},
                       "tokenizer": {"source": "union", "tokens": rules_cfg(paths)},
                       "models": [{"model": paths[n], "parameters": {"weight": 0.7}} for n in names[1:]]},
        "linear_rules_pad": {"merge_method": "linear", "base_model": paths["base"],
                             "tokenizer": {"source": "union", "tokens": rules_cfg(paths), "pad_to_multiple_of": 8},
                             "models": [{"model": paths[n], "parameters": {"weight": w}}
                                        for n, w in zip(names, (0.2, 0.5, 0.3))]},
        "slerp_union": {"merge_method": "slerp", "base_model": paths["base"], "parameters": {"t": 0.3},
                        "tokenizer_source": "union",
                        "models": [{"model": paths["base"]}, {"model": paths["ft2"]}]},
        "model_source": {"merge_method": "task_arithmetic", "base_model": paths["base"],
                         "tokenizer": {"source": paths["ft2"]},
                         "models": [{"model": paths[n], "parameters": {"weight": 0.5}} for n in names[1:]]},
    }


@pytest.mark.parametrize("case", ["linear_union", "ties_rules", "linear_rules_pad", "slerp_union", "model_source"])
def test_same_as_mergekit_run_merge(mergekit_outputs, tmp_path, case):
    cfg, mk = mergekit_outputs[case]
    failed = str(mk) + ".failed"
    if os.path.exists(failed):
        pytest.skip(f"mergekit's run_merge failed here: {open(failed).read().strip().splitlines()[-1][:200]}")
    rc, out = run(cfg, tmp_path)
    assert rc == 0
    va, vb = saved_vocab(out), saved_vocab(mk)
    assert set(va) == set(vb)
    ta = transformers.AutoTokenizer.from_pretrained(str(out)).added_tokens_decoder
    tb = transformers.AutoTokenizer.from_pretrained(str(mk)).added_tokens_decoder
    sa, sb = ({a.content: a.special for a in t.values()} for t in (ta, tb))
    assert {c for c in sa if sa[c]} == {c for c in sb if sb[c]}      # the same special tokens
    if "base_model" in cfg:
        # the base's tokens keep their ids in both, the others are added tokens in both. Without
        # a base, mergekit takes the first model of a set as the base (hash order, run to run),
        # so only the vocabulary and the rows by token are the same
        assert sa == sb and all(va[t] == vb[t] for t in va if va[t] < 20)
    ca, cb = json.load(open(out / "config.json")), json.load(open(mk / "config.json"))
    assert ca["vocab_size"] == cb["vocab_size"]
    a, b = load_folder(str(out)), load_folder(str(mk))
    assert set(a) == set(b)
    toks = sorted(va)
    ia, ib = torch.tensor([va[t] for t in toks]), torch.tensor([vb[t] for t in toks])
    for n in a:
        x, y = a[n], b[n]
        if n in EMB:
            assert x.shape == y.shape
            x, y = torch.cat([x[ia], x[len(toks):]]), torch.cat([y[ib], y[len(toks):]])
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6, msg=n)


# ------------------------------------------------------------------ dtypes, torch inputs, stripping

def test_bf16_inputs_and_torch_path_agree(tmp_path):
    """bf16 models (raw uint16 bits on the CPU path): rows copied bit for bit, defaults
    rounded once; the torch-tensor path of remap (used on CUDA) gives the same bits."""
    from lfm_engine.io.safetensors import as_numpy, as_torch, read_array
    from lfm_engine.merge import config as C, vocab
    from lfm_engine.merge.plan import EMBED_RE, build_plan

    paths = make_models(str(tmp_path / "m"))
    for p in paths.values():    # rewrite the weights in bf16
        T = load_folder(p)
        cfg = json.load(open(os.path.join(p, "config.json")))
        write_model(p, cfg, {n: t.to(torch.bfloat16) for n, t in T.items()}, tokenizer=False)
    cfg = C.parse_config({"merge_method": "linear", "tokenizer_source": "union",
                          "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in SPECS]})
    plan = build_plan(cfg)
    voc = vocab.plan_vocabulary(cfg, plan)
    vocab.attach(plan, voc, EMBED_RE, None)
    task = next(t for t in plan.tasks if t.name == EMB[0])
    arrays = {(i.file, i.start): read_array(i) for i in task.read_infos()}
    got_np = vocab.remap(task, arrays)
    got_t = vocab.remap(task, {k: as_torch(a, task.vocab.infos[k].dtype) for k, a in arrays.items()})
    Bf = {n: load_folder(p) for n, p in paths.items()}
    Y = remap64(union_vocab(list(SPECS)), mats_for(Bf, list(SPECS), EMB[0]), base=None)
    for (key, folder), name in zip(task.vocab.members, SPECS):
        assert got_np[key].dtype.name == "uint16" and got_np[key].shape == (26, 16)
        assert (as_numpy(got_t[key]) == got_np[key]).all()
        assert torch.equal(as_torch(got_np[key], task.vocab.infos[key].dtype), Y[name].to(torch.bfloat16))


def test_base_tokenizer_beyond_its_rows_is_cut(tmp_path):
    """A base whose tokenizer has more tokens than embedding rows: those tokens are removed
    from the output tokenizer (as mergekit), and come back in a union only from a model
    that has rows for them."""
    specs = {"base": (WORDS, []), "ft1": SPECS["ft1"]}
    paths = make_models(str(tmp_path / "m"), specs)
    write_tokenizer(paths["base"], WORDS, [("<|im_start|>", True), ("<extra>", False)])  # ids 20, 21 > rows
    for source, n in (("base", 20), ("union", 22)):
        cfg = {"merge_method": "linear", "tokenizer": {"source": source},
               "models": [{"model": paths[k], "parameters": {"weight": 1}} for k in specs]}
        rc, out = run(cfg, tmp_path, name=source)
        assert rc == 0
        v = saved_vocab(out)
        assert len(v) == n and "<extra>" not in v
        assert ("<|im_start|>" in v) == (source == "union")
        assert load_folder(str(out))[EMB[0]].shape == (n, 16)


def test_stage_names_in_token_rules(models, tmp_path):
    """A `tokens:` rule may name an earlier stage (mergekit-multi), like any model slot."""
    paths, _ = models
    stage1 = {"name": "mid", "merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": paths[n], "parameters": {"weight": 1}} for n in ("base", "ft1")]}
    final = {"merge_method": "linear", "tokenizer": {"source": "union", "tokens": {
        "<|im_start|>": {"source": "mid", "force": True}}},
        "models": [{"model": "mid", "parameters": {"weight": 1}}, {"model": paths["ft2"], "parameters": {"weight": 1}}]}
    text = yaml.safe_dump(stage1, sort_keys=False) + "---\n" + yaml.safe_dump(final, sort_keys=False)
    rc, out = run(text, tmp_path)
    assert rc == 0
    v = saved_vocab(out)
    assert v["<|im_start|>"] == 20 and "v0" in v


def test_tokenizers_that_do_not_load(models, tmp_path, capsys):
    """A fine-tune without a tokenizer is read with the base's ids (a warning, as mergekit);
    a base whose tokenizer does not load is an error of --dry-run."""
    paths, T = models
    bare = tmp_path / "bare"
    shutil.copytree(paths["ft2"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(bare / f)
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": paths["base"], "parameters": {"weight": 1}},
                      {"model": str(bare), "parameters": {"weight": 1}}]}
    rc, out = run(cfg, tmp_path, name="bare")
    err = capsys.readouterr().err
    assert rc == 0 and "token ids are assumed to be the base's" in err, err
    assert saved_vocab(out) == vocab_of(*SPECS["base"])
    assert_close(load_folder(str(out))[EMB[0]], (T["base"][EMB[0]] + T["ft2"][EMB[0]][:20]) / 2, torch.float32)
    broken = tmp_path / "broken"
    shutil.copytree(paths["base"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    cfg["models"][0]["model"] = str(broken)
    rc, _ = run(cfg, tmp_path, "--dry-run", name="broken")
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer_source: cannot load the tokenizer of the base model" in err, err
