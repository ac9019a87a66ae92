"""adapterops: exact arithmetic on LoRA adapters, on their factors.

    import adapterops as ao
    a, b = ao.load_adapter("./style-a"), ao.load_adapter("org/style-b@v2")
    mix = ao.combine([a, b], weights=[0.7, 0.3], method="svd", rank=16)
    mix.save("./mix")
    ao.merge("./base", [mix], out="./merged")
    ao.push_to_hub("./merged", "me/merged")
    ao.run_recipe("recipes/blend-and-merge.yaml")

The math convention (dW = scale * B @ A, shapes, layouts) is stated in ``adapterops.adapter``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport, Source
from adapterops.errors import (
    AdapterFormatError,
    AdapterOpsError,
    HubError,
    IncompatibleAdaptersError,
    InvalidInputError,
    NotFoundError,
    OutputExistsError,
    UnsupportedAdapterError,
)
from adapterops.hub import push_to_hub
from adapterops.io import load_adapter, save_adapter
from adapterops.merge import MergeResult, merge, unmerge
from adapterops.ops.combine import ApproximationWarning, Method, combine, negate, resize, scale
from adapterops.ops.lowrank import RankPolicy
from adapterops.recipe import RecipeError, load_recipe, run_recipe
from adapterops.verify import VerifyReport, verify

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "AdapterOpsError",
    "ApproximationWarning",
    "HubError",
    "IncompatibleAdaptersError",
    "InvalidInputError",
    "LoraModule",
    "MergeResult",
    "Method",
    "ModuleKind",
    "ModuleReport",
    "NotFoundError",
    "OutputExistsError",
    "RankPolicy",
    "RecipeError",
    "Source",
    "UnsupportedAdapterError",
    "VerifyReport",
    "__version__",
    "combine",
    "load_adapter",
    "load_recipe",
    "merge",
    "negate",
    "push_to_hub",
    "resize",
    "run_recipe",
    "save_adapter",
    "scale",
    "unmerge",
    "verify",
]
