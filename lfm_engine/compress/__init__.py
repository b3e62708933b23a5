"""Model-level task-vector compression: the .lfmd container, compress / decompress / inspect."""
from lfm_engine.compress.lfmd import (
    FORMAT, CompressReport, FingerprintMismatchError, LfmdError, compress_model, decompress_model,
    inspect_container, open_container, parse_codec_spec,
)

__all__ = ["FORMAT", "CompressReport", "FingerprintMismatchError", "LfmdError", "compress_model",
           "decompress_model", "inspect_container", "open_container", "parse_codec_spec"]
