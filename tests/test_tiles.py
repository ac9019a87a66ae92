"""Sparsifying merges by row tiles (docs/math.md, "Tiles and memory"): the same result whatever the
tile size, exact trims with ties at the threshold, DARE's documented masks, the error measured against
the float64 merged update when it is held in float32, and bounded memory on a module far too large to
stack. References: tests/support/sparsified.py (numpy, float64, from the papers' formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapterops.adapter import LoraModule
from adapterops.ops import combine, sparsify
from adapterops.ops.combine import combine_module
from adapterops.ops.lowrank import RankPolicy
from adapterops.ops.sparsify import (
    BYTES_PER_ENTRY,
    TILE_BYTES,
    Cut,
    Sparsity,
    Updates,
    cuts,
    merge_plan,
    merged,
    plan_tiles,
)
from adapterops.options import MajoritySign, Method
from tests.support import sparsified as reference

SPARSIFYING = [Method.TIES, Method.MAGNITUDE_PRUNE, Method.DARE_TIES, Method.DARE_LINEAR]
WEIGHTS = [1.0, 0.5, -0.7]


def terms(
    out: int, inp: int, seed: int, *, ranks: tuple[int, ...] = (3, 2, 4)
) -> list[tuple[float, LoraModule]]:
    """Three inputs whose factors are multiples of 1/2: their updates have many equal magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    made = []
    for w, r in zip(WEIGHTS, ranks, strict=True):
        B = torch.randint(-3, 4, (out, r), generator=gen).double() / 2
        A = torch.randint(-3, 4, (r, inp), generator=gen).double() / 2
        made.append((w, LoraModule("layers.0.mlp.up_proj", A.float(), B.float(), 0.5)))
    return made


def deltas(made: list[tuple[float, LoraModule]]) -> list[np.ndarray]:
    return [(m.scale * (m.B.double() @ m.A.double())).numpy() for _, m in made]


def tile_targets(inp: int, rows: tuple[int, ...] = (1, 5, 16)) -> list[int | None]:
    """None (one tile for these sizes), then targets for tiles of ``rows`` rows (1 is the least)."""
    return [None, *(1 if r == 1 else r * BYTES_PER_ENTRY * 3 * inp for r in rows)]


# ----------------------------------------------------------------------------- tiles change nothing


@pytest.mark.parametrize("method", SPARSIFYING)
@pytest.mark.parametrize(("out", "inp"), [(37, 45), (40, 2200)])
def test_tiles_change_nothing(method: Method, out: int, inp: int) -> None:
    """Factors and reports are bit for bit the same for any tile size: one tile, single rows, tiles
    that cut grid blocks (2200 columns: blocks of 29 rows) and whole blocks; ties at every threshold."""
    made = terms(out, inp, seed=1)
    rows = (1, 5, 16) if inp < 1000 else (5, 16, 29)  # 29: whole blocks
    results = []
    for target in tile_targets(inp, rows):
        sparsity = Sparsity(0.37, MajoritySign.FREQUENCY, seed=3, tile_bytes=target)
        plan = plan_tiles(out, inp, 3, tile_bytes=target)
        results.append((plan.tile_rows, *combine_module(made, method, RankPolicy(rank=6), sparsity)))
    assert [r for r, _, _ in results] == [out, *rows]
    if method in (Method.TIES, Method.MAGNITUDE_PRUNE):  # some input keeps only part of its ties
        updates = Updates.from_factors(
            [m.scale * m.B.double() for _, m in made], [m.A.double() for _, m in made]
        )
        trims = merge_plan(method, "m", updates, WEIGHTS, Sparsity(0.37)).trims
        assert trims is not None and any(0 < c.ties < c.equal for c in trims)
    for _, module, report in results[1:]:
        assert torch.equal(module.A, results[0][1].A) and torch.equal(module.B, results[0][1].B)
        assert report == results[0][2]


@pytest.mark.parametrize("method", SPARSIFYING)
def test_the_merged_update_matches_the_reference_in_tiles(method: Method) -> None:
    """The held merged update (float64 for this size) against the numpy reference, single-row tiles:
    trims with ties in flat order, DARE's masks by the documented grid-block generators."""
    made = terms(29, 31, seed=2)
    updates = Updates.from_factors([m.scale * m.B.double() for _, m in made], [m.A.double() for _, m in made])
    sparsity = Sparsity(0.4, seed=7, tile_bytes=1)
    merge = merge_plan(method, "layers.0.mlp.up_proj", updates, WEIGHTS, sparsity)
    assert merge.plan.tiles == 29 and merge.plan.held is torch.float64
    want = reference.merge(method.value, "layers.0.mlp.up_proj", deltas(made), WEIGHTS, 0.4, seed=7)
    np.testing.assert_allclose(merged(merge).held.numpy(), want, rtol=1e-14, atol=1e-14)


def test_dare_masks_do_not_depend_on_the_tile_size() -> None:
    """dare_linear at weights 1, 0, 0 keeps input 0's dropped update: its zeros are the mask, which is
    the same for every tile target and is the documented one."""
    made = terms(50, 2000, seed=3)  # grid blocks of 32 rows: two per module
    updates = Updates.from_factors([m.scale * m.B.double() for _, m in made], [m.A.double() for _, m in made])
    masks = []
    for target in tile_targets(2000):
        merge = merge_plan(
            Method.DARE_LINEAR, "q", updates, [1.0, 0.0, 0.0], Sparsity(0.3, seed=11, tile_bytes=target)
        )
        masks.append(merged(merge).held != 0)
    dense = torch.from_numpy(deltas(made)[0])
    documented = torch.from_numpy(reference.dare_mask(11, "q", 0, (50, 2000), 0.3)) & (dense != 0)
    assert all(torch.equal(mask, documented) for mask in masks)
    assert abs(float(documented.double().mean()) / float((dense != 0).double().mean()) - 0.3) < 0.01


# ------------------------------------------------------------------------------------------ the trim


def test_trim_cut_through_every_radix_pass() -> None:
    """All magnitudes equal: no histogram digit separates them, so the selection narrows the bucket
    through all four 16-bit passes and keeps the first k in flat order (``Cut`` with ties)."""
    signs = torch.where(torch.rand(20, 30, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    updates = Updates.from_dense([signs.double()])
    plan = plan_tiles(20, 30, 1, tile_bytes=1)
    (cut,) = cuts(updates, 0.3, plan)
    assert cut == Cut(1.0, ties=180, equal=600)
    kept = torch.cat([cut.keep(updates.rows(0, r0, r1).abs(), r0 * 30)[0] for r0, r1 in plan.ranges()])
    assert int(kept.sum()) == 180 and bool(kept.reshape(-1)[:180].all())


@pytest.mark.parametrize("target", [None, 1, 7 * BYTES_PER_ENTRY * 64])
def test_trim_keeps_exactly_k_by_magnitude_then_flat_order(target: int | None) -> None:
    """Against the reference's stable order (magnitude down, flat index up) on updates with many ties."""
    made = terms(48, 64, seed=4)
    updates = Updates.from_factors([m.scale * m.B.double() for _, m in made], [m.A.double() for _, m in made])
    plan = plan_tiles(48, 64, 3, tile_bytes=target)
    for density in (0.05, 0.5, 0.93):
        for i, (cut, delta) in enumerate(zip(cuts(updates, density, plan), deltas(made), strict=True)):
            seen, kept = 0, []
            for r0, r1 in plan.ranges():
                mask, seen = cut.keep(updates.rows(i, r0, r1).abs(), seen)
                kept.append(mask)
            np.testing.assert_array_equal(torch.cat(kept).numpy(), reference.kept(delta, density))


def test_trim_keeps_all_or_nothing_at_the_ends() -> None:
    updates = Updates.from_dense([torch.ones(3, 4, dtype=torch.float64)])
    plan = plan_tiles(3, 4, 1)
    assert cuts(updates, 1.0, plan) == [Cut(-1.0)]  # keep everything
    assert cuts(updates, 0.05, plan) == [Cut(float("inf"))]  # int(0.05 * 12) = 0: nothing


# ------------------------------------------------------------------------- float32-held modules


@pytest.mark.parametrize("method", [Method.TIES, Method.DARE_TIES])
def test_error_is_exact_against_the_float64_update_when_held_in_float32(method: Method) -> None:
    """Above --exact-limit the merged update is held in float32 and factored by the randomized SVD; the
    reported error is still ||M - B A|| / ||M|| for the float64 M (here from the reference), to 1e-12,
    and tiles change neither the factors nor, beyond rounding, the report."""
    made = terms(40, 48, seed=5)
    want = reference.merge(method.value, "layers.0.mlp.up_proj", deltas(made), WEIGHTS, 0.5)
    results = []
    for target in (None, 1, 3 * BYTES_PER_ENTRY * 3 * 48):
        plan = plan_tiles(40, 48, 3, exact_limit=8, tile_bytes=target)
        assert plan.held is torch.float32
        sparsity = Sparsity(0.5, tile_bytes=target)
        results.append(combine_module(made, method, RankPolicy(rank=5), sparsity, exact_limit=8))
    module, report = results[0]
    assert report.solver.value == "randomized" and report.rank_out == 5
    got = (module.B.double() @ module.A.double()).numpy()
    # the factors are stored in float32: measure the error of what was computed, in float64
    exact = np.linalg.norm(want - got) / np.linalg.norm(want)
    assert report.rel_error == pytest.approx(exact, rel=1e-6)  # float32 storage of the factors
    for other, other_report in results[1:]:
        assert torch.equal(other.A, module.A) and torch.equal(other.B, module.B)
        assert other_report.rel_error == pytest.approx(report.rel_error, rel=1e-12)


# ----------------------------------------------------------------------------------- bounded memory


@pytest.mark.slow
def test_a_module_too_large_to_stack_runs_in_bounded_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """8192 x 8192, rank 8, three inputs: stacked in float64 they would take 1.6 GB. The plan holds the
    merged update in float32 (268 MB) and asks for tiles of at most ``tile_rows`` rows within the
    64 MiB target; every row range the merge computes is checked against it. The selection's cuts are
    checked by counting, and two rows of the held update against the papers' formula."""
    n, size, density = 3, 8192, 0.2
    gen = torch.Generator().manual_seed(6)
    made = [
        (
            1.0,
            LoraModule(
                "big",
                torch.randn(8, size, generator=gen) / size**0.5,
                torch.randn(size, 8, generator=gen),
                2.0,
            ),
        )
        for _ in range(n)
    ]
    plan = plan_tiles(size, size, n)
    assert plan.held is torch.float32 and plan.tile_bytes <= TILE_BYTES
    assert plan.tile_rows % plan.grid_rows == 0 and n * plan.tile_rows < size / 50
    asked: list[int] = []
    seen: dict[str, object] = {}
    rows, select, hold = Updates.rows, sparsify.cuts, sparsify.merged

    def counted(self: Updates, i: int, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        asked.append(r1 - r0)
        return rows(self, i, r0, r1, out)

    monkeypatch.setattr(Updates, "rows", counted)
    monkeypatch.setattr(sparsify, "cuts", lambda *a: seen.setdefault("cuts", select(*a)))
    monkeypatch.setattr(combine, "merged", lambda m: seen.setdefault("held", hold(m)))
    module, report = combine_module(made, Method.TIES, RankPolicy(rank=8), Sparsity(density))
    # selection (at least two passes here), merge and error passes, each tile by tile
    assert max(asked) == plan.tile_rows and len(asked) >= 4 * n * plan.tiles
    assert report.solver.value == "randomized" and report.rank_out == 8 and 0 < report.rel_error < 1
    assert module.A.shape == (8, size) and module.A.dtype == torch.float32
    found = seen["cuts"]
    assert isinstance(found, list)
    keep, grid = int(density * size * size), plan.grid_rows
    Bs = [m.scale * m.B.double() for _, m in made]
    for cut, B, (_, m) in zip(found, Bs, made, strict=True):
        above = equal = 0
        for b0 in range(0, size, grid):  # the same products, counted independently of the selection
            block = (B[b0 : b0 + grid] @ m.A.double()).abs_()
            above, equal = above + int((block > cut.value).sum()), equal + int((block == cut.value).sum())
        assert above < keep <= above + equal and (cut.ties, cut.equal) == (keep - above, equal)
    held = seen["held"].held  # type: ignore[attr-defined]
    for row in (0, 5000):
        ds = [(B[row] @ m.A.double()).numpy() for B, (_, m) in zip(Bs, made, strict=True)]
        parts = np.stack([np.where(np.abs(d) >= c.value, d, 0.0) for d, c in zip(ds, found, strict=True)])
        gamma = np.where(parts.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(parts) == gamma
        want = np.where(agree, parts, 0.0).sum(0) / np.maximum(agree.sum(0), 1)
        np.testing.assert_allclose(held[row].double().numpy(), want, rtol=2**-24, atol=0)
