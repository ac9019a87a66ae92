"""``extract``: the LoRA adapter closest to a fine-tune, FINETUNED - BASE, module by module.

Two phases, so the memory stays a few tensors whatever the model size:

- **plan** (``plan_extraction``, headers and config.json only): both checkpoints must have the same
  architecture, tensor names, shapes and tying; each stored tensor is mapped onto the module of the
  loaded model it belongs to (transformers' load-time names and layer classes, ``io.model_names``),
  and each module gets a part: a LoRA target (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``,
  ``nn.Conv{1,2,3}d``), or a layer LoRA cannot target (norms), whole-saved or skipped by option.
- **execute** (``extract``): the parts in the base's file order; for each, its tensors are read from
  both checkpoints (one pair at a time), their difference D = W_ft - W_base is formed in float64
  in the math layout (``adapter.py``: Conv1D and embedding weights are stored transposed), and
  factored (``ops.extract.factor_difference``: Eckart-Young, the error measured on the stored
  factors). Modules whose difference is exactly zero are left out and counted.

With a rank budget over all modules (``budget_params``, ``budget_error``) execution makes two
passes over both checkpoints (twice the I/O): a spectrum pass (``_allocate``) reads each LoRA
module's difference, keeps only its error curve (``ops.extract.spectrum``) and cost, and chooses
every rank at once (``ops.budget.allocate``); the factor pass then extracts each module at its
rank. Quantized checkpoints are refused (extract reads floating-point weights only).

Memory: one module's tensors as stored, plus its difference in float64 and transient copies of
it (a float32 one for the randomized SVD): about 20 bytes per element of the largest weight (the
embedding, for most language models: 32000 x 2048 takes about 1.3 GB).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, ModuleReport, Solver
from adapterops.errors import (
    ApproximationWarning,
    IncompatibleAdaptersError,
    InvalidInputError,
    UnsupportedAdapterError,
    param,
)
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.model_names import Layer, LayerKind, LoadNames, transformers_knows
from adapterops.merging.execute import resolve_device
from adapterops.ops.budget import Item, allocate, budget_totals, item_ranks, rank_cost
from adapterops.ops.extract import SPECTRUM_CAP, factor_difference, spectrum
from adapterops.ops.lowrank import RankPolicy
from adapterops.options import Biases, Embeddings, ExtractOptions, Norms
from adapterops.provenance import checkpoint_record, operation_record

CheckpointRef = str | Path | Checkpoint
Progress = Callable[[int, str], None]  # (bytes read, module name)

HEAD = "lm_head"
# where config.json names no transformers model: an embedding is a 2-D weight of a module named so
_EMBEDDING_NAMES = re.compile(r"(^|_)(embed\w*|embeddings?|wte|wpe|shared|tok_embeddings)$")
_LORA_LAYERS = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.EMBEDDING, LayerKind.CONV)


@dataclass(frozen=True)
class Part:
    """One module of the loaded model and its stored tensors (same keys in both checkpoints).

    ``module`` is the module's name once loaded (PEFT's name for it), ``tensors`` maps each of its
    own parameters (``weight``, ``bias``, ...) to the stored key, ``fused`` is set for tensors
    transformers fuses or transforms into another at load time (they can only stay unchanged).
    """

    module: str
    layer: Layer
    tensors: Mapping[str, str]
    fused: bool = False

    @property
    def is_lora_target(self) -> bool:
        return self.layer.kind in _LORA_LAYERS and "weight" in self.tensors and not self.fused

    @property
    def is_vocabulary(self) -> bool:
        """An embedding or the output head: what ``embeddings`` decides for."""
        return self.layer.kind is LayerKind.EMBEDDING or self.module.rpartition(".")[2] == HEAD


@dataclass(frozen=True)
class ExtractionPlan:
    """What ``extract`` reads and how it treats each module; decided from headers and configs."""

    finetuned: Checkpoint
    base: Checkpoint
    parts: tuple[Part, ...]
    layers_from: str  # whose layer classes were used, or how they were guessed
    tied: Mapping[str, tuple[str, ...]]  # stored key of a tied tensor -> the other modules reading it
    loaded: Mapping[str, str]  # stored key -> name once loaded

    def module_tensors(self, module: str) -> list[tuple[str, str]]:
        """(name once loaded, stored key) of every tensor of ``module`` and of its children."""
        prefix = f"{module}."
        return sorted((name, key) for key, name in self.loaded.items() if name.startswith(prefix))


GUESSED = "guessed from tensor names and shapes"


@dataclass
class _Result:
    """What execution found, collected before the adapter is assembled."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    reports: list[ModuleReport] = field(default_factory=list)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # name once loaded -> tensor
    saved_modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # stored key -> why, for changed tensors left out
    unchanged: list[str] = field(default_factory=list)
    tied_saved: bool = False


def extract(
    finetuned: CheckpointRef,
    base: CheckpointRef,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    budget_params: int | str | None = None,
    budget_error: float | None = None,
    exact_limit: int = 1024,
    embeddings: Embeddings | str = Embeddings.LORA,
    norms: Norms | str = Norms.SAVE,
    biases: Biases | str = Biases.LORA,
    exclude: str | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> Adapter:
    """The LoRA adapter for ``base`` whose merge comes closest to ``finetuned``, module by module.

    For each module, D = W_finetuned - W_base (float64, math layout) is replaced by its best
    rank-k approximation (Eckart-Young): an exact SVD when min(out, in) <= ``exact_limit``, else a
    randomized one, checked for convergence (``ops.extract``). The error of the factors as stored
    (float32; float64 for float64 checkpoints) is measured, not estimated, and reported per module.

    Args:
        finetuned, base: checkpoint directories, Hub ids (``org/name@revision``) or ``Checkpoint``s of
            one architecture: same tensor names, shapes and tying (a resized vocabulary is refused).
        rank, energy, sv_ratio: the rank target, one of them (required): at most ``rank`` values per
            module, the fewest holding ``energy`` of ||D||_F², or those within ``sv_ratio`` of the largest.
        max_rank: caps ``energy``, ``sv_ratio`` or a budget (alone: every module at this rank, or its own if less).
        budget_params, budget_error: a budget over all modules instead: the total LoRA parameters (an
            int or ``"20M"``) or the total relative error; the ranks minimize the total squared error
            (docs/math.md, "Extraction"). Reads both checkpoints twice (spectra, then factors);
            ``provenance["budget"]`` holds the totals. Biases and modules saved whole are outside it.
        exact_limit: modules with min(out, in) up to this get an exact SVD.
        embeddings: changed ``nn.Embedding`` layers and ``lm_head``: ``lora``, ``save`` (stored whole,
            PEFT's ``modules_to_save``) or ``skip``.
        norms: changed layers LoRA cannot target (norms, ...): ``save`` (``modules_to_save``) or ``skip``.
        biases: changed biases of LoRA layers: ``lora`` (PEFT's ``lora_bias``) or ``skip``.
        exclude: a regular expression; modules whose name matches it (``re.search``) are left out.
        device: where the SVDs run: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: called with (bytes read, module name) after each module; with a budget, twice per
            module (its name then ends in ``(pass 1 of 2: spectrum)`` or ``(pass 2 of 2: factors)``).

    Returns:
        An ``Adapter`` (factors in float32, or float64 for float64 checkpoints, scale 1) with one
        ``ModuleReport`` per LoRA module; its ``provenance`` lists the modules saved whole, the
        changed tensors left out (each with the reason) and the modules that did not change.
        Anything changed that is left out also raises an ``ApproximationWarning``.

    Raises:
        IncompatibleAdaptersError: the checkpoints differ in architecture, tensors, shapes or tying.
        UnsupportedAdapterError: a change no PEFT LoRA can express as asked (quantized checkpoints,
            a changed tied embedding with ``embeddings="lora"``, tensors transformers fuses at load).

    Example:
        >>> adapter = extract("./my-finetune", "meta-llama/Llama-3.2-1B", rank=64)
        >>> save_adapter(adapter, "./extracted")
    """
    opts = ExtractOptions(
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        max_rank=max_rank,
        budget_params=cast(int, budget_params),  # the record parses "20M"
        budget_error=budget_error,
        exact_limit=exact_limit,
        embeddings=cast(Embeddings, embeddings),  # the record checks and converts a str
        norms=cast(Norms, norms),
        biases=cast(Biases, biases),
        exclude=exclude,
        device=device,
    )
    on = resolve_device(opts.device)
    ft = finetuned if isinstance(finetuned, Checkpoint) else open_checkpoint(finetuned)
    bs = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    plan = plan_extraction(ft, bs)
    result = _Result()
    if opts.is_global:
        budget = _allocate(plan, opts, on, progress)
        policies = {name: RankPolicy(rank=k) for name, k in budget.ranks.items()}
    else:
        budget, policy = None, RankPolicy(**opts.target())
    for part in plan.parts:
        size = _extract_part(
            plan, part, opts, policy if budget is None else policies.get(part.module), on, result
        )
        if progress:
            progress(size, part.module if budget is None else f"{part.module} (pass 2 of 2: factors)")
    return _assemble(plan, opts, result, budget)


# ------------------------------------------------------------------------------------------------ plan


def plan_extraction(finetuned: Checkpoint, base: Checkpoint) -> ExtractionPlan:
    """Check that the two checkpoints can be compared tensor by tensor, and group their tensors by
    module; reads headers and config.json only (and builds the model on the meta device)."""
    _check_pair(finetuned, base)
    names = base.load_names
    if names.problem is not None and transformers_knows(base.config):
        raise UnsupportedAdapterError(
            f"{base.describe()}: adapterops cannot tell which layer each tensor belongs to, which decides the "
            f"LoRA layout: {names.problem}"
        )
    loaded = {key: key for key in base.tensors}
    loaded.update({stored: name for name, stored in names.renamed.items()})
    fused = {key for keys in names.converted.values() for key in keys}
    guessed = not names.layers
    if guessed:
        warnings.warn(
            f"{base.describe()} is not a transformers model (config.json model_type "
            f"{base.config.get('model_type')!r}), so its layer types are guessed: a 2-D weight is an nn.Linear "
            "unless its module is named like an embedding, a 3-D to 5-D weight a convolution; check that PEFT "
            "loads the output without missing or unexpected keys",
            UserWarning,
            stacklevel=3,
        )
    groups: dict[str, dict[str, str]] = {}
    for key in base.tensors:  # file order: each shard is read front to back
        module, _, leaf = loaded[key].rpartition(".")
        groups.setdefault(module, {})[leaf] = key
    parts = []
    for module, tensors in groups.items():
        layer = _guess(module, tensors, base) if guessed else names.layers.get(module)
        is_fused = any(key in fused for key in tensors.values())
        parts.append(Part(module, layer or Layer(LayerKind.OTHER, ""), tensors, is_fused))
    return ExtractionPlan(
        finetuned,
        base,
        tuple(parts),
        GUESSED if guessed else names.origin,
        _tied(base, names, loaded),
        loaded,
    )


def _check_pair(ft: Checkpoint, base: Checkpoint) -> None:
    """Same architecture, tensor names, shapes and tying, and nothing quantized: else one clear error."""
    where = f"{ft.describe()} and {base.describe()}"
    for checkpoint in (ft, base):
        if checkpoint.quantization is not None:
            raise UnsupportedAdapterError(
                f"{checkpoint.describe()} is quantized ({checkpoint.quantization.describe()}); extract reads "
                "floating-point weights only: use the unquantized (bf16, fp16 or fp32) checkpoints"
            )
    for key in ("model_type", "architectures"):
        if ft.config.get(key) != base.config.get(key):
            raise IncompatibleAdaptersError(
                f"{where} are different models ({key} {ft.config.get(key)!r} and {base.config.get(key)!r} in "
                "config.json); extract needs the fine-tune and the model it was fine-tuned from"
            )
    if ft.tied != base.tied:
        raise IncompatibleAdaptersError(
            f"{ft.describe()} {'ties' if ft.tied else 'does not tie'} lm_head to the input embedding but "
            f"{base.describe()} {'does' if base.tied else 'does not'} (tie_word_embeddings); a LoRA cannot tie or "
            "untie weights: save both the same way"
        )
    missing = [k for k in base.tensors if k not in ft.tensors]
    extra = [k for k in ft.tensors if k not in base.tensors]
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"{ft.describe()} lacks {len(missing)} tensor(s) of the base (e.g. {missing[0]})")
        if extra:
            lines.append(f"{ft.describe()} has {len(extra)} tensor(s) the base lacks (e.g. {extra[0]})")
        raise IncompatibleAdaptersError(
            f"{'; '.join(lines)}; extract needs both checkpoints to store the same tensors (a fine-tune of this "
            "base, saved the same way)"
        )
    for key, (_, entry) in base.tensors.items():
        shape = ft.tensors[key][1].shape
        if shape != entry.shape:
            hint = (
                ": the fine-tune resized the vocabulary, which no LoRA can do; resize the base's embeddings to "
                f"match (model.resize_token_embeddings({shape[0]})), save it, and extract against that"
                if len(shape) == 2 and shape[1:] == entry.shape[1:]
                else "; extract needs the fine-tune and the model it was fine-tuned from"
            )
            raise IncompatibleAdaptersError(
                f"{key} is {shape} in {ft.describe()} but {entry.shape} in {base.describe()}{hint}"
            )


def _guess(module: str, tensors: Mapping[str, str], base: Checkpoint) -> Layer:
    """The layer of a module of a checkpoint whose config.json names no transformers model: a 2-D
    weight is an ``nn.Linear`` unless the module is named like an embedding, and a 3-D to 5-D weight
    a convolution (the record says the layers were guessed)."""
    key = tensors.get("weight")
    if key is None:
        return Layer(LayerKind.OTHER, "")
    dims = len(base.tensors[key][1].shape)
    leaf = module.rpartition(".")[2]
    if dims == 2:
        return Layer(LayerKind.EMBEDDING if _EMBEDDING_NAMES.search(leaf) else LayerKind.LINEAR, "")
    return Layer(LayerKind.CONV if dims in (3, 4, 5) else LayerKind.OTHER, "")


def _tied(base: Checkpoint, names: LoadNames, loaded: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Stored key of each tensor another module also reads once loaded -> those modules' names."""
    stored = {name: key for key, name in loaded.items()}
    tied: dict[str, tuple[str, ...]] = {}
    for name, others in names.tied.items():
        if name in stored:
            tied[stored[name]] = tuple(o.removesuffix(".weight") for o in others)
    head = base.tied_head
    if head is not None and head.head.removesuffix(".weight") not in tied.get(head.embedding, ()):
        tied[head.embedding] = (*tied.get(head.embedding, ()), head.head.removesuffix(".weight"))
    return tied


# --------------------------------------------------------------------------------------------- execute


def _extract_part(
    plan: ExtractionPlan,
    part: Part,
    opts: ExtractOptions,
    policy: RankPolicy | None,
    device: torch.device,
    result: _Result,
) -> int:
    """Compare, factor, save or skip one module; returns the bytes read. ``policy`` None: the module
    had no difference to factor when the spectrum pass of a budget read it."""
    start = time.perf_counter()
    changed, size = _read(plan, part)
    lora = _lora_changes(plan, part, opts, changed, result)
    if lora is None:
        return size
    if policy is None:
        raise InvalidInputError(
            f"{part.module}: its difference was zero or not read when extract first read the checkpoints (the "
            "spectrum pass of a budget) but is not now: a checkpoint changed while extract ran; run it again"
        )
    weight, bias = lora
    dtype = torch.float64 if _stored_as_float64(plan, part) else torch.float32
    module, report = _lora(plan, part, weight, bias, policy, opts.exact_limit, device, dtype)
    result.modules[module.name] = module
    result.reports.append(replace(report, seconds=time.perf_counter() - start))
    return size


def _read(plan: ExtractionPlan, part: Part) -> tuple[dict[str, torch.Tensor], int]:
    """The differences of ``part``'s tensors that changed (leaf -> float64 difference), and the bytes read."""
    changed: dict[str, torch.Tensor] = {}
    for leaf, key in part.tensors.items():
        difference = _difference(plan, key)
        if difference is not None:
            changed[leaf] = difference
    return changed, _size(plan, part)


def _size(plan: ExtractionPlan, part: Part) -> int:
    return sum(
        plan.base.tensors[key][1].nbytes + plan.finetuned.tensors[key][1].nbytes
        for key in part.tensors.values()
    )


def _lora_changes(
    plan: ExtractionPlan, part: Part, opts: ExtractOptions, changed: dict[str, torch.Tensor], result: _Result
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """What of ``part``'s ``changed`` differences a LoRA carries: (weight, bias), either None where
    unchanged or left out; None where the module gets no LoRA (unchanged, saved whole or skipped,
    recorded in ``result``). Refuses the changes no PEFT LoRA can express."""
    if not changed:
        result.unchanged.append(part.module)
        return None
    if opts.exclude is not None and re.search(opts.exclude, part.module):
        _skip(result, part, changed, f"excluded ({param('exclude')})")
        return None
    if part.fused:
        raise UnsupportedAdapterError(
            f"{part.module}: {_listed(part, changed)} changed, and {plan.layers_from} fuses or transforms these "
            "stored tensors at load time, so no PEFT LoRA can be written for them; pass "
            f"{param('exclude', repr(part.module))} to leave them out (reported)"
        )
    if not part.is_lora_target:
        if not part.layer.cls and plan.layers_from != GUESSED:
            raise UnsupportedAdapterError(
                f"{part.module}: {_listed(part, changed)} changed, but {plan.layers_from} has no module "
                f"{part.module} to carry the change; pass {param('exclude', repr(part.module))} to leave it out"
            )
        if opts.norms is Norms.SKIP:
            _skip(
                result, part, changed, f"{_what(part)}, which LoRA cannot target ({param('norms', 'skip')})"
            )
        else:
            _save(plan, part, result)
        return None
    if part.is_vocabulary and opts.embeddings is not Embeddings.LORA:
        if opts.embeddings is Embeddings.SKIP:
            _skip(result, part, changed, f"{_what(part)} ({param('embeddings', 'skip')})")
        else:
            _save(plan, part, result)
        return None
    weight_key = part.tensors["weight"]
    if weight_key in plan.tied and "weight" in changed:
        others = ", ".join(plan.tied[weight_key])
        raise UnsupportedAdapterError(
            f"{part.module}: the weight changed, and {others} reads the same tensor (tied weights, "
            f"tie_word_embeddings), while PEFT applies a LoRA to {part.module} alone; pass "
            f"{param('embeddings', 'save')} to store the changed weight whole for both, or "
            f"{param('embeddings', 'skip')} to leave it out (reported)"
        )
    unknown = [leaf for leaf in changed if leaf not in ("weight", "bias")]
    if unknown:
        raise UnsupportedAdapterError(
            f"{part.module}: {', '.join(part.tensors[leaf] for leaf in unknown)} changed, and a LoRA on this "
            f"{_what(part)} changes only its weight and bias; pass {param('exclude', repr(part.module))} to leave "
            "the module out (reported)"
        )
    bias = changed.pop("bias", None)
    if bias is not None and opts.biases is Biases.SKIP:
        change = float(bias.norm()) / max(float(plan.base.read(part.tensors["bias"]).double().norm()), 1e-300)
        result.skipped[part.tensors["bias"]] = (
            f"changed (relative change {change:.3g}); biases left out ({param('biases', 'skip')})"
        )
        bias = None
    weight = changed.pop("weight", None)
    if weight is None and bias is None:
        return None
    return weight, bias


# ---------------------------------------------------------------------------------- budget: pass 1


@dataclass(frozen=True)
class _Budget:
    """A budget's allocation from the spectrum pass: each LoRA module's rank, its ||D||_F^2, the modules
    whose rank reached ``SPECTRUM_CAP`` and the allocation's totals (``ops.budget.budget_totals``)."""

    ranks: dict[str, int]
    energies: dict[str, float]
    at_cap: frozenset[str]
    totals: dict[str, Any] | None


def _allocate(
    plan: ExtractionPlan, opts: ExtractOptions, device: torch.device, progress: Progress | None
) -> _Budget:
    """Pass 1 of a budget: every LoRA module's difference read once (the same reading and checks as
    the factor pass), its tails (``ops.extract.spectrum``) and rank cost (``ops.budget.rank_cost``),
    then the ranks over all modules (``ops.budget.allocate``). Modules saved whole, skipped or
    excluded are not read here and are outside the budget."""
    items: list[Item] = []
    energies: dict[str, float] = {}
    capped: set[str] = set()
    scratch = _Result()  # the factor pass records the modules again
    for part in plan.parts:
        size = _size(plan, part)
        if _may_be_lora(part, opts):
            changed, size = _read(plan, part)
            lora = _lora_changes(plan, part, opts, changed, scratch)
            if lora is not None:
                _, transposed, _, stored = _layout(plan, part)
                out, inp = _math_shape(stored, transposed)
                tails: tuple[float, ...] = (0.0, 0.0)  # only the bias changed: rank 1, zero factors
                if lora[0] is not None:
                    M = _matrix(lora[0], transposed, stored)
                    spectra = spectrum(M.to(device), max_rank=opts.max_rank, exact_limit=opts.exact_limit)
                    tails = spectra.tails
                    if spectra.capped:
                        capped.add(part.module)
                items.append(Item(((part.module, tails),), rank_cost(out, inp)))
                energies[part.module] = tails[0]
        if progress:
            progress(size, f"{part.module} (pass 1 of 2: spectrum)")
    if not items:  # nothing to factor: the factor pass finds it and says so
        return _Budget({}, {}, frozenset(), None)
    found = allocate(items, opts)
    ranks = item_ranks(items, found)
    at_cap = frozenset(m for m in capped if ranks[m] == SPECTRUM_CAP)
    return _Budget(ranks, energies, at_cap, budget_totals(found, opts))


def _may_be_lora(part: Part, opts: ExtractOptions) -> bool:
    """Whether ``part`` gets a LoRA if it changed: what the spectrum pass reads."""
    excluded = opts.exclude is not None and re.search(opts.exclude, part.module) is not None
    vocabulary_elsewhere = part.is_vocabulary and opts.embeddings is not Embeddings.LORA
    return part.is_lora_target and not excluded and not vocabulary_elsewhere


def _difference(plan: ExtractionPlan, key: str) -> torch.Tensor | None:
    """W_ft - W_base for stored tensor ``key`` in float64, or None where they are equal."""
    ft, base = plan.finetuned, plan.base
    if not all(c.tensors[key][1].torch_dtype.is_floating_point for c in (ft, base)):
        # integer buffers (position ids and the like): equal, or a change no adapter can carry
        if torch.equal(ft.read(key), base.read(key)):
            return None
        raise UnsupportedAdapterError(
            f"{key}: an integer tensor that differs between {ft.describe()} and {base.describe()}; no adapter "
            "can change it"
        )
    difference = ft.read(key).to(torch.float64)
    difference.sub_(base.read(key))
    if not bool(torch.isfinite(difference).all()):
        raise InvalidInputError(
            f"{key}: the difference of {ft.describe()} and {base.describe()} has NaN or Inf values; one of the "
            "checkpoints is damaged"
        )
    return difference if bool(difference.any()) else None


def _lora(
    plan: ExtractionPlan,
    part: Part,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    policy: RankPolicy,
    exact_limit: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[LoraModule, ModuleReport]:
    """The LoRA module of one layer from its weight's difference (stored layout, None where only the
    bias changed: then zero factors of rank 1) and its bias's difference."""
    kind, transposed, kernel, stored = _layout(plan, part)
    if weight is None:
        out, inp = _math_shape(stored, transposed)
        A, B = torch.zeros(1, inp, dtype=dtype), torch.zeros(out, 1, dtype=dtype)
        report = ModuleReport(part.module, 0, 1, 1.0, 0.0, Solver.DENSE)
    else:
        M = _matrix(weight, transposed, stored)
        low = factor_difference(M.to(device), policy, exact_limit=exact_limit, dtype=dtype)
        A, B = low.A.cpu(), low.B.cpu()
        report = ModuleReport(
            part.module,
            min(M.shape),
            int(A.shape[0]),
            low.energy_kept,
            low.rel_error,
            low.solver,
            note=low.note,
        )
    bias = None if bias is None else bias.to(dtype)
    return LoraModule(part.module, A, B, 1.0, kind, transposed, kernel, bias), report


def _layout(plan: ExtractionPlan, part: Part) -> tuple[ModuleKind, bool, tuple[int, ...], tuple[int, ...]]:
    """A LoRA layer's kind, whether its weight is stored transposed (Conv1D, embeddings), its kernel
    (convolutions) and its weight's stored shape."""
    kind, transposed = ModuleKind.LINEAR, part.layer.kind is LayerKind.CONV1D
    if part.layer.kind is LayerKind.EMBEDDING:
        kind, transposed = ModuleKind.EMBEDDING, True
    elif part.layer.kind is LayerKind.CONV:
        kind = ModuleKind.CONV
    stored = plan.base.tensors[part.tensors["weight"]][1].shape
    kernel = tuple(int(k) for k in stored[2:]) if kind is ModuleKind.CONV else ()
    return kind, transposed, kernel, stored


def _math_shape(stored: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(out, in) of the difference in the math layout (a convolution's in counts its kernel)."""
    return (int(stored[1]), int(stored[0])) if transposed else (int(stored[0]), math.prod(stored[1:]))


def _matrix(weight: torch.Tensor, transposed: bool, stored: tuple[int, ...]) -> torch.Tensor:
    """A weight's difference (stored layout) as the (out, in) matrix of the math layout."""
    return weight.T if transposed else weight.reshape(stored[0], -1)


def _stored_as_float64(plan: ExtractionPlan, part: Part) -> bool:
    return all(
        c.tensors[key][1].torch_dtype == torch.float64
        for c in (plan.finetuned, plan.base)
        for key in part.tensors.values()
    )


def _save(plan: ExtractionPlan, part: Part, result: _Result) -> None:
    """Store ``part``'s module whole (PEFT ``modules_to_save``): every tensor of it and of its children
    as the fine-tune has them; where its weight is tied to other modules, theirs too (they read it)."""
    for name, key in plan.module_tensors(part.module):
        result.saved[name] = plan.finetuned.read(key)
    result.saved_modules.append(part.module)
    weight = part.tensors.get("weight")
    for other in plan.tied.get(weight, ()) if weight is not None else ():
        result.saved[f"{other}.weight"] = result.saved[f"{part.module}.weight"]
        result.saved_modules.append(other)
        result.tied_saved = True


def _skip(result: _Result, part: Part, changed: Mapping[str, torch.Tensor], why: str) -> None:
    for leaf, difference in changed.items():
        result.skipped[part.tensors[leaf]] = (
            f"changed (norm of the change {float(difference.norm()):.3g}); {why}"
        )


def _listed(part: Part, changed: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(part.tensors[leaf] for leaf in changed)


def _what(part: Part) -> str:
    """How messages name a module's layer: its class (``LlamaRMSNorm``), or its kind where guessed."""
    return part.layer.cls or f"{part.layer.kind.value} layer"


# -------------------------------------------------------------------------------------------- assemble


def _assemble(plan: ExtractionPlan, opts: ExtractOptions, result: _Result, budget: _Budget | None) -> Adapter:
    """The adapter from the collected results: LoRA modules, modules saved whole, config and record."""
    ft, base = plan.finetuned, plan.base
    if not result.modules:
        what = (
            f"only layers LoRA cannot target changed ({', '.join(result.saved_modules[:3])}), and a PEFT LoRA "
            "adapter needs at least one LoRA module"
            if result.saved_modules
            else "no tensor that is not left out differs"
            if result.skipped
            else "no tensor differs"
        )
        raise InvalidInputError(f"{ft.describe()} and {base.describe()}: {what}; there is nothing to extract")
    if any(m.bias is not None for m in result.modules.values()):
        _check_lora_bias(plan, result)
    saved = sorted(set(result.saved_modules))
    _check_saved(plan, saved, result)
    totals = None if budget is None else _budget_totals(opts, result, budget)
    config: dict[str, Any] = {"base_model_name_or_path": base.repo_id or str(base.root)}
    architectures = base.config.get("architectures") or []
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        config["task_type"] = "CAUSAL_LM"
    if any(m.kind is ModuleKind.LINEAR and m.transposed for m in result.modules.values()):
        config["fan_in_fan_out"] = True  # GPT-2 Conv1D layers; PEFT corrects it per layer where they mix
    if saved:
        config["modules_to_save"] = saved
    if result.tied_saved:
        config["ensure_weight_tying"] = True  # the saved copies of tied layers stay tied in PEFT
    record = operation_record(
        "extract",
        [],
        finetuned=checkpoint_record(ft),
        base=checkpoint_record(base),
        **opts.target(),
        exact_limit=opts.exact_limit,
        embeddings=opts.embeddings.value,
        norms=opts.norms.value,
        biases=opts.biases.value,
        exclude=opts.exclude,
        layers=plan.layers_from,
        modules_to_save=saved or None,
        skipped=dict(sorted(result.skipped.items())) or None,
        unchanged=result.unchanged or None,
        budget=totals,
    )
    if result.skipped:
        first, why = next(iter(sorted(result.skipped.items())))
        more = f" and {len(result.skipped) - 1} more" if len(result.skipped) > 1 else ""
        warnings.warn(
            f"{len(result.skipped)} changed tensor(s) left out of the adapter, which therefore does not reproduce "
            f"them: {first} ({why}){more}; the output's record lists them all",
            ApproximationWarning,
            stacklevel=3,
        )
    return Adapter(result.modules, result.saved, config, None, record, tuple(result.reports))


def _budget_totals(opts: ExtractOptions, result: _Result, budget: _Budget) -> dict[str, Any]:
    """The allocation's totals with what the factor pass measured: the parameters written and the total
    relative error sqrt(sum rel_error_m^2 ||D_m||^2 / sum ||D_m||^2) of the stored factors. Notes the
    modules whose rank reached ``SPECTRUM_CAP``; warns where the measured error misses ``budget_error``."""
    totals = dict(budget.totals or {})
    energy = sum(budget.energies.values())
    squared = sum(r.rel_error**2 * budget.energies[r.name] for r in result.reports)
    totals.update(
        params=sum(rank_cost(m.out_features, m.in_features) * m.rank for m in result.modules.values()),
        rel_error=math.sqrt(squared / energy) if energy > 0 else 0.0,
    )
    for i, r in enumerate(result.reports):
        if r.name in budget.at_cap:
            note = (
                f"budget rank at the spectrum cap {SPECTRUM_CAP} of modules above exact_limit: pass "
                f"{param('max_rank', 'K')} to allow more"
            )
            result.reports[i] = replace(r, note=note)
    if opts.budget_error is not None and totals["rel_error"] > opts.budget_error:
        allocated = (budget.totals or {}).get("rel_error", 0.0)
        warnings.warn(
            f"total relative error {totals['rel_error']:.6g} measured on the stored factors is above "
            f"{param('budget_error', opts.budget_error)} (the allocation's {allocated:.6g}, from the spectra, "
            "before the factors were rounded to their dtype); lower budget_error a little",
            ApproximationWarning,
            stacklevel=4,
        )
    return totals


def _check_lora_bias(plan: ExtractionPlan, result: _Result) -> None:
    """PEFT's ``lora_bias`` applies to every LoRA layer of an adapter: each must have a bias, and none
    may be an embedding (PEFT refuses ``lora_bias`` there)."""
    with_bias = next(m.name for m in result.modules.values() if m.bias is not None)
    fix = f"pass {param('biases', 'skip')} to leave the bias changes out (reported)"
    parts = {p.module: p for p in plan.parts}
    for module in result.modules.values():
        if module.kind is ModuleKind.EMBEDDING:
            raise UnsupportedAdapterError(
                f"biases changed ({with_bias}, ...), which PEFT carries with lora_bias, and PEFT has no lora_bias for "
                f"the embedding {module.name}: {fix}, or {param('embeddings', 'save')} to store the embedding whole"
            )
        if "bias" not in parts[module.name].tensors:
            raise UnsupportedAdapterError(
                f"biases changed ({with_bias}, ...), which PEFT carries with lora_bias, but {module.name} has no bias "
                f"and lora_bias applies to every LoRA layer (PEFT cannot merge it there): {fix}"
            )


def _check_saved(plan: ExtractionPlan, saved: list[str], result: _Result) -> None:
    """PEFT finds a ``modules_to_save`` entry as a *suffix* of module names (``key.endswith(entry)``) and
    replaces the whole module: no other module may end with its name, and none may hold a LoRA module."""
    names = set(plan.base.load_names.layers) or {
        ".".join(name.split(".")[:i]) for name in plan.loaded.values() for i in range(1, name.count(".") + 1)
    }
    for entry in saved:
        clash = sorted(n for n in names if n != entry and n.endswith(entry))
        if clash:
            raise UnsupportedAdapterError(
                f"{entry} changed and must be stored whole (PEFT modules_to_save), but PEFT would also replace "
                f"{clash[0]}, whose name ends the same way; pass {param('exclude', repr(entry))} to leave it out"
            )
        inner = sorted(m for m in result.modules if m.startswith(f"{entry}."))
        if inner:
            raise UnsupportedAdapterError(
                f"{entry} changed and must be stored whole (PEFT modules_to_save), but it holds {inner[0]}, which "
                f"gets a LoRA; pass {param('exclude', repr(entry))} to leave it out"
            )
