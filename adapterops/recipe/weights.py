"""Recipe weights: a number, a layer gradient, or per-module regex filters, as a function of the module name.

    0.7                                               every module
    [0.0, 1.0]                                        a gradient over the layers, linear by layer index
    {default: 0.3, filters: [{match: mlp, value: 0}]} the first filter whose regex matches wins

Example: with 4 layers, ``[0, 1]`` gives ``model.layers.2.mlp.up_proj`` the weight 2/3.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapterops.errors import RecipeError

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
MAX_PATTERN = 1000  # characters in one filter regex


@dataclass(frozen=True)
class WeightSpec:
    """A weight that depends on the module name; ``spec`` (the recipe's value) goes into records."""

    spec: Any
    layers: int

    def __call__(self, module: str) -> float:
        spec = self.spec
        if isinstance(spec, dict):
            for item in spec.get("filters", []):
                if re.search(str(item["match"]), module):
                    return self._value(item["value"], module)
            return self._value(spec.get("default", 1.0), module)
        return self._value(spec, module)

    def _value(self, item: Any, module: str) -> float:
        if isinstance(item, int | float):
            return float(item)
        match = LAYER.search(f".{module}.")
        if match is None or len(item) == 1 or self.layers <= 1:
            return float(item[0])
        t = int(match.group(1)) / (self.layers - 1) * (len(item) - 1)
        low = min(int(t), len(item) - 2)
        return float(item[low] + (item[low + 1] - item[low]) * (t - low))


def weight_function(spec: Any, layers: int) -> float | WeightSpec:
    """A plain number, or a ``WeightSpec`` (filters, gradients over ``layers`` layers)."""
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return float(spec)
    return WeightSpec(spec, layers)


def count_layers(module_names: Sequence[str]) -> int:
    """The number of numbered layers the module names span (1 when none is numbered)."""
    indices = [int(m.group(1)) for name in module_names if (m := LAYER.search(f".{name}."))]
    return max(indices) + 1 if indices else 1


def check_weight_spec(spec: Any, where: str) -> None:
    """A number, a list of numbers (gradient) or {default, filters: [{match, value}]}."""
    if isinstance(spec, bool):
        raise RecipeError(f"{where}: weight {spec!r} must be a number")
    if isinstance(spec, int | float):
        return
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
            raise RecipeError(f"{where}: a gradient must be a non-empty list of numbers, got {spec!r}")
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {"default", "filters"}
        if unknown:
            raise RecipeError(
                f"{where}: unknown key {sorted(unknown)[0]!r} in a weight; allowed: default, filters"
            )
        if "default" in spec:
            check_weight_spec(spec["default"], where)
        for item in spec.get("filters", []):
            if not isinstance(item, dict) or set(item) != {"match", "value"}:
                raise RecipeError(f"{where}: each filter needs exactly match and value, got {item!r}")
            if len(str(item["match"])) > MAX_PATTERN:
                raise RecipeError(f"{where}: filter regex longer than {MAX_PATTERN} characters")
            try:
                re.compile(str(item["match"]))
            except re.error as exc:
                raise RecipeError(
                    f"{where}: filter {item['match']!r} is not a regular expression ({exc})"
                ) from None
            check_weight_spec(item["value"], where)
        return
    raise RecipeError(f"{where}: weight {spec!r} must be a number, a list or a mapping")
