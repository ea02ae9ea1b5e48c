"""Recipe fuzzing: whatever YAML a user pastes, `check` accepts it or refuses it with one MergerError line.

The claim under test is the CLI's contract for `python -m merger check`: parse_recipe + check_recipe
(+ the metadata-only merge plan when the check passes) either succeed or raise a MergerError whose
message is one non-empty line; never another exception, a traceback, or an unbounded wait (each case
runs under a hypothesis deadline). Models are tiny local folders; Hub-looking names are answered by an
inspector that maps a few IDs to those folders and refuses the rest, so nothing touches the network.

Runs are derandomized (same cases, same count on every CI run); FUZZ_EXPLORE=1 draws new cases.
The number of cases tried is written to tests/artifacts/fuzz_count.txt for bench/RESULTS.md.
"""

from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger import architecture as arch
from merger.check import Inspection, check_recipe
from merger.engine import plan_merge
from merger.errors import MergerError, ModelError
from merger.methods import METHODS
from merger.pipeline import load_vocab
from merger.recipe import MAX_RECIPE_BYTES, ModelRef, Recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
EXPLORE = bool(os.environ.get("FUZZ_EXPLORE"))
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # e.g. 0.1 for a quick local run, 10 for a long one
COUNTS: collections.Counter[str] = collections.Counter()
SECONDS: collections.Counter[str] = collections.Counter()  # time inside the system under test
# Examples per strategy; the sum is the per-run case count reported in bench/RESULTS.md.
BUDGET = {"text": 6000, "yaml_tree": 1200, "structured_local": 1300, "structured_space": 600,
          "hostile": 300, "mutated": 1200}


def fuzz_settings(name: str, deadline_s: float = 2.0) -> settings:
    return settings(max_examples=max(1, int(BUDGET[name] * SCALE)), deadline=timedelta(seconds=deadline_s), derandomize=not EXPLORE,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def record_count() -> Iterator[None]:
    """Write the number of cases tried, per strategy and in total, when the module finishes."""
    started = time.monotonic()
    yield
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lines = [f"{name} {n} ({SECONDS[name]:.1f} s in check)" for name, n in sorted(COUNTS.items())]
    lines.append(f"total {sum(COUNTS.values())} cases in {time.monotonic() - started:.1f} s "
                 f"({'explore' if EXPLORE else 'derandomized'})")
    (ARTIFACTS / "fuzz_count.txt").write_text("\n".join(lines) + "\n")
    print("\nfuzz cases: " + ", ".join(lines))


# ---------------------------------------------------------------- the system under test

HUB_NAMES = ("acme/base", "acme/chat", "acme/med", "acme/qwen", "acme/short")


@pytest.fixture(scope="module")
def zoo(llama_family: dict[str, Path], qwen_family: dict[str, Path], models_dir: Path) -> dict[str, Path]:
    """Hub-like names -> local tiny folders: a Llama family, a tied Qwen2 and a 2-layer Llama."""
    from merger.app.tiny import make_tiny_model

    short = make_tiny_model(models_dir / "fuzz-llama-2l", "llama", seed=5, num_layers=2)
    return {"acme/base": llama_family["base"], "acme/chat": llama_family["chat"], "acme/med": llama_family["med"],
            "acme/qwen": qwen_family["a"], "acme/short": short}


@pytest.fixture(scope="module")
def inspector(zoo: dict[str, Path]) -> Callable[[ModelRef], Inspection]:
    """Offline inspector: local folders and the zoo's names, memoized; any other Hub ID is 'not found'."""
    cache: dict[str, arch.ModelInfo] = {}

    def inspect(ref: ModelRef) -> Inspection:
        folder = Path(ref.repo) if ref.local else zoo.get(ref.repo)
        if folder is None:
            raise ModelError(f"{ref} was not found on the Hub (offline fuzzing inspector)")
        key = f"{folder}|{ref}"
        if key not in cache:
            cache[key] = arch.inspect_local(folder, ref=ref, check_size=False)
        return Inspection(cache[key], "local" if ref.local else "public", None)
    return inspect


def assert_one_line(e: BaseException) -> None:
    text = str(e)
    assert isinstance(e, MergerError), f"{type(e).__name__} escaped: {text!r}"
    assert text.strip() and "\n" not in text and "\r" not in text, repr(text)
    assert "Traceback" not in text


def check_like_cli(text: str, inspect: Callable[[ModelRef], Inspection], zoo: dict[str, Path], *,
                   allow_local: bool = True, gguf: tuple[str, ...] = ()) -> str:
    """The `check` path; returns 'refused', 'not ok' or 'ok'. Anything but a MergerError fails the test."""
    try:
        recipe = parse_recipe(text, allow_local=allow_local)
    except Exception as e:  # noqa: BLE001 - the property is exactly "only MergerError"
        assert_one_line(e)
        return "refused"
    assert isinstance(recipe, Recipe) and recipe.text == text
    if not allow_local:
        assert not any(ref.local for ref in recipe.referenced_models())
    for ref in recipe.referenced_models():  # a Hub ID goes into URLs and one-line messages
        assert ref.local or not re.search(r"[\x00-\x20]", ref.repo + (ref.revision or "")), ref
    try:
        report = check_recipe(recipe, inspect=inspect, gguf_types=gguf)
    except Exception as e:  # noqa: BLE001
        assert_one_line(e)
        return "refused"
    for p in report.problems:
        assert p.message and "\n" not in p.message and "\n" not in p.fix, p
    report.to_text()
    report.to_json()
    if not report.ok:
        return "not ok"
    # A passing check must mean the merge can be planned: the plan is metadata-only, like the check.
    folders = {ref: (Path(ref.repo) if ref.local else zoo[ref.repo]) for ref in report.models}
    vocabs = ({ref: v for ref, f in folders.items() if (v := load_vocab(f)) is not None}
              if recipe.tokenizer_source is not None else None)
    try:
        plan_merge(recipe, report.models, vocabs=vocabs)
    except Exception as e:  # noqa: BLE001
        assert_one_line(e)
        return "plan refused"
    return "ok"


# ---------------------------------------------------------------- strategies

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1e-3", "nan", ".inf", "-.inf", "true", "0x10", "1_000", "~", "null", "0.5", "1e999",
                     "9" * 60, "", " ", "*", "q_proj", "base"]))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)

ALL_PARAMS = sorted({p.name for m in METHODS.values() for p in m.params} | {"weigth", "densty", "filter", ""})
METHOD_NAMES = sorted(METHODS) + ["dare-ties", "Ties", "SLERP ", "tie", "lineer", "unknown", ""]


def model_names(zoo_paths: list[str], allow_junk: bool = True) -> st.SearchStrategy[Any]:
    good = st.sampled_from(list(HUB_NAMES) + zoo_paths + ["acme/base@main", "acme/missing", "org/name@v1.0"])
    junk = st.one_of(st.text(max_size=20), st.sampled_from(
        ["../x", "/etc", "~/.ssh", "file:///etc/passwd", "a/b/c", "a//b", "a/b@", "a/b@..", "a/b+c/d", ".", "..",
         "-x/y", "x" * 200 + "/y", "a/b.git", "C:\\x", "acme/base@" + "r" * 300, "\u202eacme/base",
         "acme/base\n@main", "acme/base@main\n", "acme/base@ma\nin", "acme\n/base"]),
        st.integers(), st.lists(st.text(max_size=3), max_size=2), st.none())
    return st.one_of(good, good, good, junk) if allow_junk else good


def param_values() -> st.SearchStrategy[Any]:
    number = st.one_of(st.floats(min_value=-2, max_value=2, allow_nan=False), st.integers(-3, 3),
                       st.sampled_from([0, 1, 0.5, 1e-12, 1e308, -0.0, math.nan, math.inf]))
    gradient = st.lists(number, min_size=0, max_size=5)
    condition = st.fixed_dictionaries({"value": st.one_of(number, gradient, SCALARS)},
                                      optional={"filter": st.one_of(st.sampled_from(
                                          ["self_attn", "mlp", "q_proj", "*", "embed"]), SCALARS),
                                          "extra": SCALARS})
    return st.one_of(number, number, gradient, st.lists(condition, max_size=3), condition, st.booleans(),
                     st.sampled_from(["true", "false", "0.5", "x"]), JSONISH)


def params_dict() -> st.SearchStrategy[Any]:
    return st.one_of(st.dictionaries(st.sampled_from(ALL_PARAMS), param_values(), max_size=3),
                     st.none(), JSONISH)


@st.composite
def structured_recipe(draw: st.DrawFn, zoo_paths: list[str], allow_junk: bool = True) -> dict[str, Any]:
    """Recipe-shaped data: mostly valid mergekit structure with hostile values mixed in."""
    names = model_names(zoo_paths, allow_junk)
    method = draw(st.sampled_from(METHOD_NAMES) | (SCALARS if allow_junk else st.nothing()))
    data: dict[Any, Any] = {"merge_method": method}
    if draw(st.booleans()):
        entries = st.one_of(st.fixed_dictionaries({"model": names}, optional={"parameters": params_dict()}),
                            names)
        data["models"] = draw(st.lists(entries, min_size=0, max_size=4) | (JSONISH if allow_junk else st.nothing()))
    else:
        bound = st.integers(-2, 6) | st.sampled_from([10**12, 2**63, -(2**63)])
        layer_range = st.one_of(st.tuples(bound, bound).map(list), st.lists(bound, max_size=3), SCALARS)
        source = st.fixed_dictionaries({"model": names, "layer_range": layer_range},
                                       optional={"parameters": params_dict()})
        slice_ = st.fixed_dictionaries({"sources": st.lists(source, min_size=0, max_size=3)},
                                       optional={"base_model": names, "parameters": params_dict()})
        data["slices"] = draw(st.lists(slice_, max_size=3))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "base_model": names, "parameters": params_dict(),
        "dtype": st.sampled_from(["float16", "bf16", "float32", "fp8", "int4"]) | SCALARS,
        "out_dtype": st.sampled_from(["bfloat16", "half"]) | SCALARS,
        "tokenizer_source": st.sampled_from(["base", "union"]) | names,
        "tokenizer": st.fixed_dictionaries({"source": st.sampled_from(["base", "acme/chat"]) | names}) | JSONISH,
        "chat_template": st.sampled_from(["chatml", "llama3", "auto", "{{ messages }}"]) | SCALARS,
        "name": SCALARS, "unknown_key": SCALARS, "Models": JSONISH,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        data[key] = draw(optional[key])
    if draw(st.integers(0, 9)) == 0:
        data.pop("merge_method")
    return data


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10**6)


HOSTILE_FRAGMENTS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "merge_method: !!python/name:os.system\nmodels: [acme/base]",
    "merge_method: linear\nmodels: [!!python/tuple [acme/base]]",
    "!<tag:yaml.org,2002:python/object:builtins.dict> {}",
    "merge_method: !custom linear\nmodels: [acme/base]",
    "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f]",
    "&x [*x, *x]", "&x {a: *x}", "<<: {merge_method: linear}\nmodels: [acme/base]",
    "merge_method: linear\nmodels: [acme/base]\nparameters: {weight: " + "9" * 5000 + "}",
    "merge_method: linear\nmodels: [acme/base]\nparameters: {weight: 0x" + "f" * 5000 + "}",
    "merge_method: linear\n\x00models: [acme/base]", "merge_method: linear\x85\u2028models: [acme/base]",
    "\ufeffmerge_method: linear\nmodels: [acme/base]", "merge_method: linear\nmodels: [acme/base]\n---\nx: 1",
    "%YAML 1.1\n---\nmerge_method: linear\nmodels: [acme/base]", "%TAG ! tag:evil.com,2000:\n--- !x {}",
    "? [a, b]\n: 1", "? {a: 1}\n: 1", "merge_method: linear\nmerge_method: ties\nmodels: [acme/base]",
    "merge_method: linear\nmodels:\n\t- acme/base", "'", '"\\x', "{", "[", "- - - -", ": :", "*undefined",
    "merge_method: linear\nmodels: [acme/base]\nname: 2001-12-14t21:59:43.10-05:00",
    "merge_method: !!binary bGluZWFy\nmodels: [acme/base]", "!!set {acme/base}", "!!omap [a: 1]",
]


@st.composite
def hostile_text(draw: st.DrawFn) -> str:
    """Known YAML attacks, deep nesting, control characters and unicode, alone or spliced into a recipe."""
    marker = draw(st.sampled_from(["/tmp/merger-fuzz-pwned"]))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(HOSTILE_FRAGMENTS)).replace("{marker}", marker)
    if kind == 1:
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        if opener == "- ":
            return "".join("  " * i + "- \n" for i in range(min(depth, 300))) + "  " * min(depth, 300) + "x"
        return opener * depth + "1" + closer * draw(st.integers(0, depth))
    if kind == 2:
        body = draw(st.text(st.characters(codec="utf-8"), max_size=40))
        return f"merge_method: linear\nmodels:\n  - model: {body}\n    parameters: {{weight: {body}}}\n"
    if kind == 3:
        n = draw(st.integers(1, 60))
        aliases = "".join(f"k{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 4) if i else 'x'}]\n" for i in range(n))
        return "merge_method: linear\nmodels: [acme/base]\nname:\n" + "".join("  " + ln + "\n"
                                                                           for ln in aliases.splitlines())
    if kind == 4:
        return draw(st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=80))
    number = draw(st.sampled_from(["1e309", "-1e309", ".nan", ".NaN", ".inf", "-.Inf", "0o777", "1_0", "0b1",
                                   "1:20", "-0", "+1", "1e-400", str(2**64), "1" + "0" * 400]))
    return (f"merge_method: ties\nbase_model: acme/base\nmodels:\n  - model: acme/chat\n    parameters:\n"
            f"      weight: {number}\n      density: {number}\nparameters: {{lambda: {number}, normalize: {number}}}\n")


def mutations(text: str) -> st.SearchStrategy[str]:
    """Near-valid text: a valid recipe with characters deleted, inserted or swapped."""
    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        out = text
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out)))
            op = draw(st.integers(0, 3))
            if op == 0:
                out = out[:i] + out[i + 1:]
            elif op == 1:
                out = out[:i] + draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@`, \n\t0.") + ["  ", "\n- "])) + out[i:]
            elif op == 2:
                j = draw(st.integers(0, len(out)))
                out = out[:min(i, j)] + out[max(i, j):]
            else:
                out = out[:i] + draw(st.text(max_size=3)) + out[i:]
        return out
    return mutate()


VALID = ["""models:
  - model: acme/base
  - model: acme/chat
    parameters: {density: [1, 0.7, 0.1], weight: 0.5}
  - model: acme/med
    parameters:
      density: 0.5
      weight: [{filter: mlp, value: 0.3}, {value: 0.6}]
merge_method: dare_ties
base_model: acme/base
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
tokenizer_source: base
chat_template: chatml
""", """slices:
  - sources:
      - model: acme/base
        layer_range: [0, 4]
      - model: acme/chat
        layer_range: [0, 4]
merge_method: slerp
base_model: acme/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
dtype: float16
""", """slices:
  - sources:
      - model: acme/base
        layer_range: [0, 3]
  - sources:
      - model: acme/short
        layer_range: [1, 2]
merge_method: passthrough
"""]


# ---------------------------------------------------------------- the properties

def _run(name: str, text: str, inspector: Any, zoo: dict[str, Path], **kw: Any) -> None:
    COUNTS[name] += 1
    started = time.monotonic()
    check_like_cli(text, inspector, zoo, **kw)
    SECONDS[name] += time.monotonic() - started


@fuzz_settings("text")
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_arbitrary_text(text: str, inspector, zoo) -> None:
    _run("text", text, inspector, zoo)


@fuzz_settings("yaml_tree")
@given(data=JSONISH | st.dictionaries(st.sampled_from(["merge_method", "models", "slices", "base_model",
                                                       "parameters", "dtype", "tokenizer_source"]), JSONISH))
def test_arbitrary_yaml_trees(data: Any, inspector, zoo) -> None:
    _run("yaml_tree", dump(data), inspector, zoo)


@fuzz_settings("structured_local")
@given(data=st.data(), gguf=st.sampled_from([(), ("Q4_K_M",), ("F16", "Q8_0")]))
def test_structured_recipes_with_local_models(data: st.DataObject, gguf: tuple[str, ...], inspector, zoo) -> None:
    paths = [str(p) for p in zoo.values()] + [str(p) + "/../" + p.name for p in zoo.values()]
    recipe = data.draw(structured_recipe(paths))
    _run("structured_local", dump(recipe), inspector, zoo, gguf=gguf)


@fuzz_settings("structured_space")
@given(data=st.data())
def test_structured_recipes_in_space_mode(data: st.DataObject, inspector, zoo) -> None:
    paths = [str(p) for p in zoo.values()] + ["./" + p.name for p in zoo.values()]
    recipe = data.draw(structured_recipe(paths))
    _run("structured_space", dump(recipe), inspector, zoo, allow_local=False)


@fuzz_settings("hostile")
@given(text=hostile_text())
def test_hostile_yaml(text: str, inspector, zoo) -> None:
    _run("hostile", text, inspector, zoo)
    assert not Path("/tmp/merger-fuzz-pwned").exists(), "a YAML tag executed code"


@fuzz_settings("mutated")
@given(text=st.sampled_from(VALID).flatmap(mutations))
def test_near_valid_recipes(text: str, inspector, zoo) -> None:
    _run("mutated", text, inspector, zoo)


def test_valid_seeds_pass_the_check(inspector, zoo) -> None:
    """The mutation seeds themselves are accepted: the fuzzer starts from recipes that work."""
    assert [check_like_cli(text, inspector, zoo) for text in VALID] == ["ok", "ok", "ok"]


BIG = {
    "1 MiB comment": "# " + "x" * (MAX_RECIPE_BYTES - 130) + "\nmerge_method: linear\nmodels: [acme/base]\n"
                     "parameters: {weight: 1}\n",
    "1 MiB string": "merge_method: linear\nmodels: [acme/base]\nparameters: {weight: 1}\nname: '"
                    + "é" * (MAX_RECIPE_BYTES // 2 - 60) + "'\n",
    "1 MiB + 1 byte": "merge_method: linear\nmodels: [acme/base]\nname: " + "x" * MAX_RECIPE_BYTES,
    "1 MiB flow list": "[" + "1," * (MAX_RECIPE_BYTES // 2 - 2) + "1]",
    "1 MiB of models": "merge_method: linear\nmodels:\n" + "".join(f"  - acme/m{i}\n" for i in range(60_000)),
}


@pytest.mark.parametrize("name", list(BIG))
def test_one_megabyte_documents_are_bounded(name: str, inspector, zoo) -> None:
    text = BIG[name]
    started = time.monotonic()
    COUNTS["big_documents"] += 1
    outcome = check_like_cli(text, inspector, zoo)
    elapsed = time.monotonic() - started
    assert elapsed < 15.0, f"{name} took {elapsed:.1f} s"
    expected = {"1 MiB comment": "ok", "1 MiB string": "ok"}.get(name, "refused")
    assert outcome == expected


HOSTILE_CLI = {
    "python tag": "!!python/object/apply:os.system ['touch {marker}']\n",
    "alias bomb": HOSTILE_FRAGMENTS[6],
    "NUL byte": "merge_method: linear\n\x00models: [acme/base]\n",
    "huge integer": "merge_method: linear\nmodels: [acme/base]\nparameters: {weight: " + "9" * 5000 + "}\n",
    "deep nesting": "[" * 5000 + "]" * 5000,
    "NaN weight": "merge_method: linear\nmodels:\n  - model: acme/base\n    parameters: {weight: .nan}\n",
}


def test_cli_prints_one_line_and_exits_2_on_hostile_input(tmp_path: Path) -> None:
    """One subprocess reads every hostile recipe (keeps the torch import cost to one start-up)."""
    marker = tmp_path / "pwned"
    files = []
    for i, (name, text) in enumerate(HOSTILE_CLI.items()):
        path = tmp_path / f"r{i}.yml"
        path.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
        files.append(str(path))
    script = ("import contextlib, io, sys\nfrom merger.__main__ import main\n"
              "for f in sys.argv[1:]:\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        code = main(['check', f])\n"
              "    print(repr((code, err.getvalue())))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SPACE_ID", None)
    result = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    outcomes = [eval(line) for line in result.stdout.splitlines()]  # noqa: S307 - our own repr() output
    assert len(outcomes) == len(HOSTILE_CLI)
    for name, (code, err) in zip(HOSTILE_CLI, outcomes):
        COUNTS["cli"] += 1
        assert code == 2, (name, code, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (name, err)
    assert not marker.exists()
    # and the real entry point, as a user runs it: one line on stderr, nothing on stdout, exit 2
    real = subprocess.run([sys.executable, "-m", "merger", "check", files[0]], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert real.returncode == 2 and real.stdout == "" and real.stderr.count("\n") == 1, real.stderr
    assert real.stderr.startswith("error: line 1: unsupported YAML tag") and not marker.exists()
