"""GGUF conversion throughput and peak memory on a synthetic ~0.5B-parameter fp16 Llama shape.

Prints, for the same folder: the time to read every input tensor once and to copy the weight files
(the I/O floors: reading alone, reading plus writing as many bytes with plain reads into one reused
buffer and plain writes), the time and
GB/s of converting to an F16 GGUF (and Q8_0), and the peak resident memory of each step, measured in
a fresh process (VmHWM; ru_maxrss would inherit the parent's peak) so one step's memory does not
hide another's; each step is the best of 3 runs. Streaming should keep the peak near
one tensor's size, far below the model's.

    .venv/bin/python bench/gguf_export.py [--hidden 1536] [--layers 24] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_STEP = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from merger.sources import TensorReader
from quantize.convert import convert_folder
folder, step, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if step == "read":
    with TensorReader(folder) as reader:
        for name in reader.headers:
            reader.read(name)
elif step == "copy":  # plain reads into one reused buffer, plain writes: no allocation per chunk
    buffer = memoryview(bytearray(16 << 20))
    with open(out, "wb", buffering=0) as dst:
        for src in sorted(Path(folder).glob("*.safetensors")):
            with open(src, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    dst.write(buffer[:n])
else:
    convert_folder(folder, out, step)
seconds = time.perf_counter() - start
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this exec's own peak
print(json.dumps({{"seconds": seconds, "peak_rss_mb": int(hwm.split()[1]) / 1024}}))
"""


REPEAT = 3


def _run(folder: Path, step: str, out: Path) -> dict:
    """The best time of REPEAT fresh processes (the output removed before each), and the highest peak RSS."""
    code = _STEP.format(root=str(ROOT))
    runs = []
    for _ in range(REPEAT):
        out.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-c", code, str(folder), step, str(out)], capture_output=True,
                              text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--keep", type=Path, default=None, help="reuse/keep the synthetic model in this folder")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from merger.app.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "model"
        if not (folder / "config.json").exists():
            make_tiny_model(folder, "llama", num_layers=args.layers, hidden=args.hidden, shards=2)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"model: llama hidden={args.hidden} layers={args.layers}, {size / 1e9:.2f} GB fp16 safetensors")
        for step in ("read", "copy", "f16", "q8_0"):
            out = Path(tmp) / f"out-{step}.gguf"
            r = _run(folder, step, out)
            gb_s = size / 1e9 / r["seconds"]
            extra = f", output {out.stat().st_size / 1e9:.2f} GB" if out.exists() else ""
            print(f"{step:>5}: {r['seconds']:6.2f} s  {gb_s:5.2f} GB/s of input  peak RSS {r['peak_rss_mb']:7.0f} MB{extra}")
            out.unlink(missing_ok=True)
        print(f"(this driver process peaked at {base_rss:.0f} MB while generating the model)")


if __name__ == "__main__":
    main()
