"""GGUF export: convert a Hugging Face folder with the gguf package, quantize and verify with llama.cpp."""
