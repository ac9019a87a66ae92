"""``adapterops merge``, ``unmerge`` and ``verify``: registered on the group in ``adapterops.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from adapterops.cli import WeightsCommand, _run, cli, maybe_push, push_options
from adapterops.console import Output
from adapterops.io import load_adapter
from adapterops.io.atomic import check_output_path
from adapterops.io.checkpoint import open_checkpoint
from adapterops.merge import Direction, execute, plan_merge
from adapterops.verify import verify as verify_checkpoint

WEIGHTS_HELP = "One weight per adapter, in order (default 1 each): dW = sum_i w_i dW_i."


def checkpoint_options(func: Any) -> Any:
    options = [
        click.option("-w", "--weights", type=float, multiple=True, help=WEIGHTS_HELP),
        click.option(
            "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory."
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto (CUDA when present), cpu, cuda or cuda:N.",
        ),
        click.option(
            "--force", is_flag=True, help="Replace the output; merge an adapter the record already lists."
        ),
        click.option(
            "--dry-run", is_flag=True, help="Print the plan (tensors, bytes, files, memory) and stop."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
    ]
    for option in reversed(options):
        func = option(func)
    return push_options(func)


def _stream(
    direction: Direction,
    checkpoint_ref: str,
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    output: Path,
    device: str,
    force: bool,
    dry_run: bool,
    out: Output,
) -> None:
    if not dry_run:
        check_output_path(output.absolute(), force=force)
    checkpoint = open_checkpoint(checkpoint_ref)
    loaded = [load_adapter(a) for a in adapters]
    plan = plan_merge(checkpoint, loaded, list(weights) or None, direction=direction, force=force)
    if dry_run:
        summary = plan.describe()
        if out.as_json:
            out.json(summary)
        else:
            for key, value in summary.items():
                out.line(f"{key}: {value}")
        return
    meta = click.get_current_context().meta
    uploader = None
    if meta.get("push_repo"):  # upload each shard as soon as it is written, while the next is computed
        from adapterops.hub import ShardUploader

        uploader = ShardUploader(meta["push_repo"], private=bool(meta.get("push_private")))
    with out.byte_progress(direction.value, checkpoint.total_size) as advance:
        result = execute(
            plan,
            output,
            device=device,
            force=force,
            progress=advance,
            on_shard=uploader.submit if uploader else None,
        )
    if out.as_json:
        out.json({**result.as_dict(), "pushed": maybe_push(output, out, uploader)})
    else:
        rate = result.bytes_written / max(result.seconds, 1e-9) / 2**20
        out.line(
            f"wrote {output}: {result.tensors_updated} tensors updated, {result.bytes_written / 2**20:.1f} MiB in "
            f"{result.seconds:.2f} s ({rate:.0f} MiB/s) on {result.device}"
        )
        maybe_push(output, out, uploader)


@cli.command(cls=WeightsCommand)
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@checkpoint_options
def merge(
    base: str,
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    output: Path,
    device: str,
    force: bool,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Bake adapters into a base checkpoint: W' = W + sum_i w_i dW_i (DoRA: PEFT's merge).

    Streams tensor by tensor: memory stays about one tensor, whatever the model size. The output has
    the base's tensor names, dtypes and shards, its other files, and a record of what was merged.

    \b
    Examples:
      adapterops merge meta-llama/Llama-3.1-8B ./my-lora -o ./merged
      adapterops merge ./base ./a ./b --weights 0.7 0.3 -o ./merged
      adapterops merge ./base ./dora-adapter -o ./merged --device cuda
      adapterops merge ./base ./my-lora -o ./merged --dry-run
    """
    out = Output(as_json=as_json, quiet=quiet)
    _run(out, lambda: _stream(Direction.MERGE, base, adapters, weights, output, device, force, dry_run, out))


@cli.command(cls=WeightsCommand)
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@checkpoint_options
def unmerge(
    merged: str,
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    output: Path,
    device: str,
    force: bool,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Take adapters out of a merged checkpoint: W = W' - sum_i w_i dW_i.

    Exact up to one step of the stored dtype. DoRA needs the row norms its merge recorded.

    \b
    Example:
      adapterops unmerge ./merged ./my-lora -o ./base-again
    """
    out = Output(as_json=as_json, quiet=quiet)
    _run(
        out,
        lambda: _stream(Direction.UNMERGE, merged, adapters, weights, output, device, force, dry_run, out),
    )


@cli.command(cls=WeightsCommand)
@click.argument("base")
@click.argument("adapters_and_merged", metavar="ADAPTERS... MERGED", nargs=-1, required=True)
@click.option("-w", "--weights", type=float, multiple=True, help=WEIGHTS_HELP)
@click.option(
    "--max-ulp", type=float, default=0.5, show_default=True, help="Fail when a tensor is off by more."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def verify(
    base: str, adapters_and_merged: tuple[str, ...], weights: tuple[float, ...], max_ulp: float, as_json: bool
) -> None:
    """Check a merged checkpoint: recompute every updated tensor in float64 and report its error
    in units in the last place (ulp) of its dtype, plus key coverage. Exits 1 on any problem.

    \b
    Example:
      adapterops verify ./base ./my-lora ./merged
    """
    if len(adapters_and_merged) < 2:
        raise click.UsageError("give the base, at least one adapter, and the merged checkpoint last")
    *adapters, merged = adapters_and_merged
    out = Output(as_json=as_json)
    report = verify_checkpoint(base, adapters, merged, list(weights) or None)
    payload = report.as_dict()
    failed = not report.ok or report.max_ulp > max_ulp * (1 + 1e-9)  # ulp ratios carry float64 rounding
    if as_json:
        out.json({**payload, "max_ulp_allowed": max_ulp, "passed": not failed})
    else:
        table = Table(title=f"{merged} vs {base} + {', '.join(adapters)}", title_justify="left")
        table.add_column("tensor")
        table.add_column("max error (ulp)", justify="right")
        for check in payload["per_tensor"]:
            table.add_row(check["key"], f"{check['max_ulp']:.3f}")
        out.out.print(table)
        problems = {
            k: payload[k]
            for k in ("missing_in_merged", "extra_in_merged", "layout_changed", "changed_untouched")
        }
        for name, keys in problems.items():
            if keys:
                out.line(f"{name.replace('_', ' ')}: {', '.join(keys)}")
        verdict = "FAILED" if failed else "ok"
        out.line(
            f"{verdict}: {payload['tensors_updated']} tensors updated, worst {report.max_ulp:.3f} ulp "
            f"(allowed {max_ulp}), {payload['tensors']} tensors checked"
        )
    if failed:
        raise SystemExit(1)
