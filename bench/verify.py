"""What GGUF verification and the merge evaluation cost, per GB of model, on this machine.

    .venv/bin/python bench/verify.py [--hidden 1024] [--layers 8] [--vocab 32000] [--tokens 256]

Writes a Llama-shaped model (fp16), exports F16 + Q8_0 + Q4_K_M, and times, side by side in one run:
the export alone, the verification of each file (llama.cpp loads + evaluates the token budget; the F16
file is also compared with the safetensors through the torch reference forward), and the perplexity
evaluation of the model (what a merge pays per parent). Prints seconds and seconds per GB of F16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merger.app.tiny import make_tiny_model  # noqa: E402
from merger.eval.quality import evaluate_merge  # noqa: E402
from merger.eval.text import eval_sections  # noqa: E402
from quantize.llama import export_gguf  # noqa: E402
from quantize.verify import Verifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "m", "llama", seed=1, num_layers=args.layers, hidden=args.hidden,
                                vocab=args.vocab, dtype=torch.float16)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        gb = size / 1e9
        t = time.perf_counter()
        export_gguf(model, root / "plain", "m", "f16", ["Q8_0", "Q4_K_M"])
        export_s = time.perf_counter() - t
        timings: dict[str, float] = {}
        v = Verifier(model, eval_sections(), token_budget=args.tokens)

        def hook(path: Path, kind: str) -> None:
            t0 = time.perf_counter()
            m = v.quantized(path, kind) if timings else v.base(path, kind)
            timings[kind.upper()] = time.perf_counter() - t0
            print(f"  {kind.upper():7s} {timings[kind.upper()]:7.2f} s  {m.summary()[:110]}")

        t = time.perf_counter()
        export_gguf(model, root / "verified", "m", "f16", ["Q8_0", "Q4_K_M"], verify=hook)
        verified_s = time.perf_counter() - t
        t = time.perf_counter()
        evaluate_merge(model, {}, token_budget=args.tokens)
        eval_s = time.perf_counter() - t
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {gb:.2f} GB fp16, "
          f"{args.tokens}-token budget")
    print(f"export F16+Q8_0+Q4_K_M           {export_s:7.2f} s")
    print(f"export + verification            {verified_s:7.2f} s  ({verified_s / export_s:.2f}x the export)")
    print(f"verification, F16 vs safetensors {timings['F16']:7.2f} s  ({timings['F16'] / gb:.1f} s/GB)")
    q = timings["Q8_0"] + timings["Q4_K_M"]
    print(f"verification, 2 quantized files  {q:7.2f} s  ({q / 2 / gb:.1f} s/GB of F16 each)")
    print(f"evaluation (perplexity, 1 model) {eval_s:7.2f} s  ({eval_s / gb:.1f} s/GB)")


if __name__ == "__main__":
    main()
