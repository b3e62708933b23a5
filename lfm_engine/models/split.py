"""Run a Llama-style causal LM in two parts: a frozen bottom (layers < L) and a top.

The example fine-tunes change only the top decoder layers (index >= L), so the hidden
state entering layer L is the base model's for every fine-tune, merge and decoded
compression of them. Computing it once per prompt set and running only the top layers
makes training and exact scoring several times cheaper on a CPU, and gives the same
numbers as the full forward (the bottom is bit-identical; ``same_bottom`` checks it).

Shapes: ids [B, T] right-padded (pads after the real tokens, so a causal mask alone keeps
them invisible to real positions); hidden [B, T, H]; positions [B, T] = arange(T).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch


def _layers(model):
    return model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers


def _causal_mask(t: int, dtype, device) -> torch.Tensor:
    """[1, 1, T, T] additive mask: 0 on and below the diagonal, -inf above."""
    m = torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)
    return m[None, None]


def run_layers(model, hidden: torch.Tensor, layers: Iterable) -> torch.Tensor:
    """hidden [B, T, H] through ``layers`` (decoder layers of ``model``) with a causal mask."""
    b, t, _ = hidden.shape
    pos = torch.arange(t, device=hidden.device)[None].expand(b, t)
    rotary = model.get_decoder().rotary_emb
    pe = rotary(hidden, pos)
    mask = _causal_mask(t, hidden.dtype, hidden.device)
    for layer in layers:
        out = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    t = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (t - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def bottom_hidden(model, seqs: Sequence[Sequence[int]], split: int, pad: int, batch: int = 16) -> List[torch.Tensor]:
    """Hidden state entering layer ``split`` for each sequence: a list of [T_i, H] tensors."""
    out: List[torch.Tensor] = []
    emb = model.get_input_embeddings()
    layers = list(_layers(model))[:split]
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        ids = pad_right(chunk, pad)
        h = run_layers(model, emb(ids), layers)
        out.extend(h[j, :len(s)].clone() for j, s in enumerate(chunk))
    return out


def top_logits(model, hidden: torch.Tensor, split: int, select: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the (row, position) pairs ``select`` [N, 2], from hidden [B, T, H] at ``split``."""
    h = run_layers(model, hidden, list(_layers(model))[split:])
    h = h[select[:, 0], select[:, 1]]
    h = model.get_decoder().norm(h)
    return model.get_output_embeddings()(h)


def stack_hidden(hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Right-pad a list of [T_i, H] into [B, T, H] (zeros after each row's end)."""
    t = max(h.shape[0] for h in hs)
    out = hs[0].new_zeros(len(hs), t, hs[0].shape[1])
    for i, h in enumerate(hs):
        out[i, :h.shape[0]] = h
    return out


def bottom_names(state_keys: Iterable[str], split: int) -> List[str]:
    """Tensor names that belong to the bottom: embeddings and layers < split."""
    keep = []
    for k in state_keys:
        if ".layers." in k:
            idx = int(k.split(".layers.")[1].split(".")[0])
            if idx < split:
                keep.append(k)
        elif "embed_tokens" in k:
            keep.append(k)
    return keep


def same_bottom(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], split: int) -> bool:
    """Whether two state dicts agree bit for bit on the bottom (embeddings, layers < split)."""
    names = bottom_names(a.keys(), split)
    return bool(names) and all(k in b and torch.equal(a[k].float(), b[k].float()) for k in names)
