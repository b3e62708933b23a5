"""Model-level merging: stream a planned merge tensor by tensor into a new folder.

Where each method runs
----------------------
* task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
  della_linear, della and linear go through :func:`lfm_engine.merge_tensors`, the
  fused multi-threaded C++ kernel (CUDA on a GPU): sparsification (exact top-k
  select, Philox masks), sign election and the weighted sum are fused into a few
  streaming passes, which is where nearly all the time of a merge goes.
* slerp, nuslerp, model_stock, multislerp and karcher run in plain torch
  (:mod:`.geometric`): each is a global reduction (norms/dots/cosines; karcher a few
  such iterations) and one scaled sum, vectorised torch ops that already run at
  memory bandwidth; there is no sparsification or sign election to fuse. sce,
  nearswap, arcee_fusion, ram and ramplus_tl (:mod:`.elementwise`) and passthrough
  also run in torch. Their results are screened for NaN/Inf once per output tensor
  (one fp32 sum; element-wise checks only when it is not finite, to name the cause).
* ``model+lora`` inputs get their adapter delta added as each tensor is read
  (:mod:`.lora_ref`).

No torch on the CPU path
------------------------
On the CPU, tensors travel as numpy arrays holding the raw bits (bf16 as uint16,
:mod:`lfm_engine.io.dtypes`): read by positional reads, handed to the C++ kernel as raw
buffers (:func:`lfm_engine.ops.merge.merge_arrays`), written by the streaming writer.
torch is imported only when the config needs it: a torch-implemented method, ``--device
cuda``, a ``model+lora`` reference, or a dtype conversion the numpy path does not make
(docs/merge.md "Startup").

Streaming and memory
--------------------
A background thread reads the inputs of upcoming tensors (positional reads, see
:mod:`lfm_engine.io.safetensors`) into a bounded queue (``PREFETCH_DEPTH`` tensor groups) while the main
thread merges the current group and appends the result to the output shard. At
most ``PREFETCH_DEPTH + 2`` groups (queued, being read, being merged) plus one
output tensor are alive, so peak memory is a few times the largest tensor group
(e.g. the embedding of every model), independent of the model size.

Output
------
Everything is written into a temporary sibling folder ``.OUT_DIR.tmp-*`` and
renamed to OUT_DIR only when complete; on any error or interrupt the temporary
folder is deleted, so no complete-looking output is ever left behind. An existing
OUT_DIR is an error unless ``allow_overwrite`` (then it is replaced only after the
new one is complete).
"""
from __future__ import annotations

import json
import math
import os
import queue
import resource
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np

from lfm_engine.core.merge_registry import METHODS
from lfm_engine.io import dtypes
from lfm_engine.io.safetensors import (ShardedWriter, as_numpy, as_torch, map_array, parse_size, plan_shards,
                                       read_array)
from lfm_engine.merge import config as C
from lfm_engine.merge import chat_template, elementwise, lora_ref, stages, vocab
from lfm_engine.merge.outdir import make_temp_dir
from lfm_engine.merge.plan import EMBED_RE, fmt_bytes, MergePlan, TensorTask, build_plan, task_merge_kwargs

PREFETCH_DEPTH = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")
MODEL_SIDE_FILES = ("generation_config.json",)


class MergeWarning(UserWarning):
    """Something was merged differently from the plain case (missing tensor, vocab size)."""


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""
    out_dir: str
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    shards: int
    dry_run: bool = False
    warnings: List[str] = field(default_factory=list)
    plan_text: str = ""

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing written\n{self.plan_text}"
        gbps = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9
        return (f"merged {self.tensors} tensors with {self.method} into {self.out_dir} "
                f"({self.shards} shard{'s' if self.shards != 1 else ''})\n"
                f"read {fmt_bytes(self.bytes_read)}, wrote {fmt_bytes(self.bytes_written)} "
                f"in {self.seconds:.2f} s ({gbps:.2f} GB/s), peak RSS "
                f"{self.peak_rss_bytes / 2**20:.0f} MiB")


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _merge_tensors_fn():
    # imported lazily: lfm_engine/__init__ re-exports merge_models, so a top-level
    # import here would be circular
    from lfm_engine.ops.merge import merge_tensors
    return merge_tensors


def _merge_arrays_fn():
    from lfm_engine.ops.merge import merge_arrays_counted
    return merge_arrays_counted


def native_method(method: str) -> bool:
    """Whether ``method`` runs in the fused C++ kernel (else in torch)."""
    return METHODS[method].fused


class _Device:
    """Where the arithmetic runs: ``type`` "cpu" or "cuda"; ``torch`` the torch.device
    (made only for CUDA, so the CPU path never imports torch)."""

    def __init__(self, spec: str):
        spec = str(spec).strip()
        kind, _, index = spec.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"--device {spec}: only cpu and cuda[:N] are supported")
        self.type = kind
        self.torch = None
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {spec}: CUDA is not available on this machine")
            self.torch = torch.device(spec)


# ------------------------------------------------------------------- one tensor

def _torch_method(method: str, task: TensorTask, base, xs, sh):
    """The methods implemented in torch (see the module docstring for why); their shared
    parameters with the registry's defaults (lfm_engine/core/merge_registry.py)."""
    from lfm_engine.merge import geometric

    p = METHODS[method].shared_values(sh)
    if method == "slerp":
        return geometric.slerp(p["t"], base, xs[0])
    elif method == "nuslerp":
        return geometric.nuslerp(float(task.inputs[0].params["weight"]),
                                float(task.inputs[1].params["weight"]), xs[0], xs[1], base,
                                flatten=p["nuslerp_flatten"], row_wise=p["nuslerp_row_wise"])
    elif method == "model_stock":
        return geometric.model_stock(base, xs, filter_wise=p["filter_wise"])
    elif method == "multislerp":
        return geometric.multislerp([float(i.params["weight"]) for i in task.inputs], xs, base,
                                   normalize_weights=p["normalize_weights"], eps=p["eps"])
    elif method in elementwise.METHODS:
        return elementwise.merge(method, base, xs, sh, _checked=p)
    elif method == "passthrough":
        # mergekit's passthrough: the one input, times `scale` when given
        scale = task.inputs[0].params.get("scale")
        return xs[0] if scale is None else xs[0].to(geometric._work_dtype(xs[0])) * float(scale)
    elif method == "karcher":
        return geometric.karcher(xs, max_iter=p["max_iter"], tol=p["tol"])
    else:  # pragma: no cover - the config parser rejects unknown methods
        raise ValueError(f"unknown merge method {method!r}")


def merge_task(method: str, task: TensorTask, tensors: Dict, seed: int,
               device=None, n_threads: int = 0):
    """Compute one output tensor from its loaded inputs, keyed by (file, start).

    On the CPU (``device`` None or "cpu") the inputs are numpy arrays and so is the
    result (raw bits of ``task.dtype``); torch runs only for the torch methods. On CUDA
    (``device`` a torch.device) inputs and result are torch tensors."""
    dev = getattr(device, "torch", device)
    if task.vocab is not None:   # embedding rows re-mapped to the merged vocabulary first
        tensors = vocab.remap(task, tensors)
    if dev is None or getattr(dev, "type", dev) == "cpu":
        if task.kind == "copy" or native_method(method):
            return _merge_task_numpy(method, task, tensors, seed, n_threads)
        tensors = {k: as_torch(a, _info_dtype(task, k)) for k, a in tensors.items()}
        return as_numpy(_merge_task_torch(method, task, tensors, seed, None, n_threads))
    return _merge_task_torch(method, task, tensors, seed, dev, n_threads)


def _info_dtype(task: TensorTask, key) -> "dtypes.DType":
    for info in task.read_infos():
        if (info.file, info.start) == key:
            return info.dtype
    raise KeyError(key)  # pragma: no cover - the prefetcher reads exactly read_infos()


def _named_error(task: TensorTask, e: ValueError) -> ValueError:
    # e.g. NaN/Inf: name the tensor (the kernel named the model: task_merge_kwargs passes
    # the config's references as model_names)
    return ValueError(f"tensor '{task.name}': {e}")


def _merge_task_numpy(method: str, task: TensorTask, arrays: Dict, seed: int, n_threads: int) -> np.ndarray:
    """The CPU path without torch: copies and the fused C++ methods on raw numpy buffers."""
    def get(info):
        return arrays[(info.file, info.start)]

    if task.kind == "copy":
        return dtypes.convert(get(task.base), task.base.dtype, task.dtype)
    reg = tuple(slice(0, r) for r in task.region) if task.region is not None else None

    def cut(info):
        x = get(info)
        return (np.ascontiguousarray(x[reg]) if reg is not None else x), info.dtype

    kw = task_merge_kwargs(method, task, seed)
    m = kw.pop("method")
    try:
        out, n_bad = _merge_arrays_fn()(cut(task.base) if task.base is not None else None,
                                        [cut(i.info) for i in task.inputs], m, out_dtype=task.dtype,
                                        n_threads=n_threads, **kw)
    except ValueError as e:
        raise _named_error(task, e) from None
    # the native kernel counts the NaN/Inf it writes (no second sweep); the torch-run
    # backends do not (None): check their output here
    counted = n_bad is not None and n_bad >= 0
    if (n_bad > 0) if counted else not dtypes.all_finite(out, task.dtype):
        raise _overflow_error(task)
    if reg is None:
        return out
    full_src = task.base if task.base is not None else task.fill
    full = dtypes.convert(get(full_src), full_src.dtype, task.dtype, copy=True)
    full[reg] = out
    return full


def _merge_task_torch(method: str, task: TensorTask, tensors: Dict, seed: int, device, n_threads: int):
    """torch tensors in and out (CUDA, and the torch methods on the CPU)."""
    dt = task.dtype.torch

    def get(info):
        t = tensors[(info.file, info.start)]
        return t if device is None else t.to(device, non_blocking=True)

    if task.kind == "copy":
        return get(task.base).to(dt)
    reg = tuple(slice(0, r) for r in task.region) if task.region is not None else None

    def cut(x):
        return x[reg].contiguous() if reg is not None else x

    base = cut(get(task.base)) if task.base is not None else None
    xs = [cut(get(i.info)) for i in task.inputs]
    sh = task.shared
    if native_method(method):
        kw = task_merge_kwargs(method, task, seed)   # names the models by their config reference
        m = kw.pop("method")
        try:
            out = _merge_tensors_fn()(base, xs, method=m, out_dtype=dt,
                                      n_threads=n_threads, **kw)
        except ValueError as e:
            raise _named_error(task, e) from None
        if not _all_finite(out):
            raise _overflow_error(task)
    else:
        out = _torch_method(method, task, base, xs, sh)
        _check_finite(task, out, base, xs)
    out = out.to(dt)
    if reg is None:
        return out
    full_src = task.base if task.base is not None else task.fill
    full = get(full_src).to(dt).clone()
    full[reg] = out
    return full


def _all_finite(x, chunk: int = 1 << 22) -> bool:
    """Exact check in float32 chunks (torch.isfinite on bf16 is slow on CPU)."""
    import torch

    flat = x.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        if not bool(torch.isfinite(part.float() if part.dtype != torch.float64 else part).all()):
            return False
    return True


def _check_finite(task: TensorTask, out, base, xs) -> None:
    """Refuse a non-finite result of a torch-implemented method, naming its cause.

    Every torch method is, per element, a combination of its inputs with finite
    coefficients computed from norms and dots of those inputs, so a NaN/Inf input
    makes the output (or a coefficient, hence the output) non-finite. One float32
    sum of the output (bandwidth-bound) therefore screens the whole group; only
    when it is not finite are the output and then the inputs checked element-wise,
    to tell an input's NaN/Inf from an overflow of finite values.
    """
    import torch

    if math.isfinite(float(out.sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32))):
        return
    if _all_finite(out):
        return  # only the screening sum overflowed
    for info, x in ([(task.base, base)] if base is not None else []) + \
            [(i.info, x) for i, x in zip(task.inputs, xs)]:
        if x.is_floating_point() and not _all_finite(x):
            raise ValueError(f"tensor '{task.name}' of {os.path.dirname(info.file)} "
                             f"contains NaN or Inf")
    raise _overflow_error(task)


def _overflow_error(task: TensorTask) -> ValueError:
    """Finite inputs (the kernels refuse NaN/Inf inputs by name) and a non-finite result:
    the parameters (weights, lambda, t, ...) scale the values past the output dtype's range."""
    return ValueError(f"tensor '{task.name}': the merged values overflow {task.dtype} (finite inputs, "
                      f"non-finite result); check the merge parameters (weight, lambda, ...) and the "
                      f"inputs' magnitudes")


# ------------------------------------------------------------------- prefetch

def cpu_reader():
    """How the CPU merge reads its inputs, from LFM_MERGE_READ: "mmap" (the default:
    map_array, each tensor mapped from the page cache: no copy into fresh buffers, whose
    page zeroing and copy cost 7-20 % of a 120M-parameter merge's wall time on 2 cores,
    bench/RESULTS.md session 5) or "pread"
    (read_array: positional reads into new arrays, immune to another process truncating an
    input during the merge)."""
    mode = os.environ.get("LFM_MERGE_READ", "mmap").strip().lower()
    if mode == "mmap":
        return map_array
    if mode == "pread":
        return read_array
    raise ValueError(f"LFM_MERGE_READ={os.environ['LFM_MERGE_READ']!r}: expected 'mmap' or 'pread'")


class _Prefetcher:
    """Reads the inputs of upcoming tasks on a background thread into a bounded queue."""

    _END = object()

    def __init__(self, tasks: List[TensorTask], depth: int = PREFETCH_DEPTH, device=None):
        self.tasks = tasks
        # On the CPU the inputs are numpy arrays. On a GPU (device: a torch.device) they are
        # read into pinned memory and copied on a stream of their own, so the copy of task
        # i+1 overlaps the merge of task i on the compute stream.
        self.device = device if device is not None and device.type == "cuda" else None
        self.copy_stream = None
        if self.device is not None:
            import torch

            self.copy_stream = torch.cuda.Stream(device=self.device)
        self.read = cpu_reader()
        self.q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lfm-merge-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        fds: Dict[str, int] = {}
        torch = None
        if self.device is not None:
            import torch

            torch.cuda.set_device(self.device)
        try:
            for task in self.tasks:
                loaded = {}
                nbytes = 0
                for info in task.read_infos():
                    key = (info.file, info.start)
                    if key in loaded:
                        continue
                    fd = fds.get(info.file)
                    if fd is None:
                        fd = fds[info.file] = os.open(info.file, os.O_RDONLY)
                    if self.device is None:
                        t = lora_ref.apply(info, self.read(info, fd))
                    else:
                        pinned = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
                        arr = read_array(info, fd, out=pinned.numpy())
                        adapted = lora_ref.apply(info, arr)
                        t = (pinned.view(info.dtype.torch).reshape(info.shape) if adapted is arr
                             else as_torch(adapted, info.dtype))
                        with torch.cuda.stream(self.copy_stream):
                            t = t.to(self.device, non_blocking=True)
                    loaded[key] = t
                    nbytes += info.nbytes
                copied = None
                if self.device is not None:
                    copied = torch.cuda.Event()
                    copied.record(self.copy_stream)
                if not self._put((task, loaded, nbytes, copied)):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, which re-raises
            self._put(e)
        finally:
            for fd in fds.values():
                os.close(fd)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            task, loaded, nbytes, copied = item
            if copied is not None:
                # the compute stream waits for the copies; the tensors, made on the copy
                # stream, are marked as used on the compute stream for the allocator
                import torch

                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(copied)
                for t in loaded.values():
                    t.record_stream(compute)
            yield task, loaded, nbytes

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)


class _AsyncWriter:
    """Appends finished tensors to the shards on a second thread (bounded queue), so the
    write of tensor i overlaps the merge of tensor i+1. Errors surface on the next call."""

    _END = object()

    def __init__(self, writer: ShardedWriter, depth: int = 2):
        self.writer = writer
        self.q: "queue.Queue" = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="lfm-merge-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:
                    self.error = e

    def write(self, name: str, tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, tensor))

    def finish(self) -> None:
        self.q.put(self._END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            self.q.put(self._END)
            self.thread.join(timeout=30)


# ------------------------------------------------------------------- outputs

def _model_card(plan: MergePlan) -> str:
    cfg = plan.config
    names = []
    for fo in plan.folders.values():
        if fo.ref not in names:
            names.append(fo.ref)
    base_line = f"- base model: `{cfg.base_ref}`\n" if cfg.base_ref else ""
    others = "".join(f"- `{n}`\n" for n in names if n != cfg.base_ref)
    return (
        "---\ntags:\n- merge\n- lfm-engine\n"
        + (f"base_model: {json.dumps(cfg.base_ref)}\n" if cfg.base_ref else "")
        + "---\n\n# Merged model\n\n"
        f"This model was produced by `lfm-engine merge` with the **{cfg.method}** merge "
        f"method (seed {plan.seed}).\n\n## Inputs\n\n{base_line}{others}\n"
        "## Configuration\n\n```yaml\n" + cfg.yaml_text.strip("\n") + "\n```\n")


def _write_side_files(plan: MergePlan, folder: str, out_dtype_name: Optional[str],
                      warns: List[str], copy_tokenizer: bool = True,
                      write_model_card: bool = True) -> None:
    layout = plan.folders[plan.layout_path]
    cfg_json = dict(layout.config or {})
    if out_dtype_name:
        cfg_json["torch_dtype"] = out_dtype_name
        if "dtype" in cfg_json:
            cfg_json["dtype"] = out_dtype_name
    if plan.config.slices is not None and plan.num_layers_out:
        cfg_json["num_hidden_layers"] = plan.num_layers_out
    if plan.vocabulary is not None:
        vocab.set_vocab_size(cfg_json, plan.vocabulary)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
        f.write("\n")
    for fn in MODEL_SIDE_FILES:
        src = os.path.join(plan.layout_path, fn)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, fn))
    if plan.vocabulary is not None and plan.vocabulary.tokenizer is not None:
        # a vocabulary that differs from every input's: written even with --no-copy-tokenizer
        # (as mergekit), since no input tokenizer matches the output's embeddings
        vocab.save(plan.vocabulary, folder)
        copy_tokenizer = True  # the output has a tokenizer: a chat template goes with it
    elif copy_tokenizer:
        copied = 0
        for fn in TOKENIZER_FILES:
            src = os.path.join(plan.tokenizer_path, fn)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(folder, fn))
                copied += 1
        if not copied:
            warns.append(f"no tokenizer files found in {plan.tokenizer_path}; the output has none")
    if plan.config.chat_template is not None:
        if copy_tokenizer:
            chat_template.write(folder, chat_template.resolve(plan.config.chat_template, plan.folders))
        else:
            warns.append("chat_template is not written: --no-copy-tokenizer writes no tokenizer files")
    if write_model_card:
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(_model_card(plan))
    with open(os.path.join(folder, "mergekit_config.yml"), "w") as f:
        f.write(plan.config.yaml_text)


def _dominant_float_dtype(plan: MergePlan) -> Optional[str]:
    sizes: Dict[dtypes.DType, int] = {}
    for t in plan.tasks:
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.out_nbytes
    if not sizes:
        return None
    return max(sizes, key=sizes.get).name


# ------------------------------------------------------------------- entry point

def merge_models(config_or_path: Union[str, dict, "os.PathLike"], out_dir: Union[str, "os.PathLike"], *,
                 device: str = "cpu", threads: Optional[int] = None,
                 out_shard_size: Union[str, int] = "5GB", seed: Optional[int] = None,
                 allow_overwrite: bool = False, dry_run: bool = False,
                 quiet: bool = False, copy_tokenizer: bool = True,
                 write_model_card: bool = True,
                 intermediate_dir: Optional[str] = None) -> MergeResult:
    """Merge the models of a mergekit-style config into ``out_dir``.

    ``config_or_path``: a YAML file path, YAML text, or a dict. ``device``: where
    the merge arithmetic runs ("cpu" or "cuda[:i]"; inputs are always read and
    outputs written through host memory). ``threads``: CPU threads for the
    kernels (default: torch's setting). ``out_shard_size``: largest output shard,
    e.g. "5GB", "500MB" or bytes. ``seed``: DARE/DELLA seed (default 0).
    ``copy_tokenizer``/``write_model_card``: write the tokenizer files / README.md
    (mergekit's options of the same names; config.json and mergekit_config.yml are
    always written). A multi-document YAML runs its stages in order
    (:mod:`.stages`); named stages go to ``intermediate_dir/NAME`` (kept) or to a
    temporary folder removed at the end.

    All configuration problems (unknown keys, misspelled methods, missing
    folders, pickle-only checkpoints, shape/architecture mismatches, an existing
    ``out_dir``) are raised together as one
    :class:`~lfm_engine.merge.config.MergeConfigErrors` before anything is
    written; ``dry_run`` stops after that check and returns the plan.
    """
    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    staged = stages.load_stages(config_or_path)
    if staged is not None:
        return _merge_stages(staged, out_dir, t0, device=device, threads=threads, out_shard_size=out_shard_size,
                             seed=seed, allow_overwrite=allow_overwrite, dry_run=dry_run, quiet=quiet,
                             copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                             intermediate_dir=intermediate_dir)
    cfg, plan, shard_bytes, dev = _check_and_plan(config_or_path, out_dir, device, threads, out_shard_size,
                                                  seed, allow_overwrite)
    for w in cfg.warnings + plan.warnings:
        warnings.warn(w, MergeWarning, stacklevel=2)

    layout = plan_shards([(t.name, t.dtype, t.shape) for t in plan.tasks], shard_bytes)
    if dry_run:
        text = plan.describe() + (f"\n{plan.vocabulary.summary}" if plan.vocabulary else "") + f"\noutput shards: {len(layout.files)} (at most {fmt_bytes(shard_bytes)} each)"
        return MergeResult(out_dir, cfg.method, len(plan.tasks), plan.input_bytes, plan.output_bytes,
                           time.perf_counter() - t0, _peak_rss(), len(layout.files), True,
                           cfg.warnings + list(plan.warnings), text)

    n_threads = 0  # 0: the C++ library's default (LFM_NUM_THREADS or all cores)
    if threads is not None:
        n_threads = int(threads)
        if not native_method(cfg.method) or dev.type == "cuda":
            import torch

            torch.set_num_threads(n_threads)  # for the torch-implemented methods
    late_warns: List[str] = []
    bytes_read, bytes_written = _stream_merge(cfg, plan, layout, out_dir, dev, n_threads, quiet, late_warns,
                                              copy_tokenizer, write_model_card)
    for w in late_warns:
        warnings.warn(w, MergeWarning, stacklevel=2)
    res = MergeResult(out_dir, cfg.method, len(plan.tasks), bytes_read, bytes_written,
                      time.perf_counter() - t0, _peak_rss(), len(layout.files), False,
                      cfg.warnings + list(plan.warnings) + late_warns)
    if not quiet:
        print(res.summary(), file=sys.stderr)
    return res


def _merge_stages(staged, out_dir: str, t0: float, *, intermediate_dir, dry_run: bool, **opts) -> MergeResult:
    """A multi-document config: each stage through merge_models, in dependency order."""
    if os.path.lexists(out_dir) and not opts["allow_overwrite"]:
        raise C.MergeConfigErrors([f"output folder '{out_dir}' already exists "
                                   f"(use --allow-overwrite to replace it)"])

    def run_one(cfg_dict, out, dry):
        return merge_models(cfg_dict, out, **{**opts, "allow_overwrite": opts["allow_overwrite"] and out == out_dir},
                            dry_run=dry)
    res = stages.run_stages(staged[0], staged[1], out_dir, intermediate_dir, run_one, dry_run)
    if res is None:  # dry run whose final stage reads earlier outputs
        res = MergeResult(out_dir, "stages", 0, 0, 0, time.perf_counter() - t0, _peak_rss(), 0, True,
                          [], f"{len(staged[0])} stages checked; the final stage reads earlier "
                              f"stages' outputs, so its tensors were not planned")
    return res


def _check_and_plan(config_or_path, out_dir: str, device, threads, out_shard_size, seed, allow_overwrite):
    """(config, plan, shard bytes, device) once every problem of the options, the config and
    the folders is known; all of them are raised together as one MergeConfigErrors."""
    pre_errors: List[str] = []
    try:
        shard_bytes = parse_size(out_shard_size)
    except ValueError as e:
        pre_errors.append(f"--out-shard-size: {e}")
        shard_bytes = 5 * 10**9
    if seed is not None and not (0 <= int(seed) < 2**64):
        pre_errors.append(f"--seed: must lie in [0, 2^64), got {seed}")
    dev = None
    try:
        dev = _Device(device)
    except ValueError as e:
        pre_errors.append(str(e))
    if threads is not None and not 1 <= int(threads) <= 1024:  # the core's bound (csrc/core/thread_pool.cpp)
        pre_errors.append(f"--threads: must be in 1..1024, got {threads}")
    if os.path.lexists(out_dir) and not allow_overwrite:
        pre_errors.append(f"output folder '{out_dir}' already exists (use --allow-overwrite to replace it)")
    try:
        cfg = C.parse_config(config_or_path)
        plan = build_plan(cfg, seed=seed)
    except C.MergeConfigErrors as e:
        errs = pre_errors + e.errors
        if e.partial is not None:
            # the config has problems but its folders open: report the tensor-level
            # problems (shapes, architectures, parameter values) in the same list
            try:
                _plan_vocabulary(e.partial, build_plan(e.partial, seed=seed))
            except C.MergeConfigErrors as e2:
                errs += [m for m in e2.errors if m not in errs]
            except Exception:  # a malformed setting already reported above
                pass
        raise C.MergeConfigErrors(errs) from None
    for path in plan.folders:
        if os.path.abspath(path) == out_dir:
            pre_errors.append(f"output folder '{out_dir}' is one of the input models")
    if cfg.chat_template is not None:
        try:
            chat_template.resolve(cfg.chat_template, plan.folders)
        except ValueError as e:
            pre_errors.append(str(e))
    try:
        _plan_vocabulary(cfg, plan)
    except C.MergeConfigErrors as e:
        pre_errors += e.errors
    if pre_errors:
        raise C.MergeConfigErrors(pre_errors)
    return cfg, plan, shard_bytes, dev


def _plan_vocabulary(cfg, plan: MergePlan) -> None:
    """The merged vocabulary of a tokenizer section and the re-mapping of the plan's
    vocabulary tensors (merge/vocab.py); raises MergeConfigErrors."""
    voc = vocab.plan_vocabulary(cfg, plan)
    if voc is None:
        return
    vocab.attach(plan, voc, EMBED_RE, cfg.base_path if cfg.models is not None else None)
    plan.vocabulary = voc
    if voc.copy_from is not None:
        plan.tokenizer_path = voc.copy_from
    plan.warnings = list(plan.warnings) + voc.warnings


def _stream_merge(cfg, plan, layout, out_dir: str, dev, n_threads: int, quiet: bool, late_warns: List[str],
                  copy_tokenizer: bool, write_model_card: bool):
    """Read, merge and write every tensor into a temporary sibling of out_dir (read-ahead and
    writing on their own threads), add the side files, then publish it by rename; on any
    failure or interrupt nothing is left. -> (bytes read, bytes written)."""
    tmp = make_temp_dir(out_dir)  # also sweeps temporaries of runs killed mid-merge
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output is an ordinary folder
    writer = None
    aw = None
    pf = None
    bar = None
    bytes_read = 0
    try:
        writer = ShardedWriter(tmp, layout, metadata={"merge_method": cfg.method,
                                                       "producer": "lfm_engine"})
        from tqdm import tqdm
        bar = tqdm(total=plan.input_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                   desc=f"merge {cfg.method}", disable=quiet, file=sys.stderr, dynamic_ncols=True,
                   smoothing=0.1)
        pf = _Prefetcher(plan.tasks, device=dev.torch)
        aw = _AsyncWriter(writer)
        n_done = 0
        for task, loaded, nbytes in pf:
            out = merge_task(cfg.method, task, loaded, plan.seed, dev, n_threads)
            del loaded
            aw.write(task.name, out)
            del out
            n_done += 1
            bytes_read += nbytes
            bar.update(nbytes)
            bar.set_postfix_str(f"tensors {n_done}/{len(plan.tasks)}", refresh=False)
        aw.finish()
        writer.close()
        _write_side_files(plan, tmp, cfg.output_dtype or _dominant_float_dtype(plan), late_warns,
                          copy_tokenizer, write_model_card)
        bar.close()
        _publish(tmp, out_dir)
    except BaseException:
        if pf is not None:
            pf.close()
        if aw is not None:
            aw.abort()
        if writer is not None:
            writer.abort()
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pf is not None:
            pf.close()
    return bytes_read, writer.bytes_written


def _publish(tmp: str, out_dir: str) -> None:
    """Rename the complete temporary folder to out_dir; an existing out_dir (allow_overwrite)
    is swapped out only now that the new one is complete."""
    if os.path.lexists(out_dir):
        old = make_temp_dir(out_dir, "old")
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
