"""``adapterops run``: one call to ``adapterops.recipe.run_recipe`` (or ``plan_recipe``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterops.cli._options import display_options, pop_display


@click.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (steps, inputs, outputs, sizes, memory) and stop."
)
@click.option(
    "--output-dir", type=click.Path(path_type=Path), help="Write outputs here instead of beside the recipe."
)
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
@display_options
def run(recipe: Path, dry_run: bool, output_dir: Path | None, force: bool, **kwargs: Any) -> None:
    """Run a pipeline from a recipe file (YAML): load, combine, negate, scale, resize, DoRA
    conversions, merge, unmerge, push. The file is validated first; its errors give the line.

    \b
    Examples:
      adapterops run recipes/blend-and-merge.yaml
      adapterops run recipes/blend-and-merge.yaml --dry-run
      adapterops run my-recipe.yaml --output-dir /data/out --force
    """
    from adapterops.cli._console import render_plan_rows
    from adapterops.recipe import load_recipe, plan_recipe, run_recipe

    out = pop_display(kwargs)
    parsed = load_recipe(recipe)
    if dry_run:
        rows = plan_recipe(parsed, output_dir)
        if out.as_json:
            out.json({"recipe": str(recipe), "plan": rows})
        else:
            render_plan_rows(rows, out)
        return

    def work() -> Any:
        with out.progress("recipe", len(parsed.steps)) as advance:
            return run_recipe(recipe, output_dir=output_dir, force=force, progress=advance)

    results = out.run(work)
    if out.as_json:
        out.json({"recipe": str(recipe), "steps": [r.__dict__ for r in results]})
        return
    for result in results:
        where = f" -> {result.output}" if result.output else ""
        pushed = f" (pushed: {result.pushed})" if result.pushed else ""
        out.line(f"{result.name}: {result.verb}{where}: {result.summary}{pushed}")
