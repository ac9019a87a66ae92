"""Recipes: a pipeline of adapterops steps in one validated YAML file.

schema.py   YAML -> validated steps, errors with file:line (keys come from ``adapterops.options``)
weights.py  per-module weights: numbers, layer gradients, regex filters
run.py      run_recipe (a verb table, one public call per step) and plan_recipe (the dry run)
"""

from __future__ import annotations

from adapterops.errors import RecipeError
from adapterops.recipe.run import StepResult, plan_recipe, run_recipe
from adapterops.recipe.schema import Recipe, Step, load_recipe
from adapterops.recipe.weights import WeightSpec, count_layers, weight_function

__all__ = [
    "Recipe",
    "RecipeError",
    "Step",
    "StepResult",
    "WeightSpec",
    "count_layers",
    "load_recipe",
    "plan_recipe",
    "run_recipe",
    "weight_function",
]
