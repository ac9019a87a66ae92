"""The architecture, checked: layers import only downwards (lazy imports included), no cycles, the
pure layer stays pure, each verb has one description, and the CLI starts without torch.

docs/architecture.md draws the same layers; LAYERS below is the one source of truth for the test.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from adapterops import extraction, options, verbs
from adapterops.cli import cli
from adapterops.recipe.schema import INPUTS, WRITE_KEYS, verb_keys

PACKAGE = Path(__file__).resolve().parent.parent / "adapterops"

# bottom to top; a module imports only from its own layer or below
LAYERS: list[tuple[str, ...]] = [
    ("adapterops._version", "adapterops.errors", "adapterops.options"),
    ("adapterops.adapter", "adapterops.report", "adapterops.card"),
    ("adapterops.ops", "adapterops.io"),
    ("adapterops.provenance",),
    (
        "adapterops.verbs",
        "adapterops.extraction",
        "adapterops.merging",
        "adapterops.verification",
        "adapterops.recipe",
        "adapterops.hub",
        "adapterops.info",
        "adapterops.serving",
    ),
    ("adapterops.cli",),
    ("adapterops", "adapterops.__main__"),
]
# siblings in one layer that must not import each other at all
APART = [("adapterops.ops", "adapterops.io")]
# third-party and standard modules a layer must not touch
FORBIDDEN = {
    "adapterops.ops": {"click", "rich", "huggingface_hub", "safetensors", "os", "shutil", "pathlib", "yaml"},
    "adapterops.io": {"click", "rich", "yaml"},
    "adapterops.adapter": {"click", "rich", "huggingface_hub", "safetensors", "os", "pathlib"},
    "adapterops.options": {"torch", "click", "rich"},
    "adapterops.errors": {"torch", "click", "rich"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function bodies too)."""
    found: set[str] = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(
            module == prefix or module.startswith(prefix + ".") for prefix in layer if prefix != "adapterops"
        ):
            return index
    if module in ("adapterops",):
        return len(LAYERS) - 1
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {
        name: {m for m in imports(path, known) if m == "adapterops" or m.startswith("adapterops.")}
        for name, path in modules().items()
    }


def test_every_module_belongs_to_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{source} (layer {layer_of(source)}) imports {target} (layer {layer_of(target)})"
        for source, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(source)
    ]
    assert wrong == []


def test_no_module_but_the_entry_points_imports_the_package_root() -> None:
    # the root loads names lazily; importing it from inside would hide a cycle behind __getattr__
    offenders = [
        s for s, targets in graph().items() if "adapterops" in targets and s != "adapterops.__main__"
    ]
    assert offenders == []


def test_siblings_that_must_stay_apart() -> None:
    for left, right in APART:
        for source, targets in graph().items():
            for a, b in ((left, right), (right, left)):
                if source.startswith(a):
                    assert not any(t.startswith(b) for t in targets), f"{source} imports {b}"


def test_no_import_cycles_even_lazy_ones() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                if not all(c.startswith(nxt + ".") or c == nxt for c in cycle):
                    raise AssertionError(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_pure_layers_stay_pure() -> None:
    known = set(modules())
    for name, path in modules().items():
        for prefix, banned in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                used = {m.split(".")[0] for m in imports(path, known)} & banned
                assert not used, f"{name} imports {sorted(used)}"


def test_only_io_model_names_imports_transformers() -> None:
    # an optional extra (adapterops[transformers]), imported lazily where names need mapping
    known = set(modules())
    importers = {
        name
        for name, path in modules().items()
        if any(m.split(".")[0] == "transformers" for m in imports(path, known))
    }
    assert importers == {"adapterops.io.model_names"}
    tree = ast.parse((PACKAGE / "io" / "model_names.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any("transformers" in ast.unparse(n) for n in top), "import transformers inside the function"


# ------------------------------------------------------------------------- one description per verb

FUNCTIONS = {
    "combine": verbs.combine,
    "negate": verbs.negate,
    "scale": verbs.scale,
    "resize": verbs.resize,
    "to_dora": verbs.to_dora,
    "to_lora": verbs.to_lora,
    "extract": extraction.extract,
}


@pytest.mark.parametrize("verb", sorted(options.VERBS))
def test_every_option_of_a_verb_is_a_python_parameter_a_cli_option_and_a_recipe_key(verb: str) -> None:
    import adapterops.merging as merging
    import adapterops.verification as verification

    function = FUNCTIONS.get(verb) or getattr(merging, verb, None) or verification.verify
    fields = {f.name for f in options.option_fields(options.VERBS[verb])}
    assert fields <= set(inspect.signature(function).parameters)
    command = cli.get_command(click.Context(cli), verb.replace("_", "-"))
    assert command is not None
    assert fields <= {p.name for p in command.params if p.name}
    if verb in INPUTS:
        assert set(verb_keys(verb)) == fields | set(INPUTS[verb])


def test_recipe_steps_accept_every_write_option_the_cli_has() -> None:
    combine = cli.get_command(click.Context(cli), "combine")
    assert combine is not None
    cli_names = {p.name for p in combine.params}
    assert {f.name for f in options.option_fields(options.WriteOptions)} == set(WRITE_KEYS)
    assert set(WRITE_KEYS) <= cli_names


def test_python_errors_name_parameters_and_cli_errors_name_flags(zoo, tmp_path: Path) -> None:
    import adapterops as ao
    from tests.test_cli import run

    with pytest.raises(ao.InvalidInputError, match=r"give rank=K, energy=F or sv_ratio=R"):
        ao.combine([zoo["llama_a"], zoo["llama_b"]], method="svd")
    code, _, err = run("combine", zoo["llama_a"], zoo["llama_b"], "--method", "svd", "-o", tmp_path / "x")
    assert code == 2 and "give --rank K, --energy F or --sv-ratio R" in err


# ----------------------------------------------------------------------------------- a light CLI

PROBE = """
import json, os, sys
from adapterops.cli import main
for argv in (["--help"], ["--version"], ["merge", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
os.environ["_ADAPTEROPS_COMPLETE"] = "bash_complete"
os.environ["COMP_WORDS"] = "adapterops com"
os.environ["COMP_CWORD"] = "1"
try:
    main([])
except SystemExit:
    pass
heavy = ("torch", "rich", "safetensors", "huggingface_hub", "transformers")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)),
      file=sys.stderr)
"""


def test_help_version_and_completion_import_no_torch() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert "Usage: adapterops" in result.stdout and "combine" in result.stdout
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


def test_every_method_the_cli_offers_has_one_registry_entry() -> None:
    from adapterops.ops.combine import METHODS

    assert set(METHODS) == set(options.Method)
    command = cli.get_command(click.Context(cli), "combine")
    assert command is not None
    method = next(p for p in command.params if p.name == "method")
    assert isinstance(method.type, click.Choice)
    assert set(method.type.choices) == {m.value for m in METHODS}
