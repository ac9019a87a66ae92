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

LoRA on an ``nn.Parameter`` (PEFT ``target_parameters``, its ``ParamWrapper``; mixture-of-experts
weights such as ``mlp.experts.gate_up_proj`` of shape (E, out, in)) is one ``ModuleKind.PARAMETER``
module *per expert*, named ``<module>.<parameter>.<e>``, with the same convention, so every
operation on factors works expert by expert unchanged. PEFT stores the E experts of one
parameter as one pair, lora_A (r*E, in) and lora_B (out, r*E), interleaved differently:

    A_e = lora_A[e*r : (e+1)*r, :]      (expert-major rows)
    B_e = lora_B[:, e::E]               (rank-major columns: column k*E + e is B_e[:, k])
    dW_e = scale * B_e @ A_e            (out, in), one r and one scale for all experts

(``split_experts`` / ``join_experts``). A 2-D parameter (E = 1, e.g. a router's ``gate.weight``)
is one module named ``<module>.<parameter>`` with the plain layout. ``transposed`` says the
stored expert slice is (in, out) (transformers' ``is_transposed`` experts, e.g. gpt-oss); it is
fixed from the checkpoint when merging, like Conv1D.

DoRA modules carry ``magnitude`` (PEFT's ``lora_magnitude_vector``, one entry per output row);
their effective update also depends on the base weight, so factor arithmetic alone cannot be
applied to them (see ``ops.dora``).

Nothing here reads or writes files: ``adapterops.io`` does (``load_adapter``, ``save_adapter``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property
from typing import Any

import torch

from adapterops.errors import AdapterFormatError


class ModuleKind(str, Enum):
    """Which PEFT layer type a module's factors belong to; decides key names and layouts."""

    LINEAR = "linear"
    EMBEDDING = "embedding"
    CONV = "conv"
    PARAMETER = "parameter"  # PEFT target_parameters: one expert of a 3-D parameter, or a 2-D one


@dataclass(frozen=True)
class ParameterTarget:
    """Where a ``ModuleKind.PARAMETER`` module's update goes: ``parameter`` of ``module`` (names as
    in the base model) and, for a 3-D (E, ., .) parameter, which ``expert`` of ``num_experts``."""

    module: str
    parameter: str
    expert: int | None = None
    num_experts: int = 1

    @property
    def tensor(self) -> str:
        """The parameter's name in the model, e.g. ``model.layers.0.mlp.experts.gate_up_proj``."""
        return f"{self.module}.{self.parameter}"

    @property
    def module_name(self) -> str:
        """The ``LoraModule`` name: ``tensor``, plus ``.<expert>`` for one expert of a 3-D parameter."""
        return self.tensor if self.expert is None else f"{self.tensor}.{self.expert}"


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
    target: ParameterTarget | None = None  # set for ModuleKind.PARAMETER

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
    ``rel_error`` is ||dW_out - dW_exact||_F / ||dW_exact||_F (0 for exact results). ``note`` says
    why the rank is not what was asked for (``capped at full rank 6: asked rank 16, ...``).
    ``tails`` is internal to budgets: ||dW_exact - dW_i||_F^2 for i = 0..rank_out, while the module
    waits for the rank a budget over all modules gives it (``ops.budget``); empty otherwise.
    """

    name: str
    rank_in: int
    rank_out: int
    energy_kept: float = 1.0
    rel_error: float = 0.0
    solver: Solver = Solver.FACTORS
    seconds: float = 0.0  # time spent on this module, where an operation measures it
    note: str | None = None
    tails: tuple[float, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if k != "tails"}
        return {**fields, "solver": Solver(self.solver).value}


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

    @cached_property
    def content_sha256(self) -> str:
        """sha256 of the tensors (names, dtypes, shapes and bytes, in name order) and scales: what
        identifies an adapter that was never a file. Computed once per object (it is immutable)."""
        digest = hashlib.sha256()
        items: list[tuple[str, torch.Tensor | None]] = []
        for name, m in sorted(self.modules.items()):
            digest.update(f"{name}:{m.scale!r}:{m.kind.value}:{m.transposed}".encode())
            items += [
                (f"{name}.A", m.A),
                (f"{name}.B", m.B),
                (f"{name}.bias", m.bias),
                (f"{name}.m", m.magnitude),
            ]
        items += sorted(self.full_tensors.items())
        for name, tensor in items:
            if tensor is None:
                continue
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        return self.source.describe() if self.source else "<in memory>"


def parameter_groups(modules: Iterable[LoraModule]) -> dict[str, list[LoraModule]]:
    """The ``ModuleKind.PARAMETER`` modules by the parameter they update (``target.tensor``), experts
    in order. Each 3-D parameter must have all of its experts: PEFT stores them as one pair."""
    groups: dict[str, dict[int, LoraModule]] = {}
    counts: dict[str, set[int]] = {}
    for module in modules:
        if module.target is None:
            continue
        t = module.target
        groups.setdefault(t.tensor, {})[0 if t.expert is None else t.expert] = module
        counts.setdefault(t.tensor, set()).add(t.num_experts if t.expert is not None else 1)
    out = {}
    for tensor, experts in groups.items():
        (count,) = counts[tensor] if len(counts[tensor]) == 1 else (0,)
        if sorted(experts) != list(range(count)):
            raise AdapterFormatError(
                f"parameter {tensor}: LoRA on experts {sorted(experts)} of {max(counts[tensor])}; PEFT stores all "
                "experts of a parameter together, so every expert needs a module (a zero one will do)"
            )
        out[tensor] = [experts[e] for e in range(count)]
    return out


def split_experts(
    A: torch.Tensor, B: torch.Tensor, num_experts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's lora_A (r*E, in) and lora_B (out, r*E) of an E-expert parameter as E pairs (A_e, B_e).

    ``A_e = A[e*r:(e+1)*r]`` and ``B_e = B[:, e::E]``: exactly PEFT's ``ParamWrapper.get_delta_weight``
    (``lora_A.reshape(E, r, in)``, ``lora_B.reshape(out, r, E)``). Copies, never views.
    """
    r = A.shape[0] // num_experts
    return [
        (A[e * r : (e + 1) * r].clone(), B[:, e::num_experts].contiguous().clone())
        for e in range(num_experts)
    ]


def join_experts(experts: list[LoraModule]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The inverse of ``split_experts`` for the modules of experts 0..E-1: (lora_A, lora_B, scale).

    PEFT gives all experts of a parameter one r and one scale. Experts of lower rank are padded
    with zero rows of A and zero columns of B (exact); an expert whose scale differs from the most
    common one has the ratio folded into its B, rounded once to B's dtype (that only happens when
    per-module weights gave experts of one parameter different weights).
    """
    rank = max(m.rank for m in experts)
    scales = [m.scale for m in experts]
    scale = max(set(scales), key=scales.count)
    As, Bs = [], []
    for m in experts:
        A, B = m.A, m.B
        if m.scale != scale:
            B = (B.double() * (m.scale / scale)).to(B.dtype)
        if m.rank < rank:
            A = torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1)
        As.append(A)
        Bs.append(B)
    lora_A = torch.cat(As)
    lora_B = torch.stack(Bs, dim=2).reshape(Bs[0].shape[0], rank * len(experts))
    return lora_A, lora_B, scale
