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


class Workspace:
    """Scratch buffers reused from tensor to tensor: fresh allocations cost a page fault per page,
    which on a CPU takes longer than the arithmetic itself."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        key = (name, dtype, str(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(tuple(shape))


def add_updates(
    W: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    *,
    sign: float = 1.0,
    device: torch.device | str = "cpu",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``W + sign * sum_i c_i dW_i``, correctly rounded to W's dtype (as if computed exactly), on the CPU.

    Half-precision weights take the fast path (``_add_updates_rounded``): float32 arithmetic, with
    the few elements float32 cannot round with certainty recomputed in float64. Other dtypes are
    computed in float64 throughout.
    """
    if W.dtype in (torch.bfloat16, torch.float16):
        return _add_updates_rounded(W, terms, sign, torch.device(device), workspace or Workspace())
    X = W.to(device=device, dtype=torch.float64, copy=True)
    for weight, module in terms:
        math_view(X, module).addmm_(
            module.B.to(device=device, dtype=torch.float64),
            module.A.to(device=device, dtype=torch.float64),
            alpha=sign * weight * module.scale,
        )
    return round_to(X, W.dtype).cpu()


def _add_updates_rounded(
    W: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    sign: float,
    device: torch.device,
    workspace: Workspace,
) -> torch.Tensor:
    """float32 sum, certified element by element, float64 where the certificate fails.

    Computed in float32, X = W + sum_t a_t B_t A_t has an error below

        b_ij = sum_t (r_t + 6) u |a_t| ||B_t[i]|| ||A_t[:, j]||  +  4 u max_j |W_ij|,   u = 2^-24

    (Cauchy-Schwarz bounds sum_k |B_ik A_kj|; the last term covers the additions, since |X_ij| is
    at most max_j |W_ij| plus the update). b has rank (terms + 1), so X - b and X + b cost one
    addmm each. Where both round to the same half-precision value, so does the exact sum, and that
    value is the answer; elsewhere (a fraction of a percent of elements) it is recomputed in
    float64. The result equals rounding the exact sum once.
    """
    u = 2.0**-24
    first = terms[0][1]
    W = W.to(device, non_blocking=True)
    X = workspace.get("x", W.shape, torch.float32, device)
    X.copy_(W)
    M = math_view(X, first)
    # max_j |W_ij|, before the update (amax and amin are vectorized; aminmax and inf-norms are not)
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

    Y = workspace.get("y", W.shape, W.dtype, device)  # valid until the next call with this workspace
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
    return Y.cpu()


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
    # x32 is exactly halfway between two adjacent values of dtype (both exact in float64)
    at_midpoint = (up != down) & ((up.double() + down.double()) / 2 == x32.double())
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
