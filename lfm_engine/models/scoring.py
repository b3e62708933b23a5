"""Score any state dict of the example model on the example tasks (exact match, perplexity).

``Scorer(model_dir, ft_dir, meta)`` loads the base once, takes the evaluation sets with
their bottom hidden states from the fine-tunes' cache (finetunes.eval_data), and scores a
merged / decoded model by putting its weights into one probe model. A model whose bottom
(embeddings, layers below the split) is not bit-equal to the base's is scored with its
own bottom (slower, counted in ``slow``), so the numbers never rest on the shortcut.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch


class Scorer:
    """Exact-match and perplexity of any state dict of the example model (see module doc)."""

    def __init__(self, model_dir, ft_dir, meta: dict):
        from lfm_engine.models import finetunes as ft

        self.ft = ft
        self.base, self.tok = ft.load_base(model_dir)
        self.split = meta["split"]
        self.data = ft.eval_data(ft_dir, self.base, self.tok, meta)
        self.base_sd = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.probe = copy.deepcopy(self.base)
        self.slow = 0

    def top_keys(self):
        from lfm_engine.models.split import bottom_names

        bottom = set(bottom_names(self.base_sd, self.split))
        return [k for k in self.base_sd if k not in bottom]

    def load(self, sd: dict) -> bool:
        """Put ``sd`` into the probe model; True when its bottom equals the base's."""
        from lfm_engine.models.split import same_bottom

        full = {k: sd.get(k, self.base_sd[k]).to(torch.float32) for k in self.base_sd}
        if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            full["lm_head.weight"] = full["model.embed_tokens.weight"]
        self.probe.load_state_dict(full, strict=True)
        return same_bottom(self.base_sd, full, self.split)

    def score(self, sd: dict, tasks=None) -> dict:
        data = self.data
        if not self.load(sd):  # its own bottom: recompute the hidden states entering the top
            self.slow += 1
            data = self.ft.prepare(self.probe, self.tok, self.split, list(self.data.eval), n_train=0,
                                   n_eval=len(next(iter(self.data.eval.values())).seqs), progress=lambda m: None)
        tasks = tasks or list(data.eval)
        out = {t: self.ft.exact_match(self.probe, data.eval[t], self.split) for t in tasks}
        out["ppl"] = self.ft.perplexity(self.probe, data.text, self.split)
        return out


def read_folder(folder) -> dict:
    """All tensors of a safetensors model folder (the demo's reader: one file or sharded)."""
    from lfm_engine.demo.data import load_folder

    return load_folder(str(folder))
