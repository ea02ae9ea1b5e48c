"""Merge open language models from mergekit-style recipes: check, merge, GGUF, publish."""

__version__ = "0.1.0"
