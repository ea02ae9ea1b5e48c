"""The merge methods by their mergekit YAML name."""

from __future__ import annotations

import difflib

from merger.errors import RecipeError
from merger.methods.base import Method
from merger.methods.linear import LINEAR, NEARSWAP, PASSTHROUGH
from merger.methods.masked import ARCEE_FUSION, RAM, RAMPLUS_TL
from merger.methods.model_stock import MODEL_STOCK
from merger.methods.spherical import KARCHER, MULTISLERP, NUSLERP, SLERP
from merger.methods.task_arithmetic import SCE, TASK_ARITHMETIC_METHODS

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        LINEAR, SLERP, NUSLERP, MULTISLERP, KARCHER, *TASK_ARITHMETIC_METHODS, SCE, MODEL_STOCK,
        NEARSWAP, PASSTHROUGH, ARCEE_FUSION, RAM, RAMPLUS_TL,
    )
}


def get_method(name: str) -> Method:
    """The method called `name`; RecipeError with the closest known name if it is misspelled."""
    method = METHODS.get(name)
    if method is not None:
        return method
    normalized = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    close = difflib.get_close_matches(normalized, METHODS, n=1, cutoff=0.6)
    if close:
        raise RecipeError(f"unknown merge_method {name!r}; did you mean {close[0]!r}? (all {len(METHODS)} methods "
                          "of mergekit 0.1.5 are supported; methods of mergekit forks are not)")
    raise RecipeError(f"unknown merge_method {name!r}; mergekit 0.1.5's methods, all supported here, are: "
                      f"{', '.join(sorted(METHODS))} (methods of mergekit forks are not)")
