"""Running a recipe: each step calls one public verb; results are named, written and pushed as asked.

``plan_recipe`` is the dry run: the steps with their inputs, outputs, estimated sizes and peak
memory, read from headers and factors, computing nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapterops import verbs
from adapterops.adapter import Adapter, Source
from adapterops.errors import AdapterOpsError, InvalidInputError, RecipeError
from adapterops.hub import push_to_hub
from adapterops.io import load_adapter, save_adapter
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.peft import SAFETENSORS_NAME, file_sha256
from adapterops.merging import MergeResult
from adapterops.merging import merge as merge_checkpoint
from adapterops.merging import unmerge as unmerge_checkpoint
from adapterops.merging.plan import TORCH_BASELINE_BYTES, estimate_peak
from adapterops.recipe.schema import CHECKPOINT_VERBS, Recipe, Step, load_recipe
from adapterops.recipe.weights import count_layers, weight_function
from adapterops.report import summarize, summary_line

ADAPTER_VERBS: dict[str, Callable[..., Adapter]] = {
    "combine": verbs.combine,
    "negate": verbs.negate,
    "scale": verbs.scale,
    "resize": verbs.resize,
    "to_dora": verbs.to_dora,
    "to_lora": verbs.to_lora,
}
CHECKPOINT_FUNCTIONS: dict[str, Callable[..., MergeResult]] = {
    "merge": merge_checkpoint,
    "unmerge": unmerge_checkpoint,
}


@dataclass(frozen=True)
class StepResult:
    name: str
    verb: str
    output: str | None
    pushed: str | None
    summary: str


def run_recipe(
    path: str | Path,
    *,
    output_dir: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[StepResult]:
    """Run every step of the recipe at ``path`` in order; write and push the results that ask for it.

    Args:
        path: the recipe file (YAML; see ``adapterops.recipe.schema``).
        output_dir: write outputs here instead of beside the recipe.
        force: replace outputs that exist.
        progress: called with each step's name when it is done.

    Example:
        >>> [r.summary for r in run_recipe("recipes/blend-and-merge.yaml", output_dir="/tmp/out")]
    """
    recipe = load_recipe(path)
    out_root = Path(output_dir) if output_dir is not None else None
    values: dict[str, Adapter | str] = {}

    def adapter(name: str) -> Adapter:
        if name not in values:
            values[name] = load_adapter(recipe.resolve_path(recipe.inputs[name]))
        value = values[name]
        if not isinstance(value, Adapter):
            raise InvalidInputError(f"{recipe.path}: {name} is a checkpoint, but this step needs an adapter")
        return value

    def checkpoint(name: str) -> str:
        value = values.get(name)
        return value if isinstance(value, str) else recipe.resolve_path(recipe.inputs[name])

    results = []
    for step in recipe.steps:
        target = recipe.output_path(step, out_root)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        if step.verb in CHECKPOINT_VERBS:
            assert target is not None  # the schema requires an output for these
            result, pushed = _run_checkpoint_step(step, checkpoint, adapter, target, force)
            values[step.name] = str(result.output)
            summary = f"{result.tensors_updated} tensors updated"
        else:
            made = _run_adapter_step(recipe, step, adapter, checkpoint)
            summary = summary_line(summarize(made.report, (made.provenance or {}).get("budget")))
            made = replace(
                made,
                provenance=dict(
                    made.provenance or {}, recipe=recipe.text, recipe_step=step.name, summary=summary
                ),
            )
            if target is not None:
                save_adapter(made, target, force=force, dtype=step.write.get("dtype"))
                # later steps record the file they could reload, not an object in memory
                sha = file_sha256(target / SAFETENSORS_NAME)
                made = replace(made, source=Source(path=str(target), sha256=sha))
            else:
                made = replace(made, source=Source(path=f"{recipe.path.name}#{step.name}"))
            values[step.name] = made
            pushed = (
                push_to_hub(target, step.push, private=bool(step.write.get("private")))
                if step.push and target is not None
                else None
            )
        results.append(StepResult(step.name, step.verb, str(target) if target else None, pushed, summary))
        if progress:
            progress(step.name)
    return results


def _run_adapter_step(
    recipe: Recipe, step: Step, adapter: Callable[[str], Adapter], checkpoint: Callable[[str], str]
) -> Adapter:
    args = dict(step.args)
    if "base" in args:
        args["base"] = checkpoint(args["base"])
    if step.verb == "combine":
        inputs = [adapter(r) for r in args.pop("inputs")]
        names = sorted({n for a in inputs for n in a.modules})
        weights = [weight_function(w, count_layers(names)) for w in args.pop("weights", [1.0] * len(inputs))]
        for weight in weights:
            _check_filters_match(recipe, step, weight, names)
        return verbs.combine(inputs, weights, **args)
    return ADAPTER_VERBS[step.verb](adapter(args.pop("input")), **args)


def _check_filters_match(recipe: Recipe, step: Step, weight: object, names: list[str]) -> None:
    """A filter that matches no module is a typo that would silently weight nothing: an error."""
    spec = getattr(weight, "spec", None)
    for item in spec.get("filters", []) if isinstance(spec, dict) else []:
        if not any(re.search(str(item["match"]), name) for name in names):
            raise RecipeError(
                f"{recipe.path}:{step.line}: step {step.name!r}: filter {item['match']!r} matches no module of "
                f"its inputs (module names look like {names[0]!r}); fix the regular expression"
            )


def _run_checkpoint_step(
    step: Step, checkpoint: Callable[[str], str], adapter: Callable[[str], Adapter], target: Path, force: bool
) -> tuple[MergeResult, str | None]:
    args = dict(step.args)
    base = checkpoint(args.pop("base"))
    inputs = [adapter(r) for r in args.pop("inputs")]
    weights = [weight_function(w, 1) for w in args.pop("weights", [])] or None
    result = CHECKPOINT_FUNCTIONS[step.verb](
        base,
        inputs,
        weights,
        out=target,
        force=force,
        push_to=step.push,
        private=bool(step.write.get("private")),
        **args,
    )
    return result, result.pushed


def plan_recipe(recipe: Recipe | str | Path, output_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """What ``run_recipe`` would do, with estimated output sizes and peak memory; computes nothing.

    ``recipe`` is a path or a loaded ``Recipe``. An adapter's size is estimated per module as
    rank x (out + in) x bytes per element, with the rank each verb produces at most (the target
    rank or max_rank, or the sum of the input ranks).

    Example:
        >>> [row["step"] for row in plan_recipe("recipes/blend-and-merge.yaml")]
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    output_dir = Path(output_dir) if output_dir is not None else None
    shapes: dict[
        str, dict[str, tuple[int, int, int, int]]
    ] = {}  # name -> module -> (out, in, rank, itemsize)
    checkpoints: dict[str, Checkpoint] = {}
    rows: list[dict[str, Any]] = []

    def size(name: str) -> int:
        if name in checkpoints:
            return int(checkpoints[name].file_size)
        return sum(r * (o + i) * b for o, i, r, b in shapes[name].values())

    for name, ref in recipe.inputs.items():
        location = recipe.resolve_path(ref)
        try:
            loaded = load_adapter(location)
            shapes[name] = {
                n: (m.out_features, m.in_features, m.rank, m.A.element_size())
                for n, m in loaded.modules.items()
            }
        except AdapterOpsError:
            checkpoints[name] = open_checkpoint(location)
        rows.append({"step": f"input {name}", "source": location, "bytes": size(name)})
    for step in recipe.steps:
        refs = list(step.args.get("inputs", [])) + ([step.args["input"]] if "input" in step.args else [])
        adapter_bytes = sum(size(r) for r in refs)
        if step.verb in CHECKPOINT_VERBS:
            checkpoint = checkpoints[step.args["base"]]
            checkpoints[step.name] = checkpoint
            peak = estimate_peak(checkpoint, adapter_bytes)
        else:
            merged: dict[str, tuple[int, int, int, int]] = {}
            for ref in refs:
                for module, (o, i, r, b) in shapes[ref].items():
                    previous = merged.get(module, (o, i, 0, b))
                    merged[module] = (o, i, previous[2] + r, b)
            target = step.args.get("rank") or step.args.get("max_rank")  # a budget only lowers it further
            shapes[step.name] = {
                m: (o, i, min(target or r, r if step.verb != "to_lora" else min(o, i), min(o, i)), b)
                for m, (o, i, r, b) in merged.items()
            }
            peak = TORCH_BASELINE_BYTES + adapter_bytes + size(step.name)
            if "base" in step.args:  # DoRA steps hold one module's W and its update in float64
                peak += 16 * max((o * i for o, i, _, _ in merged.values()), default=0)
        output = recipe.output_path(step, output_dir)
        rows.append(
            {
                "step": step.name,
                "verb": step.verb,
                "uses": refs + ([step.args["base"]] if "base" in step.args else []),
                "args": {k: v for k, v in step.args.items() if k not in ("inputs", "input", "base")},
                "output": str(output) if output else None,
                "push": step.push,
                "estimated_output_bytes": size(step.name),
                "estimated_peak_memory_bytes": peak,
            }
        )
    return rows
