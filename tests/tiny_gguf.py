"""A tiny Llama GGUF file with a byte-level BPE tokenizer and a chat template, written with
the `gguf` package (tests of the example-model conversion and of the fine-tune builder)."""
from __future__ import annotations

import pytest

HIDDEN, FF, HEADS, KV, LAYERS = 16, 32, 2, 1, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars():
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, seed=0):
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer; returns the tensors written."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'lfm_engine[example]')")
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = SPECIAL + _byte_chars() + ["he", "hel", "hell", "hello"]
    merges = ["h e", "he l", "hel l", "hell o"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (vocab - len(SPECIAL)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    tensors = {"token_embd.weight": rng.standard_normal((vocab, HIDDEN)).astype(np.float32),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)}
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV * hd, HIDDEN), "attn_v": (KV * hd, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FF, HIDDEN), "ffn_up": (FF, HIDDEN),
                  "ffn_down": (HIDDEN, FF)}
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(HIDDEN, np.float32)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
