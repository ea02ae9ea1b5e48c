"""Shared fixtures: tiny generated models (hidden 64, 4 layers, a real BPE tokenizer), made once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("SPACE_ID", None)

from merger.app.tiny import make_tiny_model  # noqa: E402
from tests.hubserver import hub  # noqa: E402,F401  (the local Hub-protocol server fixture, for every test)
from tests.no_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (skips fail)

SHARED_RECIPES = Path(__file__).resolve().parents[2] / "shared" / "recipes"
GALLERY = Path(__file__).resolve().parents[1] / "merger" / "app" / "gallery"
# The shared examples (CI has shared/ beside the repository; the gallery holds byte-identical copies,
# tested in test_app.py), plus the gallery's passthrough frankenmerge. The gallery's MoE configs (moe-*.yml)
# are not merge recipes; tests/test_moe.py runs them.
EXAMPLE_RECIPES = (sorted(SHARED_RECIPES.glob("*.yml"))
                   or sorted(p for p in GALLERY.glob("*.yml") if p.name != "index.yml" and not p.name.startswith("moe-")))
EXAMPLE_RECIPES += [p for p in [GALLERY / "passthrough-frankenmerge.yml"] if p not in EXAMPLE_RECIPES]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_family(models_dir: Path) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it (different seeds), fp16, untied head."""
    base = make_tiny_model(models_dir / "llama-base", "llama", seed=1)
    out = {"base": base}
    for i, name in enumerate(("chat", "med", "code")):
        out[name] = make_tiny_model(models_dir / f"llama-{name}", perturb_from=base, seed=10 + i,
                                    perturb_scale=0.05)
    return out


@pytest.fixture(scope="session")
def qwen_family(models_dir: Path) -> dict[str, Path]:
    """A tiny Qwen2 (tied embeddings) base and two fine-tunes."""
    base = make_tiny_model(models_dir / "qwen-base", "qwen2", seed=2)
    return {"base": base,
            "a": make_tiny_model(models_dir / "qwen-a", perturb_from=base, seed=21, perturb_scale=0.05),
            "b": make_tiny_model(models_dir / "qwen-b", perturb_from=base, seed=22, perturb_scale=0.05)}


# A two-model TIES recipe over Hub IDs: tests upload the `tiny` pair as acme/base and acme/chat.
ACME_TIES_RECIPE = """models:
  - model: acme/base
  - model: acme/chat
    parameters: {weight: 0.5, density: 0.6}
merge_method: ties
base_model: acme/base
dtype: float32
"""


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-layer Llama base and a fine-tune of it (the fault and security tests' pair)."""
    root = tmp_path_factory.mktemp("pair")
    base = make_tiny_model(root / "base", "llama", seed=3, num_layers=2)
    return {"base": base, "chat": make_tiny_model(root / "chat", perturb_from=base, seed=4, perturb_scale=0.05)}


# llama.cpp's own converter, the reference for GGUF parity (tests/test_quantize.py, test_sentencepiece.py).
LLAMA_CPP_DRIVER = '''
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
'''


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, installed by the set-up step (`make test`); missing is an error."""
    from quantize.upstream import converter_dir

    return converter_dir()
