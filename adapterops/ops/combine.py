"""Weighted sums of adapters, and the single-adapter verbs built on them (negate, scale, resize).

For weights w_i, every module any input touches gets

    dW_out = sum_i w_i * dW_i = sum_i (w_i s_i) B_i A_i = [c_1 B_1 | c_2 B_2 | ...] @ [A_1; A_2; ...]

with c_i = w_i * s_i: the concatenated factors represent the sum exactly. Methods:

- ``exact`` (default): that sum, re-factored to its numerical rank when smaller than the
  concatenated rank (cancellation, shared directions), else kept concatenated.
- ``cat``: the concatenated factors as they are.
- ``svd``: the best rank-k form of the exact sum (``lowrank.svd_of_product``), k from a ``RankPolicy``.
- ``linear``: PEFT's ``linear`` combination, A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i.
  Not the weighted sum (it adds cross terms B_i A_j); offered for parity, its error is reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleReport
from adapterops.errors import IncompatibleAdaptersError, InvalidInputError, UnsupportedAdapterError
from adapterops.ops.lowrank import (
    RankPolicy,
    compute_dtype,
    frobenius_norm_of_product,
    relative,
    svd_of_product,
)

Progress = Callable[[str], None]


class Method(str, Enum):
    EXACT = "exact"
    CAT = "cat"
    SVD = "svd"
    LINEAR = "linear"


class ApproximationWarning(UserWarning):
    """An operation returned something other than the exact weighted sum, on request."""


Weight = float | Callable[[str], float]  # a number, or a function of the module name


def combine(
    adapters: Sequence[Adapter],
    weights: Sequence[Weight] | None = None,
    *,
    method: Method | str = Method.EXACT,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
    base: Any = None,
    form: str = "lora",
) -> Adapter:
    """The adapter whose update is ``sum_i weights[i] * dW_i`` for every module (see module docstring).

    DoRA inputs need ``base`` (a checkpoint path, Hub id or ``Checkpoint``): their effective
    updates are summed densely per module and re-factored (``dora.combine_with_base``).
    ``form="dora"`` (with ``base``) returns a DoRA adapter instead, which holds any such sum
    exactly (``dora.combine_as_dora``).

    ``weights`` defaults to 1 for every input. A weight may be a function of the module name
    (per-module filters, layer gradients: see ``adapterops.recipe``). ``rank``/``energy``/``sv_ratio`` choose the output
    rank for ``method="svd"`` (one of them is required there). ``force`` accepts inputs whose
    configs name different base models. The result's ``report`` holds one ``ModuleReport`` per
    module; its ``provenance`` records inputs, weights and method.
    """
    method = _method(method)
    adapters = list(adapters)
    if not adapters:
        raise InvalidInputError("combine needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [w if callable(w) else float(w) for w in weights]
    check_weight_count(weights, adapters)
    if not all(callable(w) or math.isfinite(w) for w in weights):
        raise InvalidInputError(f"weights must be finite numbers, got {weights}")
    plain = [float(w) for w in weights if not callable(w)]
    needs_base = form == "dora" or (base is not None and any(a.is_dora for a in adapters))
    if needs_base and len(plain) != len(weights):
        raise InvalidInputError("per-module weights (filters, gradients) are not supported with DoRA yet")
    policy = RankPolicy(rank=rank, energy=energy, sv_ratio=sv_ratio)
    if method is Method.SVD and policy.is_exact:
        raise InvalidInputError("method svd needs a target: --rank K, --energy F or --sv-ratio R")
    if method is not Method.SVD and not policy.is_exact:
        raise InvalidInputError(f"--rank/--energy/--sv-ratio apply to method svd, not {method.value}")
    if form not in ("lora", "dora"):
        raise InvalidInputError(f"unknown output form {form!r}; choose lora or dora")
    if form == "dora":
        if base is None:
            raise InvalidInputError("a DoRA output needs the base checkpoint (--base)")
        if method is not Method.EXACT or not policy.is_exact:
            raise InvalidInputError("a DoRA output is exact: drop --method/--rank/--energy/--sv-ratio")
        from adapterops.dora import combine_as_dora

        return combine_as_dora(adapters, plain, base, force=force, progress=progress)
    if base is not None and any(a.is_dora for a in adapters):
        if method not in (Method.EXACT, Method.SVD):
            raise InvalidInputError(
                f"DoRA inputs are combined by SVD of their effective updates, not {method.value}"
            )
        from adapterops.dora import combine_with_base

        return combine_with_base(
            adapters,
            plain,
            base,
            policy=None if policy.is_exact else policy,
            force=force,
            progress=progress,
        )
    _check_inputs(adapters, force)

    names = sorted({name for a in adapters for name in a.modules})
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name in names:
        terms = [
            (_weight_for(w, name), a.modules[name])
            for w, a in zip(weights, adapters, strict=True)
            if name in a.modules
        ]
        check_same_module(name, [m for _, m in terms], adapters)
        module, report = combine_module(terms, method, policy)
        modules[name] = module
        reports.append(report)
        if progress:
            progress(name)
    if method is Method.LINEAR:
        worst = max(r.rel_error for r in reports)
        warnings.warn(
            f"method linear is PEFT's approximation, not the weighted sum: worst module relative error {worst:.3g}",
            ApproximationWarning,
            stacklevel=2,
        )
    provenance = {
        "operation": "combine",
        "method": method.value,
        "weights": [getattr(w, "spec", repr(w)) if callable(w) else w for w in weights],
        "inputs": [input_record(a) for a in adapters],
        **({"rank": rank} if rank is not None else {}),
        **({"energy": energy} if energy is not None else {}),
        **({"sv_ratio": sv_ratio} if sv_ratio is not None else {}),
    }
    return result_adapter(adapters, modules, reports, provenance)


def check_weight_count(weights: Sequence[object], adapters: Sequence[object]) -> None:
    """One weight per adapter, or an error that says so (shared by combine, merge and the DoRA verbs)."""
    if len(weights) != len(adapters):
        raise InvalidInputError(
            f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter"
        )


def _weight_for(weight: Weight, module: str) -> float:
    value = float(weight(module)) if callable(weight) else weight
    if not math.isfinite(value):
        raise InvalidInputError(f"module {module}: weight {value} is not a finite number")
    return value


def negate(adapter: Adapter, *, base: Any = None, form: str = "lora") -> Adapter:
    """dW -> -dW for every module: B changes sign, nothing else (bit-exact). DoRA needs ``base``."""
    return _single("negate", adapter, -1.0, base, form)


def scale(adapter: Adapter, by: float, *, base: Any = None, form: str = "lora") -> Adapter:
    """dW -> by * dW for every module: the factor goes into the scale, factors unchanged (a negative
    ``by`` also flips B's sign)."""
    if not math.isfinite(by):
        raise InvalidInputError(f"scale factor must be a finite number, got {by}")
    return _single("scale", adapter, float(by), base, form)


def resize(
    adapter: Adapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    progress: Progress | None = None,
) -> Adapter:
    """Best low-rank form of each module of one adapter (Eckart-Young on dW, from the factors).

    Exactly one of ``rank``, ``energy`` (fraction of ||dW||_F^2 to keep) or ``sv_ratio`` (keep
    singular values within this factor of the largest). Modules already at or below the target rank
    are re-factored losslessly.
    """
    policy = RankPolicy(rank=rank, energy=energy, sv_ratio=sv_ratio)
    if policy.is_exact:
        raise InvalidInputError("resize needs a target: --rank K, --energy F or --sv-ratio R")
    out = combine(
        [adapter], [1.0], method=Method.SVD, rank=rank, energy=energy, sv_ratio=sv_ratio, progress=progress
    )
    provenance = dict(out.provenance or {}, operation="resize")
    provenance.pop("weights", None)
    provenance.pop("method", None)
    return Adapter(out.modules, out.full_tensors, out.config, None, provenance, out.report)


# ------------------------------------------------------------------------------------------ internals


def _method(method: Method | str) -> Method:
    try:
        return Method(method)
    except ValueError:
        choices = ", ".join(m.value for m in Method)
        raise InvalidInputError(f"unknown method {method!r}; choose one of {choices}") from None


def _check_inputs(adapters: Sequence[Adapter], force: bool) -> None:
    _refuse_dora(adapters)
    check_bases(adapters, force)


def _refuse_dora(adapters: Sequence[Adapter]) -> None:
    for adapter in adapters:
        if adapter.is_dora:
            raise UnsupportedAdapterError(
                f"{adapter.describe()}: DoRA adapter (lora_magnitude_vector): its update depends on the base "
                "weights, so factor arithmetic alone would be wrong; pass the base checkpoint (--base)"
            )


def check_bases(adapters: Sequence[Adapter], force: bool) -> None:
    """Refuse (or, with ``force``, warn about) inputs that name different base models."""
    bases = {_base_identity(a) for a in adapters} - {None}
    if len(bases) > 1:
        listing = ", ".join(f"{a.describe()} -> {_base_identity(a)}" for a in adapters)
        message = f"inputs were trained on different base models ({listing})"
        if not force:
            raise IncompatibleAdaptersError(
                f"{message}; pass --allow-different-bases (force=True) if they share the same architecture"
            )
        warnings.warn(message, UserWarning, stacklevel=3)


def _base_identity(adapter: Adapter) -> str | None:
    """The base model an adapter names: its base_model_name_or_path, else its model class."""
    if adapter.base_model:
        return adapter.base_model
    mapping = adapter.config.get("auto_mapping") or {}
    return mapping.get("base_model_class") if isinstance(mapping, dict) else None


def check_same_module(name: str, modules: Sequence[LoraModule], adapters: Sequence[Adapter]) -> None:
    first = modules[0]
    for other in modules[1:]:
        if (other.out_features, other.in_features, other.kind, other.kernel_size) != (
            first.out_features,
            first.in_features,
            first.kind,
            first.kernel_size,
        ):
            raise IncompatibleAdaptersError(
                f"module {name}: shapes differ between inputs ({first.kind.value} {first.weight_shape} vs "
                f"{other.kind.value} {other.weight_shape}); the adapters are for different models"
            )


def combine_module(
    terms: Sequence[tuple[float, LoraModule]], method: Method, policy: RankPolicy
) -> tuple[LoraModule, ModuleReport]:
    first = terms[0][1]
    dtype = compute_dtype(*(t for _, m in terms for t in (m.A, m.B)))
    coeffs = [w * m.scale for w, m in terms]
    As = [m.A.to(dtype) for _, m in terms]
    Bs = [m.B.to(dtype) for _, m in terms]
    rank_in = sum(a.shape[0] for a in As)
    bias = bias_sum(terms, coeffs, dtype)

    if len(terms) == 1 and method in (Method.EXACT, Method.CAT):
        # one term: keep the stored factors bit for bit, the weight goes into the scale
        m, c = first, coeffs[0]
        if c == 0:
            return m.with_factors(m.A, torch.zeros_like(m.B), 1.0, None), ModuleReport(
                m.name, rank_in, m.rank
            )
        flip = c < 0
        bias_out = None if m.bias is None else (-m.bias if flip else m.bias)
        return m.with_factors(m.A, -m.B if flip else m.B, abs(c), bias_out), ModuleReport(
            m.name, rank_in, m.rank
        )

    if method is Method.LINEAR:
        A, B, rel_error = _linear(first.name, coeffs, As, Bs)
        return _finish(first, A, B, bias), ModuleReport(first.name, rank_in, A.shape[0], rel_error=rel_error)

    B_cat = torch.cat([c * b for c, b in zip(coeffs, Bs, strict=True)], dim=1)
    A_cat = torch.cat(As, dim=0)
    if method is Method.CAT:
        return _finish(first, A_cat, B_cat, bias), ModuleReport(first.name, rank_in, rank_in)

    shape = (first.out_features, first.in_features)
    if policy.rank is not None and policy.rank > min(shape):
        raise InvalidInputError(
            f"module {first.name}: rank {policy.rank} exceeds what a {shape[0]}x{shape[1]} update can have "
            f"({min(shape)}); choose --rank {min(shape)} or less"
        )
    factored = svd_of_product(B_cat, A_cat)
    reference = max(abs(c) * float(b.norm() * a.norm()) for c, a, b in zip(coeffs, As, Bs, strict=True))
    k = policy.choose(factored.S, shape, reference)
    if k == 0:
        # zero to rounding (terms cancel): a rank-1 zero update keeps the module loadable by PEFT
        zero_A, zero_B = torch.zeros_like(A_cat[:1]), torch.zeros_like(B_cat[:, :1])
        return _finish(first, zero_A, zero_B, bias), ModuleReport(first.name, rank_in, 1)
    if method is Method.EXACT and k == rank_in:
        # already full rank: the concatenation is exact and avoids re-factoring round-off
        return _finish(first, A_cat, B_cat, bias), ModuleReport(first.name, rank_in, rank_in)
    A, B = factored.truncate(k)
    total, tail = factored.energy, factored.tail_energy(k)
    energy_kept = 1.0 if total == 0 else 1.0 - tail / total
    report = ModuleReport(first.name, rank_in, k, energy_kept=energy_kept, rel_error=relative(tail, total))
    return _finish(first, A, B, bias), report


def _finish(like: LoraModule, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> LoraModule:
    """A scale-1 module with ``like``'s layout, factors rounded once to ``like``'s storage dtype."""
    dtype = like.A.dtype
    return like.with_factors(A.to(dtype), B.to(dtype), 1.0, None if bias is None else bias.to(dtype))


def _linear(
    name: str, coeffs: Sequence[float], As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's linear factors and their relative error against the exact weighted sum."""
    ranks = {a.shape[0] for a in As}
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(
            f"module {name}: method linear needs equal ranks, got {sorted(ranks)}; use the default "
            "exact method or svd"
        )
    A = torch.stack([math.copysign(math.sqrt(abs(c)), c) * a for c, a in zip(coeffs, As, strict=True)]).sum(0)
    B = torch.stack([math.sqrt(abs(c)) * b for c, b in zip(coeffs, Bs, strict=True)]).sum(0)
    # dW_lin - dW_exact = [B | -c_1 B_1 | ...] @ [A; A_1; ...], measured on factors
    exact_B = [c * b for c, b in zip(coeffs, Bs, strict=True)]
    exact = frobenius_norm_of_product(torch.cat(exact_B, dim=1), torch.cat(list(As), dim=0))
    error = frobenius_norm_of_product(
        torch.cat([B, *(-b for b in exact_B)], dim=1), torch.cat([A, *As], dim=0)
    )
    return A, B, error / exact if exact else 0.0


def bias_sum(
    terms: Sequence[tuple[float, LoraModule]], coeffs: Sequence[float], dtype: torch.dtype
) -> torch.Tensor | None:
    """Effective lora_B bias of the sum, sum_i c_i b_i; None when no input has one."""
    if all(m.bias is None for _, m in terms):
        return None
    total = torch.zeros(terms[0][1].out_features, dtype=dtype)
    for c, (_, m) in zip(coeffs, terms, strict=True):
        if m.bias is not None:
            total += c * m.bias.to(dtype)
    return total


def _single(operation: str, adapter: Adapter, factor: float, base: Any = None, form: str = "lora") -> Adapter:
    out = combine([adapter], [factor], method=Method.EXACT, base=base, form=form)
    provenance: dict[str, Any] = {"operation": operation, "inputs": (out.provenance or {}).get("inputs", [])}
    if (out.provenance or {}).get("base"):
        provenance["base"] = (out.provenance or {})["base"]
    if operation == "scale":
        provenance["by"] = factor
    return Adapter(out.modules, out.full_tensors, out.config, None, provenance, out.report)


def input_record(adapter: Adapter) -> dict[str, Any]:
    record: dict[str, Any] = adapter.source.as_dict() if adapter.source else {"path": "<in memory>"}
    if adapter.provenance:
        record["made_by"] = adapter.provenance
    return record


def result_adapter(
    adapters: Sequence[Adapter],
    modules: Mapping[str, LoraModule],
    reports: Sequence[ModuleReport],
    provenance: dict[str, Any],
) -> Adapter:
    full: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for adapter in adapters:
        for key, tensor in adapter.full_tensors.items():
            if key in full and not torch.equal(full[key], tensor):
                raise IncompatibleAdaptersError(
                    f"{owner[key]} and {adapter.describe()} both carry a full replacement for {key} "
                    "(modules_to_save) with different values; a weighted sum of replacements is undefined: "
                    "drop it from one input"
                )
            full.setdefault(key, tensor)
            owner.setdefault(key, adapter.describe())
    config = dict(adapters[0].config)
    return Adapter(modules, full, config, None, provenance, tuple(reports))
