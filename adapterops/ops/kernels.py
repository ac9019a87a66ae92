"""The merge kernels: adapters added into stored weights, correctly rounded. Pure tensor functions.

All math happens in the checkpoint tensor's *math layout* (rows = outputs, see
``adapterops.adapter``) and is rounded once to the stored dtype at the end:

    merge    W' = W + sum_i c_i s_i B_i A_i
    unmerge  W  = W' - sum_i c_i s_i B_i A_i

DoRA's merge rescales whole rows and lives with the rest of DoRA's math in ``ops.dora``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from adapterops.adapter import LoraModule
from adapterops.ops.rounding import midpoint_distance, midpoint_gap, round_to


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
    if W.dtype in (torch.bfloat16, torch.float16) and terms:
        return _add_updates_rounded(W, terms, sign, torch.device(device), workspace or Workspace())
    return _add_updates_float64(W, terms, sign, torch.device(device))


# elements per row block and CPU thread: the block's float32 buffers stay in L2 between passes
_BLOCK = 1 << 18
# the CPU looks for uncertain elements group by group: one max per _GROUP elements, vectorized
_GROUP = 64
# certified only while every error coefficient n satisfies n * 2**-24 <= 2**-12 (see below)
_MAX_COEFFICIENT = 1 << 12


def _add_updates_rounded(
    W: torch.Tensor,
    terms: Sequence[tuple[float, LoraModule]],
    sign: float,
    device: torch.device,
    workspace: Workspace,
) -> torch.Tensor:
    """float32 sum, certified by a per-row error bound, float64 where the certificate fails.

    Works on W's storage rows (``W.reshape(rows, -1)``), each term as ``alpha_t L_t R_t`` with
    (L, R) = (B, A), or (A.T, B.T) for a transposed module; in row blocks of about ``_BLOCK``
    elements on the CPU (so the elementwise passes hit cache), one block elsewhere. Per block:

        U = sum_t alpha_t L_t R_t   (float32 addmm),   X = fl32(W + U),   Y = X rounded once

    and ``d = midpoint_gap(X)``, X's distance to the rounding midpoint of its half-precision
    cell. With S the exact sum, |X - S| <= beta_k on storage row k (``_row_bounds``), and where
    d > 2 beta_k no midpoint lies within beta_k of X (the nearest is at least d / 2 away), so S
    rounds to the value X rounds to: Y is the answer. On the CPU the other elements (a few per
    thousand; all of a row holding Inf or NaN) get a second, elementwise test
    (``_still_uncertain``); those that fail it are recomputed from the factors in float64 and
    rounded once. Off the CPU all of them are recomputed, and the tensor costs one device sync
    (a single ``nonzero``).
    """
    if W.numel() == 0 or not _certifiable(terms, sign, device):
        return _add_updates_float64(W, terms, sign, device)
    W2 = W.to(device, non_blocking=True).reshape(W.shape[0], -1)
    rows, cols = W2.shape
    factors = _factors(terms, sign, device)
    norms = _norms(factors)
    bound = _row_bounds(factors, norms)
    Y = workspace.get("y", W.shape, W.dtype, device)  # valid until the next call with this workspace
    Y2 = Y.view(rows, cols)
    on_cpu = _blockwise(device)
    # each thread's share of a block stays in its core's cache; fewer, larger ops with more threads
    step = max(1, _BLOCK * torch.get_num_threads() // cols) if on_cpu else rows
    size = min(step, rows) * cols
    U_all = workspace.get("u", (size,), torch.float32, device)
    X_all = workspace.get("x", (size,), torch.float32, device)
    gap_all = workspace.get("gap", (size,), torch.float32, device)
    # thr = 2 (beta + u max|X|), float32's roundings always upwards: see ``_row_bounds``
    u_x, widen = 2.0**-24 * (1 + 2.0**-18), 2 * (1 + 2.0**-18)
    group = math.gcd(cols, _GROUP if W.dtype == torch.bfloat16 else _GROUP // 8)
    uncertain: list[torch.Tensor] = []  # flat indices, and the values of X there
    values: list[torch.Tensor] = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        n = (r1 - r0) * cols
        U, X, gap = U_all[:n].view(-1, cols), X_all[:n].view(-1, cols), gap_all[:n].view(-1, cols)
        for t, (alpha, L, R, *_) in enumerate(factors):
            torch.addmm(U, L[r0:r1], R, beta=0 if t == 0 else 1, alpha=alpha, out=U)
        X.copy_(W2[r0:r1]).add_(U)
        Y2[r0:r1].copy_(X)
        x_max = torch.maximum(torch.amax(X, dim=1).abs(), torch.amin(X, dim=1).abs())
        thr = torch.add(bound[r0:r1], x_max, alpha=u_x).mul_(widen)
        midpoint_gap(X, W.dtype, out=gap.view(torch.int32))
        if W.dtype == torch.float16:  # float16's cells are float32 bit fields only from 2**-14 up:
            # below, a gap of (|X| - 2**-14) 2**20 < 0 flags it; above it exceeds the true gap
            torch.minimum(gap, torch.abs(X, out=U).sub_(2.0**-14).mul_(2.0**20), out=gap)
        # certain where gap > thr; a NaN gap or thr (Inf or NaN in the row) is uncertain
        if on_cpu:  # the smallest gap of each group first: one vectorized pass, few groups to open
            groups = gap.view(-1, group)
            smallest = groups.amin(dim=1).view(r1 - r0, -1)
            hits = torch.nonzero(~(smallest > thr[:, None]).view(-1)).view(-1)
            if not hits.numel():
                continue
            opened = groups.index_select(0, hits)
            limit = thr.index_select(0, hits // (cols // group))
            inside = torch.nonzero(~(opened > limit[:, None]).view(-1)).view(-1)
            found = hits.index_select(0, inside // group) * group + inside % group
        else:
            found = torch.nonzero(~(gap > thr[:, None]).view(-1)).view(-1)
        uncertain.append(found + r0 * cols)
        if on_cpu:
            values.append(X.view(-1).index_select(0, found))
    if uncertain:
        flat = torch.cat(uncertain)
        if on_cpu:  # elsewhere all of them are settled: selecting would cost a second sync
            flat = flat[_still_uncertain(flat, torch.cat(values), cols, factors, norms, W.dtype)]
        _settle_in_float64(W2, Y2, flat, factors, workspace)
    return Y.cpu()


def _blockwise(device: torch.device) -> bool:
    """Row blocks, a group-by-group search and a second test (CPU: each op is cheap to start, and
    cache-sized blocks pay); or one block and one ``nonzero`` (a GPU, where each sync costs)."""
    return device.type == "cpu"


def _settle_in_float64(
    W2: torch.Tensor, Y2: torch.Tensor, flat: torch.Tensor, factors: Sequence[_Term], workspace: Workspace
) -> None:
    """``Y2`` at the flat indices ``flat``: W + sum alpha L R in float64 from the factors, rounded once."""
    count = flat.numel()
    if not count:
        return
    cols = W2.shape[1]
    rows, columns = flat // cols, flat % cols
    exact = W2.reshape(-1).index_select(0, flat).double()
    for alpha, _, _, L64, R64, _ in factors:
        shape = (count, L64.shape[1])
        left = torch.index_select(L64, 0, rows, out=workspace.get("left", shape, torch.float64, flat.device))
        right = R64.T.contiguous().index_select(0, columns)
        exact += alpha * left.mul_(right).sum(dim=1)
    Y2.view(-1).index_copy_(0, flat, round_to(exact, Y2.dtype))


def _certifiable(terms: Sequence[tuple[float, LoraModule]], sign: float, device: torch.device) -> bool:
    """Whether the float32 bound holds: IEEE float32 matmuls (no TF32 or bfloat16 inside them),
    each alpha a normal float32, coefficients small enough for the first-order bound."""
    if not _ieee_matmuls(device):
        return False
    tiny, huge = 2.0**-126, 2.0**126
    for weight, module in terms:
        alpha = abs(sign * weight * module.scale)
        if not (alpha == 0 or tiny <= alpha <= huge):
            return False
        if module.rank + len(terms) + 3 > _MAX_COEFFICIENT:
            return False
    return True


def _ieee_matmuls(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` are IEEE float32 throughout: neither the legacy switches
    (``set_float32_matmul_precision``, CUDA's ``allow_tf32``) nor the per-backend ``fp32_precision``
    of newer torch (absent at the floor, hence getattr) allow TF32 or bfloat16 inside them."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except RuntimeError:  # torch refuses to answer once the legacy and the new switches are mixed
        return False
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return False
    backend = torch.backends.cuda if device.type == "cuda" else getattr(torch.backends, "mkldnn", None)
    switches = [torch.backends, backend, getattr(backend, "matmul", None)]
    return all(getattr(switch, "fp32_precision", "none") in ("none", "ieee") for switch in switches)


class _Term(NamedTuple):
    """One term in storage orientation: ``W.reshape(rows, -1)`` gains ``alpha L R``, with (L, R)
    = (B, A), or (A.T, B.T) where the module is transposed; float32 copies for the fast sum."""

    alpha: float
    L32: torch.Tensor
    R32: torch.Tensor
    L64: torch.Tensor
    R64: torch.Tensor
    exact: bool  # the float32 copies equal the factors (stored as float32, bfloat16 or float16)


def _factors(terms: Sequence[tuple[float, LoraModule]], sign: float, device: torch.device) -> list[_Term]:
    factors = []
    narrow = (torch.float32, torch.bfloat16, torch.float16)
    for weight, module in terms:
        B64 = module.B.to(device=device, dtype=torch.float64)
        A64 = module.A.to(device=device, dtype=torch.float64)
        L64, R64 = (A64.T, B64.T) if module.transposed else (B64, A64)
        L64 = L64.contiguous()
        exact = module.A.dtype in narrow and module.B.dtype in narrow
        factors.append(_Term(sign * weight * module.scale, L64.float(), R64.float(), L64, R64, exact))
    return factors


class _Norms(NamedTuple):
    """Euclidean norms (float64) of one term's rows of L (per storage row) and columns of R."""

    L: torch.Tensor
    R: torch.Tensor
    residual_L: torch.Tensor | None  # ||L64_k - L32_k||, None where the factors are exact
    residual_R: torch.Tensor | None
    R64: torch.Tensor | None


def _norms(factors: Sequence[_Term]) -> list[_Norms]:
    def norm(x: torch.Tensor, dim: int) -> torch.Tensor:  # vector_norm across rows is slow
        return x.square().sum(dim=dim).sqrt()

    out = []
    for term in factors:
        L, R = norm(term.L32.double(), 1), norm(term.R32.double(), 0)
        if term.exact:
            out.append(_Norms(L, R, None, None, None))
        else:
            residual_L, residual_R = (
                norm(term.L64 - term.L32.double(), 1),
                norm(term.R64 - term.R32.double(), 0),
            )
            out.append(_Norms(L, R, residual_L, residual_R, norm(term.R64, 0)))
    return out


def _update_error(
    factors: Sequence[_Term],
    norms: Sequence[_Norms],
    rows: Callable[[torch.Tensor], torch.Tensor],
    cols: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A bound (float64, never below the truth) on |U - sum_t alpha_t L_t R_t| at some elements.

    ``rows`` / ``cols`` pick from per-row / per-column norms: an index's entries for elementwise
    bounds, or the row itself and the maximum over columns for a bound per row.

    U = sum_t fl32(alpha_t) L32_t R32_t in float32, against the exact sum with the float64
    factors and alpha: a product L_ks R_sc is rounded at most r_t + T + 2 times on its way into
    U (itself, r_t - 1 additions in its dot, alpha's conversion and product, the additions of
    later terms into U), so its relative error is below n_t u (1 + 2**-10), n_t = r_t + T + 3
    (Higham's gamma_n, with n u <= 2**-12); summed by Cauchy-Schwarz, sum_s |L_ks R_sc| <=
    ||L_k|| ||R_c||. The factors' rounding to float32 adds exactly ||L32_k|| ||R_c - R32_c|| +
    ||L_k - L32_k|| ||R_c|| (zero for float32, bfloat16 and float16 factors). Underflow adds at
    most 2**-150 per rounded product (r_t |alpha_t| + 1 per term), plus 2**-149 for the float32
    arithmetic the caller does on the bound. Computed in float64 (no underflow for float32
    data), widened by 2**-40 for float64's own rounding.
    """
    u = 2.0**-24
    total = len(factors)
    bound: torch.Tensor | float = 2.0**-149
    for term, norm in zip(factors, norms, strict=True):
        a, rank = abs(term.alpha), term.L32.shape[1]
        bound = bound + rows(norm.L) * (a * (rank + total + 3) * u * (1 + 2.0**-10) * cols(norm.R))
        if norm.residual_L is not None and norm.residual_R is not None and norm.R64 is not None:
            bound = bound + a * (
                rows(norm.L) * cols(norm.residual_R) + rows(norm.residual_L) * cols(norm.R64)
            )
        bound = bound + (rank * a * (1 + 2.0**-20) + 1) * 2.0**-150
    return torch.as_tensor(bound) * (1 + 2.0**-40)


def _row_bounds(factors: Sequence[_Term], norms: Sequence[_Norms]) -> torch.Tensor:
    """``_update_error`` per storage row, rounded up to float32. ``X = fl32(W + U)`` adds u |X|
    (round to nearest: |fl(s) - s| <= u |fl(s)|), which the caller adds as u max_c |X_kc|."""
    bound = _update_error(factors, norms, lambda v: v, lambda v: v.amax())
    rounded = bound.float()
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return torch.where(rounded.double() < bound, up, rounded)


def _still_uncertain(
    flat: torch.Tensor,
    x: torch.Tensor,
    cols: int,
    factors: Sequence[_Term],
    norms: Sequence[_Norms],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Which of the elements the row bound left uncertain (flat indices, float32 values ``x``)
    remain so under the elementwise bound and the exact distance to the nearest midpoint."""
    rows, columns = flat // cols, flat % cols
    bound = _update_error(
        factors, norms, lambda v: v.index_select(0, rows), lambda v: v.index_select(0, columns)
    )
    bound = bound + x.double().abs() * 2.0**-24 * (1 + 2.0**-40)
    return ~(midpoint_distance(x, dtype) > bound)


def _add_updates_float64(
    W: torch.Tensor, terms: Sequence[tuple[float, LoraModule]], sign: float, device: torch.device
) -> torch.Tensor:
    X = W.to(device=device, dtype=torch.float64, copy=True)
    for weight, module in terms:
        math_view(X, module).addmm_(
            module.B.to(device=device, dtype=torch.float64),
            module.A.to(device=device, dtype=torch.float64),
            alpha=sign * weight * module.scale,
        )
    return round_to(X, W.dtype).cpu()


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
