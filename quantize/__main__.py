"""`python -m quantize MODEL_DIR --out OUT_DIR [--outtype f16] [--quant Q4_K_M,Q5_K_M] [--name NAME]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merger.errors import MergerError
from quantize.convert import OUTTYPES
from quantize.llama import HUB_FILE_LIMIT, QUANT_TYPES, export_gguf


def main(argv: list[str] | None = None) -> int:
    """Run the export; user errors are printed as one line with exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m quantize", description="Export a Hugging Face model folder to GGUF.")
    parser.add_argument("model_dir", type=Path, help="local folder with config.json, safetensors and tokenizer files")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--outtype", choices=list(OUTTYPES), default=None,
                        help="unquantized output type (default f16 when no --quant is given)")
    parser.add_argument("--quant", default="", help=f"comma-separated llama.cpp types: {', '.join(QUANT_TYPES)}")
    parser.add_argument("--name", default=None, help="file name prefix (default: the model folder's name)")
    parser.add_argument("--split-max-size", type=int, default=HUB_FILE_LIMIT,
                        help="split files larger than this many bytes (default: the Hub's 50 GB limit)")
    args = parser.parse_args(argv)
    quants = [q for q in args.quant.split(",") if q.strip()]
    outtype = args.outtype or (None if quants else "f16")
    try:
        paths = export_gguf(
            args.model_dir, args.out, args.name or args.model_dir.resolve().name, outtype, quants,
            split_max_size=args.split_max_size,
        )
    except MergerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
