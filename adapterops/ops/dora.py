"""DoRA math on one module at a time, given its base weight W (math layout (out, in)). Pure.

    V = W + s B A,   n = ||V||_row,   W' = m / n * V                       (PEFT's merge)
    dW_eff = W' - W = (m/n - 1) * W + (m/n) * s B A                       (row scaling)

LoRA -> DoRA is exact: m = n keeps W' = V. DoRA -> LoRA is not: dW_eff is full rank in general,
so the best rank-k approximation is taken (``sum_as_lora``), and its error is reported. Any
weighted sum of DoRA and LoRA updates is exactly a DoRA module (``sum_as_dora``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adapterops.adapter import LoraModule, ModuleReport
from adapterops.errors import InvalidInputError, UnsupportedAdapterError, param
from adapterops.ops.combine import Terms, bias_sum, combine_module, low_rank_report
from adapterops.ops.kernels import math_view
from adapterops.ops.lowrank import Operator, RankPolicy, best_low_rank
from adapterops.ops.rounding import round_to
from adapterops.options import Method


def _augment_(V: torch.Tensor, module: LoraModule, sign: float = 1.0) -> torch.Tensor:
    """V += sign * s B A in place, in V's dtype and device; V is (out, in)."""
    return V.addmm_(
        module.B.to(device=V.device, dtype=V.dtype),
        module.A.to(device=V.device, dtype=V.dtype),
        alpha=sign * module.scale,
    )


def augmented(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """V = W + s B A as a new float64 (out, in) matrix (W in math layout)."""
    return _augment_(W.to(torch.float64, copy=True), module)


def row_norms(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """n = ||W + s B A|| per output row, float64."""
    return torch.linalg.vector_norm(augmented(W, module), dim=1)


def effective_delta(W: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """dW_eff = W' - W for a DoRA module, or s B A for a LoRA module; dense float64 (out, in)."""
    V = augmented(W, module)
    if module.magnitude is not None:
        V.mul_((module.magnitude.double() / torch.linalg.vector_norm(V, dim=1))[:, None])
    return V.sub_(W)


def dora_merge(
    W: torch.Tensor,
    module: LoraModule,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's DoRA merge of a stored weight: (W' in W's dtype, the row norms n in ``compute``, on the CPU)."""
    magnitude = _magnitude(module)
    X = W.to(device=device, dtype=compute, copy=True)
    M = _augment_(math_view(X, module), module)
    norm = torch.linalg.vector_norm(M, dim=1)
    M.mul_((magnitude.to(device=device, dtype=compute) / norm)[:, None])
    return round_to(X, W.dtype).cpu(), norm.cpu()


def dora_unmerge(
    W: torch.Tensor,
    module: LoraModule,
    norm: torch.Tensor,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Inverse of ``dora_merge`` given the row norms it returned: W = W' * n / m - s B A."""
    magnitude = _magnitude(module)
    X = W.to(device=device, dtype=compute, copy=True)
    M = math_view(X, module)
    M.mul_((norm.to(device=device, dtype=compute) / magnitude.to(device=device, dtype=compute))[:, None])
    _augment_(M, module, sign=-1.0)
    return round_to(X, W.dtype).cpu()


def _magnitude(module: LoraModule) -> torch.Tensor:
    if module.magnitude is None:
        raise InvalidInputError(f"module {module.name} is not a DoRA module (no lora_magnitude_vector)")
    return module.magnitude


def sum_as_lora(
    W: torch.Tensor, terms: Terms, policy: RankPolicy, *, exact_limit: int = 1024
) -> tuple[LoraModule, ModuleReport]:
    """sum_i w_i dW_eff_i (DoRA or LoRA terms) as a LoRA module: its best low-rank form.

    W is the module's float64 base weight in math layout; the terms' layouts must match it. With no
    rule in ``policy`` the rank is the sum of the input ranks (at most the rank of the sum). The report
    holds the exact relative error and the solver.

    At most ``exact_limit`` on the smaller side, the sum is formed densely in float64 and factored by a
    full SVD. Above it, it is never formed: it is diag(g) W + B' A' (``effective_operator``), and the
    randomized solver multiplies by that in float32, its Rayleigh-Ritz step and the error in float64
    against exact row tiles.
    """
    first = terms[0][1]
    rank_in = sum(m.rank for _, m in terms)
    if min(W.shape) <= exact_limit:
        total = torch.zeros_like(W)
        for w, m in terms:
            total.add_(effective_delta(W, m), alpha=w)
        low = best_low_rank(total, policy, exact_limit=exact_limit, default=rank_in)
    else:
        low = best_low_rank(effective_operator(W, terms), policy, exact_limit=exact_limit, default=rank_in)
    dtype = first.A.dtype
    bias = bias_sum(terms, torch.float64)
    module = replace(
        first,
        A=low.A.to(dtype),
        B=low.B.to(dtype),
        scale=1.0,
        bias=None if bias is None else bias.to(dtype),
        magnitude=None,
    )
    return module, low_rank_report(first.name, rank_in, low)


TILE_ELEMENTS = 1 << 17  # a float64 row tile of 1 MiB stays in cache while it is worked on


def effective_operator(W: torch.Tensor, terms: Terms) -> Operator:
    """sum_i w_i dW_eff_i (W float64 (out, in)) as an ``Operator``, never formed: with d_i = m_i / n_i
    for a DoRA term (1 for a LoRA term),

        M = sum_i w_i dW_eff_i = diag(g) W + [e_i B_i] @ [A_i],   g = sum_DoRA w_i (d_i - 1),
                                                                  e_i = w_i d_i s_i

    so a product costs one thin GEMM with W (float32 for the range finder, float64 for ``left``) and
    a few with the factors. The row norms n_i and ||M||_F^2 come from one pass over float64 row tiles
    computed as ``effective_delta`` does, w_i (d_i V_i - W) with V_i = W + s_i B_i A_i.
    """
    out, inp = W.shape
    step = max(1, TILE_ELEMENTS // max(inp, 1))
    parts = [
        (
            w,
            m.B.to(torch.float64),
            m.A.to(torch.float64),
            m.scale,
            None if m.magnitude is None else m.magnitude.to(torch.float64),
        )
        for w, m in terms
    ]
    ratios = [torch.ones(out, dtype=torch.float64) for _ in parts]  # d_i, found by the first tile pass

    def tile(r0: int, r1: int, norms: bool = False) -> torch.Tensor:
        rows = W[r0:r1]
        delta = None
        for (w, B, A, s, magnitude), d in zip(parts, ratios, strict=True):
            if magnitude is None:
                term = torch.mm(B[r0:r1], A).mul_(w * s)
            else:
                term = torch.addmm(rows, B[r0:r1], A, alpha=s)
                if norms:
                    d[r0:r1] = magnitude[r0:r1] / torch.linalg.vector_norm(term, dim=1)
                term.mul_(d[r0:r1, None]).sub_(rows)
                if w != 1.0:
                    term.mul_(w)
            delta = term if delta is None else delta.add_(term)
        assert delta is not None  # terms is never empty
        return delta

    # one pass over W: the row norms, ||M||^2 and the float32 copy of W, tile by tile
    W32 = torch.empty(out, inp, dtype=torch.float32)
    total = 0.0
    for r0 in range(0, out, step):
        r1 = min(r0 + step, out)
        W32[r0:r1] = W[r0:r1]
        total += float(torch.linalg.vector_norm(tile(r0, r1, norms=True))) ** 2  # no temporary
    g = torch.zeros(out, dtype=torch.float64)
    for (w, _, _, _, magnitude), d in zip(parts, ratios, strict=True):
        if magnitude is not None:
            g += w * (d - 1)
    B64 = torch.cat([(w * s) * d[:, None] * B for (w, B, _, s, _), d in zip(parts, ratios, strict=True)], 1)
    A64 = torch.cat([A for _, _, A, _, _ in parts])
    g32, B32, A32 = g[:, None].float(), B64.float(), A64.float()

    def times(X: torch.Tensor) -> torch.Tensor:
        return (W32 @ X).mul_(g32).addmm_(B32, A32 @ X)

    def times_t(Y: torch.Tensor) -> torch.Tensor:
        # (Y^T M)^T: a row-major W takes the product from the left faster than W^T from the right
        return torch.addmm((B32.T @ Y).T @ A32, (g32 * Y).T, W32).T

    def left(B: torch.Tensor) -> torch.Tensor:
        return torch.addmm((B.T @ B64) @ A64, (g[:, None] * B).T, W)

    def dense() -> torch.Tensor:
        return torch.cat([tile(r0, min(r0 + step, out)) for r0 in range(0, out, step)])

    return Operator((out, inp), total, times, times_t, left, dense)


def sum_as_dora(W: torch.Tensor, terms: Terms) -> tuple[LoraModule, ModuleReport]:
    """sum_i w_i dW_eff_i as a DoRA module, exactly (any mix of DoRA and LoRA terms).

    With d_i = m_i / n_i for a DoRA term and d_i = 1 for a LoRA term (row vectors),

        W + sum_i w_i dW_eff_i = g * (W + L),   g = 1 + sum_i w_i (d_i - 1),
                                               L = sum_i (w_i d_i s_i / g) B_i A_i

    so the result has factors [w_i d_i s_i / g * B_i] and [A_i] (rank sum r_i, re-factored to its
    numerical rank) and magnitude m = g * ||W + L||_row. Refused where some row has g = 0 (that row
    of the result is W-free, which no DoRA row can express).
    """
    first = terms[0][1]
    name = first.name
    if any(m.bias is not None for _, m in terms):
        raise UnsupportedAdapterError(f"module {name}: lora_bias with DoRA output is not supported")
    ratios = [
        m.magnitude.double() / row_norms(W, m) if m.magnitude is not None else torch.ones(W.shape[0]).double()
        for _, m in terms
    ]
    g = torch.ones(W.shape[0], dtype=W.dtype)
    for (w, _), d in zip(terms, ratios, strict=True):
        g += w * (d - 1)
    if bool((g.abs() < 1e-6).any()):
        row = int(torch.nonzero(g.abs() < 1e-6)[0])
        raise InvalidInputError(
            f"module {name}, row {row}: the weights cancel the base weight there (g = 0), which no DoRA "
            f"module can express; use the default LoRA output ({param('form', 'lora')})"
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
        for (w, m), d in zip(terms, ratios, strict=True)
    ]
    module, report = combine_module(scaled, Method.EXACT, RankPolicy())
    dtype = first.A.dtype
    magnitude = g * row_norms(W, module)
    module = replace(
        module, A=module.A.to(dtype), B=module.B.to(dtype), magnitude=magnitude.to(dtype), bias=None
    )
    return module, report
