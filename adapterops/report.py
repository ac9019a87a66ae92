"""The figures every rank-changing verb reports, computed from its per-module reports. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterops.adapter import ModuleReport


def summarize(reports: Sequence[ModuleReport], budget: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The figures every rank-changing command prints: ranks, energy kept, worst module; and with a
    budget (``provenance["budget"]``: ``ops.budget.apply_budget``'s totals) the totals under ``budget``."""
    if not reports:
        return {"modules": 0}
    extra = {"budget": dict(budget)} if budget else {}
    worst = min(reports, key=lambda r: r.energy_kept)
    worst_error = max(reports, key=lambda r: r.rel_error)
    ranks = sorted({r.rank_out for r in reports})
    return {
        "modules": len(reports),
        "rank_min": ranks[0],
        "rank_max": ranks[-1],
        "energy_kept_min": worst.energy_kept,
        "energy_kept_min_module": worst.name,
        "energy_kept_mean": sum(r.energy_kept for r in reports) / len(reports),
        "rel_error_max": worst_error.rel_error,
        "rel_error_max_module": worst_error.name,
        **extra,
    }


def summary_line(summary: dict[str, Any]) -> str:
    if not summary.get("modules"):
        return "0 modules"
    ranks = (
        summary["rank_min"]
        if summary["rank_min"] == summary["rank_max"]
        else (f"{summary['rank_min']}-{summary['rank_max']}")
    )
    text = f"{summary['modules']} modules, rank {ranks}"
    if summary["energy_kept_min"] < 1.0 or summary["rel_error_max"] > 0.0:
        text += (
            f", energy kept {100 * summary['energy_kept_mean']:.3f}% mean, "
            f"{100 * summary['energy_kept_min']:.3f}% min ({summary['energy_kept_min_module']}), "
            f"max relative error {summary['rel_error_max']:.3g} ({summary['rel_error_max_module']})"
        )
    if summary.get("budget"):
        text += f"; {budget_line(summary['budget'])}"
    return text


def budget_line(budget: Mapping[str, Any]) -> str:
    """The totals of a budget, and how good the allocation is proven to be.

    Example: ``budget 20,000,000 parameters: 19,998,720 used, total relative error 0.0312 (optimal)``.
    """
    if budget.get("budget_params") is not None:
        text = f"budget {budget['budget_params']:,} parameters: {budget['params']:,} used"
    else:
        text = f"budget relative error {budget['budget_error']:g}: {budget['params']:,} parameters"
    text += f", total relative error {budget['rel_error']:.4g}"
    if budget["optimal"]:
        return text + " (optimal)"
    if "rel_error_bound" in budget:
        return text + f" (greedy; no allocation in the budget goes below {budget['rel_error_bound']:.4g})"
    return text + f" (greedy; every allocation reaching it needs {budget['params_bound']:,} or more)"
