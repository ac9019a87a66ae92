"""One console: results to stdout, progress, warnings and errors to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from adapterops.adapter import ModuleReport


class Output:
    """Where a command writes: ``result`` to stdout (text or JSON), everything else to stderr."""

    def __init__(self, *, as_json: bool = False, quiet: bool = False, verbose: bool = False) -> None:
        self.as_json, self.quiet, self.verbose = as_json, quiet, verbose
        # piped output gets a wide virtual terminal: module names must not be cut in files and CI logs
        width = None if sys.stdout.isatty() else 200
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=True, width=width)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)

    def json(self, payload: Any) -> None:
        self.out.file.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")

    def line(self, text: str) -> None:
        if not self.quiet:
            self.out.print(text, markup=False)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A bar on stderr; yields ``advance(label)``. Shown only on a terminal, never with --quiet or --json."""
        with self._bar(description, total, (MofNCompleteColumn(),)) as update:
            yield lambda label=None: update(1, label)

    @contextmanager
    def byte_progress(self, description: str, total: int) -> Iterator[Any]:
        """Like ``progress`` for work measured in bytes; yields ``advance(nbytes, label)``, shows throughput."""
        with self._bar(
            description, total, (DownloadColumn(binary_units=True), TransferSpeedColumn())
        ) as update:
            yield update

    @contextmanager
    def _bar(self, description: str, total: int, counters: tuple[Any, ...]) -> Iterator[Any]:
        if self.quiet or self.as_json or total == 0 or not self.err.is_terminal:
            yield lambda _n=0, _label=None: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            *counters,
            TimeElapsedColumn(),
            TextColumn("{task.fields[item]}", style="dim"),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total, item="")

            def advance(n: int = 1, label: str | None = None) -> None:
                bar.update(task, advance=n, item=label or "")

            yield advance


def summarize(reports: Sequence[ModuleReport]) -> dict[str, Any]:
    """The figures every rank-changing command prints: ranks, energy kept, worst module."""
    if not reports:
        return {"modules": 0}
    worst = min(reports, key=lambda r: r.energy_kept)
    worst_error = max(reports, key=lambda r: r.rel_error)
    ranks = sorted({r.rank_out for r in reports})
    return {
        "modules": len(reports),
        "rank_min": ranks[0],
        "rank_max": ranks[-1],
        "energy_kept_min": worst.energy_kept,
        "energy_kept_min_module": worst.name,
        "energy_kept_mean": sum(r.energy_kept for r in reports) / len(reports),
        "rel_error_max": worst_error.rel_error,
        "rel_error_max_module": worst_error.name,
    }


def summary_line(summary: dict[str, Any]) -> str:
    if not summary.get("modules"):
        return "0 modules"
    ranks = (
        summary["rank_min"]
        if summary["rank_min"] == summary["rank_max"]
        else (f"{summary['rank_min']}-{summary['rank_max']}")
    )
    text = f"{summary['modules']} modules, rank {ranks}"
    if summary["energy_kept_min"] < 1.0 or summary["rel_error_max"] > 0.0:
        text += (
            f", energy kept {100 * summary['energy_kept_mean']:.3f}% mean, "
            f"{100 * summary['energy_kept_min']:.3f}% min ({summary['energy_kept_min_module']}), "
            f"max relative error {summary['rel_error_max']:.3g} ({summary['rel_error_max_module']})"
        )
    return text
