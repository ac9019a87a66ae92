"""LyCORIS single files (KohakuBlueleaf/LyCORIS, checked against lycoris-lora 4.1.3): LoCon, LoHa, LoKr, DoRA.

One ``.safetensors`` file, keyed like kohya's (``lora_unet_<flat>``, ``lora_te_`` / ``lora_te1_`` /
``lora_te2_``; names are resolved by ``io.kohya``'s ``unflatten`` / base mapping), with per module
one algorithm's tensors plus ``alpha`` (scalar; missing or 0 means alpha = rank, so scale 1) and an
optional ``dora_scale``. Each module is read as one exact LoRA ``dW = scale * B @ A``:

LoCon (``lora_down.weight`` (r, in[, k..]), ``lora_up.weight`` (out, r[, 1..]), Tucker
``lora_mid.weight`` (r, r, k..) with a 1x1 ``lora_down``); scale = alpha / r::

    dW[p, q, k] = scale * sum_ij up[p, i] mid[i, j, k] down[j, q]
    B = up, A[i, (q, k)] = sum_j mid[i, j, k] down[j, q]                    rank r

LoHa (``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*K), ``hada_w2_a``, ``hada_w2_b``; Tucker:
``hada_w1_a`` (r, out), ``hada_w1_b`` (r, in), ``hada_t1`` (r, r, k..), and the same for 2);
scale = alpha / r, r = rows of ``hada_w1_b``::

    dW = scale * (B1 @ A1) * (B2 @ A2)       (elementwise; Tucker: B = w_a.T, A = t x w_b as above)
    B[p, (i, j)] = B1[p, i] B2[p, j]          row-wise Khatri-Rao      rank r1 * r2
    A[(i, j), q] = A1[i, q] A2[j, q]          column-wise Khatri-Rao

LoKr (``lokr_w1`` (a, b) or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, b); ``lokr_w2`` (c, d[, k..]) or
``lokr_w2_a`` (c, r) @ ``lokr_w2_b`` (r, d*K), Tucker ``lokr_t2`` (r, r, k..) with ``lokr_w2_a`` (r, c),
``lokr_w2_b`` (r, d)); scale = alpha / r when a side is factored (r from ``lokr_w1_a``, else from
``lokr_w2_b``), 1 when both are whole, as LyCORIS's module does::

    dW = scale * kron(W1, W2) = scale * kron(B1, B2) @ kron(A1, A2)        rank r1 * r2
    a whole W (m, n) is W @ I_n when n <= m, else I_m @ W: rank min(m, n)

This is the update the modules' forward pass applies (``get_weight`` times ``alpha / r`` once), as
trainers and UIs apply it. LyCORIS 4.1.3's ``get_diff_weight`` / ``get_merged_weight`` (its merge
helper) multiply LoHa and LoKr by the scale a second time; adapterops does not follow that.

``dora_scale`` (out, 1[, 1..]) is DoRA with PEFT's row norm (LyCORIS ``wd_on_out=True``): the
magnitude, as is. LyCORIS adds float32 eps to the norm; PEFT does not (relative 1e-7 of a norm).
The column-norm form (1, in[, 1..]) (``wd_on_out=False``) is refused: adapterops's DoRA is PEFT's.

Products are formed in float64 and stored in float32 where that holds every value exactly (for
float16 / bfloat16 files without Tucker cores, unless a product leaves float32's range), float64
otherwise: a conversion adds no rounding; Tucker cores are contracted in float64. A plain LoCon
module keeps its tensors as stored. When the rank a module needs exceeds its layer's full rank
min(out, in*K), the module is stored at full rank as its float64 dense update (B = dW, A = I, or
B = I, A = dW), with a ``ModuleReport`` in ``Adapter.report`` and a ``RankCapWarning``.

The kernel of a conv module is in its tensors except for LoHa and factored LoKr without Tucker,
which store it flattened into ``in*K``: with a base it comes from the base's weight; without, a
module whose name is a convolution's (``conv*``, ``proj_in``, ``proj_out``) is refused.

Writing gives each module LoCon keys (``lora_down`` / ``lora_up`` / ``alpha`` as in ``io.kohya``,
plus ``dora_scale`` for DoRA modules): LoHa and LoKr factors are not recovered from a LoRA.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport, Solver, Source
from adapterops.errors import (
    AdapterFormatError,
    AdapterOpsError,
    RankCapWarning,
    UnsupportedAdapterError,
)
from adapterops.io import kohya
from adapterops.io.atomic import atomic_output_file
from adapterops.io.peft import PROVENANCE_KEY, provenance_from_metadata
from adapterops.io.safetensors_file import read_header, save_tensors

FORMAT = "lycoris"
VERSION_CHECKED = "lycoris-lora 4.1.3"

_LOCON = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
_PARTS = (*_LOCON, *_LOHA, *_LOKR, "alpha", "dora_scale")
_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te1_|lora_te2_|lora_te_)(?P<flat>[A-Za-z0-9_]+)"
    r"\.(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + r")$"
)
# what makes a kohya-keyed file LyCORIS rather than plain kohya LoRA
_MARKERS = (".hada_", ".lokr_", ".lora_mid.weight", ".dora_scale")
# names whose layer may be a convolution in the SD UNet (proj_in / proj_out: 1x1 convs in SD 1.x)
_CONV_WORDS = ("conv", "conv1", "conv2", "conv_shortcut", "conv_in", "conv_out", "proj_in", "proj_out")
_MAX_ENTRIES = 1 << 31  # converted factors or dense updates larger than this are refused


def detect(path: Path) -> bool:
    """A local ``.safetensors`` file with kohya-style keys and a LyCORIS-only part (``hada_*``,
    ``lokr_*``, ``lora_mid``, ``dora_scale``). Plain ``lora_down`` / ``lora_up`` files are kohya's."""
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        names = [e.name for e in read_header(path).entries]
    except (AdapterOpsError, OSError):
        return False
    return any(n.startswith(("lora_unet_", "lora_te")) and any(m in n for m in _MARKERS) for n in names)


# --------------------------------------------------------------------------------------------- decode


class _Pair:
    """B (out, r) @ A (r, in): one factor of a LoHa or LoKr product, in float64."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor) -> None:
        self.B, self.A = B, A


@dataclass(frozen=True)
class _Update:
    """One module's update: dW = scale * B @ A (LoCon) or scale * (one ⊙ two) (LoHa), kron(one, two) (LoKr).

    ``kernel`` is None where the tensors store a conv kernel flattened into ``in*K``.
    """

    algorithm: str
    scale: float
    out: int
    flat_in: int
    kernel: tuple[int, ...] | None
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None
    stored: bool = False  # B and A are the file's own tensors
    one: _Pair | None = None
    two: _Pair | None = None


def _whole(W: torch.Tensor) -> _Pair:
    """A whole matrix (m, n) as W @ I_n (n <= m) or I_m @ W: exact, rank min(m, n)."""
    m, n = W.shape
    if n <= m:
        return _Pair(W, _eye(n))
    return _Pair(_eye(m), W)


def _tucker(core: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """A[i, (q, k)] = sum_j core[i, j, k] w_b[j, q]: (r, in * K), the kernel inner as in a conv weight."""
    r, inner = core.shape[:2]
    per_tap = core.reshape(r, inner, -1).permute(0, 2, 1) @ w_b  # (r, K, in)
    return per_tap.permute(0, 2, 1).reshape(r, -1)


def _eye(n: int) -> torch.Tensor:
    return torch.zeros(n, n, dtype=torch.float64).fill_diagonal_(1.0)


def _alpha_scale(where: str, alpha: torch.Tensor | None, rank: int) -> float:
    if alpha is None:
        return 1.0
    if alpha.numel() != 1:
        raise AdapterFormatError(f"{where}: alpha has shape {tuple(alpha.shape)}; expected a scalar")
    value = float(alpha.double())
    return 1.0 if value == 0 else value / rank  # LyCORIS: alpha 0 or none means alpha = rank


def _need(where: str, parts: Mapping[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterFormatError(f"{where}: has no {', '.join(missing)}; the file is incomplete")
    return [parts[n] for n in names]


def _fit(where: str, parts: Mapping[str, torch.Tensor], keys: tuple[str, ...], ok: bool) -> None:
    if not ok:
        shapes = ", ".join(f"{n} {tuple(parts[n].shape)}" for n in keys if n in parts)
        raise AdapterFormatError(f"{where}: {shapes} do not fit together; the file is corrupt")


def _locon(where: str, p: Mapping[str, torch.Tensor]) -> _Update:
    down, up = _need(where, p, "lora_down.weight", "lora_up.weight")
    mid = p.get("lora_mid.weight")
    _fit(
        where,
        p,
        _LOCON,
        down.dim() >= 2
        and up.dim() == down.dim()
        and all(s == 1 for s in up.shape[2:])
        and down.shape[0] == up.shape[1] > 0,
    )
    rank = int(down.shape[0])
    scale = _alpha_scale(where, p.get("alpha"), rank)
    B = up.reshape(up.shape[0], rank)
    if mid is None:
        A = down.reshape(rank, -1)
        kernel = tuple(int(k) for k in down.shape[2:])
        return _Update("locon", scale, int(B.shape[0]), int(A.shape[1]), kernel, B, A, stored=True)
    _fit(
        where,
        p,
        _LOCON,
        mid.dim() == down.dim() >= 3
        and tuple(mid.shape[:2]) == (rank, rank)
        and all(s == 1 for s in down.shape[2:]),
    )
    A = _tucker(mid.double(), down.double().reshape(rank, -1))
    kernel = tuple(int(k) for k in mid.shape[2:])
    return _Update("locon_tucker", scale, int(B.shape[0]), int(A.shape[1]), kernel, B.double(), A)


def _loha(where: str, p: Mapping[str, torch.Tensor]) -> _Update:
    w1a, w1b, w2a, w2b = (t.double() for t in _need(where, p, *_LOHA[:4]))
    kernel: tuple[int, ...] | None = None
    if "hada_t1" in p or "hada_t2" in p:
        t1, t2 = (t.double() for t in _need(where, p, "hada_t1", "hada_t2"))
        _fit(
            where,
            p,
            _LOHA,
            t1.dim() == t2.dim() >= 3
            and all(w.dim() == 2 for w in (w1a, w1b, w2a, w2b))
            and t1.shape[2:] == t2.shape[2:]
            and tuple(t1.shape[:2]) == (w1a.shape[0], w1b.shape[0])
            and tuple(t2.shape[:2]) == (w2a.shape[0], w2b.shape[0])
            and w1a.shape[1] == w2a.shape[1]
            and w1b.shape[1] == w2b.shape[1],
        )
        one, two = _Pair(w1a.T, _tucker(t1, w1b)), _Pair(w2a.T, _tucker(t2, w2b))
        kernel, algorithm = tuple(int(k) for k in t1.shape[2:]), "loha_tucker"
    else:
        _fit(
            where,
            p,
            _LOHA,
            all(w.dim() == 2 for w in (w1a, w1b, w2a, w2b))
            and w1a.shape[1] == w1b.shape[0]
            and w2a.shape[1] == w2b.shape[0]
            and w1a.shape[0] == w2a.shape[0]
            and w1b.shape[1] == w2b.shape[1],
        )
        one, two, algorithm = _Pair(w1a, w1b), _Pair(w2a, w2b), "loha"
    _fit(where, p, _LOHA, one.A.shape[0] > 0 and two.A.shape[0] > 0)
    scale = _alpha_scale(where, p.get("alpha"), int(p["hada_w1_b"].shape[0]))
    out, flat_in = int(one.B.shape[0]), int(one.A.shape[1])
    return _Update(algorithm, scale, out, flat_in, kernel, one=one, two=two)


def _lokr(where: str, p: Mapping[str, torch.Tensor]) -> _Update:
    if "lokr_t1" in p:
        raise UnsupportedAdapterError(
            f"{where}: has lokr_t1, which LyCORIS itself never reads (its loader drops it), so what it means "
            "is not defined; not read"
        )
    rank: int | None = None  # the factored side's rank; None while both sides are whole
    if "lokr_w1" in p:
        (w1,) = _need(where, p, "lokr_w1")
        _fit(where, p, _LOKR, w1.dim() == 2 and w1.numel() > 0)
        one = _whole(w1.double())
    else:
        w1a, w1b = (t.double() for t in _need(where, p, "lokr_w1_a", "lokr_w1_b"))
        _fit(where, p, _LOKR, w1a.dim() == w1b.dim() == 2 and w1a.shape[1] == w1b.shape[0] > 0)
        one, rank = _Pair(w1a, w1b), int(w1a.shape[1])
    kernel: tuple[int, ...] | None
    if "lokr_w2" in p:
        (w2,) = _need(where, p, "lokr_w2")
        _fit(where, p, _LOKR, w2.dim() >= 2 and w2.numel() > 0)
        kernel = tuple(int(k) for k in w2.shape[2:]) if w2.dim() > 2 else None
        two, algorithm = _whole(w2.double().reshape(w2.shape[0], -1)), "lokr"
    elif "lokr_t2" in p:
        t2, w2a, w2b = (t.double() for t in _need(where, p, "lokr_t2", "lokr_w2_a", "lokr_w2_b"))
        _fit(
            where,
            p,
            _LOKR,
            t2.dim() >= 3
            and w2a.dim() == w2b.dim() == 2
            and tuple(t2.shape[:2]) == (w2a.shape[0], w2b.shape[0])
            and t2.shape[0] > 0,
        )
        two, algorithm = _Pair(w2a.T, _tucker(t2, w2b)), "lokr_tucker"
        kernel = tuple(int(k) for k in t2.shape[2:])
        rank = int(t2.shape[0]) if rank is None else rank
    else:
        w2a, w2b = (t.double() for t in _need(where, p, "lokr_w2_a", "lokr_w2_b"))
        _fit(where, p, _LOKR, w2a.dim() == 2 and w2b.dim() >= 2 and w2a.shape[1] == w2b.shape[0] > 0)
        kernel = tuple(int(k) for k in w2b.shape[2:]) if w2b.dim() > 2 else None
        two, algorithm = _Pair(w2a, w2b.reshape(w2b.shape[0], -1)), "lokr"
        rank = int(w2b.shape[0]) if rank is None else rank
    # both sides whole: LyCORIS sets alpha = rank (scale 1); else alpha / the factored side's rank
    scale = 1.0 if rank is None else _alpha_scale(where, p.get("alpha"), rank)
    out = int(one.B.shape[0] * two.B.shape[0])
    flat_in = int(one.A.shape[1] * two.A.shape[1])
    return _Update(algorithm, scale, out, flat_in, kernel, one=one, two=two)


# --------------------------------------------------------------------------------------------- build


def _khatri_rao(one: _Pair, two: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """(B1 A1) * (B2 A2) = B @ A with B row-wise and A column-wise Khatri-Rao products."""
    B = (one.B[:, :, None] * two.B[:, None, :]).reshape(one.B.shape[0], -1)
    A = (one.A[:, None, :] * two.A[None, :, :]).reshape(-1, one.A.shape[1])
    return B, A


def _kron(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """kron(X, Y) for matrices, one product per entry (torch.kron trips on some size-1 strides)."""
    return (X[:, None, :, None] * Y[None, :, None, :]).reshape(X.shape[0] * Y.shape[0], -1)


def _store(B: torch.Tensor, A: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 when every input is at most float32 and float32 holds every value exactly; else float64."""
    if all(t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in inputs):
        B32, A32 = B.float(), A.float()
        if torch.equal(B32.double(), B) and torch.equal(A32.double(), A):
            return B32, A32
    return B, A


def _factors(
    where: str, name: str, update: _Update, inputs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, ModuleReport | None]:
    """B and A of ``update`` (see the module docstring), and a report when the rank was capped."""
    if update.one is None or update.two is None:
        assert update.B is not None and update.A is not None
        if update.stored:
            return update.B, update.A, None
        return (*_store(update.B, update.A, inputs), None)
    one, two = update.one, update.two
    loha = update.algorithm.startswith("loha")
    out, flat_in = update.out, update.flat_in
    rank = int(one.A.shape[0] * two.A.shape[0])
    full = min(out, flat_in)
    size = out * flat_in if rank > full else rank * (out + flat_in)
    if size > _MAX_ENTRIES:
        raise UnsupportedAdapterError(
            f"{where}: as a LoRA this module has {size} entries (rank {rank}, {out}x{flat_in}); more than "
            f"adapterops converts ({_MAX_ENTRIES})"
        )
    if rank <= full:
        B, A = _khatri_rao(one, two) if loha else (_kron(one.B, two.B), _kron(one.A, two.A))
        return (*_store(B, A, inputs), None)
    W1, W2 = one.B @ one.A, two.B @ two.A
    dense = W1 * W2 if loha else _kron(W1, W2)
    eye = _eye(full)
    B, A = _store(dense, eye, inputs) if flat_in <= out else _store(eye, dense, inputs)
    error = float(torch.linalg.matrix_norm(B.double() @ A.double() - dense))
    whole = float(torch.linalg.matrix_norm(dense))
    report = ModuleReport(
        name,
        rank_in=rank,
        rank_out=full,
        rel_error=error / whole if whole > 0 else 0.0,
        solver=Solver.DENSE,
        note=(
            f"capped at full rank {full}: {update.algorithm} of rank {rank} on a {out}x{flat_in} layer, "
            f"stored as its dense update in {str(B.dtype).removeprefix('torch.')}"
        ),
    )
    return B, A, report


def _module(
    where: str,
    name: str,
    parts: Mapping[str, torch.Tensor],
    weight_shape: tuple[int, ...] | None,
) -> tuple[LoraModule, str, ModuleReport | None]:
    """One module of the file as a LoraModule (see the module docstring), its algorithm, and a report
    when its rank had to be capped at full rank."""
    for label, tensor in parts.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{where}: {label} is {tensor.dtype}; expected floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: {label} contains NaN or Inf values")
    families = [
        label
        for label, keys in (("LoCon", _LOCON), ("LoHa", _LOHA), ("LoKr", _LOKR))
        if any(k in parts for k in keys)
    ]
    if len(families) != 1:
        what = " and ".join(families) if families else "no factors"
        raise AdapterFormatError(
            f"{where}: has {what} (besides alpha / dora_scale); one module holds the tensors of one algorithm"
        )
    decode = {"LoCon": _locon, "LoHa": _loha, "LoKr": _lokr}[families[0]]
    update = decode(where, parts)
    out, flat_in = update.out, update.flat_in
    if out == 0 or flat_in == 0:
        raise AdapterFormatError(f"{where}: updates an empty ({out}x{flat_in}) weight; the file is corrupt")
    kernel = update.kernel
    if kernel is None:  # stored flattened into in*K: only the base knows the kernel
        if weight_shape is not None:
            kernel = tuple(weight_shape[2:])
        elif name.rsplit(".", 1)[-1] in _CONV_WORDS:
            raise UnsupportedAdapterError(
                f"{where}: {update.algorithm} stores a conv layer's kernel flattened into its factors, so "
                "without the base model it is unknown whether this layer is a convolution: read it with its "
                "base's UNet folder, adapterops.load_adapter(path, base=...)"
            )
        else:
            kernel = ()
    size = math.prod(kernel) if kernel else 1
    if flat_in % size:
        raise AdapterFormatError(f"{where}: factors of width {flat_in} do not fit a kernel {kernel}")
    in_channels = flat_in // size
    shape = (out, in_channels, *kernel) if kernel else (out, flat_in)
    if weight_shape is not None and tuple(weight_shape) != shape:
        raise AdapterFormatError(
            f"{where}: updates a weight of shape {shape} but the base's weight is {tuple(weight_shape)}; "
            "the file does not belong to this base"
        )
    B, A, report = _factors(where, name, update, list(parts.values()))
    magnitude = _magnitude(where, parts.get("dora_scale"), out, in_channels, len(shape))
    module = LoraModule(
        name=name,
        A=A.contiguous(),
        B=B.contiguous(),
        scale=update.scale,
        kind=ModuleKind.CONV if kernel else ModuleKind.LINEAR,
        kernel_size=kernel,
        magnitude=magnitude,
    )
    return module, update.algorithm, report


def _magnitude(
    where: str, dora_scale: torch.Tensor | None, out: int, in_channels: int, dims: int
) -> torch.Tensor | None:
    """``dora_scale`` as PEFT's magnitude (one per output row); the column-norm form is refused."""
    if dora_scale is None:
        return None
    shape = tuple(dora_scale.shape)
    if shape == (out, *(1 for _ in range(dims - 1))) or shape == (out,):
        return dora_scale.reshape(out)
    if shape == (1, in_channels, *(1 for _ in range(dims - 2))):
        raise UnsupportedAdapterError(
            f"{where}: dora_scale of shape {shape} normalizes input columns (LyCORIS wd_on_out=False); "
            "adapterops's DoRA is PEFT's, which normalizes output rows, so it cannot hold this module exactly"
        )
    raise AdapterFormatError(
        f"{where}: dora_scale has shape {shape}; expected ({out}, 1, ...) for a weight of {out} output rows"
    )


# --------------------------------------------------------------------------------------------- read


def read_adapter(
    path: Path, source: Source | None = None, base: str | Path | Mapping[str, Any] | None = None
) -> Adapter:
    """Parse a LyCORIS file into exact LoRA modules. See the module docstring for the keys and the math."""
    tensors, metadata, sha256 = kohya._read_file(path)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"{path}: tensor {key[:120]!r} is not a key of the LyCORIS algorithms adapterops reads (LoCon "
                "lora_down/lora_up/lora_mid, LoHa hada_*, LoKr lokr_*, alpha, dora_scale under lora_unet_* / "
                "lora_te*_*); OFT, BOFT, IA3, GLoRA, full and norm modules are not read"
            )
        parts.setdefault((match["prefix"], match["flat"]), {})[match["part"]] = tensor
    if not parts:
        raise AdapterFormatError(f"{path}: no LyCORIS tensors (lora_unet_* / lora_te* keys) found")
    modules_of_base = kohya.read_base(base) if base is not None else None
    shapes = kohya.base_shapes(modules_of_base) if modules_of_base is not None else {}
    te_prefixes = {prefix for prefix, _ in parts if prefix in ("lora_te_", "lora_te1_")}
    if len(te_prefixes) > 1:
        raise AdapterFormatError(
            f"{path}: has both lora_te_ and lora_te1_ keys; one file names one first text encoder"
        )

    modules: dict[str, LoraModule] = {}
    alphas: dict[str, str | None] = {}
    algorithms: dict[str, str] = {}
    reports: list[ModuleReport] = []
    for (prefix, flat), entry in sorted(parts.items()):
        key = prefix + flat
        found = kohya.targets(key, modules_of_base, path)  # the base's names, else the vocabularies
        weight_shape = shapes.get(found[0].name) if len(found) == 1 else None
        whole, algorithm, report = _module(f"{path}: {key}", found[0].name, entry, weight_shape)
        alpha = entry.get("alpha")
        for target in kohya.place(path, key, whole, found, shapes, modules, "LyCORIS"):
            algorithms[target.name] = algorithm
            alphas[target.name] = None if alpha is None else str(alpha.dtype).removeprefix("torch.")
        if report is not None:
            reports.append(report)
    if reports:
        worst = max(reports, key=lambda r: r.rel_error)
        warnings.warn(
            f"{path}: {len(reports)} module(s) need more rank than their layer has (e.g. {worst.name}: rank "
            f"{worst.rank_in} on full rank {worst.rank_out}); stored at full rank as their dense update, "
            f"relative error {worst.rel_error:.2g} at most: adapterops resize shrinks them",
            RankCapWarning,
            stacklevel=2,
        )

    if source is None:
        source = Source(path=str(path))
    source = Source(path=source.path, repo_id=source.repo_id, revision=source.revision, sha256=sha256)
    kept = {k: v for k, v in metadata.items() if k != PROVENANCE_KEY}
    if any(a != "locon" for a in algorithms.values()):  # what is written is LoCon, not what trained it
        kept = {k: v for k, v in kept.items() if k not in ("ss_network_module", "ss_network_args")}
    kohya_config = {
        "te_prefix": next(iter(te_prefixes), "lora_te_"),
        "metadata": kept,
        "alphas": alphas,
        "tensors_sha256": kohya.tensors_sha256(tensors),
    }
    return Adapter(
        modules=modules,
        config={"format": FORMAT, kohya.FORMAT: kohya_config, FORMAT: {"algorithms": algorithms}},
        source=source,
        provenance=provenance_from_metadata(path, metadata),
        report=tuple(reports),
    )


# --------------------------------------------------------------------------------------------- write


def state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` under LyCORIS LoCon keys: kohya's, plus ``dora_scale`` for DoRA modules."""
    plain = replace(adapter, modules={n: replace(m, magnitude=None) for n, m in adapter.modules.items()})
    out = kohya.state_dict(plain, dtype)
    te_prefix = (adapter.config.get(kohya.FORMAT) or {}).get("te_prefix", "lora_te_")
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            dims = 1 + len(m.kernel_size) if m.kind is ModuleKind.CONV else 1
            magnitude = m.magnitude.reshape(-1, *(1 for _ in range(dims)))
            out[f"{kohya.kohya_key(name, te_prefix)}.dora_scale"] = magnitude.to(
                dtype or m.magnitude.dtype
            ).contiguous()
    return out


def save_adapter(
    adapter: Adapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | str | None = None
) -> Path:
    """Write ``adapter`` as one LyCORIS LoCon ``.safetensors`` file at ``path``, atomically.

    Each module is written as ``lora_down`` / ``lora_up`` / ``alpha`` (alpha = scale * r, as in
    ``io.kohya``), DoRA modules with their magnitude as ``dora_scale`` (out, 1[, 1..]). ``dtype``
    casts the factors (None or ``"auto"`` keeps them).

    Example:
        >>> save_adapter(load_adapter("loha.safetensors"), "locon.safetensors", format="lycoris")
    """
    target = Path(path)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else kohya._DTYPES[dtype]
    tensors = state_dict(adapter, dtype)
    metadata = kohya._metadata(adapter, tensors)
    with atomic_output_file(target, force=force) as tmp:
        save_tensors(tmp, tensors, metadata)
    return target
