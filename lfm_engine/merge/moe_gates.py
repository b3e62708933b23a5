"""Router (gate) vectors of a mergekit-moe model: one unit vector per expert and layer.

For each expert (routed or shared) a vector per layer from its positive prompts minus
(if any) its negative prompts, normalised to unit length (mergekit's router.py):

* cheap_embed: Σ over prompts and tokens of the base's input embeddings of the
  prompts' tokens (BOS + prompt, no other special tokens), normalised to unit length
  on each side before positive minus negative (mergekit normalises inside its
  get_cheap_embedding), the same for every layer;
* hidden / hidden_avg: the base model's hidden states entering each layer
  (transformers ``output_hidden_states``, the last one dropped) at the last token
  (hidden) or averaged over all positions, padding included (hidden_avg, as mergekit),
  averaged over prompts. Prompts are left-padded with BOS (EOS without one), as mergekit
  pads them, so "the last token" is a prompt token, never padding;
* random: standard normal; uniform_random: U(−1/√hidden, 1/√hidden), both drawn as
  one [layers, experts, hidden] tensor from ``torch.Generator().manual_seed(seed)``
  (the same numbers as mergekit after ``--random-seed``, which seeds torch globally),
  prompts ignored.

Result g: [layers, experts, hidden] float32, experts in the order given (mergekit
appends the shared expert after the routed ones, so its random row is drawn last).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

PROMPT_MODES = ("hidden", "hidden_avg", "cheap_embed")
RANDOM_MODES = ("random", "uniform_random")
GATE_MODES = PROMPT_MODES + RANDOM_MODES


def _tokenize(tokenizer, prompts):
    # mergekit pads with BOS (EOS without one), on the left; hidden_avg averages over the
    # padded positions too, so the pad token is part of the definition
    tokenizer.padding_side = "left"
    if tokenizer.bos_token is not None:
        tokenizer.pad_token = tokenizer.bos_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def gate_vectors(mode: str, base, base_path: str, experts: Sequence, seed: int,
                 device: str = "cpu") -> torch.Tensor:
    """g [layers, len(experts), hidden] (see the module docstring), float32 on the CPU.

    ``base`` is the base's ModelFolder, ``experts`` objects with ``positive`` and
    ``negative`` prompt lists; ``device`` runs the hidden modes' forward pass."""
    from lfm_engine.io.safetensors import read_tensor
    bc = base.config
    L, H, E = int(bc["num_hidden_layers"]), int(bc["hidden_size"]), len(experts)
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((L, E, H), generator=g)
    if mode == "uniform_random":
        s = math.sqrt(1.0 / H)
        return torch.rand((L, E, H), generator=g) * 2 * s - s
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(base_path)
    if mode == "cheap_embed":
        emb = read_tensor(base.tensors["model.embed_tokens.weight"]).float()

        def vec(prompts):
            t = _tokenize(tok, prompts)
            h = (emb[t["input_ids"]] * t["attention_mask"].unsqueeze(-1)).sum(dim=(0, 1))
            return (h / h.norm().clamp(min=1e-8)).unsqueeze(0).repeat(L, 1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
        model.eval()

        def vec(prompts):
            t = _tokenize(tok, prompts).to(device)
            with torch.no_grad():
                out = model(**t, output_hidden_states=True, return_dict=True)
            hs = torch.stack(out.hidden_states[:-1])          # [L, batch, seq, H]
            hs = hs.mean(dim=2) if mode == "hidden_avg" else hs[:, :, -1, :]
            return hs.mean(dim=1).cpu()
    rows = []
    for e in experts:
        v = vec(e.positive)
        if e.negative:
            v = v - vec(e.negative)
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)
