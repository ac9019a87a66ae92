"""What ``adapterops info`` reports: per-module shapes, ranks, scales and update norms, as data.

The CLI renders it (``cli/_console.py``); ``--json`` prints it as it is.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule
from adapterops.io.checkpoint import BaseWeights
from adapterops.ops.dora import effective_delta
from adapterops.ops.lowrank import compute_dtype, frobenius_norm_of_product
from adapterops.verbs import AdapterRef, BaseRef, as_adapter, as_base


def describe(adapter: AdapterRef, base: BaseRef | None = None) -> dict[str, Any]:
    """A JSON-ready description of an adapter (a path, Hub id or ``Adapter``).

    ||dW||_F comes from the factors (QR of B and A^T), never dense. LoRA on expert weights
    (target_parameters) is one module per expert, with ``parameter``, ``expert`` and ``experts``
    saying which. With ``base``, each module also
    gets its base weight's norm, and DoRA modules the ratio of their magnitude to the base row norms
    and the norm of their effective update.

    Example: ``describe("./style-a")["modules"][0]["r"]`` is the first module's rank.
    """
    adapter = as_adapter(adapter, base)
    weights = None if base is None else as_base(base)
    modules = []
    for name, m in adapter.modules.items():
        dtype = compute_dtype(m.A, m.B)
        A, B = m.A.to(dtype), m.B.to(dtype)
        modules.append(
            {
                "name": name,
                "kind": m.kind.value,
                "weight_shape": list(m.weight_shape),
                "r": m.rank,
                "scale": m.scale,
                "dtype": str(m.A.dtype).removeprefix("torch."),
                "norm_A": float(torch.linalg.matrix_norm(A)),
                "norm_B": float(torch.linalg.matrix_norm(B)),
                "norm_delta": abs(m.scale) * frobenius_norm_of_product(B, A),
                "dora": m.is_dora,
                "bias": m.bias is not None,
                **_parameter_facts(m),
                **(_against_base(weights, m, adapter) if weights is not None else {}),
            }
        )
    params = sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())
    return {
        "source": adapter.source.as_dict() if adapter.source else None,
        "format": str(adapter.config.get("format", "peft")),
        "model": _model_family(adapter),
        "base_model": adapter.base_model,
        "modules_count": len(modules),
        "parameters": params,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "ranks": sorted({m["r"] for m in modules}),
        "dora": adapter.is_dora,
        "full_tensors": {k: list(v.shape) for k, v in adapter.full_tensors.items()},
        "provenance": adapter.provenance,
        "modules": modules,
    }


def _model_family(adapter: Adapter) -> str | None:
    """kohya-keyed files (kohya, LyCORIS): which model's names they carry (``io.kohya.model_family``)."""
    if adapter.config.get("format") not in ("kohya", "lycoris"):
        return None
    from adapterops.io.kohya import model_family

    return model_family(adapter)


def _parameter_facts(module: LoraModule) -> dict[str, Any]:
    """For LoRA on a parameter (target_parameters): the parameter, and which expert of how many."""
    if module.target is None:
        return {}
    facts: dict[str, Any] = {"parameter": module.target.tensor}
    if module.target.expert is not None:
        facts.update(expert=module.target.expert, experts=module.target.num_experts)
    return facts


def _against_base(weights: BaseWeights, module: LoraModule, adapter: Adapter) -> dict[str, Any]:
    module = weights.resolve(module)
    W = weights.weight(module, adapter.describe())
    row = torch.linalg.vector_norm(W, dim=1)
    facts: dict[str, Any] = {"norm_base": float(torch.linalg.matrix_norm(W))}
    if module.magnitude is not None:
        ratio = module.magnitude.double() / row
        facts.update(magnitude_over_base_min=float(ratio.min()), magnitude_over_base_max=float(ratio.max()))
    facts["norm_delta_effective"] = float(torch.linalg.matrix_norm(effective_delta(W, module)))
    return facts
