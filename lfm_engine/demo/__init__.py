"""The built-in example: generated models (data.py) and the four checked parts of
`lfm-engine demo` (runner.py)."""
