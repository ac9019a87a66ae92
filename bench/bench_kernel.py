"""Benchmark: the certified half-precision merge kernel, old against new, and the plain float32 path.

One bfloat16 (or float16) weight plus one r=16 LoRA update, in one process: the previous kernel
(rank-(T+1) bound, two extra full-size addmm passes; frozen below as ``old_kernel``), the
current ``kernels.add_updates`` (per-row bound, midpoint test on float32 bits, row blocks), and
the plain uncertified ``(W.float() + s B A).to(dtype)``. Runs alternate kernel by kernel and the
medians of many runs are printed, with each kernel's ratio to the plain path, so that a shared
machine's noise mostly cancels. Also prints the fraction of elements recomputed in float64, and
checks that old and new give identical tensors.

    python bench/bench_kernel.py [--threads 2] [--repeats 21] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from adapterops.adapter import LoraModule
from adapterops.ops import kernels
from adapterops.ops.kernels import Workspace, math_view
from adapterops.ops.rounding import round_to

SHAPES = [(2048, 5632), (4096, 14336)]


def old_kernel(
    W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]], workspace: Workspace
) -> torch.Tensor:
    """The certified kernel before issue 13 (per-element bound of rank T+1), for comparison."""
    u = 2.0**-24
    sign = 1.0
    device = W.device
    first = terms[0][1]
    X = workspace.get("x", W.shape, torch.float32, device)
    X.copy_(W)
    M = math_view(X, first)
    row_max = torch.maximum(torch.amax(M, dim=1).abs(), torch.amin(M, dim=1).abs())
    left = torch.empty(M.shape[0], len(terms) + 1, dtype=torch.float32, device=device)
    right = torch.ones(len(terms) + 1, M.shape[1], dtype=torch.float32, device=device)
    factors = []
    for t, (weight, module) in enumerate(terms):
        alpha = sign * weight * module.scale
        B = module.B.to(device=device, dtype=torch.float32)
        A = module.A.to(device=device, dtype=torch.float32)
        M.addmm_(B, A, alpha=alpha)
        left[:, t] = torch.linalg.vector_norm(B, dim=1) * ((module.rank + 6) * u * abs(alpha))
        right[t] = torch.linalg.vector_norm(A, dim=0)
        factors.append((alpha, module))
    left[:, -1] = row_max * (4 * u)
    Y = workspace.get("y", W.shape, W.dtype, device)
    Y.copy_(X)
    edge = workspace.get("edge", W.shape, torch.float32, device)
    below = workspace.get("below", W.shape, W.dtype, device)
    above = workspace.get("above", W.shape, W.dtype, device)
    torch.addmm(M, left, right, alpha=-1.0, out=math_view(edge, first))
    below.copy_(edge)
    torch.addmm(M, left, right, alpha=1.0, out=math_view(edge, first))
    above.copy_(edge)
    rows, cols = (math_view(below, first) != math_view(above, first)).nonzero(as_tuple=True)
    if rows.numel():
        exact = math_view(W, first)[rows, cols].double()
        for alpha, module in factors:
            B = module.B.to(device=device, dtype=torch.float64)[rows]
            A = module.A.to(device=device, dtype=torch.float64)[:, cols]
            exact += alpha * (B * A.T).sum(dim=1)
        math_view(Y, first)[rows, cols] = round_to(exact, W.dtype)
    return Y


def plain(W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]], workspace: Workspace) -> torch.Tensor:
    """Uncertified: float32 sum rounded once to W's dtype (wrong on about 1e-3 of elements)."""
    X = workspace.get("x", W.shape, torch.float32, W.device)
    X.copy_(W)
    for weight, module in terms:
        X.addmm_(module.B, module.A, alpha=weight * module.scale)
    Y = workspace.get("y", W.shape, W.dtype, W.device)
    return Y.copy_(X)


def new_kernel(
    W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]], workspace: Workspace
) -> torch.Tensor:
    return kernels.add_updates(W, terms, workspace=workspace)


def fallback_fraction(W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]]) -> float:
    """Fraction of elements the new kernel recomputes in float64 (counted by wrapping round_to)."""
    counted: list[int] = []
    original = kernels.round_to

    def counting(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        counted.append(x.numel())
        return original(x, dtype)

    kernels.round_to = counting  # type: ignore[assignment]
    try:
        kernels.add_updates(W, terms)
    finally:
        kernels.round_to = original  # type: ignore[assignment]
    return sum(counted) / W.numel()


def old_fallback_fraction(W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]]) -> float:
    X = W.float()
    for weight, module in terms:
        X.addmm_(module.B, module.A, alpha=weight * module.scale)
    u = 2.0**-24
    (weight, module) = terms[0]
    alpha = weight * module.scale
    row_max = W.float().abs().amax(dim=1)
    bound = (module.rank + 6) * u * abs(alpha) * torch.outer(
        torch.linalg.vector_norm(module.B, dim=1), torch.linalg.vector_norm(module.A, dim=0)
    ) + 4 * u * row_max[:, None]
    return ((X - bound).to(W.dtype) != (X + bound).to(W.dtype)).float().mean().item()


def timed(fn: Callable[..., torch.Tensor], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{args.threads} threads, {args.dtype}, r={args.rank}, medians of {args.repeats} alternating runs"
    )
    for rows, cols in SHAPES:
        gen = torch.Generator().manual_seed(0)
        W = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
        A = torch.randn(args.rank, cols, generator=gen) / cols**0.5
        B = torch.randn(rows, args.rank, generator=gen) * 0.01
        terms = [(1.0, LoraModule("m", A, B, 2.0))]
        kernel_fns = {"plain": plain, "old": old_kernel, "new": new_kernel}
        spaces = {name: Workspace() for name in kernel_fns}
        if not torch.equal(old_kernel(W, terms, spaces["old"]).clone(), new_kernel(W, terms, spaces["new"])):
            raise SystemExit("old and new kernels disagree")
        times: dict[str, list[float]] = {name: [] for name in kernel_fns}
        for _ in range(args.repeats):
            for name, fn in kernel_fns.items():
                times[name].append(timed(fn, W, terms, spaces[name]))
        ms = {name: statistics.median(values) for name, values in times.items()}
        # ratios of per-round times, then their median: robust to a neighbour's load spikes
        ratio = {
            name: statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))
            for name in ("old", "new")
        }
        print(
            f"{rows}x{cols}: plain {ms['plain']:.1f} ms, old {ms['old']:.1f} ms ({ratio['old']:.2f}x plain), "
            f"new {ms['new']:.1f} ms ({ratio['new']:.2f}x plain); old/new {ms['old'] / ms['new']:.2f}; "
            f"float64 fraction old {old_fallback_fraction(W, terms):.2e}, new {fallback_fraction(W, terms):.2e}"
        )


if __name__ == "__main__":
    main()
