"""Adding adapters into base weights and taking them out again: pure tensor kernels.

All math happens in the checkpoint tensor's *math layout* (rows = outputs, see
``adapterops.adapter``), on a float64 (by default) copy of the stored tensor, and is rounded once to
the stored dtype at the end:

    merge    W' = W + sum_i c_i s_i B_i A_i
    unmerge  W  = W' - sum_i c_i s_i B_i A_i
    DoRA     W' = m / n * (W + s B A),   n = ||W + s B A||_row   (PEFT's merge, per output row)
    DoRA^-1  W  = W' * n / m - s B A     (needs n, which the merge records)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterops.adapter import LoraModule


def math_view(X: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """``X`` (a stored weight) seen as (out, in): transposed or flattened as the module says; shares memory."""
    if module.transposed:
        return X.T
    return X.reshape(X.shape[0], -1)


def add_updates(
    W: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    *,
    sign: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``W + sign * sum_i c_i dW_i``, correctly rounded to W's dtype (as if computed exactly), on the CPU.

    Half-precision weights take the fast path (``_add_updates_rounded``): float32 arithmetic, with
    the few elements float32 cannot round with certainty recomputed in float64. Other dtypes are
    computed in float64 throughout.
    """
    if W.dtype in (torch.bfloat16, torch.float16):
        return _add_updates_rounded(W, terms, sign=sign, device=device)
    X = W.to(device=device, dtype=torch.float64, copy=True)
    for weight, module in terms:
        math_view(X, module).addmm_(
            module.B.to(device=device, dtype=torch.float64),
            module.A.to(device=device, dtype=torch.float64),
            alpha=sign * weight * module.scale,
        )
    return round_to(X, W.dtype).cpu()


def _add_updates_rounded(
    W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]], *, sign: float, device: torch.device | str
) -> torch.Tensor:
    """float32 sum, certified element by element, float64 where the certificate fails.

    For X = W + sum_t a_t B_t A_t computed in float32, each element's error is below
    ``(r_t + 2) u (|a_t| ||B_t[i]|| ||A_t[:, j]|| summed over t + |X_ij|)`` with u = 2^-24
    (Cauchy-Schwarz bounds sum_k |B_ik A_kj|). Rounding X to the half dtype is then certain unless
    X lies within that bound of a rounding boundary; those elements (a fraction of a percent) are
    recomputed exactly enough in float64. The result equals rounding the float64 sum.
    """
    u = 2.0**-24
    first = terms[0][1]
    W = W.to(device)
    X = W.to(dtype=torch.float32, copy=True)
    M = math_view(X, first)
    bound = torch.zeros_like(M)
    factors = []
    for weight, module in terms:
        alpha = sign * weight * module.scale
        B = module.B.to(device=device, dtype=torch.float32)
        A = module.A.to(device=device, dtype=torch.float32)
        M.addmm_(B, A, alpha=alpha)
        row = torch.linalg.vector_norm(B, dim=1)
        col = torch.linalg.vector_norm(A, dim=0)
        bound.addr_(row, col, alpha=(module.rank + 2) * u * abs(alpha))
        factors.append((alpha, module))
    bound.add_(M.abs(), alpha=2 * u)
    Y = X.to(W.dtype)
    Ym = math_view(Y, first)
    gap = _half_gap(Ym.float(), W.dtype)
    doubtful = (M - Ym.float()).abs() + bound >= gap
    if bool(doubtful.any()):
        rows, cols = doubtful.nonzero(as_tuple=True)
        exact = math_view(W, first)[rows, cols].double()
        for alpha, module in factors:
            B = module.B.to(device=device, dtype=torch.float64)[rows]
            A = module.A.to(device=device, dtype=torch.float64)[:, cols]
            exact += alpha * (B * A.T).sum(dim=1)
        Ym[rows, cols] = round_to(exact, W.dtype)
    return Y.cpu()


def _half_gap(Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance from each representable ``Y`` to the nearest rounding boundary of ``dtype``.

    Half the spacing, except at powers of two where the spacing below is half the spacing above.
    """
    bits = MANTISSA_BITS[dtype]
    mantissa, exponent = torch.frexp(Y)
    spacing = torch.ldexp(torch.ones_like(Y), exponent - 1 - bits)
    at_power_of_two = mantissa.abs() == 0.5
    half = torch.where(at_power_of_two, spacing / 4, spacing / 2)
    # below the normal range the spacing is that of the subnormals (frexp of 0 says nothing useful)
    smallest = torch.finfo(dtype).smallest_normal * 2.0**-bits / 2
    return torch.where(Y.abs() < torch.finfo(dtype).smallest_normal, torch.full_like(Y, smallest), half)


def add_bias_updates(
    bias: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    *,
    sign: float = 1.0,
    compute: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``bias + sign * sum_i c_i s_i lora_B.bias_i``, rounded once."""
    total = bias.to(compute).clone()
    for weight, module in terms:
        if module.bias is not None:
            total += sign * weight * module.scale * module.bias.to(compute)
    return round_to(total, bias.dtype)


def dora_merge(
    W: torch.Tensor,
    module: LoraModule,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's DoRA merge: returns (W' in W's dtype, the row norms n in ``compute``, on the CPU)."""
    if module.magnitude is None:
        raise ValueError(f"module {module.name} is not a DoRA module")
    X = W.to(device=device, dtype=compute, copy=True)
    M = math_view(X, module)
    M.addmm_(
        module.B.to(device=device, dtype=compute),
        module.A.to(device=device, dtype=compute),
        alpha=module.scale,
    )
    norm = torch.linalg.vector_norm(M, dim=1)
    M.mul_((module.magnitude.to(device=device, dtype=compute) / norm)[:, None])
    return round_to(X, W.dtype).cpu(), norm.cpu()


def dora_unmerge(
    W: torch.Tensor,
    module: LoraModule,
    norm: torch.Tensor,
    *,
    compute: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Inverse of ``dora_merge`` given the row norms it returned."""
    if module.magnitude is None:
        raise ValueError(f"module {module.name} is not a DoRA module")
    X = W.to(device=device, dtype=compute, copy=True)
    M = math_view(X, module)
    M.mul_(
        (norm.to(device=device, dtype=compute) / module.magnitude.to(device=device, dtype=compute))[:, None]
    )
    M.addmm_(
        module.B.to(device=device, dtype=compute),
        module.A.to(device=device, dtype=compute),
        alpha=-module.scale,
    )
    return round_to(X, W.dtype).cpu()


MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``x`` rounded once, to nearest (ties to even), to ``dtype``.

    torch casts float64 to bfloat16/float16 through float32, which rounds twice: a value just
    off a half-precision midpoint lands on it in float32 and then goes to the even neighbour,
    not the nearest. Here such values are settled by which side of the midpoint ``x`` lies on.
    """
    if x.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    x32 = x.to(torch.float32)
    up = torch.nextafter(x32, torch.tensor(float("inf"), device=x.device)).to(dtype)
    down = torch.nextafter(x32, torch.tensor(float("-inf"), device=x.device)).to(dtype)
    residual = x - x32.double()
    at_midpoint = up != down  # x32 is exactly halfway between two values of dtype
    rounded = x32.to(dtype)
    rounded = torch.where(at_midpoint & (residual > 0), up, rounded)
    return torch.where(at_midpoint & (residual < 0), down, rounded)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``x`` (float64), subnormals included."""
    bits = MANTISSA_BITS[dtype]
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double().abs())
    # frexp: |x| = f * 2**e with f in [0.5, 1), so the spacing is 2**(e - 1 - bits)
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - bits)
    return torch.clamp(spacing, min=info.smallest_normal * 2.0**-bits)
