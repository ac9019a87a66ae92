"""``adapterops to-dora`` and ``to-lora``: registered on the group in ``adapterops.cli``."""

from __future__ import annotations

from pathlib import Path

import click

from adapterops.cli import _run, _write, cli, output_options, rank_options
from adapterops.console import Output
from adapterops.dora import to_dora as convert_to_dora
from adapterops.dora import to_lora as convert_to_lora
from adapterops.io import load_adapter
from adapterops.io.atomic import check_output_path

BASE_HELP = "Base checkpoint the adapter was trained on (dir or Hub id)."


@cli.command("to-dora")
@click.argument("adapter")
@click.option("--base", required=True, help=BASE_HELP)
@output_options
def to_dora(
    adapter: str, base: str, output: Path, force: bool, dtype: str, as_json: bool, quiet: bool, verbose: bool
) -> None:
    """Turn a LoRA into a DoRA with the same merged weights: m = ||W + sBA|| per output row.

    Exact: PEFT merges the result to the same weights as the LoRA, up to rounding.

    \b
    Example:
      adapterops to-dora ./lora --base ./base -o ./dora
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    check_output_path(output.absolute(), force=force)

    def work() -> None:
        loaded = load_adapter(adapter)
        with out.progress("to-dora", len(loaded.modules)) as advance:
            result = convert_to_dora(loaded, base, progress=advance)
        _write(result, output, force=force, dtype=dtype, out=out)

    _run(out, work)


@cli.command("to-lora")
@click.argument("adapter")
@click.option("--base", required=True, help=BASE_HELP)
@rank_options
@click.option(
    "--exact-limit",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Modules with min(out, in) up to this get an exact SVD; larger ones a randomized one.",
)
@output_options
def to_lora(
    adapter: str,
    base: str,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    exact_limit: int,
    output: Path,
    force: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Best low-rank LoRA of a DoRA adapter's effective update, with the error per module.

    DoRA's update (m/n - 1) W + (m/n) sBA is full rank in general: the output is its best rank-K
    approximation (Eckart-Young), and the relative error is reported per module and in total.

    \b
    Examples:
      adapterops to-lora ./dora --base ./base --rank 16 -o ./lora
      adapterops to-lora ./dora --base ./base --energy 0.999 -o ./lora
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    if rank is None and energy is None and sv_ratio is None:
        raise click.UsageError("give a target: --rank K, --energy F or --sv-ratio R")
    check_output_path(output.absolute(), force=force)

    def work() -> None:
        loaded = load_adapter(adapter)
        with out.progress("to-lora", len(loaded.modules)) as advance:
            result = convert_to_lora(
                loaded,
                base,
                rank=rank,
                energy=energy,
                sv_ratio=sv_ratio,
                exact_limit=exact_limit,
                progress=advance,
            )
        _write(result, output, force=force, dtype=dtype, out=out)

    _run(out, work)
