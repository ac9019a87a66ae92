"""Recipe files: YAML parsed into validated steps, every error with its file and line.

    version: 1
    inputs:                       # names for adapters and checkpoints: local paths or Hub ids
      a: inputs/style-a
      b: org/style-b@v2
      base: inputs/tiny-llama-64
    steps:
      - name: mix                 # each step's result gets a name later steps can use
        combine:
          inputs: [a, b]
          weights: [0.7, {default: 0.3, filters: [{match: mlp, value: 0.0}]}]
          method: svd
          rank: 8
        output: out/mix           # optional: write this result here (and dtype: bfloat16, ...)
        push: me/mix              # optional: and upload it (private: true)
      - name: merged
        merge: {base: base, inputs: [mix]}
        output: out/merged

A verb's keys are its inputs (``inputs`` for combine, merge and unmerge, ``input`` and for merge
``base`` as names) and its options: exactly the fields of its record in ``adapterops.options``,
so a recipe accepts every option the CLI has. A step's own keys are ``name``, the verb,
``output`` and the fields of ``WriteOptions`` (``dtype``, ``push``, ``private``); a merge step's
``dtype`` (``MergeOptions.dtype``, for quantized bases) goes inside ``merge: {...}``.

The hand-written validator (not a schema library) is what gives file:line for every error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from adapterops.errors import InvalidInputError, NotFoundError, RecipeError
from adapterops.io.refs import parse_hub_id
from adapterops.options import COUNT, VERBS, WEIGHTS, WriteOptions, option_fields, parse_count
from adapterops.recipe.weights import check_weight_spec

# the inputs each verb names (besides its options); True: a list of names
INPUTS: dict[str, dict[str, bool]] = {
    "combine": {"inputs": True},
    "negate": {"input": False},
    "scale": {"input": False},
    "resize": {"input": False},
    "to_dora": {"input": False},
    "to_lora": {"input": False},
    "merge": {"base": False, "inputs": True},
    "unmerge": {"base": False, "inputs": True},
}
CHECKPOINT_VERBS = ("merge", "unmerge")
WRITE_KEYS = {f.name: f for f in option_fields(WriteOptions)}
STEP_KEYS = {"name", "output", *WRITE_KEYS, *INPUTS}
MAX_RECIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class Step:
    name: str
    verb: str
    args: Mapping[str, Any]  # input names and option values, as validated
    output: str | None
    write: Mapping[str, Any]  # WriteOptions fields given in the step
    line: int

    @property
    def push(self) -> str | None:
        return self.write.get("push")


@dataclass(frozen=True)
class Recipe:
    path: Path
    text: str
    inputs: Mapping[str, str]
    steps: tuple[Step, ...]

    def resolve_path(self, value: str) -> str:
        """Local paths relative to the recipe's folder; Hub ids as they are."""
        candidate = self.path.parent / value
        if Path(value).is_absolute() or candidate.exists() or parse_hub_id(value) is None:
            return str(candidate if not Path(value).is_absolute() else Path(value))
        return value

    def output_path(self, step: Step, output_dir: Path | None = None) -> Path | None:
        """Where ``step`` writes: relative to ``output_dir`` if given, else to the recipe's folder."""
        if step.output is None:
            return None
        root = output_dir if output_dir is not None else self.path.parent
        return Path(step.output) if Path(step.output).is_absolute() else root / step.output


def verb_keys(verb: str) -> dict[str, Any]:
    """Every key a step of ``verb`` accepts: its inputs, then its options' fields."""
    keys: dict[str, Any] = dict.fromkeys(INPUTS[verb])
    keys.update({f.name: f for f in option_fields(VERBS[verb])})
    return keys


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; every problem is a ``RecipeError`` naming file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such recipe file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; is it a recipe?")
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
    steps_node = top["steps"]
    if not isinstance(steps_node, yaml.SequenceNode):
        raise RecipeError(f"{path}:{_line(steps_node)}: steps must be a list")
    names = set(inputs)
    steps = []
    for node in steps_node.value:
        step = _step(node, path, names)
        names.add(step.name)
        steps.append(step)
    return Recipe(path, text, inputs, tuple(steps))


def _step(node: Any, path: Path, names: set[str]) -> Step:
    fields = _mapping(node, path, "a step", STEP_KEYS, {"name"})
    name = _typed(fields["name"], str, path, "step name")
    if name in names:
        raise RecipeError(f"{path}:{_line(fields['name'])}: the name {name!r} is used twice")
    verbs = [k for k in fields if k in INPUTS]
    if len(verbs) != 1:
        raise RecipeError(
            f"{path}:{_line(node)}: step {name!r} needs exactly one of {', '.join(INPUTS)} (found {verbs or 'none'})"
        )
    verb = verbs[0]
    keys = verb_keys(verb)
    required = set(INPUTS[verb]) | {k for k, f in keys.items() if f is not None and f.metadata["required"]}
    raw = _mapping(fields[verb], path, f"step {name!r} ({verb})", set(keys), required)
    where = f"step {name!r}"
    args: dict[str, Any] = {}
    for key, value in raw.items():
        spec = keys[key]
        if spec is None or key == "base":  # names of inputs or earlier steps
            many = spec is None and INPUTS[verb][key]
            args[key] = _typed(value, list if many else str, path, f"{where}: {key}")
            for ref in args[key] if many else [args[key]]:
                if ref not in names:
                    label = f"{ref!r}" if many else f"{key} {ref!r}"
                    raise RecipeError(
                        f"{path}:{_line(value)}: {where}: {label} is not an input or an earlier step"
                    )
            continue
        args[key] = _option(value, spec, path, f"{where}: {key}")
    if "weights" in args:
        if len(args["weights"]) != len(args["inputs"]):
            raise RecipeError(
                f"{path}:{_line(raw['weights'])}: {where}: {len(args['weights'])} weights for "
                f"{len(args['inputs'])} inputs"
            )
        for weight in args["weights"]:
            check_weight_spec(weight, f"{path}:{_line(raw['weights'])}: {where}")
    options = {k: v for k, v in args.items() if k in keys and keys[k] is not None and k != "weights"}
    try:  # the options record's own checks (targets, forms, ranges), at the verb's line
        VERBS[verb](**options)
    except InvalidInputError as exc:
        raise RecipeError(f"{path}:{_line(fields[verb])}: {where}: {exc}") from None
    write = {
        k: _option(v, WRITE_KEYS[k], path, f"{where}: {k}") for k, v in fields.items() if k in WRITE_KEYS
    }
    if verb in CHECKPOINT_VERBS and "dtype" in write:  # it would set adapter factors' dtype: nothing here
        raise RecipeError(
            f"{path}:{_line(fields['dtype'])}: {where}: a step's dtype is the dtype of an adapter it writes; a "
            f"{verb} step writes a checkpoint: give dtype inside {verb}: {{...}} (merge only: quantized bases)"
        )
    try:
        WriteOptions(**write)
    except InvalidInputError as exc:
        raise RecipeError(f"{path}:{_line(node)}: {where}: {exc}") from None
    output = _typed(fields["output"], str, path, "output") if "output" in fields else None
    if output is None and (verb in CHECKPOINT_VERBS or write.get("push")):
        what = f"{verb} step" if verb in CHECKPOINT_VERBS else "a step that pushes"
        raise RecipeError(f"{path}:{_line(node)}: {where}: {what} needs an output path (output: ...)")
    return Step(name, verb, args, output, write, _line(node))


def _option(node: Any, spec: Any, path: Path, what: str) -> Any:
    kind = spec.metadata["type"]
    if kind == WEIGHTS:
        return _typed(node, list, path, what)
    if kind == COUNT:  # an int, or a string such as 20M
        try:
            return parse_count(_typed(node, (int, str), path, what), spec.name)
        except InvalidInputError as exc:
            raise RecipeError(f"{path}:{_line(node)}: {what}: {exc}") from None
    if isinstance(kind, type) and issubclass(kind, Enum):
        value = _typed(node, str, path, what)
        choices = [m.value for m in kind]
        if value not in choices:
            raise RecipeError(
                f"{path}:{_line(node)}: {what} must be one of {', '.join(choices)}, got {value!r}"
            )
        return value
    return _typed(node, kind, path, what)


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
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise RecipeError(f"{path}:{_line(node)}: {what} must be {names}, got {value!r}")
    return value
