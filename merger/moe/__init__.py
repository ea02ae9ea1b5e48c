"""mergekit-moe configs: parse and validate (config), plan the output (plan), routers (gates), the
pre-flight check (check), the assembly (assemble) and the model card (card)."""

from .config import MoERecipe, is_moe_config, parse_moe

__all__ = ["MoERecipe", "is_moe", "is_moe_config", "parse_moe"]


def is_moe(recipe: object) -> bool:
    """Whether a parsed recipe is a mergekit-moe config."""
    return isinstance(recipe, MoERecipe)
