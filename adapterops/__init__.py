"""adapterops: exact arithmetic on LoRA adapters, on their factors.

    import adapterops as ao
    mix = ao.combine(["./style-a", "org/style-b@v2"], weights=[0.7, 0.3], method="svd", rank=16)
    ao.save_adapter(mix, "./mix")
    ao.merge("./base", [mix], out="./merged", push_to="me/merged")
    lora = ao.extract("./my-finetune", "./base", rank=64)     # the LoRA closest to a fine-tune
    ao.run_recipe("recipes/blend-and-merge.yaml")

The math convention (dW = scale * B @ A, shapes, layouts) is stated in ``adapterops.adapter``;
docs/architecture.md shows the layers. Names are loaded on first use (PEP 562), so importing
adapterops (and running its CLI) does not import torch until a function needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapterops._version import __version__
from adapterops.errors import (
    AdapterFormatError,
    AdapterOpsError,
    ApproximationWarning,
    HubError,
    IncompatibleAdaptersError,
    InvalidInputError,
    NotFoundError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    RankCapWarning,
    RecipeError,
    UnsupportedAdapterError,
)
from adapterops.options import Form, Method, Space

# public name -> module that defines it
_LAZY = {
    "Adapter": "adapterops.adapter",
    "LoraModule": "adapterops.adapter",
    "ModuleKind": "adapterops.adapter",
    "ModuleReport": "adapterops.adapter",
    "Solver": "adapterops.adapter",
    "Source": "adapterops.adapter",
    "RankPolicy": "adapterops.ops.lowrank",
    "load_adapter": "adapterops.io",
    "save_adapter": "adapterops.io",
    "combine": "adapterops.verbs",
    "negate": "adapterops.verbs",
    "scale": "adapterops.verbs",
    "resize": "adapterops.verbs",
    "to_dora": "adapterops.verbs",
    "to_lora": "adapterops.verbs",
    "convert": "adapterops.verbs",
    "extract": "adapterops.extraction",
    "merge": "adapterops.merging",
    "unmerge": "adapterops.merging",
    "plan_merge": "adapterops.merging",
    "MergePlan": "adapterops.merging",
    "MergeResult": "adapterops.merging",
    "verify": "adapterops.verification",
    "VerifyReport": "adapterops.verification",
    "describe": "adapterops.info",
    "push_to_hub": "adapterops.hub",
    "load_recipe": "adapterops.recipe",
    "run_recipe": "adapterops.recipe",
    "plan_recipe": "adapterops.recipe",
}

__all__ = [
    "AdapterFormatError",
    "AdapterOpsError",
    "ApproximationWarning",
    "Form",
    "HubError",
    "IncompatibleAdaptersError",
    "InvalidInputError",
    "Method",
    "NotFoundError",
    "OutputBusyError",
    "OutputExistsError",
    "OutputWriteError",
    "RankCapWarning",
    "RecipeError",
    "Space",
    "UnsupportedAdapterError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the names __getattr__ provides
    from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport, Solver, Source
    from adapterops.extraction import extract
    from adapterops.hub import push_to_hub
    from adapterops.info import describe
    from adapterops.io import load_adapter, save_adapter
    from adapterops.merging import MergePlan, MergeResult, merge, plan_merge, unmerge
    from adapterops.ops.lowrank import RankPolicy
    from adapterops.recipe import load_recipe, plan_recipe, run_recipe
    from adapterops.verbs import combine, convert, negate, resize, scale, to_dora, to_lora
    from adapterops.verification import VerifyReport, verify
