"""GGUF verification with teeth (quantize.verify) and merge quality (merger.eval): figures checked against
independent computations (float64 formula, transformers, llama.cpp's own converter + quantizer)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from merger.app.tiny import make_tiny_model
from merger.errors import GGUFError
from merger.eval.quality import BROKEN_RATIO, _degenerate, evaluate_merge
from merger.eval.text import eval_sections
from merger.pipeline import RunOptions, run
from merger.recipe import parse_recipe
from quantize import llama as qllama
from quantize.llama import export_gguf, quantize_gguf
from quantize.verify import LLAMA_CPP_KLD, LLAMA_CPP_TOP1, Verifier, compare, threshold
from tests.conftest import LLAMA_CPP_DRIVER

QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalpair")
    base = make_tiny_model(root / "base", "llama", seed=31, num_layers=2)
    return {"base": base, "chat": make_tiny_model(root / "chat", perturb_from=base, seed=32, perturb_scale=0.05)}


def _measure_all(model: Path, base_gguf: Path, files: dict[str, Path]) -> dict:
    v = Verifier(model, eval_sections())
    out = {"F16": v.base(base_gguf, "F16")}
    out.update({q: v.quantized(p, q) for q, p in files.items()})
    return out


def test_compare_is_the_kl_divergence_formula_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, got = torch.randn(40, 300, generator=gen) * 3, torch.randn(40, 300, generator=gen) * 3
    kld, p99, top1, top_p = compare(torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1))
    p = np.exp(ref.numpy().astype(np.float64))
    p /= p.sum(1, keepdims=True)
    q = np.exp(got.numpy().astype(np.float64))
    q /= q.sum(1, keepdims=True)
    per_token = [sum(pi * math.log(pi / qi) for pi, qi in zip(p[t], q[t])) for t in range(40)]
    assert kld == pytest.approx(np.mean(per_token), rel=1e-9)
    assert p99 == pytest.approx(np.percentile(per_token, 99), rel=1e-9)
    assert top1 == np.mean(p.argmax(1) == q.argmax(1))
    assert top_p == pytest.approx(p.max(1).mean(), rel=1e-9)


def test_thresholds_come_from_llama_cpp_measurements() -> None:
    # tools/perplexity/README.md of the pinned llama.cpp: LLaMA 3 8B, no imatrix
    assert threshold("Q4_K_M").max_kld == pytest.approx(4 * 0.031273)
    assert threshold("Q8_0").min_top1 == pytest.approx(0.97674 - 0.10)
    assert threshold("Q2_K").min_top1 == pytest.approx(0.71138 - 0.10)
    order = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    limits = [threshold(t) for t in order]
    assert all(a.max_kld < b.max_kld and a.min_top1 >= b.min_top1 for a, b in zip(limits, limits[1:]))
    assert threshold("F32").max_kld < threshold("F16").max_kld == threshold("BF16").max_kld
    assert set(LLAMA_CPP_TOP1) <= set(LLAMA_CPP_KLD) and set(qllama.QUANT_TYPES) <= set(LLAMA_CPP_KLD)


def test_our_files_are_as_close_as_llama_cpps_own(pair: dict[str, Path], tmp_path: Path,
                                                  llama_cpp_converter: Path) -> None:
    """The same model through llama.cpp's converter + quantizer: its files pass our limits, and ours are
    as close to the reference as its own."""
    ours = tmp_path / "ours"
    measured: dict = {}
    v = Verifier(pair["base"], eval_sections())

    def hook(path: Path, kind: str) -> None:
        measured[kind.upper()] = v.quantized(path, kind) if measured else v.base(path, kind)

    export_gguf(pair["base"], ours, "m", "f16", list(QUANTS), verify=hook)
    ref_f16 = tmp_path / "llama-cpp-F16.gguf"
    subprocess.run([sys.executable, "-c", LLAMA_CPP_DRIVER, str(llama_cpp_converter), str(pair["base"]),
                    "--outtype", "f16", "--outfile", str(ref_f16)], check=True, capture_output=True, timeout=600)
    theirs = _measure_all(pair["base"], ref_f16, {q: quantize_gguf(ref_f16, tmp_path / f"lc-{q}.gguf", q)
                                                  for q in QUANTS})
    for kind in ("F16", *QUANTS):
        assert theirs[kind].passed, theirs[kind].summary()
        assert measured[kind].passed, measured[kind].summary()
        assert measured[kind].kld_mean <= 1.25 * theirs[kind].kld_mean + 1e-5, (kind, measured[kind], theirs[kind])
    assert measured["F16"].kld_mean < 1e-5 and measured["F16"].top1 == 1.0


def _corrupt(path: Path, tensor: str) -> None:
    """Zero one tensor's bytes in place (the file still loads: a silent bad model)."""
    reader = gguf.GGUFReader(path, "r+")
    np.asarray(next(t for t in reader.tensors if t.name == tensor).data).view(np.uint8)[...] = 0
    del reader


def test_a_corrupted_file_fails_with_one_line(pair: dict[str, Path], tmp_path: Path) -> None:
    files = export_gguf(pair["base"], tmp_path, "m", "f16", ["Q8_0"])
    q8 = next(p for p in files if p.name.endswith("Q8_0.gguf"))
    _corrupt(q8, "blk.1.ffn_down.weight")
    v = Verifier(pair["base"], eval_sections())
    assert v.base(tmp_path / "m-F16.gguf", "F16").passed
    bad = v.quantized(q8, "Q8_0")
    assert not bad.passed and bad.kld_mean > 10 * threshold("Q8_0").max_kld
    assert bad.reason.startswith("m-Q8_0.gguf is too far from m-F16.gguf: mean KL divergence")
    assert "\n" not in bad.reason and "✗ FAIL" in bad.summary()
    with pytest.raises(GGUFError, match="verify the unquantized GGUF before"):
        Verifier(pair["base"], eval_sections()).quantized(q8, "Q8_0")


def _recipe(pair: dict[str, Path]) -> str:
    return (f"models:\n  - model: {pair['base']}\n  - model: {pair['chat']}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
            f"merge_method: ties\nbase_model: {pair['base']}\ndtype: float32\n")


@pytest.fixture
def corrupting_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    real = qllama.quantize_gguf

    def broken(src: Path, dst: Path, quant: str) -> Path:
        out = real(src, dst, quant)
        _corrupt(out, "blk.0.ffn_down.weight")
        return out

    monkeypatch.setattr(qllama, "quantize_gguf", broken)


def test_a_run_with_a_failing_gguf_fails_and_leaves_nothing(pair: dict[str, Path], tmp_path: Path,
                                                            corrupting_quantizer: None) -> None:
    out = tmp_path / "merged"
    with pytest.raises(GGUFError, match=r"GGUF verification failed: merged-Q8_0.gguf is too far .*--gguf-drop-failing"):
        run(parse_recipe(_recipe(pair)), RunOptions(out_dir=out, gguf=("Q8_0",), evaluate=False))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_drop_failing_keeps_the_file_out_and_says_why(pair: dict[str, Path], tmp_path: Path,
                                                      corrupting_quantizer: None) -> None:
    out = tmp_path / "merged"
    result = run(parse_recipe(_recipe(pair)), RunOptions(out_dir=out, gguf=("F16", "Q8_0"), evaluate=False,
                                                         drop_failing_gguf=True))
    assert [p.name for p in result.gguf_files] == ["merged-F16.gguf"]
    assert not (out / "merged-Q8_0.gguf").exists()
    assert any(w.startswith("merged-Q8_0.gguf was kept out: merged-Q8_0.gguf is too far") for w in result.warnings)
    card = (out / "README.md").read_text()
    assert "| merged-Q8_0.gguf | ✗ FAIL" in card and "| merged-F16.gguf | ✓ pass: vs safetensors model" in card


def _transformers_nll(folder: Path, texts: list[str]) -> tuple[float, int]:
    """Summed NLL and predicted-token count with transformers' own model and tokenizer (float64)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    nll, n = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return nll, n


def test_perplexity_equals_transformers(pair: dict[str, Path]) -> None:
    report = evaluate_merge(pair["chat"], {"base": pair["base"]}, token_budget=96)
    from merger.eval.quality import _texts, _Tokenizer

    texts = _texts(_Tokenizer(pair["chat"]), 96 // len(eval_sections()))
    for score, folder in ((report.merged, pair["chat"]), (report.parents[0], pair["base"])):
        nll, n = _transformers_nll(folder, texts)
        assert n == report.n_tokens
        assert report.perplexity(score) == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert report.verdict is None
    assert report.merged.sample is not None and report.parents[0].sample is not None  # small: sampled


def test_a_broken_merge_is_flagged_in_the_report_and_the_card(pair: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pair["chat"], broken)
    from merger.app.tiny import write_safetensors
    from merger.sources import TensorReader

    with TensorReader(broken) as reader:
        tensors = {n: reader.read(n).clone() for n in reader.headers}
    tensors["lm_head.weight"] *= 60  # confident and wrong: what a bad merge of a head looks like
    write_safetensors(broken / "model.safetensors", tensors)
    report = evaluate_merge(broken, {"base": pair["base"], "chat": pair["chat"]}, token_budget=96)
    assert report.perplexity(report.merged) > BROKEN_RATIO * report.perplexity(report.parents[0])
    assert report.verdict.startswith("this merge looks broken: its perplexity")
    table = "\n".join(report.markdown())
    assert table.startswith("> **Warning: this merge looks broken") and "| **this merge** |" in table


def test_a_good_merge_is_scored_against_its_parents_in_the_card(pair: dict[str, Path], tmp_path: Path) -> None:
    result = run(parse_recipe(_recipe(pair)), RunOptions(out_dir=tmp_path / "good", eval_tokens=96))
    q = result.quality
    assert q.verdict is None and [p.name for p in q.parents] == ["base", "chat"]
    card = (tmp_path / "good" / "README.md").read_text()
    assert "| **this merge** |" in card and "lower is better" in card and "looks broken" not in card
    best = min(q.perplexity(p) for p in q.parents)
    assert q.perplexity(q.merged) < 1.2 * best  # a TIES merge of close fine-tunes stays close to them


@pytest.mark.parametrize("text,expected", [
    ("ssssssssssss", True), ("the the the the the cat", True), ("\ufffd\ufffd\ufffd ab \ufffd\ufffd", True),
    ("The keeper lit the lamp before dark.", False), ("", False),
])
def test_degenerate_text(text: str, expected: bool) -> None:
    assert _degenerate(text) is expected


def test_cli_refuses_a_tiny_token_budget(pair: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe(pair))
    got = subprocess.run([sys.executable, "-m", "merger", "run", str(recipe), str(tmp_path / "o"), "--eval-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and got.stderr.strip().splitlines() == [
        "error: --eval-tokens must be at least 16 (the verification needs a few tokens per section)"]
    assert not (tmp_path / "o").exists()


def test_quantize_cli_prints_each_verdict(pair: dict[str, Path], tmp_path: Path) -> None:
    got = subprocess.run([sys.executable, "-m", "quantize", str(pair["base"]), "--out", str(tmp_path), "--quant", "Q8_0"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    lines = [line for line in got.stdout.splitlines() if line.startswith("verify ")]
    assert [line.split(":")[0] for line in lines] == ["verify base-F16.gguf", "verify base-Q8_0.gguf"]
    assert all("✓ pass" in line for line in lines)


def test_the_app_result_leads_with_a_broken_verdict(pair: dict[str, Path], tmp_path: Path) -> None:
    from merger.app import demo
    from merger.app.runs import DONE, Outcome, Snapshot

    broken = "this merge looks broken: its perplexity 9000 is 12.0x that of its best parent base (750)"
    table = ("| model | perplexity | sample |", "|---|---|---|", "| **this merge** | 9000 | 'ssss' |")
    outcome = Outcome((("model.safetensors", 10),), "card", (), {}, (broken, "another warning"), tmp_path, 1.0,
                      ("> **Warning: x.**", "", *table), broken)
    md = demo.render_outcome(Snapshot("j", DONE, "done", 1.0, "", 0, 0, None, (), outcome))
    assert md.startswith(f"### ⚠ Merged in 1.0 s, but {broken}")
    assert "| **this merge** | 9000 |" in md and "> **Warning" not in md
    # samples quoted as code under a header that says what they are (issue 15: garbled text shown raw)
    assert "| model | perplexity | sample (greedy, tiny models write gibberish) |" in md
    assert "| **this merge** | 9000 | <code>&#x27;ssss&#x27;</code> |" in md
    assert md.count("looks broken") == 1 and "- ⚠ another warning" in md
    good = Outcome((), "card", (), {}, (), tmp_path, 1.0, table, None)
    assert demo.render_outcome(Snapshot("j", DONE, "done", 1.0, "", 0, 0, None, (), good)).startswith("### ✓ Merged")
