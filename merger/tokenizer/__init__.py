"""Output tokenizers built from several models' tokenizers (mergekit's `tokenizer_source: union`)."""

from merger.tokenizer.union import UnionTokenizer, build_union, write_union_tokenizer

__all__ = ["UnionTokenizer", "build_union", "write_union_tokenizer"]
