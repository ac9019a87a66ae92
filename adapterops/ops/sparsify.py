"""TIES, DARE and magnitude pruning of one module's updates, by row tiles (docs/math.md).

The inputs' effective updates dW_i = s_i B_i A_i of one module (math layout, (out, in), float64
values) are never stacked whole: they are recomputed from the factors a tile of rows at a time, so
the memory a module needs is its merged result plus one tile of every input, whatever their number.

- ``trim``: keep the int(density * numel) entries of largest magnitude of each dW_i: every entry
  above the threshold T (the k-th largest magnitude, found exactly by a radix selection over the
  tiles), then those equal to T in flat (row-major) order until k are kept (``Cut``).
- ``drop``: keep each entry with probability ``density`` and divide the kept ones by it (DARE's
  drop and rescale, unbiased: E[drop(x)] = x). The uniforms come from a fixed grid of row blocks
  (``grid_rows``), one generator per (seed, module, input, block): the mask is the same whatever
  the tiling.
- ``elect``: per entry, the sign of sum_i t_i (``total``) or of sum_i sign(t_i) (``frequency``) of
  the trimmed, unweighted updates t_i; a zero sum elects +.
- ``disjoint_mean``: per entry, the mean of the weighted values w_i t_i whose sign is the elected
  one, over their count (0 where none agrees).

``ties`` = trim, elect, disjoint mean (Yadav et al. 2023, TIES-Merging); ``dare_ties`` = drop,
elect, disjoint mean and ``dare_linear`` = drop, weighted sum (Yu et al. 2024, DARE);
``magnitude_prune`` = trim, weighted sum. Worked example (one entry each, density 1, total):
t = (3, -1, 2), w = (1, 1, 0.5): the sum is 4 > 0, so + is elected; the values that agree are
3 and 0.5 * 2 = 1, and their mean (3 + 1) / 2 = 2 is the merged entry.

Every entry is computed the same way whatever the tile size: rows of dW_i come from one matrix
product per grid block (its rows and shape fixed by the module's shape), so the result does not
depend on the memory target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from adapterops.ops.lowrank import Dense
from adapterops.options import MajoritySign, Method, Space

GRID_ENTRIES = 1 << 16  # entries per grid block: the unit of every product and of DARE's draws
TILE_BYTES = 64 << 20  # working memory for one tile of every input's update and its temporaries
BYTES_PER_ENTRY = 64  # per input and tile entry: the update, its part, the merge's temporaries
FLOAT64_BYTES = 256 << 20  # the merged update is held in float64 up to this size (exact-SVD modules)
_RADIX = 16  # bits resolved per histogram pass of the selection


@dataclass(frozen=True)
class Sparsity:
    """The parameters of a sparsifying method: the fraction kept, how signs are elected, the seed,
    and the space it acts in (``Space``; ``ops.native`` for all but ``dense``).

    ``tile_bytes``: the tile memory target (default ``TILE_BYTES``); it changes the speed and the
    memory, never the result.
    """

    density: float = 1.0
    majority_sign: MajoritySign = MajoritySign.TOTAL
    seed: int = 0
    space: Space = Space.DENSE
    tile_bytes: int | None = field(default=None, compare=False)


# ------------------------------------------------------------------------------------------ tiling


def grid_rows(inp: int) -> int:
    """Rows per grid block of an (out, inp) update: the most whose block has at most GRID_ENTRIES."""
    return max(1, GRID_ENTRIES // inp)


@dataclass(frozen=True)
class TilePlan:
    """How one module is visited: row tiles of ``tile_rows`` rows, products by grid blocks of
    ``grid_rows``, the merged update held in ``held`` (float64 or float32)."""

    out: int
    inp: int
    inputs: int
    grid_rows: int
    tile_rows: int
    held: torch.dtype

    @property
    def tiles(self) -> int:
        return -(-self.out // self.tile_rows)

    @property
    def tile_bytes(self) -> int:
        """The tile working memory this plan needs (inputs x tile entries x BYTES_PER_ENTRY)."""
        return self.inputs * self.tile_rows * self.inp * BYTES_PER_ENTRY

    def ranges(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.out, self.tile_rows):
            yield r0, min(self.out, r0 + self.tile_rows)


def plan_tiles(
    out: int, inp: int, inputs: int, *, exact_limit: int = 1024, tile_bytes: int | None = None
) -> TilePlan:
    """The tiles for ``inputs`` updates of shape (out, inp) within ``tile_bytes`` (default TILE_BYTES).

    Tiles are whole grid blocks when the target allows one, else as many rows as it allows (at least
    one). The merged update is held in float64 when the module gets the exact SVD (min(out, inp) <=
    ``exact_limit``) and that copy is at most FLOAT64_BYTES, else in float32 (docs/math.md).
    """
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    grid = grid_rows(inp)
    rows = max(1, budget // (BYTES_PER_ENTRY * inputs * inp))
    if rows >= grid:
        rows -= rows % grid
    small = min(out, inp) <= exact_limit and out * inp * 8 <= FLOAT64_BYTES
    return TilePlan(out, inp, inputs, grid, min(rows, out), torch.float64 if small else torch.float32)


Block = Callable[[int, int, torch.Tensor], object]  # block(b0, b1, out): rows [b0, b1) into out


class Updates:
    """The n updates of one module, by rows: from factors (dW_i = Bs_i @ A_i, Bs_i = s_i B_i) or dense.

    Rows [r0, r1) are assembled from grid blocks, each computed whole by one product of fixed shape,
    so an entry has the same value whichever tile asks for it.
    """

    def __init__(self, shape: tuple[int, int], blocks: Sequence[Block]) -> None:
        self.out, self.inp = shape
        self.grid = grid_rows(self.inp)
        self._blocks = list(blocks)

    @classmethod
    def from_factors(cls, Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor]) -> Updates:
        """From float64 factors with the scales already in B: B (out, r_i), A (r_i, in)."""

        def product(B: torch.Tensor, A: torch.Tensor) -> Block:
            return lambda b0, b1, out: torch.mm(B[b0:b1], A, out=out)

        shape = (int(Bs[0].shape[0]), int(As[0].shape[1]))
        return cls(shape, [product(B, A) for B, A in zip(Bs, As, strict=True)])

    @classmethod
    def from_dense(cls, deltas: Sequence[torch.Tensor]) -> Updates:
        """From dense float64 updates, each (out, in)."""

        def part(delta: torch.Tensor) -> Block:
            return lambda b0, b1, out: out.copy_(delta[b0:b1])

        shape = (int(deltas[0].shape[0]), int(deltas[0].shape[1]))
        return cls(shape, [part(d) for d in deltas])

    def __len__(self) -> int:
        return len(self._blocks)

    def rows(self, i: int, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of update i, float64 (into ``out`` if given)."""
        tile = torch.empty((r1 - r0, self.inp), dtype=torch.float64) if out is None else out
        return _by_blocks(self.grid, self.out, r0, r1, self._blocks[i], tile)


def _by_blocks(grid: int, out: int, r0: int, r1: int, block: Block, tile: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) into ``tile``, from the grid blocks that cover them, each computed whole."""
    for b0 in range((r0 // grid) * grid, r1, grid):
        b1 = min(b0 + grid, out)
        lo, hi = max(r0, b0), min(r1, b1)
        if (lo, hi) == (b0, b1):
            block(b0, b1, tile[lo - r0 : hi - r0])
        else:  # a block cut by the tile's edge: computed whole, then sliced
            whole = tile.new_empty((b1 - b0, tile.shape[1]))
            block(b0, b1, whole)
            tile[lo - r0 : hi - r0] = whole[lo - b0 : hi - b0]
    return tile


def block_seed(seed: int, name: str, index: int, block: int) -> int:
    """The 63-bit generator seed of input ``index``'s DARE draws in grid block ``block`` of module
    ``name``: the first 8 bytes of sha256("{seed}:{name}:{index}:{block}"), little-endian, >> 1."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniforms(
    seed: int,
    name: str,
    index: int,
    shape: tuple[int, int],
    r0: int,
    r1: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [r0, r1) of input ``index``'s DARE uniforms (float32) for an update of ``shape``: grid block
    b (rows [b*G, (b+1)*G), G = grid_rows(in)) is ``torch.rand((rows, in), dtype=float32)`` drawn from a
    generator seeded with ``block_seed(seed, name, index, b)``."""
    rows, inp = shape
    grid = grid_rows(inp)

    def block(b0: int, b1: int, dst: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(block_seed(seed, name, index, b0 // grid))
        torch.rand((b1 - b0, inp), generator=generator, dtype=torch.float32, out=dst)

    tile = torch.empty((r1 - r0, inp), dtype=torch.float32) if out is None else out
    return _by_blocks(grid, rows, r0, r1, block, tile)


# ---------------------------------------------------------------------------------------- the trim


@dataclass(frozen=True)
class Cut:
    """What trim keeps of one update: every entry whose magnitude is above ``value``, then the first
    ``ties`` of the ``equal`` entries whose magnitude is ``value``, in flat (row-major) order.

    Keep everything: value -1; keep nothing: value inf (ties 0 in both).
    """

    value: float
    ties: int = 0
    equal: int = 0

    def keep(self, magnitude: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        """The kept mask of a tile of magnitudes that follows ``seen`` entries equal to ``value``
        (tiles visited in row order), and ``seen`` after it."""
        if self.ties == 0:
            return magnitude > self.value, seen
        if self.ties == self.equal:
            return magnitude >= self.value, seen
        equal = magnitude == self.value
        order = torch.cumsum(equal.reshape(-1), 0).reshape(equal.shape) + seen
        return (magnitude > self.value) | (equal & (order <= self.ties)), seen + int(equal.sum())


@dataclass
class _Selection:
    """The radix selection of one update's k-th largest magnitude, on float64 bit patterns (for
    non-negative floats, ordered as the values): the bucket is the entries whose bits >> shift equal
    ``prefix`` (shift 64: all), with ``above`` entries known to be larger. A pass either counts the
    bucket's next 16 bits (``counts``) or, once the bucket is small, copies it whole (``gathered``);
    both are allocated once per pass, so that no small allocation outlives a tile's temporaries."""

    keep: int
    size: int
    above: int = 0
    shift: int = 64
    prefix: int = 0
    counts: torch.Tensor | None = None
    gathered: torch.Tensor | None = None
    filled: int = 0
    cut: Cut | None = None

    def start_pass(self, gather: bool) -> None:
        if gather:
            self.gathered, self.filled = torch.empty(self.size, dtype=torch.int64), 0
        else:
            self.counts = torch.zeros(1 << _RADIX, dtype=torch.int64)

    def add(self, bits: torch.Tensor) -> None:
        """Count (or copy) the entries of a tile's bits that are in the bucket."""
        chosen = bits if self.shift == 64 else bits[(bits >> self.shift) == self.prefix]
        if self.gathered is not None:
            self.gathered[self.filled : self.filled + chosen.numel()] = chosen
            self.filled += chosen.numel()
        elif self.counts is not None:
            digits = (chosen >> (self.shift - _RADIX)) & ((1 << _RADIX) - 1)
            self.counts += torch.bincount(digits, minlength=1 << _RADIX)

    def finish_pass(self) -> None:
        """Resolve the cut from the gathered bucket, or narrow the bucket by one histogram digit."""
        need = self.keep - self.above  # the wanted entry's rank within the bucket, from the top, 1-based
        if self.gathered is not None:
            values = self.gathered.sort(descending=True).values
            threshold = values[need - 1]
            greater, equal = int((values > threshold).sum()), int((values == threshold).sum())
            self.cut, self.gathered = Cut(_as_float(int(threshold)), need - greater, equal), None
            return
        if self.counts is None:
            return
        suffix = self.counts.flip(0).cumsum(0).flip(0)  # suffix[d]: entries with digit >= d
        digit = int(torch.nonzero(suffix >= need).max())
        self.above += int(suffix[digit] - self.counts[digit])
        self.prefix = digit if self.shift == 64 else (self.prefix << _RADIX) | digit
        self.shift -= _RADIX
        self.size, self.counts = int(self.counts[digit]), None
        if self.shift == 0:  # every bit fixed: the bucket holds copies of one value
            self.cut = Cut(_as_float(self.prefix), self.keep - self.above, self.size)


def _as_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64))


def cuts(updates: Updates, density: float, plan: TilePlan) -> list[Cut]:
    """Each update's exact trim (``Cut``), by passes over the tiles: a histogram of 16 more bits of the
    magnitudes per pass, until the bucket holding the threshold is small enough to gather and sort
    (every input's gathered bits together: at most the tile target; a module that small is gathered
    at once, in one pass)."""
    numel = plan.out * plan.inp
    keep = int(density * numel)
    limit = plan.tile_bytes // (8 * plan.inputs)
    if keep >= numel:
        return [Cut(-1.0)] * len(updates)
    if keep == 0:
        return [Cut(float("inf"))] * len(updates)
    selections = [_Selection(keep, numel) for _ in range(len(updates))]
    buffer = torch.empty((plan.tile_rows, plan.inp), dtype=torch.float64)
    while open_ := [(i, s) for i, s in enumerate(selections) if s.cut is None]:
        for _, s in open_:
            s.start_pass(gather=s.size <= limit)
        for r0, r1 in plan.ranges():
            for i, s in open_:
                magnitudes = updates.rows(i, r0, r1, buffer[: r1 - r0]).abs_()
                s.add(magnitudes.view(torch.int64).reshape(-1))
        for _, s in open_:
            s.finish_pass()
    return [s.cut for s in selections if s.cut is not None]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` (float64, any shape) with all but its int(density * numel) largest-magnitude entries
    set to zero; at the threshold, the first in flat order are kept (``Cut``)."""
    flat = delta.reshape(1, -1)
    plan = plan_tiles(1, flat.shape[1], 1)
    (cut,) = cuts(Updates.from_dense([flat]), density, plan)
    return torch.where(cut.keep(delta.abs(), 0)[0], delta, torch.zeros_like(delta))


def drop(delta: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """Each entry kept where ``uniform`` (same shape, in [0, 1)) is below ``density``, divided by it."""
    if density >= 1.0:
        return delta.clone()
    return torch.where(uniform < density, delta / density, torch.zeros_like(delta))


# ------------------------------------------------------------------------------------- the merge


def elect(trimmed: torch.Tensor, how: MajoritySign) -> torch.Tensor:
    """The elected sign (+1 or -1) per entry of the stacked (n, ...) trimmed updates."""
    votes = trimmed.sum(0) if how is MajoritySign.TOTAL else trimmed.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_mean(trimmed: torch.Tensor, weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries w_i t_i whose (unweighted) sign equals ``sign``, 0 where none does."""
    agree = trimmed.sign() == sign
    w = torch.tensor(list(weights), dtype=trimmed.dtype).reshape(-1, *([1] * (trimmed.dim() - 1)))
    total = torch.where(agree, w * trimmed, torch.zeros_like(trimmed)).sum(0)
    return total / agree.sum(0).clamp(min=1)


def weighted_sum(parts: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=parts.dtype).reshape(-1, *([1] * (parts.dim() - 1)))
    return (w * parts).sum(0)


TRIMMING = (Method.TIES, Method.MAGNITUDE_PRUNE)


@dataclass(frozen=True)
class Merge:
    """One module's sparsified merge by ``method``, tile by tile (module docstring)."""

    method: Method
    name: str
    updates: Updates
    weights: Sequence[float]
    sparsity: Sparsity
    plan: TilePlan
    trims: Sequence[Cut] | None  # the cuts of trimming methods

    def tiles(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float64 rows of the merged update), tile by tile in row order."""
        n, density, seen = len(self.updates), self.sparsity.density, [0] * len(self.updates)
        shape = (self.plan.out, self.plan.inp)
        parts = torch.empty((n, self.plan.tile_rows, self.plan.inp), dtype=torch.float64)
        draws = torch.empty((self.plan.tile_rows, self.plan.inp), dtype=torch.float32)
        for r0, r1 in self.plan.ranges():
            part = parts[:, : r1 - r0]
            for i in range(n):
                values = self.updates.rows(i, r0, r1, part[i])
                if self.trims is not None:
                    kept, seen[i] = self.trims[i].keep(values.abs(), seen[i])
                    values.masked_fill_(kept.logical_not_(), 0.0)
                elif density < 1.0:
                    u = uniforms(self.sparsity.seed, self.name, i, shape, r0, r1, draws[: r1 - r0])
                    values.div_(density).masked_fill_(u >= density, 0.0)
            if self.method in (Method.TIES, Method.DARE_TIES):
                yield r0, _disjoint_mean_(part, self.weights, self.sparsity.majority_sign)
            else:
                yield r0, weighted_sum(part, self.weights)


def _disjoint_mean_(parts: torch.Tensor, weights: Sequence[float], how: MajoritySign) -> torch.Tensor:
    """``disjoint_mean(parts, weights, elect(parts, how))`` with fewer temporaries; ``parts`` is reused."""
    sign = elect(parts, how)
    agree = (parts * sign) > 0  # sign(t_i) == sign, zeros excluded
    count = agree.sum(0).clamp_(min=1)
    w = torch.tensor(list(weights), dtype=parts.dtype).reshape(-1, 1, 1)
    return parts.mul_(w).masked_fill_(agree.logical_not_(), 0.0).sum(0).div_(count)


def merge_plan(
    method: Method,
    name: str,
    updates: Updates,
    weights: Sequence[float],
    sparsity: Sparsity,
    *,
    exact_limit: int = 1024,
) -> Merge:
    """The merge of ``updates`` by ``method``, its tiles planned and its trims (if any) selected."""
    plan = plan_tiles(
        updates.out, updates.inp, len(updates), exact_limit=exact_limit, tile_bytes=sparsity.tile_bytes
    )
    trims = cuts(updates, sparsity.density, plan) if method in TRIMMING else None
    return Merge(method, name, updates, list(weights), sparsity, plan, trims)


def merged(merge: Merge) -> Dense:
    """The merged update, held in ``merge.plan.held``, for ``lowrank.best_low_rank``: its exact squared
    norm summed in float64 grid block by grid block, and its exact float64 rows (recomputed tile by
    tile when it is held in float32) for the error."""
    plan = merge.plan
    held = torch.empty((plan.out, plan.inp), dtype=plan.held)
    total = 0.0
    for r0, tile in merge.tiles():
        held[r0 : r0 + tile.shape[0]] = tile  # rounded once to the held dtype
        if plan.held is not torch.float64:
            for b0 in range((r0 // plan.grid_rows) * plan.grid_rows, r0 + tile.shape[0], plan.grid_rows):
                lo, hi = max(r0, b0), min(r0 + tile.shape[0], b0 + plan.grid_rows)
                total += float(tile[lo - r0 : hi - r0].pow(2).sum())
    if plan.held is torch.float64:
        return Dense.of(held)
    return Dense(held, total, merge.tiles)


def sparsified_sum(
    method: Method, name: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], sparsity: Sparsity
) -> torch.Tensor:
    """The dense merged update of one module by ``method`` from dense updates (module docstring).

    ``deltas``: the inputs' effective updates s_i B_i A_i, each (out, in) float64; ``weights``: w_i.
    """
    merge = merge_plan(method, name, Updates.from_dense(deltas), weights, sparsity)
    return torch.cat([tile for _, tile in merge.tiles()])
