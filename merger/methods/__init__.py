"""Merge methods: pure functions on float32 tensors, described for the recipe parser, by YAML name."""

from merger.methods.base import REQUIRED, Interval, MergeInputs, Method, Param
from merger.methods.registry import METHODS, get_method

__all__ = ["METHODS", "REQUIRED", "Interval", "MergeInputs", "Method", "Param", "get_method"]
