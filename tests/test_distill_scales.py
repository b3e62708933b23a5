"""BitDelta-style scale distillation of sign1 entries (lfm_engine/compress/distill.py) on a
tiny random Llama: the calibration loss falls, the signs stay, only the scales change,
the weight error does not fall below the mean-|delta| optimum, and `lfm-engine compress
--distill-scales` writes a container that decompresses to the distilled model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lfm_engine.compress import compress_model, decompress_model, open_container  # noqa: E402
from lfm_engine.compress.distill import DistillConfig, distill_sign1_scales, lm_batches, read_prompts  # noqa: E402
from lfm_engine.ops.codec import decode_delta, encode_delta  # noqa: E402

WORDS = "the a cat dog sat ran on under mat tree big small red blue and then".split()
TEXTS = ["the cat sat on the mat", "a big dog ran under the tree", "the small red cat ran",
         "a blue dog sat and then ran", "the big tree and the small mat", "a cat then a dog"]


def _tiny_pair(root):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ft = copy.deepcopy(base)
    with torch.no_grad():  # a structured delta (low rank + noise), like a real fine-tune's
        for n, p in ft.named_parameters():
            if p.ndim == 2 and "layers" in n:
                r = p.shape
                p += 0.05 * torch.randn(r[0], 2) @ torch.randn(2, r[1]) + 0.005 * torch.randn(r)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    for name, m in (("base", base), ("ft", ft)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return base, ft, tok


def _encode_all(base, ft, per_tensor=False):
    b = dict(base.named_parameters())
    return {n: encode_delta((p - b[n]).detach(), "sign1", per_tensor=per_tensor)
            for n, p in ft.named_parameters() if p.ndim == 2 and "layers" in n}


@pytest.mark.parametrize("per_tensor", [False, True])
def test_distill_lowers_logit_error_keeps_signs(tmp_path, per_tensor):
    base, ft, tok = _tiny_pair(tmp_path)
    encs = _encode_all(base, ft, per_tensor)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    bsd = {n: p.detach() for n, p in base.named_parameters()}
    before_w = {n: p.detach().clone() for n, p in ft.named_parameters()}
    new, rep = distill_sign1_scales(ft, bsd, encs, lm_batches(ids, 3, 0), DistillConfig(TEXTS, steps=30, lr=0.05))
    assert rep.loss_after < 0.9 * rep.loss_before
    assert all(torch.equal(p, before_w[n]) for n, p in ft.named_parameters())  # the teacher is untouched
    changed = 0
    for n, e in encs.items():
        assert torch.equal(new[n].fields["signs"], e.fields["signs"])
        assert new[n].fields["scales"].dtype == e.fields["scales"].dtype
        assert new[n].fields["scales"].shape == e.fields["scales"].shape
        assert new[n].options == e.options
        changed += not torch.equal(new[n].fields["scales"], e.fields["scales"])
        d = (dict(ft.named_parameters())[n] - bsd[n]).detach()
        err0 = torch.linalg.norm(d - decode_delta(e))
        err1 = torch.linalg.norm(d - decode_delta(new[n]))
        assert err1 >= err0 * (1 - 1e-3)  # mean |delta| is the weight-error optimum for fixed signs
    assert changed == len(encs)


def test_distill_refuses_other_codecs_and_empty_input(tmp_path):
    base, ft, tok = _tiny_pair(tmp_path)
    bsd = {n: p.detach() for n, p in base.named_parameters()}
    n = "model.layers.0.mlp.up_proj.weight"
    enc = encode_delta((dict(ft.named_parameters())[n] - bsd[n]).detach(), "int4")
    with pytest.raises(ValueError, match="sign1"):
        distill_sign1_scales(ft, bsd, {n: enc}, lm_batches([[3, 4]], 1, 0), DistillConfig(["x"]))
    with pytest.raises(ValueError, match="calibration"):
        lm_batches([], 1, 0)
    with pytest.raises(ValueError, match="calibration"):
        DistillConfig([])
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(["x"], steps=0)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no calibration text"):
        read_prompts(tmp_path / "empty.txt")


def test_compress_cli_distill_roundtrip(tmp_path):
    from lfm_engine.cli import main as cli_main

    base, ft, tok = _tiny_pair(tmp_path)
    (tmp_path / "calib.txt").write_text("\n".join(TEXTS) + "\n")
    plain, dist = tmp_path / "plain.lfmd", tmp_path / "dist.lfmd"
    compress_model(tmp_path / "base", tmp_path / "ft", plain, codec="sign1")
    rc = cli_main(["compress", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "ft"), "--codec", "sign1",
                   "--distill-scales", str(tmp_path / "calib.txt"), "--distill-steps", "20", "--distill-lr", "0.05",
                   "--quiet", str(dist)])
    assert rc == 0
    with open_container(plain) as a, open_container(dist) as b:
        names = [n for n in a.params() if a.codecs[n]["codec"] == "sign1"]
        assert names and [n for n in b.params() if b.codecs[n]["codec"] == "sign1"] == names
        for n in names:
            assert torch.equal(a.fields(n)["signs"], b.fields(n)["signs"])
            info = b.codecs[n]["stats"]["distilled"]
            assert info["steps"] == 20 and info["loss_after"] < info["loss_before"]
            assert b.codecs[n]["stats"]["rel_error"] >= a.codecs[n]["stats"]["rel_error"] * (1 - 1e-3)
        assert json.loads(b.source)["distill_scales"]["texts"] == len(TEXTS)
    out = decompress_model(tmp_path / "base", dist, tmp_path / "out")
    m = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        zt, zd = ft(ids).logits, m(ids).logits
        zp = transformers.LlamaForCausalLM.from_pretrained(decompress_model(tmp_path / "base", plain,
                                                                            tmp_path / "out2"))(ids).logits
    assert float(((zd - zt) ** 2).mean()) < float(((zp - zt) ** 2).mean())


def test_compress_cli_distill_needs_a_folder(tmp_path, capsys):
    from lfm_engine.cli import main as cli_main

    _tiny_pair(tmp_path)
    (tmp_path / "calib.txt").write_text("the cat\n")
    rc = cli_main(["compress", "--base", str(tmp_path / "base"), "--model",
                   str(tmp_path / "ft" / "model.safetensors"), "--codec", "sign1", "--distill-scales",
                   str(tmp_path / "calib.txt"), str(tmp_path / "x.lfmd")])
    assert rc == 2
    assert "model folder" in capsys.readouterr().err
    assert not (tmp_path / "x.lfmd").exists()
