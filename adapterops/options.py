"""One description per verb: the options it takes, with their types, defaults, checks and help.

Each verb's options are a frozen dataclass. Three consumers read them, so they cannot drift:

- the Python functions (``verbs``, ``merge``) build one from their keyword arguments, and its
  ``__post_init__`` checks them (errors name the option with ``errors.param``);
- the CLI generates its click options from the fields (``cli/_options.py``);
- recipes validate a step's keys and values against the fields (``recipe/schema.py``).

A new option is one field here (and one keyword in the function that uses it; a test checks the
signatures). This module imports no torch: ``adapterops --help`` reads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any

from adapterops.errors import InvalidInputError, param


class Method(str, Enum):
    """How ``combine`` represents the weighted sum (docs/math.md)."""

    EXACT = "exact"
    CAT = "cat"
    SVD = "svd"
    LINEAR = "linear"
    TIES = "ties"
    DARE_LINEAR = "dare_linear"
    DARE_TIES = "dare_ties"
    MAGNITUDE_PRUNE = "magnitude_prune"
    TSV = "tsv"
    ISO_C = "iso_c"
    ISO_CTS = "iso_cts"


# methods that sparsify each module's update, in the space ``Space`` says (docs/math.md, ops/sparsify.py)
SPARSIFYING = (Method.TIES, Method.DARE_LINEAR, Method.DARE_TIES, Method.MAGNITUDE_PRUNE)
SIGN_ELECTING = (Method.TIES, Method.DARE_TIES)
RANDOM = (Method.DARE_LINEAR, Method.DARE_TIES)
# methods that build a new spectrum from the updates' singular vectors (ops/native.py)
SPECTRAL = (Method.TSV, Method.ISO_C, Method.ISO_CTS)
# methods whose result is not the weighted sum: LoRA inputs only, no lora_B bias, rank targets optional
MERGING = (*SPARSIFYING, *SPECTRAL)


class Space(str, Enum):
    """Where a sparsifying method acts (docs/math.md): the dense updates s_i B_i A_i, their coordinates
    in a shared basis (``core``: Core Space merging; ``knots``: KnOTS), or PEFT's factor-wise variant
    (``peft-factors``: A and B separately, as PEFT's non-svd ``add_weighted_adapter`` does)."""

    DENSE = "dense"
    CORE = "core"
    KNOTS = "knots"
    PEFT_FACTORS = "peft-factors"


class MajoritySign(str, Enum):
    """How TIES elects each entry's sign: ``total``, sign of the sum; ``frequency``, of the sum of signs."""

    TOTAL = "total"
    FREQUENCY = "frequency"


class Form(str, Enum):
    """What an adapter verb writes: a LoRA, or a DoRA (which holds sums of DoRA inputs exactly).

    ``auto``: a DoRA when an input is DoRA and the method is exact (the exact result), else a LoRA.
    """

    AUTO = "auto"
    LORA = "lora"
    DORA = "dora"


class OutputDtype(str, Enum):
    """Storage dtype of written factors; ``auto`` keeps the inputs'."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT64 = "float64"


class Engine(str, Enum):
    """A serving engine ``convert --for`` writes for (docs/serving.md: what each one reads)."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMA_CPP = "llama.cpp"
    DIFFUSERS = "diffusers"


class MergeDtype(str, Enum):
    """How a merge writes a quantized checkpoint's weights: auto keeps the checkpoint's format
    (FP8/int8 with recomputed scales, the error reported); a float dtype dequantizes them all."""

    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Embeddings(str, Enum):
    """What ``extract`` does with a changed embedding or output head (``nn.Embedding`` layers, ``lm_head``):
    a LoRA on it, the whole layer saved (PEFT ``modules_to_save``), or nothing (reported)."""

    LORA = "lora"
    SAVE = "save"
    SKIP = "skip"


class Norms(str, Enum):
    """What ``extract`` does with a changed layer that LoRA cannot target (norms and the like): save it
    whole (PEFT ``modules_to_save``) or leave it out (reported)."""

    SAVE = "save"
    SKIP = "skip"


class Biases(str, Enum):
    """What ``extract`` does with a changed bias of a LoRA-targeted layer: PEFT's ``lora_bias``, or
    leave it out (reported)."""

    LORA = "lora"
    SKIP = "skip"


WEIGHTS = "weights"  # the ``type`` of a per-input weights option: numbers on the CLI, weight specs in recipes
COUNT = "count"  # the ``type`` of a count option: an int, or a string with a suffix (20M, 1.5G, 500K)

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_COUNT_LIMIT = Decimal(10) ** 18
_COUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*$")


def parse_count(value: object, name: str) -> int:
    """A whole number given as an int or a string with an SI suffix: K = 10^3, M = 10^6, G = 10^9.

    Example: ``parse_count("1.5G", "budget_params")`` -> 1500000000; ``"20M"`` -> 20000000;
    ``"1.0005K"`` is an error (not a whole number).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidInputError(
            f"{param(name)} must be a whole number such as 20000000 or 20M, got {_shown(value)}"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidInputError(f"{param(name)} must be a whole number, got {_shown(value)}")
        return int(value)
    match = _COUNT.match(value)
    try:
        number = Decimal(match.group(1)) * _SUFFIXES[match.group(2).upper()] if match else None
    except InvalidOperation:
        number = None
    except ArithmeticError:  # decimal.Overflow: an exponent beyond Decimal's range
        number = _COUNT_LIMIT + 1
    if number is not None and number > _COUNT_LIMIT:  # before int(): "1e999999999" would be a huge int
        raise InvalidInputError(f"{param(name)} must be at most {_COUNT_LIMIT:.0e}, got {_shown(value)}")
    if number is None or number != number.to_integral_value():
        raise InvalidInputError(
            f"{param(name)} must be a whole number, optionally with a suffix K, M or G (20M, 1.5G, 500K), "
            f"got {_shown(value)}"
        )
    return int(number)


def _shown(value: object) -> str:
    """``repr(value)``, cut to 40 characters: an error line quotes untrusted input, not all of it."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def option(
    default: Any,
    help: str,
    *,
    type: Any = str,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    metavar: str | None = None,
    required: bool = False,
    cli: bool = True,
    flag: str | None = None,
) -> Any:
    """A field with what the CLI and recipes need to know about it (see the module docstring).

    ``flag`` names the CLI option when it cannot be the field's name (``--for``: a Python keyword);
    ``errors.FLAGS`` must spell it the same way, so that messages name it as the CLI does.
    """
    meta = dict(
        help=help,
        type=type,
        min=min,
        max=max,
        min_open=min_open,
        metavar=metavar,
        required=required,
        cli=cli,
        flag=flag,
    )
    return field(default=default, metadata=meta)


def option_fields(record: type | object) -> tuple[Field[Any], ...]:
    """The fields of an options record that are options (all of them, in declaration order)."""
    return tuple(f for f in fields(record) if "help" in f.metadata)  # type: ignore[arg-type]


def _check_fields(record: object) -> None:
    """Coerce enums and numbers, check ranges and required values: one error naming the option."""
    for f in option_fields(record):
        value, meta = getattr(record, f.name), f.metadata
        kind = meta["type"]
        if value is None:
            if meta["required"]:
                raise InvalidInputError(f"{param(f.name)} is required")
            continue
        if isinstance(kind, type) and issubclass(kind, Enum):
            try:
                value = kind(value.value if isinstance(value, Enum) else value)
            except ValueError:
                choices = ", ".join(str(m.value) for m in kind)
                raise InvalidInputError(
                    f"unknown {param(f.name)} {value!r}; choose one of {choices}"
                ) from None
        elif kind == COUNT:
            value = parse_count(value, f.name)
            if meta["min"] is not None and value < meta["min"]:
                raise InvalidInputError(f"{param(f.name)} must be >= {meta['min']:g}, got {value}")
        elif kind in (int, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok and kind is int and not float(value).is_integer():
                ok = False
            if not ok or not math.isfinite(value):
                raise InvalidInputError(f"{param(f.name)} must be a finite {kind.__name__}, got {value!r}")
            value = kind(value)
            low, high, open_low = meta["min"], meta["max"], meta["min_open"]
            if (low is not None and (value < low or (open_low and value == low))) or (
                high is not None and value > high
            ):
                raise InvalidInputError(f"{param(f.name)} must be {_span(low, high, open_low)}, got {value}")
        elif kind is bool and not isinstance(value, bool):
            raise InvalidInputError(f"{param(f.name)} must be true or false, got {value!r}")
        object.__setattr__(record, f.name, value)


def _span(low: float | None, high: float | None, open_low: bool) -> str:
    """``>= 1``, ``<= 5`` or ``in (0, 1]``: the allowed range, as a message says it."""
    if high is None:
        return f"{'>' if open_low else '>='} {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}]"


def target_hint() -> str:
    """How to ask for a rank target, spelled for the caller."""
    return f"{param('rank', 'K')}, {param('energy', 'F')} or {param('sv_ratio', 'R')}"


def budget_hint() -> str:
    """The other targets: a rank cap alone, or a budget over all modules, spelled for the caller."""
    return (
        f"{param('max_rank', 'K')} alone, or a budget over all modules: {param('budget_params', 'N')} "
        f"or {param('budget_error', 'E')}"
    )


# the rules that choose each module's rank (at most one); ``max_rank`` caps any of them
RULES = ("rank", "energy", "sv_ratio", "budget_params", "budget_error")
BUDGETS = ("budget_params", "budget_error")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RankTarget:
    """How many singular values to keep per module.

    At most one rule: ``rank``, ``energy`` or ``sv_ratio`` per module, or a budget over all modules
    (``budget_params``: the total LoRA parameters; ``budget_error``: the total relative error);
    ``max_rank`` caps whichever applies (alone: each module's numerical rank, capped). None at all
    means the exact result (its numerical rank). docs/math.md, "Choosing k".
    """

    rank: int | None = option(
        None,
        "Keep the top K singular values per module (at most the module's own rank: noted when capped).",
        type=int,
        min=1,
        metavar="K",
    )
    energy: float | None = option(
        None,
        "Keep the fewest singular values holding this fraction of ||dW||^2 per module.",
        type=float,
        min=0,
        max=1,
        min_open=True,
        metavar="F",
    )
    sv_ratio: float | None = option(
        None,
        "Keep singular values within this factor of the largest, per module.",
        type=float,
        min=1,
        metavar="R",
    )
    max_rank: int | None = option(
        None,
        "Cap every module's rank at K: with --energy, --sv-ratio or a budget, or alone (each module's "
        "exact rank, capped).",
        type=int,
        min=1,
        metavar="K",
    )
    budget_params: int | None = option(
        None,
        "Total LoRA parameters (lora_A and lora_B) over all modules, e.g. 20M, 1.5G, 500K: ranks chosen to "
        "minimize the total squared error.",
        type=COUNT,
        min=1,
        metavar="N",
    )
    budget_error: float | None = option(
        None,
        "Total relative error over all modules, sqrt(sum ||dW - dW_k||^2 / sum ||dW||^2): the fewest "
        "parameters that reach it.",
        type=float,
        min=0,
        max=1,
        min_open=True,
        metavar="E",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        given = [n for n in RULES if getattr(self, n) is not None]
        budgets = [n for n in given if n in BUDGETS]
        if len(budgets) > 1:
            raise InvalidInputError(
                f"give one of {param('budget_params', 'N')} or {param('budget_error', 'E')}, not both"
            )
        if budgets and len(given) > 1:
            others = " and ".join(param(n) for n in given if n not in BUDGETS)
            raise InvalidInputError(
                f"{param(budgets[0])} chooses every module's rank over the whole adapter: drop {others} "
                f"(only {param('max_rank', 'K')} combines with a budget)"
            )
        if len(given) > 1:
            raise InvalidInputError(f"give one of {target_hint()}, not {' and '.join(map(param, given))}")
        if self.rank is not None and self.max_rank is not None:
            raise InvalidInputError(
                f"{param('max_rank')} caps {param('energy')}, {param('sv_ratio')}, a budget or the exact rank; "
                f"with {param('rank', self.rank)} it has nothing to cap: give one of them"
            )

    @property
    def is_exact(self) -> bool:
        """No target at all: the exact result (max_rank counts as a target)."""
        return not self.target()

    @property
    def is_global(self) -> bool:
        """A budget: the ranks are chosen over all modules together, not module by module."""
        return self.budget_params is not None or self.budget_error is not None

    def target(self) -> dict[str, Any]:
        """The target's fields that are set, as a dict (empty when exact), for records and reports."""
        return {n: getattr(self, n) for n in (*RULES, "max_rank") if getattr(self, n) is not None}

    def _require_target(self, verb: str) -> None:
        if self.is_exact:
            raise InvalidInputError(f"{verb} needs a target: give {target_hint()}; or {budget_hint()}")


_BASE_HELP = (
    "Base checkpoint (dir, .safetensors file or Hub id): needed for DoRA inputs and --form dora; names the "
    "modules of kohya files (SDXL, Flux)."
)
_NAMING_BASE_HELP = (
    "Base checkpoint (dir, .safetensors file or Hub id) whose weight names map a kohya file's flattened names "
    "back to modules (needed for SDXL and Flux files)."
)
_FORM_HELP = (
    "Output form. dora (needs --base) holds any weighted sum of DoRA and LoRA updates exactly; lora "
    "approximates DoRA inputs (and warns); auto: dora when an input is DoRA and the method is exact."
)
_EXACT_LIMIT_HELP = "Modules with min(out, in) up to this get an exact SVD; larger ones a randomized one."


def _check_form(form: Form, base: Any) -> None:
    if form is Form.DORA and base is None:
        raise InvalidInputError(f"a DoRA output needs the base checkpoint ({param('base')})")


@dataclass(frozen=True)
class CombineOptions(RankTarget):
    weights: Any = option(
        None,
        "One weight per adapter, in order (repeat the option or list them after it). Default: 1 each.",
        type=WEIGHTS,
    )
    method: Method = option(
        Method.EXACT,
        "exact: the weighted sum at its numerical rank. cat: concatenated factors. svd: best rank-K "
        "form (needs --rank, --energy, --sv-ratio, --max-rank or a budget). linear: PEFT's approximation. "
        "ties, dare_linear, dare_ties, magnitude_prune: sparsify each module's update (needs --density; see "
        "--space), then factor it at the sum of the input ranks or at that target. tsv: Task Singular Vectors "
        "(TSV-M). iso_c, iso_cts: isotropic merging (Iso-C, Iso-CTS). All but exact, cat and linear take a "
        "rank target.",
        type=Method,
    )
    density: float | None = option(
        None,
        "ties, dare_*, magnitude_prune: fraction of each update's entries kept.",
        type=float,
        min=0,
        max=1,
        min_open=True,
        metavar="D",
    )
    majority_sign: MajoritySign | None = option(
        None,
        "ties, dare_ties: elect each entry's sign by the total (default) or by the frequency of signs.",
        type=MajoritySign,
    )
    seed: int | None = option(
        None, "dare_linear, dare_ties: seed of the random drop (default 0).", type=int, min=0, metavar="N"
    )
    space: Space | None = option(
        None,
        "ties, dare_*, magnitude_prune: where to sparsify. dense (default): each update s*B@A, then "
        "factor it. core: in a shared core basis of the updates (Core Space merging), exact on factors. "
        "knots: on the per-input right singular vectors of the stacked updates (KnOTS), exact on factors. "
        "peft-factors: A and B separately, as PEFT's add_weighted_adapter (not the weighted sum; warns).",
        type=Space,
    )
    common_fraction: float | None = option(
        None,
        "iso_cts: fraction of the merged directions taken from the weighted sum's common subspace "
        "(default 0.8, the paper's); the rest are split among the inputs' task-specific directions.",
        type=float,
        min=0,
        max=1,
        metavar="F",
    )
    allow_different_bases: bool = option(
        False, "Combine adapters whose configs name different base models.", type=bool
    )
    base: Any = option(None, _BASE_HELP)
    form: Form = option(Form.AUTO, _FORM_HELP, type=Form)
    exact_limit: int = option(1024, _EXACT_LIMIT_HELP, type=int, min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method is Method.SVD and self.is_exact:
            raise InvalidInputError(f"method svd needs a target: give {target_hint()}; or {budget_hint()}")
        if self.method not in (Method.SVD, *MERGING) and not self.is_exact:
            raise InvalidInputError(
                f"{' and '.join(map(param, self.target()))} {'applies' if len(self.target()) == 1 else 'apply'} "
                f"to methods svd, {', '.join(m.value for m in MERGING)}, not {self.method.value}"
            )
        if self.method in SPARSIFYING and self.density is None:
            raise InvalidInputError(
                f"method {self.method.value} needs {param('density', 'D')} (0 < D <= 1; 1 keeps every entry)"
            )
        for name, methods in (
            ("density", SPARSIFYING),
            ("majority_sign", SIGN_ELECTING),
            ("seed", RANDOM),
            ("space", SPARSIFYING),
            ("common_fraction", (Method.ISO_CTS,)),
        ):
            if getattr(self, name) is not None and self.method not in methods:
                raise InvalidInputError(
                    f"{param(name)} applies to method {', '.join(m.value for m in methods)}, "
                    f"not {self.method.value}"
                )
        if self.is_global and self.method in (Method.ISO_C, Method.ISO_CTS):
            raise InvalidInputError(
                f"method {self.method.value} gives every kept direction the same singular value, so a budget "
                f"has no error to trade between modules: give {target_hint()} or {param('max_rank', 'K')}"
            )
        if self.is_global and self.space is Space.PEFT_FACTORS:
            raise InvalidInputError(
                f"space peft-factors reproduces PEFT's factors, which a budget would change: drop "
                f"{param('budget_params')}/{param('budget_error')} or use space dense, core or knots"
            )
        _check_form(self.form, self.base)
        if self.form is Form.DORA and self.method is not Method.EXACT:
            raise InvalidInputError(f"a DoRA output is exact: drop {param('method')} and the rank target")


@dataclass(frozen=True)
class NegateOptions:
    base: Any = option(None, _BASE_HELP)
    form: Form = option(Form.AUTO, _FORM_HELP, type=Form)

    def __post_init__(self) -> None:
        _check_fields(self)
        _check_form(self.form, self.base)


@dataclass(frozen=True)
class ScaleOptions(NegateOptions):
    by: float = option(None, "The factor F in dW -> F dW.", type=float, required=True, metavar="F")


@dataclass(frozen=True)
class ResizeOptions(RankTarget):
    base: Any = option(None, _NAMING_BASE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_target("resize")


@dataclass(frozen=True)
class ToDoraOptions:
    base: Any = option(None, "Base checkpoint the adapter was trained on (dir or Hub id).", required=True)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ToLoraOptions(RankTarget):
    base: Any = option(None, "Base checkpoint the adapter was trained on (dir or Hub id).", required=True)
    exact_limit: int = option(1024, _EXACT_LIMIT_HELP, type=int, min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_target("to-lora")


@dataclass(frozen=True)
class ExtractOptions(RankTarget):
    exact_limit: int = option(1024, _EXACT_LIMIT_HELP, type=int, min=1)
    embeddings: Embeddings = option(
        Embeddings.LORA,
        "Changed embeddings and output head (nn.Embedding layers, lm_head): lora (a LoRA on them), save "
        "(stored whole: PEFT modules_to_save) or skip (left out, reported).",
        type=Embeddings,
    )
    norms: Norms = option(
        Norms.SAVE,
        "Changed layers LoRA cannot target (norms, ...): save (stored whole: PEFT modules_to_save) or skip "
        "(left out, reported).",
        type=Norms,
    )
    biases: Biases = option(
        Biases.LORA,
        "Changed biases of LoRA-targeted layers: lora (PEFT's lora_bias) or skip (left out, reported).",
        type=Biases,
    )
    exclude: str | None = option(
        None,
        "Leave out modules whose name matches this regular expression (re.search); changed ones are reported.",
        metavar="REGEX",
    )
    device: str = option("auto", "Where the SVDs run: auto (CUDA when present), cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_target("extract")
        if self.exclude is not None:
            try:
                re.compile(self.exclude)
            except (re.error, TypeError) as exc:
                raise InvalidInputError(
                    f"{param('exclude')} {self.exclude!r} is not a regular expression ({exc})"
                ) from None


_CHECKPOINT_WEIGHTS = "One weight per adapter, in order (default 1 each): dW = sum_i w_i dW_i."


@dataclass(frozen=True)
class MergeOptions:
    weights: Any = option(None, _CHECKPOINT_WEIGHTS, type=WEIGHTS)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    remerge: bool = option(False, "Merge an adapter the checkpoint's merge record already lists.", type=bool)
    dtype: MergeDtype = option(
        MergeDtype.AUTO,
        "Quantized checkpoints only. auto: write the merged weights in the checkpoint's format (FP8/int8 with "
        "new scales; the rounding error is reported). bfloat16, float16, float32: dequantize every quantized "
        "weight, add the update, round once, and drop the quantization (needed for bitsandbytes).",
        type=MergeDtype,
    )
    workers: int = option(
        1,
        "Write the shards of a sharded checkpoint in N processes at once (CPU only; at most one per shard "
        "and per core, each with an equal share of the cores). The output is the same bytes as with 1.",
        type=int,
        min=1,
        metavar="N",
    )

    def __post_init__(self) -> None:
        _check_fields(self)


_RECORDED_WEIGHTS = (
    "One weight per adapter, in order; default: the weights the merge record lists (1 where it lists none)."
)
_IGNORE_RECORD_HELP = "Use the given weights even where the merge record lists others."


@dataclass(frozen=True)
class UnmergeOptions:
    weights: Any = option(None, _RECORDED_WEIGHTS, type=WEIGHTS)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N.")
    ignore_record: bool = option(False, _IGNORE_RECORD_HELP, type=bool)
    workers: int = option(
        1,
        "Write the shards of a sharded checkpoint in N processes at once (CPU only; at most one per shard "
        "and per core, each with an equal share of the cores). The output is the same bytes as with 1.",
        type=int,
        min=1,
        metavar="N",
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class VerifyOptions:
    weights: Any = option(None, _RECORDED_WEIGHTS, type=WEIGHTS)
    max_ulp: float = option(0.5, "Fail when a tensor is off by more.", type=float, min=0)
    ignore_record: bool = option(False, _IGNORE_RECORD_HELP, type=bool)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class ConvertOptions:
    """``convert``: the output format (a name in ``adapterops.io.FORMATS``, checked there) or the
    serving engine to write for (``engine``, ``--for`` on the CLI), exactly one of them; and, for
    GGUF, the base model whose config.json gives the architecture and head counts."""

    to: str | None = option(
        None,
        "Output format: peft or mlx (adapter directories), kohya, lycoris or gguf (one file), diffusers "
        "(a folder, or one file named .safetensors); any format in adapterops.io.FORMATS.",
        metavar="FORMAT",
    )
    engine: Engine | None = option(
        None,
        "Write for this serving engine instead (docs/serving.md): one rank, scales folded into the factors "
        "(scale 1), what the engine cannot read refused. vllm, sglang, tgi: a PEFT directory; llama.cpp: "
        "GGUF (needs --base); diffusers: a kohya file with one alpha.",
        type=Engine,
        flag="--for",
    )
    base: Any = option(
        None,
        "Base model (dir, .safetensors file or Hub id): its config.json gives the architecture and head "
        "counts (--to gguf, --for llama.cpp) or the number of layers (--for tgi); names the modules of a "
        "kohya input (SDXL, Flux).",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if (self.to is None) == (self.engine is None):
            raise InvalidInputError(
                f"give one of {param('to', 'FORMAT')} (a file format) or {param('engine', 'ENGINE')} "
                f"(a serving engine: {', '.join(e.value for e in Engine)}), "
                f"{'not both' if self.to is not None else 'none was given'}"
            )


@dataclass(frozen=True)
class WriteOptions:
    """Where and how a verb's result is written; shared by every verb that writes."""

    dtype: OutputDtype = option(
        OutputDtype.AUTO, "Storage dtype of the output factors; auto keeps the inputs'.", type=OutputDtype
    )
    push: str | None = option(
        None,
        "Also upload the output to this Hub repo, with a lineage card (see `adapterops push`).",
        metavar="REPO_ID",
    )
    private: bool = option(False, "With --push: create the Hub repo private.", type=bool)

    def __post_init__(self) -> None:
        _check_fields(self)


VERBS: dict[str, type] = {
    "combine": CombineOptions,
    "negate": NegateOptions,
    "scale": ScaleOptions,
    "resize": ResizeOptions,
    "to_dora": ToDoraOptions,
    "to_lora": ToLoraOptions,
    "extract": ExtractOptions,
    "merge": MergeOptions,
    "unmerge": UnmergeOptions,
    "verify": VerifyOptions,
}


def defaults(record: type) -> dict[str, Any]:
    """``{field: default}`` of an options record (``MISSING`` never occurs: every option has one)."""
    return {f.name: f.default for f in option_fields(record) if f.default is not MISSING}
