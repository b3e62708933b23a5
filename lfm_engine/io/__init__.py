"""File formats: the safetensors header parser (and, as the I/O layer grows, the model
folder, PEFT adapter folder and dtype-name readers and writers)."""
