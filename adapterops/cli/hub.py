"""``adapterops push``: one call to ``adapterops.hub.push_to_hub``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterops.cli._options import display_options, pop_display


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--revision", help="Branch to push to (created if missing); default main.")
@click.option("--commit-message", help="Commit message; default names the kind of output.")
@click.option("--token", help="Hub token; default HF_TOKEN or the login cache. Never printed.")
@click.option(
    "--replace-card",
    is_flag=True,
    help="Upload a new card instead of the directory's README.md (kept by default).",
)
@display_options
def push(
    path: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    token: str | None,
    replace_card: bool,
    **kwargs: Any,
) -> None:
    """Upload an adapter or merged checkpoint to the Hub with a model card of its lineage.

    The card records the inputs (repo@revision or path, sha256), weights, method, rank, recipe,
    adapterops version and the error figures the operation reported. A README.md in the directory
    is kept: only its lineage section is added or brought up to date.

    \b
    Examples:
      adapterops push ./mix me/style-mix --private
      adapterops push ./merged me/llama-merged --revision v2
    """
    from adapterops.hub import push_to_hub

    out = pop_display(kwargs)
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    with out.progress("uploading", len(files) + 1) as advance:
        url = push_to_hub(
            path,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            progress=advance,
            replace_card=replace_card,
        )
    if out.as_json:
        out.json({"repo_id": repo_id, "revision": revision or "main", "commit_url": url})
    else:
        out.line(f"pushed {path} to {url}")
