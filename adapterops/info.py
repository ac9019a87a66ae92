"""What ``adapterops info`` reports: per-module shapes, ranks, scales and update norms."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from adapterops.adapter import Adapter
from adapterops.ops.lowrank import compute_dtype, frobenius_norm_of_product


def describe(adapter: Adapter, base: Any = None) -> dict[str, Any]:
    """A JSON-ready description. ||dW||_F comes from the factors (QR of B and A^T), never dense.

    With ``base``, each module also gets its base weight's norm, and DoRA modules the ratio of
    their magnitude to the base row norms and the norm of their effective update.
    """
    weights = None
    if base is not None:
        from adapterops.base import BaseWeights

        weights = BaseWeights(base)
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
                **(_against_base(weights, m, adapter) if weights is not None else {}),
            }
        )
    params = sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())
    return {
        "source": adapter.source.as_dict() if adapter.source else None,
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


def _against_base(weights: Any, module: Any, adapter: Adapter) -> dict[str, Any]:
    from adapterops.ops.dora import effective_delta

    module = weights.resolve(module)
    W = weights.weight(module, adapter)
    row = torch.linalg.vector_norm(W, dim=1)
    facts: dict[str, Any] = {"norm_base": float(torch.linalg.matrix_norm(W))}
    if module.magnitude is not None:
        ratio = module.magnitude.double() / row
        facts.update(magnitude_over_base_min=float(ratio.min()), magnitude_over_base_max=float(ratio.max()))
    facts["norm_delta_effective"] = float(torch.linalg.matrix_norm(effective_delta(W, module)))
    return facts


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=report["source"]["path"] if report["source"] else None, title_justify="left")
    with_base = any("norm_base" in m for m in report["modules"])
    columns = ["module", "kind", "shape", "r", "scale", "dtype", "‖A‖", "‖B‖", "‖ΔW‖"]
    if with_base:
        columns += ["‖W‖", "‖ΔW_eff‖", "m / ‖W‖row"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("module", "kind", "dtype") else "right")
    for m in report["modules"]:
        extra = []
        if with_base:
            ratio = (
                f"{m['magnitude_over_base_min']:.3f}-{m['magnitude_over_base_max']:.3f}"
                if "magnitude_over_base_min" in m
                else ""
            )
            extra = [f"{m['norm_base']:.4g}", f"{m['norm_delta_effective']:.4g}", ratio]
        table.add_row(
            m["name"] + (" (DoRA)" if m["dora"] else ""),
            m["kind"],
            "x".join(str(d) for d in m["weight_shape"]),
            str(m["r"]),
            f"{m['scale']:.4g}",
            m["dtype"],
            f"{m['norm_A']:.4g}",
            f"{m['norm_B']:.4g}",
            f"{m['norm_delta']:.4g}",
            *extra,
        )
    console.print(table)
    source = report["source"] or {}
    facts = [
        f"modules: {report['modules_count']}",
        f"ranks: {', '.join(map(str, report['ranks']))}",
        f"parameters: {report['parameters']:,}",
        f"dtype: {report['dtype']}",
        f"base model: {report['base_model'] or 'not recorded'}",
    ]
    if source.get("repo_id"):
        facts.append(f"hub: {source['repo_id']}@{source.get('revision')}")
    if source.get("sha256"):
        facts.append(f"sha256: {source['sha256']}")
    if report["dora"]:
        facts.append("DoRA: yes (lora_magnitude_vector present)")
    for key, shape in report["full_tensors"].items():
        facts.append(f"stored whole: {key} {'x'.join(map(str, shape))}")
    provenance = report["provenance"] or {}
    if provenance.get("command"):
        facts.append(f"made by: {provenance['command']}")
    elif provenance.get("recipe_step"):
        facts.append(f"made by: recipe step {provenance['recipe_step']} ({provenance.get('operation')})")
    elif provenance:
        facts.append(f"made by: {provenance.get('operation')}")
    console.print("\n".join(facts), markup=False, highlight=False)
