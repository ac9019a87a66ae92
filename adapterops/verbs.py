"""The adapter verbs: combine, negate, scale, resize, to_dora, to_lora; and convert (between formats).

Each takes adapters (paths, Hub ids or loaded ``Adapter`` objects) and returns a new ``Adapter``
with a per-module ``report`` and a ``provenance`` record; ``save_adapter`` writes it. Each checks
its options once (through its record in ``options``), picks the pure kernel per module (factor
arithmetic in ``ops.combine``, or DoRA math given the base weight in ``ops.dora``), and writes the
record once (``provenance.operation_record``, with the adapterops version).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport
from adapterops.errors import (
    ApproximationWarning,
    InvalidInputError,
    RankCapWarning,
    UnsupportedAdapterError,
    param,
)
from adapterops.io import FORMATS, kohya, load_adapter, save_adapter
from adapterops.io.checkpoint import BaseWeights, Checkpoint
from adapterops.ops.budget import apply_budget
from adapterops.ops.combine import (
    Terms,
    Weight,
    check_bases,
    check_weights,
    combine_module,
    map_modules,
    result_adapter,
)
from adapterops.ops.dora import row_norms, sum_as_dora, sum_as_lora
from adapterops.ops.lowrank import FULL_RANK, RankPolicy
from adapterops.ops.sparsify import Sparsity
from adapterops.options import (
    MERGING,
    RANDOM,
    SIGN_ELECTING,
    SPARSIFYING,
    CombineOptions,
    ConvertOptions,
    Engine,
    Form,
    MajoritySign,
    Method,
    NegateOptions,
    RankTarget,
    ResizeOptions,
    ScaleOptions,
    Space,
    ToDoraOptions,
    ToLoraOptions,
)
from adapterops.provenance import checkpoint_record, operation_record

AdapterRef = str | Path | Adapter
BaseRef = str | Path | Checkpoint | BaseWeights
Progress = Callable[[str], None]


def as_adapter(ref: AdapterRef, base: BaseRef | None = None) -> Adapter:
    """An ``Adapter`` as it is, or loaded from a path or Hub id; ``base`` names a kohya file's modules."""
    if isinstance(ref, Adapter):
        return ref
    return load_adapter(ref, base=_naming(base))


def _naming(base: BaseRef | None) -> str | Path | Checkpoint | None:
    """What ``load_adapter`` reads names from: the checkpoint a ``BaseWeights`` reads."""
    return base.checkpoint if isinstance(base, BaseWeights) else base


def as_base(base: BaseRef) -> BaseWeights:
    return base if isinstance(base, BaseWeights) else BaseWeights(base)


def combine(
    adapters: Sequence[AdapterRef],
    weights: Sequence[Weight] | None = None,
    *,
    method: Method | str = Method.EXACT,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    budget_params: int | str | None = None,
    budget_error: float | None = None,
    density: float | None = None,
    majority_sign: MajoritySign | str | None = None,
    seed: int | None = None,
    space: Space | str | None = None,
    common_fraction: float | None = None,
    allow_different_bases: bool = False,
    base: BaseRef | None = None,
    form: Form | str = Form.AUTO,
    exact_limit: int = 1024,
    progress: Progress | None = None,
) -> Adapter:
    """The adapter whose update is ``sum_i weights[i] * dW_i`` for every module any input touches
    (or, with a merging method, what that method makes of the weighted updates).

    Args:
        adapters: paths, Hub ids or ``Adapter`` objects.
        weights: one per adapter (default 1 each); a weight may be a function of the module name
            (per-module filters, layer gradients: see ``adapterops.recipe``).
        method: ``exact`` (the sum at its numerical rank), ``cat``, ``svd`` (best rank-k; needs
            a target below), ``linear`` (PEFT's approximation, warns), or
            ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: each module's dense updates
            s_i B_i A_i sparsified and merged (docs/math.md), then factored at rank sum of input ranks
            (or the target below), the error in the report; ``tsv`` (TSV-M), ``iso_c`` and
            ``iso_cts`` (isotropic merging), exact on factors at the result's numerical rank unless a
            target says otherwise. LoRA inputs only.
        rank, energy, sv_ratio: one rule per module: the top ``rank`` singular values (capped at what a
            module holds, with a note and a ``RankCapWarning``), the fewest holding ``energy`` of
            ||dW||^2, or those within ``sv_ratio`` of the largest.
        max_rank: caps any rule (or alone: each module's numerical rank, capped).
        budget_params, budget_error: a budget over all modules instead of a rule per module: the
            total LoRA parameters (an int, or a string such as ``"20M"``), or the total relative error;
            the ranks minimize the total squared error (docs/math.md, "Choosing k"), and
            ``provenance["budget"]`` holds the totals.
        density: for those four, the fraction of each update's entries kept (0 < density <= 1).
        majority_sign: ``ties``/``dare_ties``: ``total`` (default) or ``frequency``.
        seed: ``dare_*``: the random drop's seed (default 0), combined with each module's name.
        space: for those four, where they act: ``dense`` (default), ``core`` (Core Space merging) or
            ``knots`` (KnOTS), both exact on factors, or ``peft-factors`` (PEFT's non-svd
            ``add_weighted_adapter``, on A and B separately: not the weighted sum, so it warns).
        common_fraction: ``iso_cts``: the share of directions from the common subspace (default 0.8).
        allow_different_bases: combine inputs whose configs name different base models (warns).
        base: the base checkpoint, needed when an input is DoRA.
        form: ``dora`` (with ``base``) returns a DoRA adapter, which holds any weighted sum of DoRA
            and LoRA updates exactly. ``lora`` sums DoRA inputs' effective updates densely per module
            and re-factors them: an approximation, so it warns (``ApproximationWarning``) with the
            error. ``auto`` (default): ``dora`` when an input is DoRA and ``method`` is exact.
        exact_limit: DoRA modules with min(out, in) up to this get an exact SVD, larger a randomized one.
        progress: called with each module name when it is done.

    Returns:
        An ``Adapter`` whose ``report`` holds one ``ModuleReport`` per module.

    Raises:
        InvalidInputError: bad options, weights or shapes (``IncompatibleAdaptersError``).
        UnsupportedAdapterError: DoRA inputs without ``base``.

    Example:
        >>> mix = combine(["./style-a", "./style-b"], [0.7, 0.3], method="svd", rank=16)
    """
    opts = CombineOptions(
        weights=weights,
        method=cast(Method, method),  # the record checks and converts a str
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        max_rank=max_rank,
        budget_params=cast(int, budget_params),  # the record parses "20M"
        budget_error=budget_error,
        density=density,
        majority_sign=cast(MajoritySign, majority_sign),
        seed=seed,
        space=cast(Space, space),
        common_fraction=common_fraction,
        allow_different_bases=allow_different_bases,
        base=base,
        form=cast(Form, form),
        exact_limit=exact_limit,
    )
    loaded = [as_adapter(a, base) for a in adapters]
    if not loaded:
        raise InvalidInputError("combine needs at least one adapter")
    checked = check_weights(weights, len(loaded))
    result, record = _sum(loaded, checked, opts, progress)
    if opts.method is Method.LINEAR or opts.space is Space.PEFT_FACTORS:
        what = "method linear is" if opts.method is Method.LINEAR else "space peft-factors is"
        worst = max(result.report, key=lambda r: r.rel_error)
        warnings.warn(
            f"{what} PEFT's approximation, not the weighted sum: worst module relative error "
            f"{worst.rel_error:.3g} ({worst.name})",
            ApproximationWarning,
            stacklevel=2,
        )
    record.update(weights=[getattr(w, "spec", w) if callable(w) else w for w in checked])
    record.update(opts.target())
    _warn_capped(result.report, opts)
    if opts.method in SPARSIFYING:
        sparsity = _sparsity(opts)
        record.update(density=sparsity.density, space=sparsity.space.value)
        if opts.method in SIGN_ELECTING:
            record.update(majority_sign=sparsity.majority_sign.value)
        if opts.method in RANDOM:
            record.update(seed=sparsity.seed)
    if opts.method is Method.ISO_CTS:
        record.update(common_fraction=_common_fraction(opts))
    return replace(result, provenance=operation_record("combine", loaded, **record))


def negate(
    adapter: AdapterRef,
    *,
    base: BaseRef | None = None,
    form: Form | str = Form.AUTO,
    progress: Progress | None = None,
) -> Adapter:
    """dW -> -dW for every module: lora_B changes sign, nothing else (bit-exact).

    A DoRA input needs ``base``; its effective update is negated and re-factored (``combine``).

    Example: ``negate("./toxic")`` has ``lora_B`` of ``-B`` and the same ``lora_A`` and scale.
    """
    opts = NegateOptions(base=base, form=cast(Form, form))
    return _single("negate", as_adapter(adapter, base), -1.0, opts.base, opts.form, progress)


def scale(
    adapter: AdapterRef,
    by: float,
    *,
    base: BaseRef | None = None,
    form: Form | str = Form.AUTO,
    progress: Progress | None = None,
) -> Adapter:
    """dW -> by * dW for every module: the factor goes into the scale, factors unchanged (a negative
    ``by`` also flips lora_B's sign). A DoRA input needs ``base``, as for ``combine``.

    Example: ``scale(a, 0.5)`` keeps ``A`` and ``B`` bit for bit and halves each module's scale.
    """
    opts = ScaleOptions(base=base, form=cast(Form, form), by=by)
    return _single("scale", as_adapter(adapter, base), opts.by, opts.base, opts.form, progress, by=opts.by)


def resize(
    adapter: AdapterRef,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    budget_params: int | str | None = None,
    budget_error: float | None = None,
    base: BaseRef | None = None,
    progress: Progress | None = None,
) -> Adapter:
    """Best low-rank form of each module of one LoRA adapter (Eckart-Young on dW, from the factors).

    One rule per module: ``rank`` (a module holding less keeps what it has, with a note and a
    ``RankCapWarning``), ``energy`` (fraction of ||dW||_F^2 to keep) or ``sv_ratio`` (keep singular
    values within this factor of the largest); or a budget over all modules: ``budget_params`` (total
    LoRA parameters, an int or ``"20M"``) or ``budget_error`` (total relative error), the ranks chosen
    to minimize the total squared error (docs/math.md), the totals in ``provenance["budget"]``.
    ``max_rank`` caps any of them, or alone each module's exact rank. Modules already at or below the
    target rank are re-factored losslessly. A DoRA adapter is refused: convert it with ``to_lora``.
    ``base`` names a kohya file's modules (SDXL, Flux: see ``load_adapter``).

    Example: ``resize("./big", rank=8)``: every module at rank <= 8, its error in the report;
    ``resize("./big", budget_params="20M")``: at most 20,000,000 parameters, the least total error.
    """
    opts = ResizeOptions(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        max_rank=max_rank,
        budget_params=cast(int, budget_params),  # the record parses "20M"
        budget_error=budget_error,
        base=base,
    )
    loaded = as_adapter(adapter, base)
    if loaded.is_dora:
        raise UnsupportedAdapterError(
            f"{loaded.describe()}: resize works on LoRA adapters; a DoRA adapter's update depends on the base "
            "weights: use to_lora (adapterops to-lora) with the base checkpoint and a rank target"
        )
    policy = RankPolicy(**opts.target())
    modules, reports = map_modules(
        [loaded], [1.0], lambda _, terms: combine_module(terms, Method.SVD, policy), progress
    )
    modules, reports, totals = _ranked(modules, reports, opts)
    record = operation_record("resize", [loaded], **opts.target(), budget=totals)
    _warn_capped(reports, opts)
    return replace(result_adapter([loaded], modules, reports), provenance=record)


def to_dora(adapter: AdapterRef, base: BaseRef, *, progress: Progress | None = None) -> Adapter:
    """The DoRA adapter with the same merged weights: m = ||W + s B A||_row, factors unchanged. Exact.

    Example: ``to_dora("./lora", "./base")``: PEFT merges it to the LoRA's merged weights.
    """
    opts = ToDoraOptions(base=base)
    loaded = as_adapter(adapter)
    if loaded.is_dora:
        raise InvalidInputError(f"{loaded.describe()} is already a DoRA adapter")
    _no_embeddings(loaded, "to-dora")
    weights = as_base(opts.base)

    def one(_: str, terms: Terms) -> tuple[LoraModule, ModuleReport]:
        module = weights.resolve(terms[0][1])
        magnitude = row_norms(weights.weight(module, loaded.describe()), module).to(module.A.dtype)
        return replace(module, magnitude=magnitude), ModuleReport(module.name, module.rank, module.rank)

    modules, reports = map_modules([loaded], [1.0], one, progress)
    record = operation_record("to-dora", [loaded], base=checkpoint_record(weights.checkpoint))
    return Adapter(modules, loaded.full_tensors, loaded.config, None, record, reports)


def to_lora(
    adapter: AdapterRef,
    base: BaseRef,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    budget_params: int | str | None = None,
    budget_error: float | None = None,
    exact_limit: int = 1024,
    progress: Progress | None = None,
) -> Adapter:
    """Best low-rank LoRA of each DoRA module's effective update dW_eff (see ``ops.dora``).

    One of ``rank``, ``energy``, ``sv_ratio`` sets the rank per module, or a budget over all modules
    (``budget_params``, ``budget_error``, as for ``resize``; each module's rank at most ``max_rank``,
    else the DoRA's own rank); ``max_rank`` caps any of them, or alone is the rank of every module.
    Modules whose smaller side is at most ``exact_limit`` get an exact SVD; larger ones a randomized
    one. Each module's report says which, and its exact relative error.

    Example: ``to_lora("./dora", "./base", rank=16)``; ``max(r.rel_error for r in out.report)``.
    """
    opts = ToLoraOptions(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        max_rank=max_rank,
        budget_params=cast(int, budget_params),  # the record parses "20M"
        budget_error=budget_error,
        base=base,
        exact_limit=exact_limit,
    )
    loaded = as_adapter(adapter)
    if not loaded.is_dora:
        raise InvalidInputError(f"{loaded.describe()} is not a DoRA adapter (no lora_magnitude_vector)")
    _no_embeddings(loaded, "to-lora")
    combined = CombineOptions(
        method=Method.SVD, base=opts.base, exact_limit=opts.exact_limit, **opts.target()
    )
    result, record = _sum([loaded], [1.0], combined, progress)
    record.pop("method", None)
    record.update(opts.target())
    _warn_capped(result.report, opts)
    return replace(result, provenance=operation_record("to-lora", [loaded], **record))


# ------------------------------------------------------------------------------------------ internals


def _sum(
    adapters: list[Adapter], weights: list[Weight], opts: CombineOptions, progress: Progress | None
) -> tuple[Adapter, dict[str, Any]]:
    """The weighted sum per module with the kernel each module needs, and the record's fields."""
    check_bases(adapters, opts.allow_different_bases)
    dora_inputs = any(a.is_dora for a in adapters)
    policy = RankPolicy(**opts.target())
    form = opts.form
    if form is Form.AUTO:
        form = Form.DORA if dora_inputs and opts.method is Method.EXACT else Form.LORA
    if dora_inputs and opts.method in MERGING:
        dora = next(a for a in adapters if a.is_dora)
        verb = "sparsifies" if opts.method in SPARSIFYING else "merges"
        raise UnsupportedAdapterError(
            f"{dora.describe()}: DoRA adapter (lora_magnitude_vector); method {opts.method.value} {verb} "
            "LoRA updates s*B@A, which a DoRA's update is not: convert it first with to-lora (and --base)"
        )
    if not dora_inputs and form is Form.LORA:
        sparsity, fraction = _sparsity(opts), _common_fraction(opts)
        modules, reports = map_modules(
            adapters,
            weights,
            lambda _, terms: combine_module(terms, opts.method, policy, sparsity, opts.exact_limit, fraction),
            progress,
        )
        modules, reports, totals = _ranked(modules, reports, opts)
        return result_adapter(adapters, modules, reports), {"method": opts.method.value, "budget": totals}

    if opts.base is None:
        dora = next(a for a in adapters if a.is_dora)
        raise UnsupportedAdapterError(
            f"{dora.describe()}: DoRA adapter (lora_magnitude_vector): its update depends on the base weights, "
            f"so factor arithmetic alone would be wrong; pass the base checkpoint ({param('base')})"
        )
    if any(callable(w) for w in weights):
        raise InvalidInputError("per-module weights (filters, gradients) are not supported with DoRA yet")
    if opts.method not in (Method.EXACT, Method.SVD):
        raise InvalidInputError(
            f"DoRA inputs are combined by SVD of their effective updates, not {opts.method.value}"
        )
    for adapter in adapters:
        if adapter.is_dora or form is Form.DORA:
            _no_embeddings(adapter, "DoRA output" if form is Form.DORA else "DoRA arithmetic")
    base = as_base(opts.base)
    who = ", ".join(a.describe() for a in adapters)

    def one(_: str, terms: Terms) -> tuple[LoraModule, ModuleReport]:
        resolved = [(w, base.resolve(m)) for w, m in terms]
        if form is Form.DORA:
            return sum_as_dora(base.weight(resolved[0][1], who), resolved)
        if not any(m.is_dora for _, m in terms):
            method = Method.EXACT if policy.is_exact else Method.SVD
            return combine_module(terms, method, policy)
        return sum_as_lora(base.weight(resolved[0][1], who), resolved, policy, exact_limit=opts.exact_limit)

    modules, reports = map_modules(adapters, weights, one, progress)
    if not all(math.isfinite(r.rel_error) for r in reports):
        raise InvalidInputError("the result has non-finite values; check the base weights and the magnitudes")
    modules, reports, totals = _ranked(modules, reports, opts)
    if form is Form.LORA and dora_inputs and opts.method is Method.EXACT:
        worst = max(reports, key=lambda r: r.rel_error)
        warnings.warn(
            f"DoRA inputs written as a LoRA are an approximation: worst module relative error "
            f"{worst.rel_error:.3g} ({worst.name}); the default, {param('form', 'auto')}, writes the exact DoRA",
            ApproximationWarning,
            stacklevel=4,
        )
    method = "dora-exact" if form is Form.DORA else "dense-svd" if dora_inputs else "exact"
    record = {"method": method, "base": checkpoint_record(base.checkpoint), "budget": totals}
    if form is Form.DORA:
        record["form"] = Form.DORA.value
    return result_adapter(adapters, modules, reports), record


def _ranked(
    modules: dict[str, LoraModule], reports: tuple[ModuleReport, ...], target: RankTarget
) -> tuple[dict[str, LoraModule], tuple[ModuleReport, ...], dict[str, Any] | None]:
    """With a budget, every module's rank chosen over all of them (``ops.budget``), and the totals."""
    if not target.is_global:
        return modules, reports, None
    return apply_budget(modules, reports, target)


def _warn_capped(reports: Sequence[ModuleReport], target: RankTarget) -> None:
    """One warning naming the modules whose asked rank was above what they hold (the notes say each)."""
    capped = [r for r in reports if r.note and r.note.startswith(FULL_RANK)]
    if not capped:
        return
    listed = ", ".join(f"{r.name} ({r.rank_out})" for r in capped[:3])
    more = f" and {len(capped) - 3} more" if len(capped) > 3 else ""
    warnings.warn(
        f"{len(capped)} module{'s' if len(capped) > 1 else ''} capped at {'their' if len(capped) > 1 else 'its'} "
        f"full rank ({param('rank', target.rank)} asked for more): {listed}{more}; each one's report has a note",
        RankCapWarning,
        stacklevel=3,
    )


def _sparsity(opts: CombineOptions) -> Sparsity:
    """The sparsifying methods' parameters, defaults filled in."""
    return Sparsity(
        density=1.0 if opts.density is None else opts.density,
        majority_sign=opts.majority_sign or MajoritySign.TOTAL,
        seed=opts.seed or 0,
        space=opts.space or Space.DENSE,
    )


def _common_fraction(opts: CombineOptions) -> float:
    """iso_cts's share of common directions: the option, or the paper's 0.8."""
    return 0.8 if opts.common_fraction is None else opts.common_fraction


def _single(
    operation: str,
    adapter: Adapter,
    factor: float,
    base: BaseRef | None,
    form: Form,
    progress: Progress | None,
    **fields: Any,
) -> Adapter:
    opts = CombineOptions(base=base, form=form)
    result, record = _sum([adapter], [factor], opts, progress)
    record.pop("method", None)
    return replace(result, provenance=operation_record(operation, [adapter], **record, **fields))


def _no_embeddings(adapter: Adapter, verb: str) -> None:
    for module in adapter.modules.values():
        if module.kind is ModuleKind.EMBEDDING:
            raise UnsupportedAdapterError(
                f"{adapter.describe()}: module {module.name} is an embedding; {verb} supports DoRA on linear, "
                "Conv1D and conv layers (PEFT's embedding DoRA scales columns, not rows)"
            )
        if module.kind is ModuleKind.PARAMETER:
            raise UnsupportedAdapterError(
                f"{adapter.describe()}: module {module.name} is LoRA on a parameter (target_parameters, "
                f"expert weights); {verb} is not possible there, as PEFT has no DoRA for parameters"
            )


def convert(
    adapter: AdapterRef,
    output: str | Path,
    *,
    to: str | None = None,
    engine: Engine | str | None = None,
    base: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``adapter`` at ``output`` in format ``to`` (a name in ``adapterops.io.FORMATS``), or for
    serving engine ``engine`` (exactly one of them). ``base`` (a directory or Hub id with the base
    model's config.json) is needed by formats that name tensors the way a runtime does (``gguf`` and
    ``engine="llama.cpp"``: llama.cpp's names, q/k row permutation, one alpha: docs/formats.md),
    and names a kohya input's modules (SDXL, Flux: ``load_adapter``).

    ``to``: the same update in another file format, nothing else changed. ``engine`` (vllm, sglang,
    tgi, llama.cpp, diffusers): what that engine reads exactly as PEFT does (``serving.prepare``:
    one rank, scales folded into lora_B, the rounding error measured; docs/serving.md).

    Returns the path written. Refused with one line: what the target format or engine cannot hold
    (DoRA, lora_B bias, modules stored whole, modules the engine does not apply LoRA to, ...).

    Example:
        >>> convert("./peft-adapter", "adapter.gguf", to="gguf", base="./base")
        >>> convert("./peft-adapter", "./for-vllm", engine="vllm")
    """
    opts = ConvertOptions(to=to, engine=cast(Engine, engine), base=base)  # the record converts a str
    if opts.engine is not None:
        from adapterops import serving

        return serving.write(
            as_adapter(adapter, opts.base), output, opts.engine, base=opts.base, force=force
        )[0]
    assert opts.to is not None  # ConvertOptions: exactly one of to / engine
    if opts.to not in FORMATS:
        raise InvalidInputError(f"unknown {param('to')} {opts.to!r}; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[opts.to]
    takes_base = "base" in inspect.signature(fmt.write).parameters
    if isinstance(adapter, Adapter):
        names_kohya = adapter.config.get("format") == kohya.FORMAT
    else:
        names_kohya = kohya.detect(Path(adapter).expanduser())
    if opts.base is not None and not takes_base and not names_kohya:
        raise InvalidInputError(
            f"{param('base')} is not used by {param('to', opts.to)} (it names only a kohya input's modules); drop it"
        )
    from adapterops.io.atomic import check_output_path

    check_output_path(Path(output).absolute(), force=force, file=fmt.writes_file(output))
    loaded = as_adapter(adapter, opts.base)
    options: dict[str, Any] = {"force": force}
    if takes_base:
        options["base"] = opts.base
    return save_adapter(loaded, output, format=opts.to, **options)
