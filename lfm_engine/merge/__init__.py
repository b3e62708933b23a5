"""Model-level merging: mergekit YAML configs, streaming safetensors I/O, bounded memory.

``merge_models(config_or_path, out_dir, ...)`` is the entry point (also behind
``lfm-engine merge``). See :mod:`.config` for the YAML vocabulary, :mod:`.plan`
for how output tensors and their parameters are decided, :mod:`.runner` for the
streaming executor and which methods run in C++ vs torch, :mod:`lfm_engine.io`
for the safetensors reader and sharded writer.
"""
from lfm_engine.merge.config import ALL_METHODS, MergeConfigErrors, parse_config
from lfm_engine.io.model_folder import CheckpointError
from lfm_engine.merge.plan import build_plan
from lfm_engine.merge.runner import MergeResult, MergeWarning, merge_models

__all__ = ["merge_models", "MergeResult", "MergeWarning", "MergeConfigErrors", "CheckpointError",
           "parse_config", "build_plan", "ALL_METHODS"]
