"""`python -m quantize MODEL_DIR --out OUT_DIR [--outtype f16] [--quant Q4_K_M,Q5_K_M] [--name NAME]`.

Every file is verified in llama.cpp as it is written (quantize.verify): the unquantized one against the
folder's safetensors, each quantized one against it; a file outside its type's limits fails the export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merger.errors import GGUFError, MergerError
from merger.eval.text import eval_sections
from quantize.convert import OUTTYPES
from quantize.llama import HUB_FILE_LIMIT, QUANT_TYPES, export_gguf
from quantize.verify import Measurement, Verifier


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
    parser.add_argument("--no-verify", action="store_true", help="skip measuring each file in llama.cpp")
    parser.add_argument("--verify-tokens", type=int, default=256, metavar="N",
                        help="token budget of the verification (default 256)")
    args = parser.parse_args(argv)
    quants = [q for q in args.quant.split(",") if q.strip()]
    outtype = args.outtype or (None if quants else "f16")
    measurements: list[Measurement] = []
    verifier = Verifier(args.model_dir, eval_sections(), token_budget=max(16, args.verify_tokens))

    def verify(path: Path, kind: str) -> None:
        m = verifier.quantized(path, kind) if measurements else verifier.base(path, kind)
        measurements.append(m)
        if not m.passed:
            raise GGUFError(f"verification failed: {m.reason}")

    try:
        paths = export_gguf(
            args.model_dir, args.out, args.name or args.model_dir.resolve().name, outtype, quants,
            split_max_size=args.split_max_size, verify=None if args.no_verify else verify,
        )
    except MergerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    for m in measurements:
        print(f"verify {m.file}: {m.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
