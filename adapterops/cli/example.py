"""``adapterops example``: write the bundled examples (recipes and their inputs) into a folder.

The examples are the package ``adapterops.examples`` (in a source checkout: the folder ``recipes/``),
read through ``importlib.resources``, so they work from a wheel, an editable install or a zip.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from adapterops.cli._options import display_options, pop_display

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; only for the annotations

FIRST_RECIPE = "blend-and-merge.yaml"


def bundled() -> Traversable:
    """The folder holding the bundled recipes (``*.yaml``) and ``inputs/``."""
    try:
        return resources.files("adapterops.examples")
    except ModuleNotFoundError:  # a source checkout put on sys.path without installing it
        checkout = Path(__file__).resolve().parents[2] / "recipes"
        if (checkout / FIRST_RECIPE).is_file():
            return checkout
        raise


def example_files(root: Traversable) -> Iterator[tuple[str, Traversable]]:
    """(relative path, file) for each recipe and each input file; never ``out/`` or Python files."""
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(".yaml"):
            yield entry.name, entry
    inputs = root / "inputs"
    for folder in sorted(inputs.iterdir(), key=lambda e: e.name):
        if folder.is_dir():
            for entry in sorted(folder.iterdir(), key=lambda e: e.name):
                if entry.is_file():
                    yield f"inputs/{folder.name}/{entry.name}", entry


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--force", is_flag=True, help="Write into DIRECTORY even if it exists and is not empty (replacing it)."
)
@display_options
def example(directory: Path, force: bool, **kwargs: Any) -> None:
    """Write the bundled example recipes and their inputs into DIRECTORY.

    The recipes (*.yaml) run on the inputs beside them (inputs/: two LoRA adapters, a DoRA adapter
    and the tiny Llama checkpoint they were made for; about 300 KB). DIRECTORY may exist if it is
    empty; it is written whole or not at all.

    \b
    Examples:
      adapterops example ./examples
      adapterops run ./examples/blend-and-merge.yaml
      adapterops run ./examples/dora.yaml --dry-run
    """
    from adapterops.io.atomic import atomic_output_dir

    out = pop_display(kwargs)
    empty = directory.is_dir() and not any(directory.iterdir())
    written: list[str] = []
    size = 0
    with atomic_output_dir(directory, force=force or empty) as tmp:
        for relative, source in example_files(bundled()):
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open("rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(relative)
            size += target.stat().st_size
    recipes = [name for name in written if "/" not in name]
    inputs = sorted({name.split("/")[1] for name in written if "/" in name})
    if out.as_json:
        out.json(
            {"output": str(directory), "recipes": recipes, "inputs": inputs, "files": written, "bytes": size}
        )
        return
    if out.verbose:
        for name in written:
            out.line(f"  {name}")
    out.line(
        f"wrote {directory}: {len(recipes)} recipes, {len(inputs)} inputs ({', '.join(inputs)}), "
        f"{size / 1024:.0f} KiB"
    )
    out.line(f"try: adapterops run {directory / FIRST_RECIPE}")
