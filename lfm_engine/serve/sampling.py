"""Per-request logits processing and sampling (OpenAI / vLLM semantics).

For one row's fp32 logits z [V], the request's prompt ids P and generated ids G:

    repetition_penalty ρ (CTRL paper, as transformers/vLLM): for every token t in P ∪ G,
        z_t ← z_t / ρ if z_t > 0 else z_t · ρ
    frequency / presence penalty (OpenAI): with c_t = count of t in G,
        z_t ← z_t − frequency_penalty · c_t − presence_penalty · [c_t > 0]
    temperature T < 1e-5 → greedy argmax of the penalised logits (no division: 1e-300 would
        overflow to inf and give NaN probabilities); otherwise p = softmax(z / T), then
    top_k k > 0: keep the k most likely tokens; top_p: keep the smallest most-likely set whose
        mass reaches top_p; min_p m > 0: keep tokens with p_t ≥ m · max p; draw from the rest
        with the request's own generator.

Logprobs reported to clients are the model's raw log_softmax(z) before any processing
(vLLM's default "raw_logprobs"), so they do not depend on the sampling settings.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


def needs_processing(r) -> bool:
    """Whether the request's next token depends on more than the argmax of the raw logits."""
    return (r.temperature >= GREEDY_EPS or r.repetition_penalty != 1.0 or r.presence_penalty != 0.0
            or r.frequency_penalty != 0.0)


def penalise(z: torch.Tensor, r, prompt_ids: Sequence[int], generated: Sequence[int]) -> torch.Tensor:
    """Apply repetition / presence / frequency penalties to a copy of z [V] (fp32)."""
    z = z.clone()
    if r.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(generated)), dtype=torch.long)
        v = z[seen]
        z[seen] = torch.where(v > 0, v / r.repetition_penalty, v * r.repetition_penalty)
    if generated and (r.presence_penalty != 0.0 or r.frequency_penalty != 0.0):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=z.numel()).to(z.dtype)
        z -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(z.dtype)
    return z


def choose(z: torch.Tensor, r, prompt_ids: Sequence[int], generated: Sequence[int],
           gen: Optional[torch.Generator]) -> int:
    """The next token for one row (module docstring). z: fp32 CPU logits [V]."""
    z = penalise(z, r, prompt_ids, generated)
    if r.temperature < GREEDY_EPS:
        return int(torch.argmax(z))
    probs = torch.softmax(z / float(r.temperature), dim=-1)
    sp, idx = torch.sort(probs, descending=True)
    keep = torch.ones_like(sp, dtype=torch.bool)
    if r.top_k and r.top_k > 0:
        keep[r.top_k:] = False
    if r.top_p < 1.0:
        keep &= (torch.cumsum(sp, 0) - sp) < r.top_p  # keep a token while the mass before it < top_p
    if r.min_p > 0.0:
        keep &= sp >= r.min_p * sp[0]
    keep[0] = True
    sp = torch.where(keep, sp, torch.zeros_like(sp))
    return int(idx[int(torch.multinomial(sp, 1, generator=gen))])


def logprobs_of(z: torch.Tensor, token: int, k: int) -> Tuple[float, List[Tuple[int, float]]]:
    """Raw log-probability of `token` and the k most likely (id, logprob) pairs. z: [V]."""
    lp = torch.log_softmax(z.float(), dim=-1)
    top: List[Tuple[int, float]] = []
    if k > 0:
        v, i = torch.topk(lp, min(k, lp.numel()))
        top = list(zip(i.tolist(), v.tolist()))
    return float(lp[token]), top
