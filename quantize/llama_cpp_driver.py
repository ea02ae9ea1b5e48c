"""Runs llama.cpp's convert_hf_to_gguf.py in this process: `python -m quantize.llama_cpp_driver DIR ARGS...`.

DIR is the converter's folder (quantize.upstream.converter_dir()); ARGS are the converter's own. One
thing is added: llama.cpp names a BPE tokenizer's pre-tokenizer by hashing how it encodes a test text,
and refuses tokenizers whose hash it has not recorded (every fine-tune that retrains or edits its
tokenizer). Then the name is taken from tokenizer.json's pre-tokenizer rule itself, exactly as the
streaming converter does (quantize.tokenizer.bpe_pre_tokenizer), or the export is refused in one line.
Known tokenizers keep llama.cpp's own answer.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m quantize.llama_cpp_driver CONVERTER_DIR ARGS...", file=sys.stderr)
        return 2
    sys.path.insert(0, argv[0])
    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    import conversion.base as base  # puts the converter's own gguf-py first on sys.path

    by_hash = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:  # noqa: ANN001
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            from quantize.tokenizer import pre_tokenizer_of_folder

            return pre_tokenizer_of_folder(self.dir_model)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    try:
        convert_hf_to_gguf.main()
    except Exception as exc:  # noqa: BLE001 - one line for the caller, which shows it to the user
        print(f"GGUF-EXPORT-ERROR: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
