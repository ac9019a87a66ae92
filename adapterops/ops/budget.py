"""Ranks for all modules at once: a budget over the whole adapter (docs/math.md, "Choosing k"). Pure.

A verb run with a budget first computes every module once, in SVD order up to a cap, its report
holding ``tails``: the squared error ||dW - dW_k||_F^2 at every rank k (``ModuleReport.tails``).
``apply_budget`` then chooses the ranks and slices each module's factors (B[:, :k], A[:k]): the
first k directions of an SVD are its best rank-k form, so the errors stay exact.

An item is a module, or all experts of one parameter (PEFT stores them as one pair at one rank).
Its rank k costs c k parameters: c = out + in (lora_A is (r, in), lora_B (out, r); a convolution's
in counts its kernel, an embedding's its rows) times the number of experts. Every item keeps at
least rank 1 (a module is written even when zero). With e_i(k) the item's squared error:

- ``budget_params`` N: minimize sum_i e_i(k_i) subject to sum_i c_i k_i <= N;
- ``budget_error`` E: minimize sum_i c_i k_i subject to sum_i e_i(k_i) <= E^2 sum_i e_i(0).

Both are multiple-choice knapsacks. Greedy by gain per parameter over each item's convex hull of
errors solves the LP relaxation; it is optimal for the budget it consumes, not for N. So:

1. greedy, and its LP bound; when the two meet, the greedy allocation is optimal;
2. else a Lagrangian reduction at the LP's price of a parameter drops every rank that cannot be in
   an allocation better than the greedy one (usually all but a few per item), and an exact dynamic
   program over the ranks left, cost in units of g = gcd(c_i), when its work (ranks left times the
   budget in units) and its table fit ``MAX_WORK`` and ``MAX_CELLS``;
3. else the greedy allocation, with the LP bound reported: the least error (or the fewest
   parameters) any allocation could reach. Never silently suboptimal.

Example: two 2x2 modules (c = 4 each) with S = (3, 1) and (2, 2), N = 12: rank 1 each costs 8 and
leaves 1 + 4 = 5; one more unit (4 parameters) removes 1 or 4, so the second module gets rank 2:
ranks (1, 2), error 1, total 18, relative error sqrt(1/18) = 0.236.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import torch

from adapterops.adapter import LoraModule, ModuleReport
from adapterops.errors import InvalidInputError, param
from adapterops.ops.lowrank import relative
from adapterops.options import RankTarget

MAX_WORK = 100_000_000  # DP steps (one per budget unit, item and candidate rank): seconds at most
MAX_CELLS = 50_000_000  # DP choice table entries (int16): 100 MB


@dataclass(frozen=True)
class Item:
    """Modules that share one rank: ``members`` (name, own errors), ``cost`` parameters per rank."""

    members: tuple[tuple[str, tuple[float, ...]], ...]
    cost: int

    @property
    def top(self) -> int:
        """The most ranks worth keeping: the longest member's."""
        return max(len(t) for _, t in self.members) - 1

    def errors(self) -> list[float]:
        """e(k) for k = 0..top: the members' errors summed, each flat past its own rank."""
        return [sum(t[min(k, len(t) - 1)] for _, t in self.members) for k in range(self.top + 1)]


@dataclass(frozen=True)
class Allocation:
    """Ranks per item, what they cost and leave, and whether they are proven optimal."""

    ranks: tuple[int, ...]
    params: int
    error: float  # sum of squared errors left
    total: float  # sum of ||dW||_F^2
    optimal: bool
    solver: str  # "greedy" or "dp"
    bound: float  # params: the least squared error any allocation within budget leaves; error: fewest params


# ------------------------------------------------------------------------------------------- entry


def apply_budget(
    modules: Mapping[str, LoraModule],
    reports: Sequence[ModuleReport],
    target: RankTarget,
    *,
    max_work: int | None = None,
    max_cells: int | None = None,
) -> tuple[dict[str, LoraModule], tuple[ModuleReport, ...], dict[str, Any]]:
    """Choose every module's rank under ``target``'s budget and cut the modules to it.

    ``modules`` hold factors in SVD order and ``reports`` their ``tails`` (see the module docstring).
    Returns the cut modules, their reports (rank, energy kept, relative error, from the tails) and the
    totals for the record: params, rel_error (sqrt of the summed squared errors over the summed
    ||dW||^2), optimal, solver and the bound. ``max_work``, ``max_cells``: the DP's limits
    (default ``MAX_WORK``, ``MAX_CELLS``).
    """
    items = _items(modules, reports)
    found = allocate(items, target, max_work=max_work, max_cells=max_cells)
    ranks = item_ranks(items, found)
    cut: dict[str, LoraModule] = {}
    for name, module in modules.items():
        k = ranks[name]
        cut[name] = replace(module, A=module.A[:k].clone(), B=module.B[:, :k].contiguous())
    new_reports = []
    for r in reports:
        k, tails = ranks[r.name], r.tails
        energy_kept = 1.0 if tails[0] == 0 else 1.0 - tails[k] / tails[0]
        new_reports.append(
            replace(r, rank_out=k, energy_kept=energy_kept, rel_error=relative(tails[k], tails[0]), tails=())
        )
    totals = budget_totals(found, target)
    return cut, tuple(new_reports), totals


def allocate(
    items: Sequence[Item], target: RankTarget, *, max_work: int | None = None, max_cells: int | None = None
) -> Allocation:
    """``allocate_params`` or ``allocate_error``, whichever budget ``target`` sets."""
    max_work = MAX_WORK if max_work is None else max_work
    max_cells = MAX_CELLS if max_cells is None else max_cells
    if target.budget_params is not None:
        return allocate_params(items, target.budget_params, max_work=max_work, max_cells=max_cells)
    if target.budget_error is not None:
        return allocate_error(items, target.budget_error, max_work=max_work, max_cells=max_cells)
    raise InvalidInputError("a budget allocation needs budget_params or budget_error")


def item_ranks(items: Sequence[Item], found: Allocation) -> dict[str, int]:
    """Every member module's rank: its item's, at most the member's own top."""
    return {
        name: min(k, len(tails) - 1)
        for item, k in zip(items, found.ranks, strict=True)
        for name, tails in item.members
    }


def budget_totals(found: Allocation, target: RankTarget) -> dict[str, Any]:
    """The totals a record keeps under ``budget``: the target, params, rel_error (sqrt of the summed
    squared errors over the summed ||dW||^2), optimal, solver and the bound (``report.budget_line``)."""
    totals: dict[str, Any] = {
        **target.target(),
        "params": found.params,
        "rel_error": relative(found.error, found.total),
    }
    totals.update(optimal=found.optimal, solver=found.solver)
    if target.budget_params is not None:
        totals["rel_error_bound"] = relative(found.bound, found.total)
    else:
        totals["params_bound"] = int(found.bound)
    return totals


def rank_cost(out_features: int, in_features: int) -> int:
    """Parameters one rank of a module costs: a column of lora_B (out) and a row of lora_A (in; a
    convolution's in counts its kernel, an embedding's is its number of rows)."""
    return out_features + in_features


def _items(modules: Mapping[str, LoraModule], reports: Sequence[ModuleReport]) -> list[Item]:
    """The modules as items: experts of one parameter together (one rank), the others alone."""
    groups: dict[str, list[tuple[str, tuple[float, ...]]]] = {}
    costs: dict[str, int] = {}
    for r in reports:
        module = modules[r.name]
        if len(r.tails) < 2:
            raise InvalidInputError(
                f"module {r.name}: its result cannot be cut to a budget (no spectrum); budgets apply to "
                "methods svd, ties, dare_linear, dare_ties and magnitude_prune"
            )
        key = (
            module.target.tensor if module.target is not None and module.target.expert is not None else r.name
        )
        groups.setdefault(key, []).append((r.name, r.tails))
        costs[key] = costs.get(key, 0) + rank_cost(module.out_features, module.in_features)
    return [Item(tuple(groups[key]), costs[key]) for key in groups]


# ------------------------------------------------------------------------------------- allocation


def allocate_params(
    items: Sequence[Item], budget: int, *, max_work: int = MAX_WORK, max_cells: int = MAX_CELLS
) -> Allocation:
    """The ranks (>= 1 each) that leave the least total squared error within ``budget`` parameters."""
    errors = [item.errors() for item in items]
    total = sum(e[0] for e in errors)
    least = sum(item.cost for item in items)
    if budget < least:
        raise InvalidInputError(
            f"{param('budget_params', budget)} is below the smallest output: {least:,} parameters, every "
            f"module at rank 1; raise it to {least:,} or more"
        )
    most = sum(item.cost * item.top for item in items)
    if budget >= most:  # everything fits
        ranks = tuple(item.top for item in items)
        error = _error(errors, ranks)
        return Allocation(ranks, most, error, total, True, "greedy", error)
    spare = budget - least
    ranks, lp_gain, price = _greedy_params(items, errors, spare)
    error = _error(errors, ranks)
    start = sum(e[1] for e in errors)  # the error at rank 1 everywhere
    bound = start - lp_gain
    tol = 1e-12 * total
    if error <= bound + tol:
        return Allocation(ranks, _cost(items, ranks), error, total, True, "greedy", error)
    # Lagrangian reduction: with h(i, k) = gain - price * cost, every allocation within the budget
    # gains at most L = price * spare + sum_i max_k h(i, k), and one keeping rank k of item i at most
    # L - (max_k h(i, .) - h(i, k)): ranks for which that is below the greedy's gain are out
    hs = [_prices(item, e, price, gain=True) for item, e in zip(items, errors, strict=True)]
    ceiling = price * spare + sum(max(h[1:]) for h in hs)
    bound = max(bound, start - ceiling)
    slack = ceiling - (start - error) + tol
    candidates = [
        sorted({k for k in range(1, len(h)) if max(h[1:]) - h[k] <= slack} | {ranks[i]})
        for i, h in enumerate(hs)
    ]
    solved = _dp(items, errors, candidates, spare, max_work, max_cells)
    if solved is None:
        return Allocation(ranks, _cost(items, ranks), error, total, False, "greedy", max(bound, 0.0))
    ranks = solved.ranks(solved.units)
    error = _error(errors, ranks)
    return Allocation(ranks, _cost(items, ranks), error, total, True, "dp", error)


def allocate_error(
    items: Sequence[Item], target: float, *, max_work: int = MAX_WORK, max_cells: int = MAX_CELLS
) -> Allocation:
    """The fewest parameters (ranks >= 1 each) whose total relative error is at most ``target``."""
    errors = [item.errors() for item in items]
    total = sum(e[0] for e in errors)
    allowed = target**2 * total + 1e-12 * total  # the slack absorbs the summation order of the errors
    best = sum(min(e[1:]) for e in errors)
    if best > allowed:
        raise InvalidInputError(
            f"{param('budget_error', target)} cannot be met: the least total relative error within reach is "
            f"{relative(best, total):.4g} (every module at its rank cap); raise {param('max_rank')} or "
            f"{param('budget_error')}"
        )
    least = sum(item.cost for item in items)
    need = sum(e[1] for e in errors) - allowed  # error to remove from rank 1 everywhere
    ranks, lp_cost, price = _greedy_error(items, errors, need)
    cost = _cost(items, ranks)
    unit = math.gcd(*(item.cost for item in items))
    bound = least + max(math.ceil(lp_cost / unit - 1e-9), 0) * unit
    if cost <= bound:
        return Allocation(ranks, cost, _error(errors, ranks), total, True, "greedy", cost)
    # Lagrangian reduction, as in allocate_params: with h(i, k) = cost - gain / price, every allocation
    # removing ``need`` costs at least L = need / price + sum_i min_k h(i, k) above rank 1 everywhere,
    # and one keeping rank k of item i at least L + (h(i, k) - min_k h(i, .)): only ranks for which
    # that is below the greedy's cost can be in a cheaper allocation
    hs = [_prices(item, e, price, gain=False) for item, e in zip(items, errors, strict=True)]
    spare = cost - least - unit  # a cheaper allocation spends at most this above rank 1 everywhere
    slack = spare - (need / price + sum(min(h[1:]) for h in hs)) + 1e-9 * unit
    candidates = [[k for k in range(1, len(h)) if h[k] - min(h[1:]) <= slack] for h in hs]
    lowest = sum(item.cost * (c[0] - 1) for item, c in zip(items, candidates, strict=True) if c)
    if not all(candidates) or lowest > spare:  # no allocation is cheaper than the greedy one
        return Allocation(ranks, cost, _error(errors, ranks), total, True, "greedy", cost)
    solved = _dp(items, errors, candidates, spare, max_work, max_cells)
    if solved is None:
        return Allocation(ranks, cost, _error(errors, ranks), total, False, "greedy", bound)
    reached = torch.nonzero(solved.best >= need - solved.offset - 1e-12 * total)
    if reached.numel():  # a cheaper allocation than the greedy one
        ranks = solved.ranks(int(reached[0]))
        cost = _cost(items, ranks)
    return Allocation(ranks, cost, _error(errors, ranks), total, True, "dp", cost)


def _prices(item: Item, e: list[float], price: float, *, gain: bool) -> list[float]:
    """Per rank k (index 0 unused): gain - price * cost above rank 1, or cost - gain / price."""
    if gain:
        return [e[1] - e[k] - price * item.cost * (k - 1) for k in range(item.top + 1)]
    return [item.cost * (k - 1) - (e[1] - e[k]) / price for k in range(item.top + 1)]


def _cost(items: Sequence[Item], ranks: Sequence[int]) -> int:
    return sum(item.cost * k for item, k in zip(items, ranks, strict=True))


def _error(errors: Sequence[list[float]], ranks: Sequence[int]) -> float:
    return sum(e[k] for e, k in zip(errors, ranks, strict=True))


def _segments(
    items: Sequence[Item], errors: Sequence[list[float]]
) -> list[tuple[float, int, int, float, int]]:
    """Every item's steps along the lower convex hull of its errors from rank 1: (gain per parameter,
    item, rank reached, gain, cost), best first. Along one item the ratios do not increase."""
    steps = []
    for i, (item, e) in enumerate(zip(items, errors, strict=True)):
        hull = [1]
        for k in range(2, len(e)):
            # drop the last vertex while it lies on or above the chord from the one before it to k
            while len(hull) >= 2 and (e[hull[-1]] - e[hull[-2]]) * (k - hull[-2]) >= (e[k] - e[hull[-2]]) * (
                hull[-1] - hull[-2]
            ):
                hull.pop()
            hull.append(k)
        for a, b in pairwise(hull):
            gain, cost = e[a] - e[b], (b - a) * item.cost
            if gain <= 0:
                break
            steps.append((gain / cost, i, b, gain, cost))
    steps.sort(key=lambda s: -s[0])  # stable: one item's steps keep their order
    return steps


def _greedy_params(
    items: Sequence[Item], errors: Sequence[list[float]], spare: int
) -> tuple[tuple[int, ...], float, float]:
    """Greedy ranks within ``spare`` parameters above rank 1 everywhere; the LP bound on the error they
    remove, and the LP's price of a parameter (the gain per parameter of the step that did not fit)."""
    ranks = [1] * len(items)
    blocked: set[int] = set()
    gain, lp_gain, price = 0.0, None, 0.0
    for ratio, i, k, step_gain, cost in _segments(items, errors):
        if i in blocked:
            continue
        if cost <= spare:
            ranks[i], spare, gain = k, spare - cost, gain + step_gain
            continue
        if lp_gain is None:  # the LP optimum: everything before this step, and the fraction that fits
            lp_gain, price = gain + spare * ratio, ratio
        blocked.add(i)  # later steps of this item need this one first
    return tuple(ranks), gain if lp_gain is None else lp_gain, price


def _greedy_error(
    items: Sequence[Item], errors: Sequence[list[float]], need: float
) -> tuple[tuple[int, ...], float, float]:
    """Greedy ranks removing ``need`` from rank 1 everywhere; the LP bound on the parameters that
    takes above rank 1 everywhere, and the LP's price (the gain per parameter of the last step)."""
    ranks = [1] * len(items)
    gain, spent = 0.0, 0
    if need <= 0:
        return tuple(ranks), 0.0, 1.0
    for ratio, i, k, step_gain, cost in _segments(items, errors):
        ranks[i] = k
        if gain + step_gain >= need:
            return tuple(ranks), spent + (need - gain) / ratio, ratio
        gain, spent = gain + step_gain, spent + cost
    return tuple(ranks), float(spent), 1.0  # not reached: allocate_error checked it is reachable


@dataclass(frozen=True)
class _Table:
    """A solved DP: ``best[b]`` the most error removed with at most b units above the lowest candidates
    (``offset`` removed by those already), and each item's choice per b to read the ranks back."""

    best: torch.Tensor
    offset: float
    units: int
    unit: int
    candidates: list[list[int]]
    choices: list[torch.Tensor | None]
    costs: list[int]

    def ranks(self, units: int) -> tuple[int, ...]:
        """The ranks behind ``best[units]``, read back from the last item to the first."""
        ranks = []
        for cand, choice, cost in zip(
            reversed(self.candidates), reversed(self.choices), reversed(self.costs), strict=True
        ):
            k = cand[0] if choice is None else cand[int(choice[units])]
            ranks.append(k)
            units -= (k - cand[0]) * cost // self.unit
        return tuple(reversed(ranks))


def _dp(
    items: Sequence[Item],
    errors: Sequence[list[float]],
    candidates: list[list[int]],
    spare: int,
    max_work: int,
    max_cells: int,
) -> _Table | None:
    """The multiple-choice knapsack over each item's ``candidates`` (ascending, not empty, the lowest
    ones within ``spare``) within ``spare`` parameters above rank 1 everywhere, exactly: cost in units
    of g = gcd(costs), one item at a time, vectorized over the budget. None when it would exceed
    ``max_work`` steps or ``max_cells`` table entries."""
    unit = math.gcd(*(item.cost for item in items))
    units = (
        spare - sum(item.cost * (cand[0] - 1) for item, cand in zip(items, candidates, strict=True))
    ) // unit
    free = [len(cand) > 1 for cand in candidates]
    work = sum(len(cand) for cand, f in zip(candidates, free, strict=True) if f) * (units + 1)
    if work > max_work or sum(free) * (units + 1) > max_cells:
        return None
    offset = sum(e[1] - e[cand[0]] for e, cand in zip(errors, candidates, strict=True))
    best = torch.zeros(units + 1, dtype=torch.float64)
    choices: list[torch.Tensor | None] = []
    for item, e, cand in zip(items, errors, candidates, strict=True):
        if len(cand) == 1:
            choices.append(None)
            continue
        step = item.cost // unit
        new = best.clone()  # the lowest candidate: no extra cost, no extra gain
        choice = torch.zeros(units + 1, dtype=torch.int16 if len(cand) < 2**15 else torch.int32)
        for j, k in enumerate(cand[1:], start=1):
            shift = (k - cand[0]) * step
            if shift > units:
                break
            candidate = best[: units + 1 - shift] + (e[cand[0]] - e[k])
            kept = new[shift:]
            better = candidate > kept  # strict: the cheaper choice wins a tie
            torch.maximum(kept, candidate, out=kept)
            choice[shift:].masked_fill_(better, j)
        best = new
        choices.append(choice)
    return _Table(best, offset, units, unit, candidates, choices, [item.cost for item in items])
