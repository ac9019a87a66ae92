"""The data model: one LoRA module's factors, and an adapter as a set of them.

The math convention, stated once (docs/math.md says the same at length):

    dW = scale * B @ A        A: (r, in)   B: (out, r)   dW: (out, in)

``dW`` is in *math layout*, rows = outputs. Where the base checkpoint stores its weight the other
way round the module says so with ``transposed=True``:

- GPT-2 style ``Conv1D`` (PEFT ``fan_in_fan_out=True``): weight stored (in, out) = dW.T
- embeddings (PEFT ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r)):
  weight stored (num_embeddings, dim) = dW.T
- convolutions: A is stored (r, in_channels, *kernel) and B (out_channels, r, 1, ...); here A is
  flattened to (r, in_channels * prod(kernel)) and ``kernel_size`` keeps the shape to restore.

``scale`` already includes everything PEFT multiplies by: lora_alpha / r (or / sqrt(r) with
rsLoRA), with rank_pattern and alpha_pattern resolved for this module.

DoRA modules carry ``magnitude`` (PEFT's ``lora_magnitude_vector``, one entry per output row);
their effective update also depends on the base weight, so factor arithmetic alone cannot be
applied to them (see ``ops.dora``).

Nothing here reads or writes files: ``adapterops.io`` does (``load_adapter``, ``save_adapter``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch


class ModuleKind(str, Enum):
    """Which PEFT layer type a module's factors belong to; decides key names and layouts."""

    LINEAR = "linear"
    EMBEDDING = "embedding"
    CONV = "conv"


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA update ``dW = scale * B @ A`` (math layout, see the module docstring).

    Tensors keep the dtype they were stored in; operations compute in float32 or better.
    ``bias`` is PEFT's ``lora_B.bias`` (lora_bias=True): it adds ``scale * bias`` to the base bias.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: ModuleKind = ModuleKind.LINEAR
    transposed: bool = False
    kernel_size: tuple[int, ...] = ()
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module updates, as the checkpoint stores it."""
        if self.kind is ModuleKind.CONV:
            in_channels = self.in_features // math.prod(self.kernel_size)
            return (self.out_features, in_channels, *self.kernel_size)
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense dW in the checkpoint's storage layout, computed in ``dtype``.

        For tests, ``info`` and small modules only: the operations never form it.
        """
        dw = self.scale * (self.B.to(dtype) @ self.A.to(dtype))
        if self.transposed:
            dw = dw.T
        return dw.reshape(self.weight_shape)

    def with_factors(
        self, A: torch.Tensor, B: torch.Tensor, scale: float, bias: torch.Tensor | None = None
    ) -> LoraModule:
        """The same module (name, kind, layout) with new factors."""
        return replace(self, A=A, B=B, scale=scale, bias=bias, magnitude=None)


class Solver(str, Enum):
    """How an operation factored a module: QR of its factors, a full SVD, or a randomized one."""

    FACTORS = "factors"
    DENSE = "dense"
    RANDOMIZED = "randomized"


@dataclass(frozen=True)
class ModuleReport:
    """What an operation did to one module: ranks in and out and the share of dW it kept.

    ``energy_kept`` is ||dW_out||_F^2 / ||dW_exact||_F^2 restricted to the kept singular values,
    ``rel_error`` is ||dW_out - dW_exact||_F / ||dW_exact||_F (0 for exact results).
    """

    name: str
    rank_in: int
    rank_out: int
    energy_kept: float = 1.0
    rel_error: float = 0.0
    solver: Solver = Solver.FACTORS
    seconds: float = 0.0  # time spent on this module, where an operation measures it

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "solver": Solver(self.solver).value}


@dataclass(frozen=True)
class Source:
    """Where an adapter came from, for provenance: a local path or a Hub repo at a revision."""

    path: str
    repo_id: str | None = None
    revision: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return self.path

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: its modules, plus tensors stored whole.

    ``modules`` maps module names (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``)
    to their factors. ``full_tensors`` holds tensors PEFT stores whole and *replaces* in the base
    model on load (``modules_to_save`` copies, saved embedding layers, trained biases), keyed by
    their name in the base model (``lm_head.weight``). ``config`` keeps the source adapter_config
    fields that describe the base model rather than the factors (base_model_name_or_path,
    task_type, modules_to_save, ...).
    """

    modules: Mapping[str, LoraModule]
    full_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    source: Source | None = None
    provenance: Mapping[str, Any] | None = None
    report: tuple[ModuleReport, ...] = ()

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the factors (the most common one, should they differ)."""
        counts: dict[torch.dtype, int] = {}
        for module in self.modules.values():
            counts[module.A.dtype] = counts.get(module.A.dtype, 0) + 1
        return max(counts, key=lambda d: counts[d]) if counts else torch.float32

    def describe(self) -> str:
        return self.source.describe() if self.source else "<in memory>"
