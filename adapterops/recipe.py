"""Recipes: a pipeline of adapterops steps in one validated YAML file.

    version: 1
    inputs:                       # names for adapters and checkpoints: local paths or Hub ids
      a: inputs/style-a
      b: org/style-b@v2
      base: inputs/tiny-llama-64
    steps:
      - name: mix                 # each step's result gets a name later steps can use
        combine:
          inputs: [a, b]
          weights:
            - 0.7                                          # a number
            - {default: 0.3, filters: [{match: mlp, value: 0.0}]}   # per-module overrides (regex)
          method: svd
          rank: 8
        output: out/mix           # optional: write this result here
        push: me/mix              # optional: and upload it
      - name: merged
        merge: {base: base, inputs: [mix]}
        output: out/merged

Verbs and their keys:

- combine: inputs, weights, method, rank, energy, sv_ratio, base, form
- negate: input, base, form
- scale: input, by, base, form
- resize: input, rank, energy, sv_ratio
- to_dora: input, base
- to_lora: input, base, rank, energy, sv_ratio
- merge: base, inputs, weights

A weight is a number, a list (a gradient: values spread evenly over the layers and interpolated
linearly by layer index), or ``{default: w, filters: [{match: regex, value: w}, ...]}`` where the
first filter whose regex matches the module name wins. Modules outside the numbered layers take a
gradient's first value.

Relative paths are relative to the recipe file; outputs go under ``output_dir`` when one is given.
Unknown keys, missing keys, unknown names and wrong types are errors that give the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.errors import AdapterOpsError, InvalidInputError

VERBS: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    # key -> (allowed types, required)
    "combine": {
        "inputs": (list, True),
        "weights": (list, False),
        "method": (str, False),
        "rank": (int, False),
        "energy": (float, False),
        "sv_ratio": (float, False),
        "base": (str, False),
        "form": (str, False),
    },
    "negate": {"input": (str, True), "base": (str, False), "form": (str, False)},
    "scale": {"input": (str, True), "by": (float, True), "base": (str, False), "form": (str, False)},
    "resize": {
        "input": (str, True),
        "rank": (int, False),
        "energy": (float, False),
        "sv_ratio": (float, False),
    },
    "to_dora": {"input": (str, True), "base": (str, True)},
    "to_lora": {
        "input": (str, True),
        "base": (str, True),
        "rank": (int, False),
        "energy": (float, False),
        "sv_ratio": (float, False),
    },
    "merge": {"base": (str, True), "inputs": (list, True), "weights": (list, False)},
}
STEP_KEYS = {"name", "output", "push", *VERBS}
LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


class RecipeError(InvalidInputError):
    """A recipe file is not valid; the message names the file and line."""


@dataclass(frozen=True)
class Step:
    name: str
    verb: str
    args: Mapping[str, Any]
    output: str | None
    push: str | None
    line: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    inputs: Mapping[str, str]
    steps: tuple[Step, ...]

    def resolve_path(self, value: str) -> str:
        """Local paths relative to the recipe's folder; Hub ids as they are."""
        from adapterops.io.hub import parse_hub_id

        candidate = self.path.parent / value
        if Path(value).is_absolute() or candidate.exists() or parse_hub_id(value) is None:
            return str(candidate if not Path(value).is_absolute() else Path(value))
        return value


# ------------------------------------------------------------------------------------------ parsing


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every problem is a ``RecipeError`` naming file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        from adapterops.errors import NotFoundError

        raise NotFoundError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise RecipeError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {problem}") from None
    if root is None:
        raise RecipeError(f"{path}: the recipe is empty")
    top = _mapping(root, path, "the recipe", {"version", "inputs", "steps"}, {"steps"})
    if "version" in top and _scalar(top["version"]) != 1:
        raise RecipeError(
            f"{path}:{_line(top['version'])}: unsupported recipe version; this adapterops reads version 1"
        )
    inputs: dict[str, str] = {}
    if "inputs" in top:
        for key, node in _mapping(top["inputs"], path, "inputs", None, set()).items():
            inputs[key] = _typed(node, str, path, f"input {key}")
    names = set(inputs)
    steps = []
    steps_node = top["steps"]
    if (
        not hasattr(steps_node, "value")
        or not isinstance(steps_node.value, list)
        or steps_node.tag.endswith(":map")
    ):
        raise RecipeError(f"{path}:{_line(steps_node)}: steps must be a list")
    for node in steps_node.value:
        fields = _mapping(node, path, "a step", STEP_KEYS, {"name"})
        name = _typed(fields["name"], str, path, "step name")
        verbs = [k for k in fields if k in VERBS]
        if len(verbs) != 1:
            raise RecipeError(
                f"{path}:{_line(node)}: step {name!r} needs exactly one of {', '.join(VERBS)} (found {verbs or 'none'})"
            )
        verb = verbs[0]
        schema = VERBS[verb]
        raw = _mapping(
            fields[verb], path, f"step {name!r} ({verb})", set(schema), {k for k, v in schema.items() if v[1]}
        )
        args = {
            key: _typed(value, schema[key][0], path, f"step {name!r}: {key}") for key, value in raw.items()
        }
        for key in ("input", "base"):
            if key in args and args[key] not in names:
                raise RecipeError(
                    f"{path}:{_line(raw[key])}: step {name!r}: {key} {args[key]!r} is not an input or an earlier step"
                )
        for ref in args.get("inputs", []):
            if ref not in names:
                raise RecipeError(
                    f"{path}:{_line(raw['inputs'])}: step {name!r}: {ref!r} is not an input or an earlier step"
                )
        if "weights" in args:
            if len(args["weights"]) != len(args["inputs"]):
                raise RecipeError(
                    f"{path}:{_line(raw['weights'])}: step {name!r}: {len(args['weights'])} weights for "
                    f"{len(args['inputs'])} inputs"
                )
            for weight in args["weights"]:
                check_weight_spec(weight, f"{path}:{_line(raw['weights'])}: step {name!r}")
        if name in names:
            raise RecipeError(f"{path}:{_line(fields['name'])}: the name {name!r} is used twice")
        names.add(name)
        output = _typed(fields["output"], str, path, "output") if "output" in fields else None
        push = _typed(fields["push"], str, path, "push") if "push" in fields else None
        steps.append(Step(name, verb, args, output, push, _line(node)))
    return Recipe(path, text, inputs, tuple(steps))


def _line(node: Any) -> int:
    return int(node.start_mark.line) + 1


def _scalar(node: Any) -> Any:
    import yaml

    return yaml.safe_load(yaml.serialize(node))


def _mapping(
    node: Any, path: Path, what: str, allowed: set[str] | None, required: set[str]
) -> dict[str, Any]:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"{path}:{_line(node)}: {what} must be a mapping of keys to values")
    fields: dict[str, Any] = {}
    for key_node, value in node.value:
        key = key_node.value
        if allowed is not None and key not in allowed:
            raise RecipeError(
                f"{path}:{_line(key_node)}: unknown key {key!r} in {what}; allowed: {', '.join(sorted(allowed))}"
            )
        if key in fields:
            raise RecipeError(f"{path}:{_line(key_node)}: key {key!r} appears twice in {what}")
        fields[key] = value
    missing = sorted(required - set(fields))
    if missing:
        raise RecipeError(f"{path}:{_line(node)}: {what} is missing {', '.join(missing)}")
    return fields


def _typed(node: Any, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    value = _scalar(node)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in kinds)
        raise RecipeError(f"{path}:{_line(node)}: {what} must be {names}, got {value!r}")
    return value


def check_weight_spec(spec: Any, where: str) -> None:
    """A number, a list of numbers (gradient) or {default, filters: [{match, value}]}."""
    if isinstance(spec, bool):
        raise RecipeError(f"{where}: weight {spec!r} must be a number")
    if isinstance(spec, int | float):
        return
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in spec):
            raise RecipeError(f"{where}: a gradient must be a non-empty list of numbers, got {spec!r}")
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {"default", "filters"}
        if unknown:
            raise RecipeError(
                f"{where}: unknown key {sorted(unknown)[0]!r} in a weight; allowed: default, filters"
            )
        if "default" in spec:
            check_weight_spec(spec["default"], where)
        for item in spec.get("filters", []):
            if not isinstance(item, dict) or set(item) != {"match", "value"}:
                raise RecipeError(f"{where}: each filter needs exactly match and value, got {item!r}")
            try:
                re.compile(str(item["match"]))
            except re.error as exc:
                raise RecipeError(
                    f"{where}: filter {item['match']!r} is not a regular expression ({exc})"
                ) from None
            check_weight_spec(item["value"], where)
        return
    raise RecipeError(f"{where}: weight {spec!r} must be a number, a list or a mapping")


# -------------------------------------------------------------------------------------------- weights


def weight_function(spec: Any, layers: int) -> float | Callable[[str], float]:
    """A plain number, or a function of the module name (filters, gradients over ``layers`` layers)."""
    if isinstance(spec, int | float):
        return float(spec)

    def value_of(item: Any, module: str) -> float:
        if isinstance(item, int | float):
            return float(item)
        match = LAYER.search(f".{module}.")
        if match is None or len(item) == 1 or layers <= 1:
            return float(item[0])
        t = int(match.group(1)) / (layers - 1) * (len(item) - 1)
        low = min(int(t), len(item) - 2)
        return float(item[low] + (item[low + 1] - item[low]) * (t - low))

    def weight(module: str) -> float:
        if isinstance(spec, dict):
            for item in spec.get("filters", []):
                if re.search(str(item["match"]), module):
                    return value_of(item["value"], module)
            return value_of(spec.get("default", 1.0), module)
        return value_of(spec, module)

    weight.spec = spec  # type: ignore[attr-defined]  # recorded in provenance instead of a repr
    return weight


def count_layers(module_names: Sequence[str]) -> int:
    indices = [int(m.group(1)) for name in module_names if (m := LAYER.search(f".{name}."))]
    return max(indices) + 1 if indices else 1


# -------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class StepResult:
    name: str
    verb: str
    output: str | None
    pushed: str | None
    summary: str


def plan(recipe: Recipe, output_dir: Path | None = None) -> list[dict[str, Any]]:
    """What ``run`` would do, with estimated output sizes and peak memory; reads inputs, computes nothing.

    An adapter's size is estimated per module as rank x (out + in) x bytes per element, with the
    rank each verb produces at most (the target rank, or the sum of the input ranks).
    """
    from adapterops.io import load_adapter
    from adapterops.io.checkpoint import open_checkpoint
    from adapterops.merge import TORCH_BASELINE_BYTES, estimate_peak

    shapes: dict[
        str, dict[str, tuple[int, int, int, int]]
    ] = {}  # name -> module -> (out, in, rank, itemsize)
    checkpoints: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def size(name: str) -> int:
        if name in checkpoints:
            return int(checkpoints[name].file_size)
        return sum(r * (o + i) * b for o, i, r, b in shapes[name].values())

    for name, ref in recipe.inputs.items():
        location = recipe.resolve_path(ref)
        try:
            adapter = load_adapter(location)
            shapes[name] = {
                n: (m.out_features, m.in_features, m.rank, m.A.element_size())
                for n, m in adapter.modules.items()
            }
        except AdapterOpsError:
            checkpoints[name] = open_checkpoint(location)
        rows.append({"step": f"input {name}", "source": location, "bytes": size(name)})
    for step in recipe.steps:
        refs = list(step.args.get("inputs", [])) + ([step.args["input"]] if "input" in step.args else [])
        adapter_bytes = sum(size(r) for r in refs)
        if step.verb == "merge":
            checkpoint = checkpoints[step.args["base"]]
            checkpoints[step.name] = checkpoint
            peak = estimate_peak(checkpoint, adapter_bytes)
        else:
            merged: dict[str, tuple[int, int, int, int]] = {}
            for ref in refs:
                for module, (o, i, r, b) in shapes[ref].items():
                    previous = merged.get(module, (o, i, 0, b))
                    merged[module] = (o, i, previous[2] + r, b)
            target = step.args.get("rank")
            shapes[step.name] = {
                m: (o, i, min(target or r, r if step.verb != "to_lora" else min(o, i), min(o, i)), b)
                for m, (o, i, r, b) in merged.items()
            }
            peak = TORCH_BASELINE_BYTES + adapter_bytes + size(step.name)
            if "base" in step.args:  # DoRA steps hold one module's W and its update in float64
                peak += 16 * max((o * i for o, i, _, _ in merged.values()), default=0)
        rows.append(
            {
                "step": step.name,
                "verb": step.verb,
                "uses": refs + ([step.args["base"]] if "base" in step.args else []),
                "args": {k: v for k, v in step.args.items() if k not in ("inputs", "input", "base")},
                "output": str(_output_path(recipe, step, output_dir)) if step.output else None,
                "push": step.push,
                "estimated_output_bytes": size(step.name),
                "estimated_peak_memory_bytes": peak,
            }
        )
    return rows


def _output_path(recipe: Recipe, step: Step, output_dir: Path | None) -> Path:
    assert step.output is not None
    root = output_dir if output_dir is not None else recipe.path.parent
    return Path(step.output) if Path(step.output).is_absolute() else root / step.output


def run_recipe(
    path: str | Path,
    *,
    output_dir: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[StepResult]:
    """Run every step in order; write and push the results that ask for it."""
    from adapterops import dora
    from adapterops.adapter import Adapter
    from adapterops.console import summarize, summary_line
    from adapterops.hub import push_to_hub
    from adapterops.io import load_adapter
    from adapterops.merge import merge as merge_checkpoint
    from adapterops.ops import combine as ops

    recipe = load_recipe(path)
    out_root = Path(output_dir) if output_dir is not None else None
    values: dict[str, Any] = {}

    def get(name: str, want: str) -> Any:
        if name not in values:
            location = recipe.resolve_path(recipe.inputs[name])
            values[name] = load_adapter(location) if want == "adapter" else location
        value = values[name]
        if want == "adapter" and not isinstance(value, Adapter):
            raise InvalidInputError(f"{recipe.path}: {name} is a checkpoint, but this step needs an adapter")
        if want == "checkpoint":
            return value if isinstance(value, str | Path) else recipe.resolve_path(recipe.inputs[name])
        return value

    results = []
    for step in recipe.steps:
        a = step.args
        base: Any = get(a["base"], "checkpoint") if "base" in a and step.verb != "merge" else None
        target = _output_path(recipe, step, out_root) if step.output else None
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        if step.verb == "merge":
            adapters = [get(r, "adapter") for r in a["inputs"]]
            if target is None:
                raise RecipeError(f"{recipe.path}:{step.line}: merge step {step.name!r} needs an output path")
            result = merge_checkpoint(
                get(a["base"], "checkpoint"), adapters, a.get("weights"), out=target, force=force
            )
            values[step.name] = str(result.output)
            summary = f"{result.tensors_updated} tensors updated"
        else:
            targets: dict[str, Any] = {
                "rank": a.get("rank"),
                "energy": a.get("energy"),
                "sv_ratio": a.get("sv_ratio"),
            }
            if step.verb == "combine":
                adapters = [get(r, "adapter") for r in a["inputs"]]
                layers = count_layers([n for ad in adapters for n in ad.modules])
                weights = [weight_function(w, layers) for w in a.get("weights", [1.0] * len(adapters))]
                made = ops.combine(
                    adapters,
                    weights,
                    method=a.get("method", "exact"),
                    base=base,
                    form=a.get("form", "lora"),
                    **targets,
                )
            elif step.verb == "negate":
                made = ops.negate(get(a["input"], "adapter"), base=base, form=a.get("form", "lora"))
            elif step.verb == "scale":
                made = ops.scale(get(a["input"], "adapter"), a["by"], base=base, form=a.get("form", "lora"))
            elif step.verb == "resize":
                made = ops.resize(get(a["input"], "adapter"), **targets)
            elif step.verb == "to_dora":
                made = dora.to_dora(get(a["input"], "adapter"), base)
            else:
                made = dora.to_lora(get(a["input"], "adapter"), base, **targets)
            summary = summary_line(summarize(made.report))
            provenance = dict(
                made.provenance or {}, recipe=recipe.text, recipe_step=step.name, summary=summary
            )
            from dataclasses import replace

            made = replace(made, provenance=provenance)
            values[step.name] = made
            if target is not None:
                made.save(target, force=force)
        pushed = push_to_hub(target, step.push) if step.push and target is not None else None
        if step.push and target is None:
            raise RecipeError(f"{recipe.path}:{step.line}: step {step.name!r} pushes but has no output path")
        results.append(StepResult(step.name, step.verb, str(target) if target else None, pushed, summary))
        if progress:
            progress(step.name)
    return results
