"""Checkpoint commands: merge, unmerge, verify. Each is one call into ``adapterops.merging`` or
``adapterops.verification``; dry runs and uploads while merging happen there, not here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterops.cli._options import (
    WeightsCommand,
    display_options,
    options_from,
    pop_display,
    recorded_command,
)
from adapterops.options import MergeOptions, UnmergeOptions, VerifyOptions


def _checkpoint_options(record: type) -> Any:
    def decorate(func: Any) -> Any:
        func = display_options(func)
        func = click.option("--private", is_flag=True, help="With --push: create the Hub repo private.")(func)
        func = click.option(
            "--push",
            metavar="REPO_ID",
            help="Also upload the output to this Hub repo, shard by shard as written.",
        )(func)
        func = click.option(
            "--dry-run", is_flag=True, help="Print the plan (tensors, bytes, files, memory) and stop."
        )(func)
        func = click.option("--force", is_flag=True, help="Replace the output directory if it exists.")(func)
        func = options_from(record)(func)
        return click.option(
            "-o",
            "--output",
            required=True,
            type=click.Path(path_type=Path),
            help="Output directory; one .safetensors file when the base is one.",
        )(func)

    return decorate


def _stream(function_name: str, checkpoint: str, adapters: tuple[str, ...], kwargs: dict[str, Any]) -> None:
    import adapterops.merging as merging
    from adapterops.io.checkpoint import open_checkpoint

    out = pop_display(kwargs)
    weights = list(kwargs.pop("weights")) or None
    output, push = kwargs.pop("output"), kwargs.pop("push")

    command = recorded_command(click.get_current_context().find_root().meta.get("argv", []))

    def run() -> Any:
        opened = open_checkpoint(checkpoint) if not kwargs["dry_run"] else checkpoint
        total = opened.total_size if not isinstance(opened, str) else 0
        with out.byte_progress(function_name, total) as advance:
            function = getattr(merging, function_name)
            return function(
                opened,
                adapters,
                weights,
                out=output,
                push_to=push,
                progress=advance,
                command=command,
                **kwargs,
            )

    result = out.run(run)
    if result.dry_run:
        if out.as_json:
            out.json(result.plan)
        else:
            for key, value in result.plan.items():
                out.line(f"{key}: {value}")
        return
    if out.as_json:
        out.json(result.as_dict())
        return
    rate = result.bytes_written / max(result.seconds, 1e-9) / 2**20
    out.line(
        f"wrote {output}: {result.tensors_updated} tensors updated, {result.bytes_written / 2**20:.1f} MiB in "
        f"{result.seconds:.2f} s ({rate:.0f} MiB/s) on {result.device}"
    )
    if out.verbose:
        for key, error in result.quantization.items():
            ratio = f", {error.update_ratio:.3g}x the update" if error.update_ratio is not None else ""
            out.line(
                f"  {key}: relative error {error.rel_error:.3g}, worst {error.max_step:.3f} steps of its grid{ratio}"
            )
    if result.pushed:
        out.line(f"pushed {output} to {result.pushed}")


@click.command(cls=WeightsCommand)
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@_checkpoint_options(MergeOptions)
def merge(base: str, adapters: tuple[str, ...], **kwargs: Any) -> None:
    """Bake adapters into a base checkpoint: W' = W + sum_i w_i dW_i (DoRA: PEFT's merge).

    Streams tensor by tensor: memory stays about one tensor, whatever the model size. The output has
    the base's tensor names, dtypes and shards, its other files, and a record of what was merged.
    FP8/int8 bases are written back in their format with new scales, the error reported (-v: per
    tensor); --dtype bfloat16 writes them dequantized instead (bitsandbytes bases need it). A
    merge that changes one side of a tied lm_head unties it, and says so. A single-file checkpoint
    (an original SD, SDXL or Flux .safetensors) merges into one file; kohya adapters are named
    through its keys.

    \b
    Examples:
      adapterops merge meta-llama/Llama-3.1-8B ./my-lora -o ./merged
      adapterops merge ./base ./a ./b --weights 0.7 0.3 -o ./merged
      adapterops merge ./base ./dora-adapter -o ./merged --device cuda
      adapterops merge ./base ./my-lora -o ./merged --dry-run
      adapterops merge ./base ./my-lora -o ./merged --device cpu --workers 4
      adapterops merge ./qwen3-fp8 ./my-lora -o ./merged-bf16 --dtype bfloat16
      adapterops merge ./sdxl.safetensors style.safetensors -o ./sdxl-styled.safetensors
    """
    _stream("merge", base, adapters, kwargs)


@click.command(cls=WeightsCommand)
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@_checkpoint_options(UnmergeOptions)
def unmerge(merged: str, adapters: tuple[str, ...], **kwargs: Any) -> None:
    """Take adapters out of a merged checkpoint: W = W' - sum_i w_i dW_i.

    Exact up to one step of the stored dtype. DoRA needs the row norms its merge recorded.

    \b
    Example:
      adapterops unmerge ./merged ./my-lora -o ./base-again
    """
    _stream("unmerge", merged, adapters, kwargs)


@click.command(cls=WeightsCommand)
@click.argument("base")
@click.argument("adapters_and_merged", metavar="ADAPTERS... MERGED", nargs=-1, required=True)
@options_from(VerifyOptions)
@display_options
def verify(
    base: str,
    adapters_and_merged: tuple[str, ...],
    weights: tuple[float, ...],
    max_ulp: float,
    ignore_record: bool,
    **kwargs: Any,
) -> None:
    """Check a merged checkpoint: recompute every updated tensor in float64 and report its error
    in units in the last place (ulp) of its dtype, plus key coverage. Exits 1 on any problem.

    Tensors written back quantized are measured in steps of their own grid (0.5: rounded to
    nearest) and against the relative error their merge reported.

    \b
    Example:
      adapterops verify ./base ./my-lora ./merged
    """
    from adapterops.cli._console import render_verify
    from adapterops.verification import verify as verify_checkpoint

    if len(adapters_and_merged) < 2:
        raise click.UsageError("give the base, at least one adapter, and the merged checkpoint last")
    *adapters, merged = adapters_and_merged
    out = pop_display(kwargs)
    report = verify_checkpoint(
        base, adapters, merged, list(weights) or None, max_ulp=max_ulp, ignore_record=ignore_record
    )
    passed = report.passed()
    payload = report.as_dict()
    if out.as_json:
        out.json(payload)
    else:
        render_verify(payload, f"{merged} vs {base} + {', '.join(adapters)}", max_ulp, passed, out)
    if not passed:
        raise SystemExit(1)
