"""Example fine-tunes of SmolLM2-135M-Instruct that do something, and their exact scores.

``build(out)`` trains, from the cached example model (models/example.py), on the tasks of
models/tasks.py (seeds fixed; about 1000 CPU-seconds, i.e. ~8 minutes on 2 idle cores):

    adapters/persona   PEFT LoRA r=4,  q_proj v_proj                    alpha 8
    adapters/upper     PEFT LoRA r=8,  q k v o                         alpha 16
    adapters/reverse   PEFT LoRA r=16, all linear, rsLoRA              alpha 8  (scale 8/sqrt(16)=2)
    adapters/add       PEFT LoRA r=8,  q v gate up down                alpha 16
    full/persona, full/upper, full/add    every linear weight of the trained layers (dense
                                          deltas), saved as complete HF folders

Only the top TRAIN_LAYERS decoder layers are trained (PEFT ``layers_to_transform``; the
full fine-tunes leave the other tensors bit-equal to the base), which lets training and
scoring reuse the base's hidden state below them (models/split.py). ``scores.json``
records each model's exact-match accuracy on every task's evaluation set and the
held-out perplexity; ``build`` fails if a fine-tune does not beat the base on its task.

Exact match by teacher forcing: greedy decoding returns exactly ``answer<|im_end|>`` iff
at every answer position the argmax of the logits is the next answer token, so one
forward over prompt+answer decides it (no decoding loop; same result as generate()).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import split as sp
from .tasks import HELDOUT_TEXT, N_EVAL, TASKS

TRAIN_LAYERS = 4          # the top decoder layers the fine-tunes change
SEED = 1234
MIN_GAIN = 0.25        # "clearly beats the base": this much more accuracy on its task (else listed as weak)
FORMAT_VERSION = 3        # bump when the recipe changes: build() then rebuilds

LORAS = {
    "persona": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], steps=20, lr=2e-3),
    "upper": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], steps=60, lr=2e-3),
    "reverse": dict(r=16, lora_alpha=8, use_rslora=True, steps=80, lr=2e-3,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "add": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                steps=60, lr=2e-3),
}
FULL = {"persona": dict(steps=20, lr=1e-4), "upper": dict(steps=60, lr=2e-4), "add": dict(steps=40, lr=2e-4)}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def finetunes_dir(cache_dir=None) -> Path:
    """Where build() writes by default: <cache>/finetunes/smollm2-135m-instruct."""
    from .example import EXAMPLE_NAME, cache_root

    return cache_root(cache_dir) / "finetunes" / EXAMPLE_NAME


def is_built(folder: os.PathLike) -> bool:
    p = Path(folder) / "scores.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format_version") == FORMAT_VERSION
    except ValueError:
        return False


def load_base(model_dir, dtype=torch.float32):
    """(model, tokenizer) of the base folder, eval mode (compress/distill.py loads them)."""
    from lfm_engine.compress.distill import load_causal_lm

    return load_causal_lm(model_dir, dtype)


def encode(tok, prompt: str, answer: str) -> Tuple[List[int], int]:
    """Token ids of the chat prompt + answer + <|im_end|>, and where the answer starts."""
    p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                return_dict=True)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return list(p) + a, len(p)


def prompt_ids(tok, prompt: str) -> List[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"])


@dataclass
class Batch:
    """Examples of one task with their bottom hidden states (computed once with the base)."""
    seqs: List[List[int]]
    starts: List[int]
    hidden: List[torch.Tensor]

    def select(self, rows: Sequence[int]):
        """hidden [b, T, H], targets [N], select [N, 2] (row, position predicting each target)."""
        h = sp.stack_hidden([self.hidden[r] for r in rows])
        sel, tgt = [], []
        for i, r in enumerate(rows):
            s, start = self.seqs[r], self.starts[r]
            for pos in range(start, len(s)):
                sel.append((i, pos - 1))
                tgt.append(s[pos])
        return h, torch.tensor(tgt), torch.tensor(sel)


@dataclass
class TaskData:
    split: int
    train: Dict[str, Batch] = field(default_factory=dict)
    eval: Dict[str, Batch] = field(default_factory=dict)
    text: Optional[Batch] = None


def prepare(model, tok, split: int, tasks: Sequence[str] = tuple(TASKS), n_train: Optional[int] = None,
            n_eval: int = N_EVAL, progress: Callable[[str], None] = print) -> TaskData:
    """Tokenize every task's train/eval examples and the held-out text; bottom hidden states.

    n_train: training examples per task (default: each task's own ``n_train``; 0: none).
    """
    data = TaskData(split=split)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for name in tasks:
        for which, n in (("train", TASKS[name].n_train if n_train is None else n_train), ("eval", n_eval)):
            if n == 0:
                continue
            enc = [encode(tok, p, a) for p, a in TASKS[name].examples(n, which)]
            seqs = [e[0] for e in enc]
            getattr(data, which)[name] = Batch(seqs, [e[1] for e in enc], sp.bottom_hidden(model, seqs, split, pad))
        progress(f"  prepared {name}")
    ids = tok(HELDOUT_TEXT, add_special_tokens=False)["input_ids"]
    data.text = Batch([ids], [1], sp.bottom_hidden(model, [ids], split, pad))
    return data


@torch.no_grad()
def exact_match(model, batch: Batch, split: int, chunk: int = 24) -> float:
    """Fraction of examples whose greedy reply is exactly the answer (teacher-forced argmax)."""
    ok = 0
    for i in range(0, len(batch.seqs), chunk):
        rows = list(range(i, min(i + chunk, len(batch.seqs))))
        h, tgt, sel = batch.select(rows)
        hit = sp.top_logits(model, h, split, sel).argmax(-1) == tgt
        for j in range(len(rows)):
            ok += bool(hit[sel[:, 0] == j].all())
    return ok / len(batch.seqs)


@torch.no_grad()
def perplexity(model, batch: Batch, split: int) -> float:
    """exp(mean NLL) of the held-out text (every token after the first)."""
    h, tgt, sel = batch.select([0])
    logits = sp.top_logits(model, h, split, sel)
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), tgt).item())


def score(model, data: TaskData, tasks: Optional[Sequence[str]] = None) -> dict:
    """{task: exact-match accuracy} on the eval sets of ``tasks`` (default all), plus "ppl"."""
    model.eval()
    out = {name: round(exact_match(model, data.eval[name], data.split), 4) for name in (tasks or data.eval)}
    out["ppl"] = round(perplexity(model, data.text, data.split), 4)
    return out


def _train(model, params, batch: Batch, split: int, steps: int, lr: float, seed: int, bs: int = 8) -> float:
    """AdamW on mean token cross-entropy of the answers; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    n = len(batch.seqs)
    order = torch.randperm(n, generator=g).tolist()
    for step in range(steps):
        if not order:
            order = torch.randperm(n, generator=g).tolist()
        rows, order = order[:bs], order[bs:]
        h, tgt, sel = batch.select(rows)
        loss = torch.nn.functional.cross_entropy(sp.top_logits(model, h, split, sel), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def train_lora(base, batch: Batch, split: int, spec: dict, seed: int):
    """A PEFT LoRA on the top layers; returns the PeftModel (base deep-copied, untouched)."""
    from peft import LoraConfig, get_peft_model

    spec = dict(spec)
    steps, lr = spec.pop("steps"), spec.pop("lr")
    n_layers = base.config.num_hidden_layers
    torch.manual_seed(seed)
    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     layers_to_transform=list(range(split, n_layers)), **spec)
    model = get_peft_model(copy.deepcopy(base), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _train(model, params, batch, split, steps, lr, seed)
    return model, loss


def train_full(base, batch: Batch, split: int, spec: dict, seed: int):
    """Every linear weight of the top layers trained (dense deltas); the rest stays the base's."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for i, layer in enumerate(model.get_decoder().layers):
        if i < split:
            continue
        for name, mod in layer.named_modules():
            if name.split(".")[-1] in LINEAR_NAMES:
                mod.weight.requires_grad_(True)
                params.append(mod.weight)
    loss = _train(model, params, batch, split, spec["steps"], spec["lr"], seed)
    for p in params:
        p.requires_grad_(False)
    return model, loss


def _save_full(model, tok, dest: Path) -> None:
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest, save_jinja_files=False)


def build(model_dir, out_dir, force: bool = False, progress: Callable[[str], None] = print,
          loras: Optional[dict] = None, full: Optional[dict] = None, split_layers: int = TRAIN_LAYERS,
          n_train: Optional[int] = None, n_eval: int = N_EVAL) -> dict:
    """Train the example fine-tunes into ``out_dir`` (temporary folder + rename); their scores.

    ``loras`` / ``full``: recipes to use instead of LORAS / FULL (tests pass tiny ones).
    Returns the content of scores.json: {"base": {...}, "adapters/<t>": {...}, "full/<t>": {...},
    "weak": [models that beat the base on their task by less than MIN_GAIN], "split": L, ...}.
    """
    out = Path(out_dir)
    if is_built(out) and not force:
        progress(f"fine-tunes already built in {out}")
        return json.loads((out / "scores.json").read_text())
    loras = LORAS if loras is None else loras
    full = FULL if full is None else full
    t0 = time.perf_counter()
    base, tok = load_base(model_dir)
    split = base.config.num_hidden_layers - split_layers
    tasks = sorted(set(loras) | set(full), key=list(TASKS).index)
    counts = {t: TASKS[t].n_train if n_train is None else n_train for t in tasks}
    progress(f"preparing {len(tasks)} tasks (train examples {counts}, {n_eval} eval each; layers < {split} frozen)")
    data = prepare(base, tok, split, tasks, n_train, n_eval, progress)
    scores = {"base": score(base, data)}
    progress(f"  base: {scores['base']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weak: List[str] = []
    try:
        for kind, recipes, trainer in (("adapters", loras, train_lora), ("full", full, train_full)):
            for i, (task, spec) in enumerate(recipes.items()):
                t1 = time.perf_counter()
                model, loss = trainer(base, data.train[task], split, spec, SEED + 17 * i + (kind == "full"))
                key = f"{kind}/{task}"
                scores[key] = score(model, data, [task])
                if kind == "adapters":
                    model.save_pretrained(tmp / key)
                else:
                    _save_full(model, tok, tmp / key)
                progress(f"  {key}: loss {loss:.3f}, {scores[key]} ({time.perf_counter() - t1:.0f} s)")
                if scores[key][task] < scores["base"][task] + MIN_GAIN:
                    weak.append(key)
                    progress(f"  WARNING: {key} does not clearly beat the base on '{task}' "
                             f"({scores[key][task]:.2f} vs {scores['base'][task]:.2f})")
                del model
        meta = {**scores, "weak": weak, "split": split, "format_version": FORMAT_VERSION, "seed": SEED,
                "n_train": counts, "n_eval": n_eval, "model_dir": str(model_dir),
                "recipes": {"adapters": {k: dict(v) for k, v in loras.items()}, "full": full},
                "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "scores.json").write_text(json.dumps(meta, indent=2) + "\n")
        torch.save({"key": {"split": split, "n_eval": n_eval, "format_version": FORMAT_VERSION,
                            "tasks": [t for t in TASKS if t in tasks]},
                    "data": TaskData(split, {}, data.eval, data.text)}, tmp / EVAL_CACHE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"fine-tunes ready in {out} ({time.perf_counter() - t0:.0f} s)")
    return meta


EVAL_CACHE = "eval_hidden.pt"


def eval_data(ft_dir, model, tok, meta: dict) -> TaskData:
    """The evaluation sets with their bottom hidden states, cached in ``ft_dir``.

    Computing them costs a forward through the frozen bottom for every eval prompt (the
    slow part of scoring on a CPU); the cache is keyed by the split, the example counts and
    FORMAT_VERSION, and rewritten (temporary name + rename) when any of them differs.
    """
    path = Path(ft_dir) / EVAL_CACHE
    key = {"split": meta["split"], "n_eval": meta["n_eval"], "format_version": FORMAT_VERSION,
           "tasks": [t for t in TASKS if t in meta.get("base", {})]}
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=False)
            if blob.get("key") == key:
                return blob["data"]
        except Exception:  # a damaged cache is recomputed below
            pass
    data = prepare(model, tok, meta["split"], key["tasks"], n_train=0, n_eval=meta["n_eval"], progress=lambda m: None)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"key": key, "data": data}, tmp)
    os.replace(tmp, path)
    return data
