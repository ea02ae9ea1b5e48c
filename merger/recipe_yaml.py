"""Recipe YAML read safely: plain data only, bounded size, nesting and alias expansion; duplicate keys noted.

A recipe comes from anyone (a pasted text, a Hub repo), so nothing here builds objects or follows tags.
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml

from .errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and alias expansion bombs, and reports duplicate keys.

    A repeated key keeps its last value, as in mergekit (which reads recipes with yaml.safe_load);
    each repetition is noted in `duplicates`, or refused when that is None.
    """

    def __init__(self, stream: str, duplicates: list[str] | None = None) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._duplicates = duplicates

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        self._depth += 1
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:  # stop composing early: a 1 MiB flow list takes ~10 s otherwise
            raise RecipeError(f"the recipe has more than {MAX_YAML_NODES} YAML values; "
                              "a merge recipe is a few lines of YAML")
        if self._depth > MAX_YAML_DEPTH:
            raise RecipeError(f"the recipe is nested more than {MAX_YAML_DEPTH} levels deep; "
                              "flatten it to the mergekit schema")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Iterable) and not isinstance(key, str):
                raise RecipeError(f"line {key_node.start_mark.line + 1}: mapping keys must be plain names")
            line = key_node.start_mark.line + 1
            if key in seen:
                if self._duplicates is None:
                    raise RecipeError(f"line {line}: key '{key}' appears twice; keep one of them")
                self._duplicates.append(f"key '{_short(key)}' appears twice (lines {seen[key]} and {line}); "
                                        f"the value on line {seen[key]} is ignored (mergekit 0.1.5 keeps the "
                                        "last one too); delete one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Node count with aliases expanded, computed without expanding them (bomb detection)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # guards against recursive aliases
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[key] = min(size, MAX_YAML_NODES + 1)
    return memo[key]


def load_yaml(text: str, duplicates: list[str] | None = None) -> Any:
    """Parse YAML safely: plain data only, bounded size, depth and alias expansion.

    Duplicate keys are refused, or with `duplicates` given, noted there and resolved as mergekit does.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KiB; "
                          "a merge recipe is a few lines of YAML")
    loader = None
    try:
        loader = _LimitedLoader(text, duplicates)  # the reader rejects control characters here, as a YAMLError
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise RecipeError("the recipe expands to too many YAML nodes (alias bomb?); "
                              "write the values out instead of nesting aliases")
        return loader.construct_document(node)
    except RecipeError:
        raise
    except yaml.constructor.ConstructorError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise RecipeError(f"{where}unsupported YAML tag or value ({_one_line(e.problem)}); "
                          "recipes are plain YAML without tags") from None
    except yaml.composer.ComposerError as e:
        if "single document" not in str(e):
            raise RecipeError(f"the recipe is not valid YAML: {_one_line(e.problem)}") from None
        raise RecipeError("the file holds several YAML documents separated by '---' (a mergekit-multi recipe); "
                          "put each merge in its own file and run them in order, naming an earlier result "
                          "by its output folder") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"the recipe is not valid YAML: {where}{_one_line(problem)}") from None
    except RecursionError:
        raise RecipeError("the recipe is nested too deeply; flatten it to the mergekit schema") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int() limit)
        raise RecipeError(f"the recipe has a value that cannot be read ({_one_line(e)[:80]}); "
                          "write numbers with at most a few dozen digits") from None
    finally:
        if loader is not None:
            loader.dispose()


def _one_line(text: Any) -> str:
    try:
        shown = str(text)
    except ValueError:  # an int past Python's 4300-digit str() limit
        shown = "an integer too long to print"
    return " ".join(shown.split())[:200]


def _short(value: Any) -> str:
    text = _one_line(value)
    return text if len(text) <= 60 else text[:57] + "..."
