"""BitDelta-style scale distillation for sign1 deltas (docs/spec/codec.md "Scale distillation").

sign1 stores a delta as ``delta_hat = s ⊙ S``: S = sign(delta) in {-1, +1}^[rows, cols]
(packed bits) and s the scales (per row, [rows], or per tensor, [1]), initialised by the
encoder at mean |delta| (the L2-optimal scale for fixed signs). That choice minimises the
weight error of each matrix alone; what a user cares about is the model's output. BitDelta
(Liu et al., 2024) therefore trains the scales afterwards, signs frozen, so that the
compressed model's logits match the fine-tune's on a few calibration inputs:

    W_hat_i(m) = B_i + (m_i ⊙ s0_i) ⊙ S_i            for every sign1-encoded matrix i
    L(m) = mean over calibration tokens t of || z_fine(t) - z_hat(t; m) ||^2 / V

z [V] are the logits; m (one multiplier per stored scale, initialised at 1) is trained with
Adam. Training a multiplier of s0 instead of s itself makes one learning rate fit deltas
of any magnitude (equivalent to a per-scale learning rate proportional to s0). The
trained scales s = m ⊙ s0 are rounded to the entry's scale dtype; the signs, the shapes
and the container format are those of plain sign1 (a distilled entry decodes with any
sign1 decoder). The weight error ||delta - delta_hat|| can only grow (s0 is its optimum);
the output error shrinks.

This module is the only place that runs a model to compress: it needs the fine-tune as a
torch module whose parameter names are the container's tensor names (a transformers
model loaded from the fine-tune's folder, see ``load_causal_lm``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from lfm_engine.ops.codec import Encoded
from lfm_engine.reference import codec as ref


@dataclass
class DistillConfig:
    """Options of the scale distillation.

    prompts: calibration texts (at least one); chat: wrap each in the tokenizer's chat
    template as a user turn (for instruction-tuned models); steps, lr: Adam steps and
    learning rate on the scale multipliers; batch_size: texts per step; max_tokens:
    each text is cut to this many tokens; seed: order of the texts.
    """
    prompts: Sequence[str]
    chat: bool = False
    steps: int = 50
    lr: float = 1e-2
    batch_size: int = 8
    max_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) and p.strip()
                                                                         for p in self.prompts):
            raise ValueError("scale distillation needs a list of non-empty calibration texts")
        for name in ("steps", "batch_size", "max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"scale distillation: {name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0):
            raise ValueError(f"scale distillation: lr must be > 0, got {self.lr}")


@dataclass
class DistillReport:
    """Calibration loss (mean squared logit error / V) before and after, per step."""
    loss_before: float
    loss_after: float
    losses: list = field(default_factory=list)
    tensors: int = 0
    scales: int = 0


def read_prompts(path) -> list:
    """Calibration texts from a file: one per line, blank lines skipped (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"{path}: no calibration text (one text per line)")
    return prompts


def load_causal_lm(model_dir, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a transformers causal LM folder, in dtype, eval mode."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("running a model folder needs transformers, which is not installed "
                         "(pip install 'lfm_engine[example]')") from None
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, tok


def tokenize(tok, cfg: DistillConfig) -> list:
    """Token id lists of the calibration texts (chat-wrapped when cfg.chat), cut to max_tokens."""
    out = []
    for p in cfg.prompts:
        if cfg.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
        else:
            ids = tok(p, add_special_tokens=True)["input_ids"]
        out.append(list(ids)[: cfg.max_tokens])
    return out


def lm_batches(calib_ids: Sequence[Sequence[int]], batch_size: int, pad: int) -> list:
    """Batches for a causal LM: ({"input_ids": [B, T], "attention_mask": [B, T]}, keep [B, T] bool).

    Right-padded; ``keep`` marks the real tokens (the positions whose logits are matched).
    """
    if not calib_ids or not all(len(s) for s in calib_ids):
        raise ValueError("scale distillation: empty calibration input")
    out = []
    for i in range(0, len(calib_ids), batch_size):
        seqs = calib_ids[i:i + batch_size]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, :len(s)] = 1
        out.append(({"input_ids": ids, "attention_mask": mask}, mask.bool()))
    return out


def _logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out).float()


def _signs(enc: Encoded) -> torch.Tensor:
    """S [rows, cols] in {-1, +1} (float32) from a sign1 entry's packed bits."""
    rows, cols = ref.matrix_shape(enc.shape)
    neg = ref.unpack_bits32(enc.fields["signs"], cols)
    return (1.0 - 2.0 * neg.to(torch.float32)).reshape(rows, cols)


def distill_sign1_scales(model: torch.nn.Module, base: Mapping[str, torch.Tensor], encoded: Mapping[str, Encoded],
                         batches: Sequence[tuple], cfg: DistillConfig,
                         progress: Optional[Callable[[str], None]] = None) -> tuple:
    """Train the scales of the sign1 entries ``encoded`` so that the model's logits match.

    model: the fine-tuned model (its own weights are the teacher; it is not modified);
        ``model(**kwargs)`` returns logits [B, T, V] (or an output with ``.logits``).
    base: {name: base tensor} for every name of ``encoded`` (any float dtype).
    encoded: {parameter name of ``model``: sign1 Encoded}; other codecs are refused.
    batches: [(kwargs, keep)] with keep [B, T] bool marking the matched positions
        (``lm_batches`` makes them from token ids). cfg.prompts/chat/batch_size/max_tokens
        are not used here (they shaped the batches); cfg.steps/lr/seed are.
    Returns ({name: Encoded with the trained scales, same signs and options}, DistillReport).
    """
    params = dict(model.named_parameters())
    for name, enc in encoded.items():
        if enc.codec != "sign1":
            raise ValueError(f"scale distillation applies to sign1 entries; '{name}' is {enc.codec}")
        if name not in params:
            raise ValueError(f"scale distillation: the model has no parameter '{name}'")
        if tuple(params[name].shape) != tuple(enc.shape):
            raise ValueError(f"scale distillation: '{name}' has shape {tuple(params[name].shape)} in the model "
                             f"but {tuple(enc.shape)} in the encoding")
    if not batches:
        raise ValueError("scale distillation: empty calibration input")
    say = progress or (lambda m: None)
    was_training = model.training
    model.eval()
    with torch.no_grad():  # the teacher: the fine-tune itself
        targets = [_logits(model(**kw))[keep] for kw, keep in batches]
    frozen = {n: (base[n].to(torch.float32).reshape(ref.matrix_shape(e.shape)), _signs(e),
                  e.fields["scales"].to(torch.float32).reshape(-1, 1)) for n, e in encoded.items()}
    mult = {n: torch.ones_like(s0, requires_grad=True) for n, (_, _, s0) in frozen.items()}
    opt = torch.optim.Adam(list(mult.values()), lr=cfg.lr)

    def student_loss(k: int) -> torch.Tensor:
        w = {n: (b + (mult[n] * s0) * sg).reshape(encoded[n].shape) for n, (b, sg, s0) in frozen.items()}
        kw, keep = batches[k]
        z = _logits(torch.func.functional_call(model, w, args=(), kwargs=kw))[keep]
        return ((z - targets[k]) ** 2).mean()

    with torch.no_grad():
        before = sum(float(student_loss(k)) for k in range(len(batches))) / len(batches)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.steps):
        k = int(torch.randint(len(batches), (1,), generator=g))
        loss = student_loss(k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            say(f"  distill step {step + 1}/{cfg.steps}: loss {losses[-1]:.4g}")
    with torch.no_grad():
        after = sum(float(student_loss(k)) for k in range(len(batches))) / len(batches)
    model.train(was_training)
    out = {}
    for n, enc in encoded.items():
        sdt = enc.fields["scales"].dtype
        s = (mult[n].detach() * frozen[n][2]).reshape(enc.fields["scales"].shape)
        scales = ref._round_scale(s, sdt, "sign1")
        out[n] = Encoded(enc.codec, enc.shape, enc.dtype, dict(enc.fields, scales=scales), dict(enc.options))
    rep = DistillReport(before, after, losses, len(encoded), sum(int(e.fields["scales"].numel()) for e in out.values()))
    return out, rep
