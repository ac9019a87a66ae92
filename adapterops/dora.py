"""DoRA conversions and DoRA-aware arithmetic: the operations that need the base weights.

Each reads the base checkpoint one module's weight at a time (``base.BaseWeights``), so memory is
one weight matrix plus the adapters. The math is in ``ops.dora``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport
from adapterops.base import BaseWeights
from adapterops.errors import InvalidInputError, UnsupportedAdapterError
from adapterops.io.checkpoint import Checkpoint
from adapterops.ops import combine as combine_ops
from adapterops.ops.dora import best_low_rank, effective_delta, row_norms
from adapterops.ops.lowrank import RankPolicy

Progress = Callable[[str], None]
BaseRef = str | Path | Checkpoint | BaseWeights


def _base(base: BaseRef) -> BaseWeights:
    return base if isinstance(base, BaseWeights) else BaseWeights(base)


def _no_embeddings(adapter: Adapter, verb: str) -> None:
    for module in adapter.modules.values():
        if module.kind is ModuleKind.EMBEDDING:
            raise UnsupportedAdapterError(
                f"{adapter.describe()}: module {module.name} is an embedding; {verb} supports DoRA on linear, "
                "Conv1D and conv layers (PEFT's embedding DoRA scales columns, not rows)"
            )


def to_dora(adapter: Adapter, base: BaseRef, *, progress: Progress | None = None) -> Adapter:
    """The DoRA adapter with the same merged weights: m = ||W + s B A||_row, factors unchanged."""
    if adapter.is_dora:
        raise InvalidInputError(f"{adapter.describe()} is already a DoRA adapter")
    _no_embeddings(adapter, "to-dora")
    weights = _base(base)
    modules = {}
    for name, module in adapter.modules.items():
        module = weights.resolve(module)
        W = weights.weight(module, adapter)
        magnitude = row_norms(W, module).to(module.A.dtype)
        modules[name] = replace(module, magnitude=magnitude)
        if progress:
            progress(name)
    provenance = {
        "operation": "to-dora",
        "base": weights.checkpoint.describe(),
        "inputs": [combine_ops.input_record(adapter)],
    }
    report = tuple(ModuleReport(n, m.rank, m.rank) for n, m in modules.items())
    return Adapter(modules, adapter.full_tensors, adapter.config, None, provenance, report)


def to_lora(
    adapter: Adapter,
    base: BaseRef,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    exact_limit: int = 1024,
    progress: Progress | None = None,
) -> Adapter:
    """Best low-rank LoRA of each DoRA module's effective update dW_eff (see ``ops.dora``).

    One of ``rank``, ``energy``, ``sv_ratio`` sets the rank per module. Modules whose smaller side is
    at most ``exact_limit`` get an exact SVD; larger ones a randomized one. Each module's report
    says which, and its exact relative error.
    """
    if not adapter.is_dora:
        raise InvalidInputError(f"{adapter.describe()} is not a DoRA adapter (no lora_magnitude_vector)")
    policy = RankPolicy(rank=rank, energy=energy, sv_ratio=sv_ratio)
    if policy.is_exact:
        raise InvalidInputError("to-lora needs a target: --rank K, --energy F or --sv-ratio R")
    _no_embeddings(adapter, "to-lora")
    out = combine_with_base([adapter], [1.0], base, policy=policy, exact_limit=exact_limit, progress=progress)
    provenance = dict(out.provenance or {}, operation="to-lora")
    provenance.pop("weights", None)
    return replace(out, provenance=provenance)


def combine_with_base(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    base: BaseRef,
    *,
    policy: RankPolicy | None = None,
    exact_limit: int = 1024,
    force: bool = False,
    progress: Progress | None = None,
) -> Adapter:
    """``sum_i w_i dW_eff_i`` for inputs that may be DoRA, as a LoRA.

    Modules no DoRA input touches are combined on factors, exactly as ``combine`` does (or at the
    policy's rank). Modules with a DoRA term are summed densely, one at a time, and re-factored at
    the policy's rank; without a policy, at the sum of the inputs' ranks there. The error is reported.
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    combine_ops.check_weight_count(weights, adapters)
    for adapter in adapters:
        if adapter.is_dora:
            _no_embeddings(adapter, "DoRA arithmetic")
    combine_ops.check_bases(adapters, force)
    weights_of = _base(base)
    names = sorted({name for a in adapters for name in a.modules})
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name in names:
        start = time.perf_counter()
        terms = [(w, a.modules[name], a) for w, a in zip(weights, adapters, strict=True) if name in a.modules]
        combine_ops.check_same_module(name, [m for _, m, _ in terms], adapters)
        rank_in = sum(m.rank for _, m, _ in terms)
        if not any(m.is_dora for _, m, _ in terms):
            lora_policy = policy if policy is not None else RankPolicy()
            method = combine_ops.Method.EXACT if lora_policy.is_exact else combine_ops.Method.SVD
            module, report = combine_ops.combine_module([(w, m) for w, m, _ in terms], method, lora_policy)
        else:
            first = weights_of.resolve(terms[0][1])
            W = weights_of.weight(first, terms[0][2])
            total = torch.zeros_like(W)
            for w, m, _ in terms:
                total.add_(effective_delta(W, weights_of.resolve(m)), alpha=w)
            target = (
                policy
                if policy is not None and not policy.is_exact
                else RankPolicy(rank=min(rank_in, *W.shape))
            )
            low = best_low_rank(total, target, exact_limit=exact_limit)
            dtype = terms[0][1].A.dtype
            module = replace(
                first, A=low.A.to(dtype), B=low.B.to(dtype), scale=1.0, bias=None, magnitude=None
            )
            bias = combine_ops.bias_sum(
                [(w, m) for w, m, _ in terms], [w * m.scale for w, m, _ in terms], torch.float64
            )
            module = replace(module, bias=None if bias is None else bias.to(dtype))
            report = ModuleReport(name, rank_in, low.A.shape[0], low.energy_kept, low.rel_error, low.solver)
        modules[name] = module
        reports.append(replace(report, seconds=time.perf_counter() - start))
        if progress:
            progress(name)
    provenance: dict[str, Any] = {
        "operation": "combine",
        "method": "dense-svd" if any(a.is_dora for a in adapters) else "exact",
        "weights": weights,
        "base": weights_of.checkpoint.describe(),
        "inputs": [combine_ops.input_record(a) for a in adapters],
    }
    if policy is not None:
        provenance.update({k: v for k, v in vars(policy).items() if v is not None})
    result = combine_ops.result_adapter(adapters, modules, reports, provenance)
    if not math.isfinite(sum(r.rel_error for r in reports)):
        raise InvalidInputError("the result has non-finite values; check the base weights and the magnitudes")
    return result


def combine_as_dora(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    base: BaseRef,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> Adapter:
    """``sum_i w_i dW_eff_i`` as a DoRA adapter, exactly (any mix of DoRA and LoRA inputs).

    Per module, with d_i = m_i / n_i for a DoRA input and d_i = 1 for a LoRA input,

        W + sum_i w_i dW_eff_i = g * (W + L),   g = 1 + sum_i w_i (d_i - 1),
                                               L = sum_i (w_i d_i s_i / g) B_i A_i   (row scalings)

    so the result is a DoRA module with factors [w_i d_i s_i / g * B_i] and [A_i] (rank sum r_i,
    re-factored to its numerical rank) and magnitude m = g * ||W + L||_row. Exact up to rounding;
    refused where some row has g = 0 (the result's row would be W-free, not a DoRA row).
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    combine_ops.check_weight_count(weights, adapters)
    for adapter in adapters:
        _no_embeddings(adapter, "DoRA output")
    combine_ops.check_bases(adapters, force)
    weights_of = _base(base)
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name in sorted({name for a in adapters for name in a.modules}):
        start = time.perf_counter()
        terms = [
            (w, weights_of.resolve(a.modules[name]), a)
            for w, a in zip(weights, adapters, strict=True)
            if name in a.modules
        ]
        combine_ops.check_same_module(name, [m for _, m, _ in terms], adapters)
        first = terms[0][1]
        W = weights_of.weight(first, terms[0][2])
        ratios = [
            (m.magnitude.double() / row_norms(W, m))
            if m.magnitude is not None
            else torch.ones(W.shape[0], dtype=W.dtype)
            for _, m, _ in terms
        ]
        g = torch.ones(W.shape[0], dtype=W.dtype)
        for (w, _, _), d in zip(terms, ratios, strict=True):
            g += w * (d - 1)
        if bool((g.abs() < 1e-6).any()):
            row = int(torch.nonzero(g.abs() < 1e-6)[0])
            raise InvalidInputError(
                f"module {name}, row {row}: the weights cancel the base weight there (g = 0), which no DoRA "
                "module can express; use the default LoRA output"
            )
        scaled = [
            (
                1.0,
                replace(
                    m,
                    B=(w * m.scale * d / g)[:, None] * m.B.double(),
                    A=m.A.double(),
                    scale=1.0,
                    magnitude=None,
                    bias=None,
                ),
            )
            for (w, m, _), d in zip(terms, ratios, strict=True)
        ]
        module, report = combine_ops.combine_module(scaled, combine_ops.Method.EXACT, RankPolicy())
        dtype = first.A.dtype
        magnitude = g * row_norms(W, module)
        modules[name] = replace(
            module, A=module.A.to(dtype), B=module.B.to(dtype), magnitude=magnitude.to(dtype), bias=None
        )
        if any(m.bias is not None for _, m, _ in terms):
            raise UnsupportedAdapterError(f"module {name}: lora_bias with DoRA output is not supported")
        reports.append(replace(report, seconds=time.perf_counter() - start))
        if progress:
            progress(name)
    provenance: dict[str, Any] = {
        "operation": "combine",
        "method": "dora-exact",
        "weights": weights,
        "base": weights_of.checkpoint.describe(),
        "inputs": [combine_ops.input_record(a) for a in adapters],
    }
    return combine_ops.result_adapter(adapters, modules, reports, provenance)
