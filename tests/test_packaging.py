"""Packaging: the declared dependencies are the imported ones, each with a floor; the wheel's package list
and package data cover the source; torch's floor covers the APIs used; the bundled examples can be
written out with ``adapterops example`` and run from there.

Building the sdist and the wheel, checking their contents and running this suite from the unpacked sdist
at the lowest declared versions is ``make test-lowest`` (scripts/lowest_versions.sh, run by CI).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from adapterops.cli import cli

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "adapterops"
RECIPES = REPO / "recipes"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# declared but never imported by name: what needs them
USED_WITHOUT_IMPORT = {"numpy": "Tensor.numpy() (io/safetensors_file.py) needs numpy at run time"}

# every torch attribute adapterops uses, each present in torch 2.3 (the declared floor). A new one fails
# test_torch_apis_exist_at_the_declared_floor: check the torch release that added it, raise the floor in
# pyproject.toml (and docs/guide.md) if that is later than the floor, then add it here.
TORCH_FLOOR = "2.3"
TORCH_APIS = {
    *("Generator", "Tensor", "device", "dtype", "finfo", "load", "cuda", "cuda.is_available"),
    *("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"),
    *("float8_e4m3fn", "float8_e5m2"),  # 2.1
    *("empty", "zeros", "zeros_like", "ones", "ones_like", "tensor", "randn", "cat", "stack", "where"),
    *("addmm", "amax", "amin", "clamp", "cumsum", "equal", "isfinite", "isnan", "maximum", "nonzero"),
    *("frexp", "ldexp", "nextafter", "round", "full_like", "arange", "mul", "rand", "topk", "mm", "bincount"),
    *("block_diag", "split"),  # both long before 2.3 (1.8 and 1.0)
    "from_numpy",  # torch 1.0 (io/gguf.py)
    *("linalg", "linalg.matrix_norm", "linalg.qr", "linalg.svd", "linalg.vector_norm"),
    "linalg.svdvals",  # torch 1.9
    *("nn", "nn.Module"),  # layer classes (io/model_names.py), unchanged since torch 1.0
    # the merge stream (merging/pipeline.py) and its workers: all in torch 1.x
    *("cuda.Event", "cuda.Stream", "cuda.current_stream", "cuda.default_stream", "cuda.stream"),
    "set_num_threads",
    # the certified kernel (ops/kernels.py, ops/rounding.py); copysign and minimum 1.7-1.8,
    # get_float32_matmul_precision 1.12, backends.cuda.matmul.allow_tf32 1.7, the rest 1.0
    *("abs", "add", "as_tensor", "bitwise_and", "copysign", "index_select", "isinf", "minimum"),
    *("get_num_threads", "get_float32_matmul_precision"),
    *("backends", "backends.cuda", "backends.cuda.matmul", "backends.cuda.matmul.allow_tf32"),
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """name -> requirement, for the runtime dependencies."""
    out = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name, requirement
        out[canonical(name.group())] = requirement
    return out


def third_party_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """top-level module -> the files that import it, for every import that is neither stdlib nor ours
    (with ``top_level_only``: those imported when the file is imported, outside functions)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level_only else ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "adapterops":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def extras() -> dict[str, str]:
    """name -> requirement, for the optional runtime extras (``pip install 'adapterops[name]'``)."""
    out = {}
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        if extra == "test":
            continue
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9._-]+", requirement)
            assert name, requirement
            out[canonical(name.group())] = requirement
    return out


def test_every_import_is_a_declared_dependency_and_back() -> None:
    distributions = metadata.packages_distributions()
    deps = {**declared(), **extras()}
    used = set()
    for module, files in sorted(third_party_imports().items()):
        names = {canonical(d) for d in distributions.get(module, [module])}
        assert names & set(deps), f"{module} (imported in {sorted(files)}) is not in pyproject's dependencies"
        used |= names & set(deps)
    unused = set(deps) - used - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared but never imported: {sorted(unused)} (or say why in USED_WITHOUT_IMPORT)"


def test_optional_extras_are_imported_lazily_and_installed_for_the_tests() -> None:
    distributions = metadata.packages_distributions()
    optional = set(extras())
    for module in third_party_imports(top_level_only=True):
        names = {canonical(d) for d in distributions.get(module, [module])}
        assert not names & optional, f"{module} is optional: import it inside the function that needs it"
    tested = {
        canonical(re.split(r"[=<>!~ ]", r)[0]) for r in PYPROJECT["project"]["optional-dependencies"]["test"]
    }
    assert optional <= tested, "the test extra must install every optional extra, so the suite runs its code"


def test_every_dependency_has_a_floor_that_make_test_lowest_installs() -> None:
    for name, requirement in {**declared(), **extras()}.items():
        # scripts/lowest_versions.sh turns each dependency's `>=X` into `==X` (the extras keep the test
        # pins; docs/guide.md#install says how their floors were checked); markers or other operators
        # need it taught
        assert re.fullmatch(r"[A-Za-z0-9._-]+>=[0-9][0-9.]*", requirement), (name, requirement)


def test_torch_apis_exist_at_the_declared_floor() -> None:
    assert declared()["torch"] == f"torch>={TORCH_FLOOR}"
    used: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                parts, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    parts.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id == "torch":
                    used.add(".".join(reversed(parts)))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
                used |= {f"{node.module}.{alias.name}".removeprefix("torch.") for alias in node.names}
    new = used - TORCH_APIS
    assert not new, f"torch APIs not yet checked against torch {TORCH_FLOOR}: {sorted(new)} (see TORCH_APIS)"


def test_every_package_is_in_the_wheel() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"adapterops.examples"} == listed, (
        "pyproject.toml [tool.setuptools] packages is out of date"
    )
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"adapterops.examples": "recipes"}


def example_sources() -> list[str]:
    """Every file of the bundled examples in the source tree (recipes/, less its outputs and the package marker)."""
    return sorted(
        p.relative_to(RECIPES).as_posix()
        for p in RECIPES.rglob("*")
        if p.is_file()
        and p.relative_to(RECIPES).parts[0] not in ("out", "__pycache__")
        and p.name != "__init__.py"
        and not p.name.startswith(".")
    )


def test_package_data_takes_every_example_file() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["adapterops.examples"]
    matched = {p.relative_to(RECIPES).as_posix() for pattern in patterns for p in RECIPES.glob(pattern)}
    assert set(example_sources()) <= matched, "a bundled example file would be missing from the wheel"
    assert {"inputs/style-a", "inputs/style-b", "inputs/style-dora", "inputs/tiny-llama-64"} <= {
        name.rpartition("/")[0] for name in example_sources()
    }


def test_installed_examples_are_the_source_ones() -> None:
    try:
        root = resources.files("adapterops.examples")
    except ModuleNotFoundError:
        pytest.skip("adapterops runs from a source tree that is not installed (PYTHONPATH): no package data")
    for name in example_sources():
        assert root.joinpath(*name.split("/")).read_bytes() == (RECIPES / name).read_bytes(), name


def test_license_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert (
        text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text
    )
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])  # PEP 639


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def written(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_example_writes_the_bundled_recipes_and_inputs(tmp_path: Path) -> None:
    code, out, err = invoke("example", tmp_path / "ex")
    assert (code, err) == (0, "")
    assert out.startswith(f"wrote {tmp_path / 'ex'}: 6 recipes, 4 inputs")
    assert out.endswith(f"try: adapterops run {tmp_path / 'ex' / 'blend-and-merge.yaml'}\n")
    assert written(tmp_path / "ex") == example_sources()
    for name in example_sources():
        assert (tmp_path / "ex" / name).read_bytes() == (RECIPES / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["ex"]  # no temporary sibling left behind


def test_example_refuses_a_folder_with_files_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out, _ = invoke("example", tmp_path / "empty", "--json")
    assert code == 0 and sorted(json.loads(out)["files"]) == example_sources()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, out, err = invoke("example", tmp_path / "mine")
    assert (code, out) == (4, "") and err.startswith("error: ") and "--force" in err
    assert written(tmp_path / "mine") == ["notes.txt"]
    code, _, _ = invoke("example", tmp_path / "mine", "--force", "-q")
    assert code == 0 and written(tmp_path / "mine") == example_sources()
    code, _, err = invoke("example", tmp_path / "missing" / "ex")
    assert code == 2 and "does not exist" in err


def test_a_recipe_runs_from_the_written_examples(tmp_path: Path) -> None:
    assert invoke("example", tmp_path / "ex", "-q")[0] == 0
    code, out, err = invoke("run", tmp_path / "ex" / "blend-and-merge.yaml")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[-1].startswith(f"merged: merge -> {tmp_path / 'ex' / 'out' / 'merged'}")
    assert (tmp_path / "ex" / "out" / "mix" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ex" / "out" / "merged" / "model.safetensors.index.json").is_file()
