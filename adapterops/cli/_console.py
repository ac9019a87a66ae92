"""One console for every command: results to stdout (text or ``--json``), progress, warnings and
errors to stderr; and every text rendering (info and verify tables, plans, recipe rows).

rich is imported inside the methods that draw, so ``adapterops --help`` never pays for it.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any


class Output:
    """Where a command writes: ``result`` to stdout (text or JSON), everything else to stderr."""

    def __init__(self, *, as_json: bool = False, quiet: bool = False, verbose: bool = False) -> None:
        self.as_json, self.quiet, self.verbose = as_json, quiet, verbose
        from rich.console import Console  # imported per command: --help and completion stay light

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
        from rich.progress import MofNCompleteColumn

        with self._bar(description, total, (MofNCompleteColumn(),)) as update:
            yield lambda label=None: update(1, label)

    @contextmanager
    def byte_progress(self, description: str, total: int) -> Iterator[Any]:
        """Like ``progress`` for work measured in bytes; yields ``advance(nbytes, label)``, shows throughput."""
        from rich.progress import DownloadColumn, TransferSpeedColumn

        with self._bar(
            description, total, (DownloadColumn(binary_units=True), TransferSpeedColumn())
        ) as update:
            yield update

    @contextmanager
    def _bar(self, description: str, total: int, counters: tuple[Any, ...]) -> Iterator[Any]:
        if self.quiet or self.as_json or total == 0 or not self.err.is_terminal:
            yield lambda _n=0, _label=None: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

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

    def run(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` and print the warnings it raised as one line each on stderr."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = work()
        for item in caught:
            if issubclass(item.category, UserWarning) and "adapterops" in item.filename:
                self.warn(str(item.message))
        return result


def render_info(report: dict[str, Any], console: Any) -> None:
    """The ``info`` table and facts."""
    from rich.table import Table

    table = Table(title=report["source"]["path"] if report["source"] else None, title_justify="left")
    with_base = any("norm_base" in m for m in report["modules"])
    columns = ["module", "kind", "shape", "r", "scale", "dtype", "‖A‖", "‖B‖", "‖ΔW‖"]
    if with_base:
        columns += ["‖W‖", "‖ΔW_eff‖", "m / ‖W‖row"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("module", "kind", "dtype") else "right")
    for m in report["modules"]:
        extra = []
        if with_base:
            ratio = (
                f"{m['magnitude_over_base_min']:.3f}-{m['magnitude_over_base_max']:.3f}"
                if "magnitude_over_base_min" in m
                else ""
            )
            extra = [f"{m['norm_base']:.4g}", f"{m['norm_delta_effective']:.4g}", ratio]
        table.add_row(
            m["name"] + (" (DoRA)" if m["dora"] else ""),
            f"expert {m['expert']}/{m['experts']}" if "expert" in m else m["kind"],
            "x".join(str(d) for d in m["weight_shape"]),
            str(m["r"]),
            f"{m['scale']:.4g}",
            m["dtype"],
            f"{m['norm_A']:.4g}",
            f"{m['norm_B']:.4g}",
            f"{m['norm_delta']:.4g}",
            *extra,
        )
    console.print(table)
    source = report["source"] or {}
    facts = [
        f"format: {report.get('format', 'peft')}" + (f" ({report['model']})" if report.get("model") else ""),
        f"modules: {report['modules_count']}",
        f"ranks: {', '.join(map(str, report['ranks']))}",
        f"parameters: {report['parameters']:,}",
        f"dtype: {report['dtype']}",
        f"base model: {report['base_model'] or 'not recorded'}",
    ]
    if source.get("repo_id"):
        facts.append(f"hub: {source['repo_id']}@{source.get('revision')}")
    if source.get("sha256"):
        facts.append(f"sha256: {source['sha256']}")
    if report["dora"]:
        facts.append("DoRA: yes (lora_magnitude_vector present)")
    parameters = sorted({m["parameter"] for m in report["modules"] if "parameter" in m})
    if parameters:
        facts.append(f"LoRA on parameters (target_parameters): {len(parameters)}, one row per expert")
    for key, shape in report["full_tensors"].items():
        facts.append(f"stored whole: {key} {'x'.join(map(str, shape))}")
    provenance = report["provenance"] or {}
    if provenance.get("command"):
        facts.append(f"made by: {provenance['command']}")
    elif provenance.get("recipe_step"):
        facts.append(f"made by: recipe step {provenance['recipe_step']} ({provenance.get('operation')})")
    elif provenance:
        facts.append(f"made by: {provenance.get('operation')}")
    console.print("\n".join(facts), markup=False, highlight=False)


def render_verify(payload: Mapping[str, Any], title: str, max_ulp: float, passed: bool, out: Output) -> None:
    """The ``verify`` table: each updated tensor's error, the coverage problems, the verdict."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("tensor")
    table.add_column("max error (ulp)", justify="right")
    quantized = any("rel_error" in check for check in payload["per_tensor"])
    if quantized:  # written back quantized: ulps of its grid, and the relative error against the reported one
        table.add_column("relative error", justify="right")
        table.add_column("reported", justify="right")
    for check in payload["per_tensor"]:
        row = [check["key"], f"{check['max_ulp']:.3f}"]
        if quantized:
            row += [
                f"{check['rel_error']:.4g}" if "rel_error" in check else "",
                f"{check['reported_rel_error']:.4g}" if "reported_rel_error" in check else "",
            ]
        table.add_row(*row)
    if not out.quiet:
        out.out.print(table)
    names = ("missing_in_merged", "extra_in_merged", "layout_changed", "changed_untouched", "non_finite")
    for name in (*names, "config_problems", "over_reported"):
        if payload.get(name):
            out.line(f"{name.replace('_', ' ')}: {', '.join(payload[name])}")
    out.line(
        f"{'ok' if passed else 'FAILED'}: {payload['tensors_updated']} tensors updated, worst "
        f"{payload['max_ulp']:.3f} ulp (allowed {max_ulp}), {payload['tensors']} tensors checked"
    )


def render_plan_rows(rows: Sequence[Mapping[str, Any]], out: Output) -> None:
    """A recipe's dry run, one line per input and step."""
    for row in rows:
        if "verb" not in row:
            out.line(f"{row['step']}: {row['source']} ({row['bytes'] / 2**20:.2f} MiB)")
            continue
        where = f" -> {row['output']}" if row["output"] else ""
        pushed = f", push to {row['push']}" if row["push"] else ""
        out.line(
            f"{row['step']}: {row['verb']}({', '.join(row['uses'])}) {row['args'] or ''}{where}{pushed}; "
            f"about {row['estimated_output_bytes'] / 2**20:.2f} MiB out, "
            f"{row['estimated_peak_memory_bytes'] / 2**20:.0f} MiB peak"
        )
