"""File formats, one reader and one writer each, used by merge, compress and serve
(decisions: docs/spec/io.md):

- :mod:`.dtypes`             element types: names, safetensors tags, sizes, C ABI codes
- :mod:`.safetensors_format` the validating safetensors header parser
- :mod:`.safetensors`        tensor reader (numpy, positional reads) and streaming writer
- :mod:`.model_folder`       Hugging Face model folders (:class:`ModelFolder`)
- :mod:`.peft`               PEFT LoRA adapter folders
- :mod:`.names`              the check on file names that come from inside files

Nothing here imports torch at import time (``lfm-engine merge`` on the CPU runs without it).
"""
