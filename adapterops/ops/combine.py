"""Weighted sums of LoRA modules on their factors, and the one per-module loop every verb uses.

For weights w_i, every module any input touches gets

    dW_out = sum_i w_i * dW_i = sum_i (w_i s_i) B_i A_i = [c_1 B_1 | c_2 B_2 | ...] @ [A_1; A_2; ...]

with c_i = w_i * s_i: the concatenated factors represent the sum exactly. Methods
(``options.Method``):

- ``exact`` (default): that sum, re-factored to its numerical rank when smaller than the
  concatenated rank (cancellation, shared directions), else kept concatenated.
- ``cat``: the concatenated factors as they are.
- ``svd``: the best rank-k form of the exact sum (``lowrank.svd_of_product``), k from a ``RankPolicy``.
- ``linear``: PEFT's ``linear`` combination, A = sum sign(c_i) sqrt|c_i| A_i, B = sum sqrt|c_i| B_i.
  Not the weighted sum (it adds cross terms B_i A_j); offered for parity, its error is reported.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: not a sum on factors; in the default
  ``dense`` space each module's dense updates s_i B_i A_i are sparsified and merged by row tiles
  recomputed from the factors (``ops.sparsify``), then the best rank-k form of the merged update is kept (default k: the sum of
  the input ranks), its error reported. The ``core``, ``knots`` and ``peft-factors`` spaces
  (``options.Space``) sparsify on factors instead (``ops.native``), exact before any rank target.
- ``tsv``, ``iso_c``, ``iso_cts``: new spectra from the updates' singular vectors (``ops.native``).

DoRA modules are not handled here: their update depends on the base weight (``ops.dora``).
Expert weights (``ModuleKind.PARAMETER``) need nothing special: each expert is a module of its own.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleReport
from adapterops.errors import IncompatibleAdaptersError, InvalidInputError, UnsupportedAdapterError, param
from adapterops.ops import native
from adapterops.ops.lowrank import (
    LowRank,
    RankPolicy,
    best_low_rank,
    compute_dtype,
    frobenius_norm_of_product,
    relative,
    svd_of_product,
)
from adapterops.ops.sparsify import Sparsity, Updates, merge_plan, merged
from adapterops.options import Method, Space

Progress = Callable[[str], None]
Weight = float | Callable[[str], float]  # a number, or a function of the module name
Terms = list[tuple[float, LoraModule]]
ModuleFn = Callable[[str, Terms], tuple[LoraModule, ModuleReport]]


def map_modules(
    adapters: Sequence[Adapter], weights: Sequence[Weight], fn: ModuleFn, progress: Progress | None = None
) -> tuple[dict[str, LoraModule], tuple[ModuleReport, ...]]:
    """The one per-module loop: ``fn(name, [(w_i, module_i), ...])`` for every module any input has.

    Modules are visited in name order; each gets the weights of the inputs that have it (a weight
    may be a function of the module name), after a check that their shapes agree. Each report
    records the seconds its module took.
    """
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name in sorted({name for a in adapters for name in a.modules}):
        start = time.perf_counter()
        terms = [
            (weight_for(w, name), a.modules[name])
            for w, a in zip(weights, adapters, strict=True)
            if name in a.modules
        ]
        check_same_module(name, [m for _, m in terms])
        module, report = fn(name, terms)
        modules[name] = module
        reports.append(replace(report, seconds=time.perf_counter() - start))
        if progress:
            progress(name)
    return modules, tuple(reports)


@dataclass(frozen=True)
class Stacked:
    """One module's terms, prepared once for every method: coefficients c_i = w_i s_i, float64
    factors, the concatenated exact form [c_i B_i] @ [A_i], and the summed lora_B bias; the weights
    w_i and scales s_i apart, and the parameters of the sparsifying methods."""

    first: LoraModule
    coeffs: list[float]
    As: list[torch.Tensor]
    Bs: list[torch.Tensor]
    bias: torch.Tensor | None
    weights: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    sparsity: Sparsity = field(default_factory=Sparsity)
    exact_limit: int = 1024  # dense factoring: exact SVD up to this min(out, in) (``best_low_rank``)
    common_fraction: float = 0.8  # iso_cts: share of the common subspace

    @property
    def shape(self) -> tuple[int, int]:
        return (self.first.out_features, self.first.in_features)

    @property
    def rank_in(self) -> int:
        return sum(a.shape[0] for a in self.As)

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        B_cat = torch.cat([c * b for c, b in zip(self.coeffs, self.Bs, strict=True)], dim=1)
        return torch.cat(self.As, dim=0), B_cat

    def finish(self, A: torch.Tensor, B: torch.Tensor) -> LoraModule:
        """A scale-1 module with the first term's layout, factors rounded once to its storage dtype."""
        dtype = self.first.A.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return self.first.with_factors(A.to(dtype), B.to(dtype), 1.0, bias)


MethodFn = Callable[[Stacked, RankPolicy], tuple[LoraModule, ModuleReport]]


def combine_module(
    terms: Terms,
    method: Method,
    policy: RankPolicy,
    sparsity: Sparsity | None = None,
    exact_limit: int = 1024,
    common_fraction: float = 0.8,
) -> tuple[LoraModule, ModuleReport]:
    """sum_i w_i s_i B_i A_i for one module, represented as ``method`` says (module docstring).

    ``sparsity`` parameterizes the sparsifying methods; ``exact_limit`` is ``best_low_rank``'s;
    ``common_fraction`` is iso_cts's.
    """
    first = terms[0][1]
    rank_in = sum(m.rank for _, m in terms)
    if len(terms) == 1 and method in (Method.EXACT, Method.CAT):
        # one term: keep the stored factors bit for bit, the weight goes into the scale
        c = terms[0][0] * first.scale
        if c == 0:
            return first.with_factors(first.A, torch.zeros_like(first.B), 1.0, None), ModuleReport(
                first.name, rank_in, first.rank
            )
        flip = c < 0
        bias = None if first.bias is None else (-first.bias if flip else first.bias)
        return first.with_factors(first.A, -first.B if flip else first.B, abs(c), bias), ModuleReport(
            first.name, rank_in, first.rank
        )
    dtype = compute_dtype(*(t for _, m in terms for t in (m.A, m.B)))
    stacked = Stacked(
        first,
        [w * m.scale for w, m in terms],
        [m.A.to(dtype) for _, m in terms],
        [m.B.to(dtype) for _, m in terms],
        bias_sum(terms, dtype),
        [w for w, _ in terms],
        [m.scale for _, m in terms],
        sparsity or Sparsity(),
        exact_limit,
        common_fraction,
    )
    return METHODS[method](stacked, policy)


def _cat(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """The concatenated factors as they are: exact, rank = sum of the input ranks."""
    A, B = t.concatenated()
    return t.finish(A, B), ModuleReport(t.first.name, t.rank_in, t.rank_in)


def _exact(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """The exact sum at its numerical rank (the concatenation when that is already full rank)."""
    return _factored(t, policy, keep_full=True)


def _svd(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """The best rank-k form of the exact sum, k from ``policy``; the error is reported."""
    return _factored(t, policy, keep_full=False)


def _factored(t: Stacked, policy: RankPolicy, keep_full: bool) -> tuple[LoraModule, ModuleReport]:
    A_cat, B_cat = t.concatenated()
    reference = max(abs(c) * float(b.norm() * a.norm()) for c, a, b in zip(t.coeffs, t.As, t.Bs, strict=True))
    return from_factors(t, B_cat, A_cat, policy, reference, keep_full=keep_full)


def from_factors(
    t: Stacked,
    B: torch.Tensor,
    A: torch.Tensor,
    policy: RankPolicy,
    reference: float | None = None,
    *,
    keep_full: bool = False,
) -> tuple[LoraModule, ModuleReport]:
    """The module for a result held exactly as ``B @ A`` (float64), at the rank ``policy`` chooses.

    The one truncation path of every method whose result is exact on factors: the SVD of ``B @ A``
    from the factors (``svd_of_product``), k from ``policy`` (``reference``: the size of the terms the
    result was summed from, see ``numerical_rank``), factors in SVD order (B = U sqrt(S),
    A = sqrt(S) Vh), the dropped energy reported. k never exceeds the numerical rank of ``B @ A``:
    an asked rank above it is capped, with a note in the report (no zero directions are stored).
    ``keep_full``: when nothing would be dropped, keep ``B`` and ``A`` as given (no re-factoring
    round-off). With a budget (``policy.is_global``) the module keeps every direction up to max_rank
    and its report the squared error at every rank (``tails``): ``ops.budget`` then chooses k over
    all modules and slices the factors.
    """
    first, rank_in = t.first, t.rank_in
    shape = (first.out_features, first.in_features)
    factored = svd_of_product(B, A)
    pick = policy.pick(factored.S, shape, reference)
    k = pick.k
    if k == 0:
        # zero to rounding (terms cancel): a rank-1 zero update keeps the module loadable by PEFT
        tails = (factored.energy,) * 2 if policy.is_global else ()
        return t.finish(torch.zeros_like(A[:1]), torch.zeros_like(B[:, :1])), ModuleReport(
            first.name, rank_in, 1, tails=tails
        )
    if keep_full and k == B.shape[1] and not policy.is_global:
        # already full rank: the given factors are exact and avoid re-factoring round-off
        return t.finish(A, B), ModuleReport(first.name, rank_in, k)
    A_k, B_k = factored.truncate(k)
    total, tail = factored.energy, factored.tail_energy(k)
    energy_kept = 1.0 if total == 0 else 1.0 - tail / total
    report = ModuleReport(
        first.name,
        rank_in,
        k,
        energy_kept,
        relative(tail, total),
        note=pick.note,
        tails=factored.tails(k) if policy.is_global else (),
    )
    return t.finish(A_k, B_k), report


def _linear(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """PEFT's linear factors (not the weighted sum) and their relative error against it."""
    ranks = {a.shape[0] for a in t.As}
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(
            f"module {t.first.name}: method linear needs equal ranks, got {sorted(ranks)}; use the default "
            "exact method or svd"
        )
    pairs = list(zip(t.coeffs, t.As, t.Bs, strict=True))
    A = torch.stack([math.copysign(math.sqrt(abs(c)), c) * a for c, a, _ in pairs]).sum(0)
    B = torch.stack([math.sqrt(abs(c)) * b for c, _, b in pairs]).sum(0)
    # dW_lin - dW_exact = [B | -c_1 B_1 | ...] @ [A; A_1; ...], measured on factors
    exact_B = [c * b for c, _, b in pairs]
    exact = frobenius_norm_of_product(torch.cat(exact_B, dim=1), torch.cat(t.As, dim=0))
    error = frobenius_norm_of_product(
        torch.cat([B, *(-b for b in exact_B)], dim=1), torch.cat([A, *t.As], dim=0)
    )
    report = ModuleReport(t.first.name, t.rank_in, A.shape[0], rel_error=error / exact if exact else 0.0)
    return t.finish(A, B), report


def _sparsified(method: Method, t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """TIES/DARE/magnitude pruning of the dense updates s_i B_i A_i (``ops.sparsify``, computed by row
    tiles from the factors), then their best rank-k form, k from ``policy`` or else the sum of the
    input ranks (at most the rank of the merged update); the error is measured against the dense
    merged update. Other spaces: ``_in_space``."""
    first = t.first
    _check_merging(method, t, policy)
    if t.sparsity.space is not Space.DENSE:
        return _in_space(method, t, policy)
    updates = Updates.from_factors([s * b for s, b in zip(t.scales, t.Bs, strict=True)], t.As)
    merge = merge_plan(method, first.name, updates, t.weights, t.sparsity, exact_limit=t.exact_limit)
    low = best_low_rank(merged(merge), policy, exact_limit=t.exact_limit, default=t.rank_in)
    return t.finish(low.A, low.B), low_rank_report(first.name, t.rank_in, low)


def low_rank_report(name: str, rank_in: int, low: LowRank) -> ModuleReport:
    """The report of a module factored densely by ``best_low_rank``."""
    return ModuleReport(
        name,
        rank_in,
        low.A.shape[0],
        low.energy_kept,
        low.rel_error,
        low.solver,
        note=low.note,
        tails=low.tails,
    )


def _in_space(method: Method, t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """A sparsifying method in the core or knots space (exact on factors; any error reported is the
    rank target's) or on the factors as PEFT does (its error against the weighted sum reported)."""
    name, space = t.first.name, t.sparsity.space
    unweighted = [s * b for s, b in zip(t.scales, t.Bs, strict=True)]
    if space is Space.PEFT_FACTORS:
        if t.first.target is not None:
            raise UnsupportedAdapterError(
                f"module {name}: LoRA on a parameter (target_parameters); PEFT's add_weighted_adapter refuses "
                "those, so space peft-factors has nothing to match: use space dense, core or knots"
            )
        B, A = native.peft_factors(method, name, t.Bs, t.As, t.coeffs, t.sparsity)
        module, report = from_factors(t, B, A, policy, _term_size(t), keep_full=True)
        return module, replace(report, rel_error=_error_against_sum(t, module))
    merge = native.core_space if space is Space.CORE else native.knots
    B, A = merge(method, name, unweighted, t.As, t.weights, t.sparsity)
    return from_factors(t, B, A, policy, _update_size(t, t.weights))


def _tsv(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """TSV-M: the inputs' singular vectors, orthogonalized, with their singular values (exact on factors)."""
    _check_merging(Method.TSV, t, policy)
    B, A = native.tsv(_weighted(t), t.As)
    return from_factors(t, B, A, policy, _update_size(t, t.coeffs))


def _iso_c(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """Iso-C: the weighted sum's singular vectors with their mean singular value."""
    _check_merging(Method.ISO_C, t, policy)
    iso = native.iso_c(_weighted(t), t.As, policy, t.shape, _update_size(t, t.coeffs))
    return _isotropic(t, iso)


def _iso_cts(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """Iso-CTS: common and task-specific directions, orthogonalized, with one mean singular value."""
    _check_merging(Method.ISO_CTS, t, policy)
    iso = native.iso_cts(_weighted(t), t.As, policy, t.common_fraction, t.shape, _update_size(t, t.coeffs))
    return _isotropic(t, iso)


def _isotropic(t: Stacked, iso: native.Isotropic) -> tuple[LoraModule, ModuleReport]:
    """A flat spectrum has no best rank-k form: the rank target already chose the directions, so the
    result is kept whole; the report gives the share of the input spectrum they span."""
    module, report = from_factors(t, iso.B, iso.A, RankPolicy(), keep_full=True)
    return module, replace(
        report, energy_kept=iso.energy_kept, rel_error=relative(1.0 - iso.energy_kept, 1.0), note=iso.note
    )


def _check_merging(method: Method, t: Stacked, policy: RankPolicy) -> None:
    """What every merging method (not a sum) refuses: a lora_B bias."""
    first = t.first
    if t.bias is not None:
        raise InvalidInputError(
            f"module {first.name}: an input has a lora_B bias (lora_bias=True); method {method.value} "
            "merges weight updates only: use the default exact method or svd"
        )


def _weighted(t: Stacked) -> list[torch.Tensor]:
    """c_i B_i: with ``t.As``, the factors of the weighted updates w_i dW_i."""
    return [c * b for c, b in zip(t.coeffs, t.Bs, strict=True)]


def _update_size(t: Stacked, factors: Sequence[float]) -> float:
    """max_i |f_i| ||B_i A_i||_F: the size of the terms a result was merged from, for ``numerical_rank``;
    a function of the updates, so the rank does not depend on how they were factored."""
    return max(abs(f) * frobenius_norm_of_product(b, a) for f, a, b in zip(factors, t.As, t.Bs, strict=True))


def _term_size(t: Stacked) -> float:
    """max_i |c_i| ||B_i|| ||A_i||: the size of factor-wise terms (as ``_factored`` measures it)."""
    return max(abs(c) * float(b.norm() * a.norm()) for c, a, b in zip(t.coeffs, t.As, t.Bs, strict=True))


def _error_against_sum(t: Stacked, module: LoraModule) -> float:
    """||dW_out - sum_i c_i B_i A_i||_F / ||sum_i c_i B_i A_i||_F for the written module, on factors."""
    dtype = t.As[0].dtype
    A_out, B_out = module.A.to(dtype), module.scale * module.B.to(dtype)
    exact_B = _weighted(t)
    exact = frobenius_norm_of_product(torch.cat(exact_B, dim=1), torch.cat(t.As, dim=0))
    error = frobenius_norm_of_product(
        torch.cat([B_out, *(-b for b in exact_B)], dim=1), torch.cat([A_out, *t.As], dim=0)
    )
    return error / exact if exact else (0.0 if error == 0 else math.inf)


def _ties(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """TIES-Merging of the dense updates (trim, elect sign, disjoint mean), then rank-k."""
    return _sparsified(Method.TIES, t, policy)


def _dare_linear(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """DARE (random drop, 1/density rescale) then the weighted sum, then rank-k."""
    return _sparsified(Method.DARE_LINEAR, t, policy)


def _dare_ties(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """DARE's drop and rescale, then TIES's sign election and disjoint mean, then rank-k."""
    return _sparsified(Method.DARE_TIES, t, policy)


def _magnitude_prune(t: Stacked, policy: RankPolicy) -> tuple[LoraModule, ModuleReport]:
    """TIES's trim then the weighted sum, then rank-k."""
    return _sparsified(Method.MAGNITUDE_PRUNE, t, policy)


# one entry per method: a new method is one function above and one line here (and its Method value)
METHODS: dict[Method, MethodFn] = {
    Method.EXACT: _exact,
    Method.CAT: _cat,
    Method.SVD: _svd,
    Method.LINEAR: _linear,
    Method.TIES: _ties,
    Method.DARE_LINEAR: _dare_linear,
    Method.DARE_TIES: _dare_ties,
    Method.MAGNITUDE_PRUNE: _magnitude_prune,
    Method.TSV: _tsv,
    Method.ISO_C: _iso_c,
    Method.ISO_CTS: _iso_cts,
}


def bias_sum(terms: Terms, dtype: torch.dtype) -> torch.Tensor | None:
    """Effective lora_B bias of the sum, sum_i w_i s_i b_i; None when no input has one."""
    if all(m.bias is None for _, m in terms):
        return None
    total = torch.zeros(terms[0][1].out_features, dtype=dtype)
    for w, m in terms:
        if m.bias is not None:
            total += w * m.scale * m.bias.to(dtype)
    return total


def weight_for(weight: Weight, module: str) -> float:
    """A weight's value for ``module``: the number, or the function's value, checked finite."""
    value = float(weight(module)) if callable(weight) else weight
    if not math.isfinite(value):
        raise InvalidInputError(f"module {module}: weight {value} is not a finite number")
    return value


def check_weights(weights: Sequence[Weight] | None, count: int) -> list[Weight]:
    """One finite weight (or weight function) per input; ``None`` means 1 each."""
    if weights is None:
        return [1.0] * count
    checked = [w if callable(w) else float(w) for w in weights]
    if len(checked) != count:
        raise InvalidInputError(
            f"got {len(checked)} weights for {count} adapters; give one weight per adapter"
        )
    if not all(callable(w) or math.isfinite(w) for w in checked):
        raise InvalidInputError(f"weights must be finite numbers, got {list(weights)}")
    return checked


def check_bases(adapters: Sequence[Adapter], allow_different_bases: bool) -> None:
    """Refuse (or, when allowed, warn about) inputs that name different base models."""
    bases = {_base_identity(a) for a in adapters} - {None}
    if len(bases) > 1:
        listing = ", ".join(f"{a.describe()} -> {_base_identity(a)}" for a in adapters)
        message = f"inputs were trained on different base models ({listing})"
        if not allow_different_bases:
            raise IncompatibleAdaptersError(
                f"{message}; pass {param('allow_different_bases', True)} if they share the same architecture"
            )
        warnings.warn(message, UserWarning, stacklevel=4)


def _base_identity(adapter: Adapter) -> str | None:
    """The base model an adapter names: its base_model_name_or_path, else its model class."""
    if adapter.base_model:
        return adapter.base_model
    mapping = adapter.config.get("auto_mapping") or {}
    return mapping.get("base_model_class") if isinstance(mapping, dict) else None


def check_same_module(name: str, modules: Sequence[LoraModule]) -> None:
    """All inputs' versions of module ``name`` update a weight of the same shape and kind."""
    first = modules[0]
    for other in modules[1:]:
        if (other.out_features, other.in_features, other.kind, other.kernel_size, other.target) != (
            first.out_features,
            first.in_features,
            first.kind,
            first.kernel_size,
            first.target,
        ):
            raise IncompatibleAdaptersError(
                f"module {name}: shapes differ between inputs ({first.kind.value} {first.weight_shape} vs "
                f"{other.kind.value} {other.weight_shape}); the adapters are for different models"
            )


def merged_full_tensors(adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """The inputs' whole tensors (modules_to_save): carried over; two different values are an error."""
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
    return full


def result_adapter(
    adapters: Sequence[Adapter],
    modules: Mapping[str, LoraModule],
    reports: Sequence[ModuleReport],
) -> Adapter:
    """The adapter holding ``modules``, with the inputs' whole tensors and the first input's config."""
    return Adapter(
        modules, merged_full_tensors(adapters), dict(adapters[0].config), None, None, tuple(reports)
    )
