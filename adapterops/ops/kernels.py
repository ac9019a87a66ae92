"""The merge kernels: adapters added into stored weights, correctly rounded. Pure tensor functions.

All math happens in the checkpoint tensor's *math layout* (rows = outputs, see
``adapterops.adapter``) and is rounded once to the stored dtype at the end:

    merge    W' = W + sum_i c_i s_i B_i A_i
    unmerge  W  = W' - sum_i c_i s_i B_i A_i

DoRA's merge rescales whole rows and lives with the rest of DoRA's math in ``ops.dora``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapterops.adapter import LoraModule
from adapterops.ops.rounding import round_to


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
