"""Evidence that a merge is good: the shipped evaluation text, merge-vs-parents perplexity and samples
(quality.py). GGUF files are verified by quantize.verify on the same text."""
