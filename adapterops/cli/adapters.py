"""Adapter commands: combine, negate, scale, resize, to-dora, to-lora, extract, info, convert.

Each parses (options generated from its record in ``adapterops.options``), calls one public
function, and renders the result. Library imports happen inside the commands: ``--help`` and
shell completion never import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from adapterops.cli._options import (
    WeightsCommand,
    display_options,
    options_from,
    pop_display,
    pop_write,
    recorded_command,
    write_options,
)
from adapterops.options import (
    CombineOptions,
    ConvertOptions,
    ExtractOptions,
    NegateOptions,
    ResizeOptions,
    ScaleOptions,
    ToDoraOptions,
    ToLoraOptions,
    WriteOptions,
)


@click.command(cls=WeightsCommand)
@click.argument("adapters", nargs=-1, required=True)
@options_from(CombineOptions)
@write_options
def combine(adapters: tuple[str, ...], **kwargs: Any) -> None:
    """Weighted sum of adapters: dW = sum_i w_i dW_i for every module any input touches.

    \b
    Examples:
      adapterops combine ./style-a ./style-b --weights 0.7 0.3 -o ./mix
      adapterops combine a b c --weights 0.5 -0.4 1.2 --method svd --rank 16 -o ./mix16
      adapterops combine a b --method svd --budget-params 20M -o ./mix20m
      adapterops combine org/a@v2 org/b -w 1 -w 1 --method cat -o ./both
      adapterops combine a b --method ties --density 0.3 --space core -o ./core-ties
      adapterops combine a b c --method iso_cts --common-fraction 0.8 -o ./iso
      adapterops combine ./dora-a ./lora-b --weights 0.6 0.4 --base ./base -o ./mix
      adapterops combine ./dora-a ./dora-b --weights 0.5 0.5 --base ./base --form dora -o ./mix
    """
    from adapterops import verbs

    def work(out: Any) -> Any:
        loaded = _load_all(adapters, out, kwargs.get("base"))
        with out.progress("combining", len(set().union(*(a.modules for a in loaded)))) as advance:
            return verbs.combine(loaded, progress=advance, **kwargs)

    _adapter_command(CombineOptions, kwargs, work)


@click.command()
@click.argument("adapter")
@options_from(NegateOptions)
@write_options
def negate(adapter: str, **kwargs: Any) -> None:
    """Flip an adapter's update: dW -> -dW (lora_B changes sign, nothing else).

    A DoRA input needs --base; its effective update is negated and re-factored as a LoRA.

    \b
    Examples:
      adapterops negate ./toxic -o ./anti-toxic
      adapterops negate ./dora --base ./base -o ./anti
    """
    from adapterops import verbs

    _adapter_command(NegateOptions, kwargs, lambda out: _one(out, "negate", adapter, verbs.negate, kwargs))


@click.command()
@click.argument("adapter")
@options_from(ScaleOptions)
@write_options
def scale(adapter: str, **kwargs: Any) -> None:
    """Multiply an adapter's update by a factor; the factors stay as stored, lora_alpha absorbs it.

    \b
    Example:
      adapterops scale ./style-a --by 0.5 -o ./half
    """
    from adapterops import verbs

    _adapter_command(ScaleOptions, kwargs, lambda out: _one(out, "scale", adapter, verbs.scale, kwargs))


@click.command()
@click.argument("adapter")
@options_from(ResizeOptions)
@write_options
def resize(adapter: str, **kwargs: Any) -> None:
    """Truncate each module to its best low-rank form (SVD of dW, computed from the factors).

    A rule per module (--rank, --energy, --sv-ratio), or a budget over all modules: --budget-params
    (total LoRA parameters; the ranks that leave the least total squared error) or --budget-error
    (the fewest parameters within that total relative error). --max-rank caps any of them.

    \b
    Examples:
      adapterops resize ./big --rank 8 -o ./small
      adapterops resize ./big --energy 0.99 -o ./small
      adapterops resize ./big --sv-ratio 20 -o ./small
      adapterops resize ./big --energy 0.99 --max-rank 64 -o ./small
      adapterops resize ./big --budget-params 20M -o ./small
      adapterops resize ./big --budget-error 0.05 --max-rank 64 -o ./small
    """
    from adapterops import verbs

    _adapter_command(ResizeOptions, kwargs, lambda out: _one(out, "resize", adapter, verbs.resize, kwargs))


@click.command("to-dora")
@click.argument("adapter")
@options_from(ToDoraOptions)
@write_options
def to_dora(adapter: str, **kwargs: Any) -> None:
    """Turn a LoRA into a DoRA with the same merged weights: m = ||W + sBA|| per output row.

    Exact: PEFT merges the result to the same weights as the LoRA, up to rounding.

    \b
    Example:
      adapterops to-dora ./lora --base ./base -o ./dora
    """
    from adapterops import verbs

    _adapter_command(ToDoraOptions, kwargs, lambda out: _one(out, "to-dora", adapter, verbs.to_dora, kwargs))


@click.command("to-lora")
@click.argument("adapter")
@options_from(ToLoraOptions)
@write_options
def to_lora(adapter: str, **kwargs: Any) -> None:
    """Best low-rank LoRA of a DoRA adapter's effective update, with the error per module.

    DoRA's update (m/n - 1) W + (m/n) sBA is full rank in general: the output is its best rank-K
    approximation (Eckart-Young), and the relative error is reported per module and in total.

    \b
    Examples:
      adapterops to-lora ./dora --base ./base --rank 16 -o ./lora
      adapterops to-lora ./dora --base ./base --energy 0.999 -o ./lora
      adapterops to-lora ./dora --base ./base --budget-params 2M --max-rank 32 -o ./lora
    """
    from adapterops import verbs

    _adapter_command(ToLoraOptions, kwargs, lambda out: _one(out, "to-lora", adapter, verbs.to_lora, kwargs))


@click.command()
@click.argument("finetuned")
@click.argument("base")
@options_from(ExtractOptions)
@write_options
def extract(finetuned: str, base: str, **kwargs: Any) -> None:
    """Extract a LoRA from a fine-tune: the best rank-K form of FINETUNED - BASE, module by module.

    FINETUNED and BASE are checkpoints (directories or Hub ids) of one architecture. Each changed
    Linear, Conv1D, conv and embedding layer gets the best rank-K approximation of its weight's
    change (exact SVD, or a randomized one for large layers), its error measured and reported;
    changed norms are stored whole (--norms), changed biases go into lora_bias (--biases). Reads
    one module at a time. The output loads with PeftModel.from_pretrained on BASE.

    A budget over all modules (--budget-params N, --budget-error E) reads both checkpoints twice:
    once for every module's singular values, to choose the ranks, once to factor.

    \b
    Examples:
      adapterops extract ./my-finetune meta-llama/Llama-3.2-1B --rank 64 -o ./extracted
      adapterops extract ./ft ./base --budget-params 20M --max-rank 128 -o ./extracted
      adapterops extract ./ft ./base --energy 0.9 --embeddings save -o ./extracted -v
      adapterops extract ./ft ./base --rank 32 --exclude 'lm_head|embed' -o ./extracted --json
    """
    from adapterops import extraction
    from adapterops.io.checkpoint import open_checkpoint

    def work(out: Any) -> Any:
        ft, bs = open_checkpoint(finetuned), open_checkpoint(base)
        passes = 2 if ExtractOptions(**kwargs).is_global else 1  # a budget reads both checkpoints twice
        with out.byte_progress("extracting", passes * (ft.total_size + bs.total_size)) as advance:
            return extraction.extract(ft, bs, progress=advance, **kwargs)

    _adapter_command(ExtractOptions, kwargs, work)


@click.command()
@click.argument("adapter")
@click.option(
    "--base",
    help="Base checkpoint: adds DoRA magnitudes against base row norms and effective update norms; names a "
    "kohya file's modules (SDXL, Flux).",
)
@display_options
def info(adapter: str, base: str | None, **kwargs: Any) -> None:
    """Show an adapter's modules: kind, shape, rank, scale, dtype and update norms.

    \b
    Examples:
      adapterops info ./style-a
      adapterops info org/style-b@v2 --json | jq '.modules[0]'
      adapterops info ./dora --base ./base
    """
    from adapterops.cli._console import render_info
    from adapterops.info import describe

    out = pop_display(kwargs)
    report = describe(adapter, base=base)
    if out.as_json:
        out.json(report)
    elif not out.quiet:
        render_info(report, out.out)


@click.command()
@click.argument("adapter")
@options_from(ConvertOptions)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Output: a directory (peft, mlx, diffusers) or one file (kohya, lycoris, gguf; diffusers when named .safetensors).",
)
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@display_options
def convert(adapter: str, **kwargs: Any) -> None:
    """Write an adapter in another format (--to), or for a serving engine (--for); the update is the
    same (docs/formats.md, docs/serving.md).

    GGUF (llama.cpp) needs --base for the architecture and head counts; one alpha holds for the whole
    file, so a module whose scale differs has it folded into its lora_b (float32, one rounding).
    mlx (mlx-lm) holds one rank and one scale per file too: smaller ranks are zero-padded (exact) and
    scales folded the same way.

    --for vllm, sglang or tgi (needs --base) writes a PEFT directory with one r and lora_alpha = r:
    every module's scale (alpha/r, rsLoRA, rank/alpha patterns) folded into lora_B, ranks zero-padded
    to the largest; the rounding error is measured and printed. --for diffusers writes a kohya file
    with one alpha; --for llama.cpp a GGUF file (needs --base). What the engine cannot read is
    refused (use adapterops merge).

    \b
    Examples:
      adapterops convert ./peft-adapter --to gguf --base ./base -o adapter.gguf
      adapterops convert adapter.gguf --to peft -o ./peft-adapter
      adapterops convert ./peft-adapter --for vllm -o ./for-vllm
      adapterops convert ./peft-adapter --for tgi --base ./base -o ./for-tgi
      adapterops convert lora.safetensors --for diffusers -o one-alpha.safetensors
      adapterops convert ./peft-adapter --to mlx -o ./mlx-adapter
    """
    from adapterops import verbs
    from adapterops.io import load_adapter

    out = pop_display(kwargs)
    output, force = kwargs.pop("output"), kwargs.pop("force")
    opts = ConvertOptions(**kwargs)

    def work() -> dict[str, Any]:
        loaded = load_adapter(adapter, base=kwargs["base"])
        summary: dict[str, Any] = {"modules": len(loaded.modules)}
        if opts.engine is not None:
            from adapterops import serving

            written, served = serving.write(loaded, output, opts.engine, base=opts.base, force=force)
            return {"output": str(written), **summary, **served.as_dict()}
        written = verbs.convert(loaded, output, force=force, **kwargs)
        summary.update(output=str(written), format=kwargs["to"])
        if kwargs["to"] in ("gguf", "mlx"):  # one scale per file: the others folded into lora_b
            from adapterops.io.gguf import file_alpha
            from adapterops.io.mlx import file_scale
            from adapterops.serving import float32_fold_reports

            if kwargs["to"] == "gguf":
                alpha, folded = file_alpha(loaded)
                summary.update(alpha=alpha, folded=folded)
                reports = float32_fold_reports(loaded, folded, lambda m: alpha / m.rank)
            else:
                scale, folded = file_scale(loaded)
                summary.update(scale=scale, folded=folded)
                reports = float32_fold_reports(loaded, folded, lambda m: scale)
            summary["max_rel_error"] = max((r.rel_error for r in reports), default=0.0)
        return summary

    summary = out.run(work)
    if out.as_json:
        out.json(summary)
        return
    if "engine" in summary:
        _print_served(summary, out)
        return
    line = f"wrote {summary['output']}: {summary['format']}, {summary['modules']} modules"
    if "alpha" in summary or "scale" in summary:
        line += f", alpha {summary['alpha']:g}" if "alpha" in summary else f", scale {summary['scale']:g}"
        if summary["folded"]:
            line += (
                f"; scale folded into lora_b (float32) of {len(summary['folded'])} modules "
                f"(max relative error {summary['max_rel_error']:.2g})"
            )
    if out.verbose:
        for name in summary.get("folded", []):
            out.line(f"{name}: scale folded into lora_b (float32, one rounding)")
    out.line(line)


def _print_served(summary: dict[str, Any], out: Any) -> None:
    """convert --for: what was written, and what folding and padding did (the error measured)."""
    line = f"wrote {summary['output']}: for {summary['engine']} ({summary['format']}), {summary['modules']} modules"
    if summary["rank"] is not None:
        line += f", r {summary['rank']}"
    line += f", alpha {summary['alpha']:g}"
    if summary["folded"]:
        line += (
            f"; scale folded into lora_b of {len(summary['folded'])} modules "
            f"(max relative error {summary['max_rel_error']:.2g})"
        )
    if summary["padded"]:
        line += f"; {len(summary['padded'])} modules zero-padded (exact)"
    if out.verbose:
        for name in summary["folded"]:
            out.line(f"{name}: scale folded into lora_b (one rounding)")
        for name in summary["padded"]:
            out.line(f"{name}: rank zero-padded to {summary['rank']}")
    out.line(line)


# ----------------------------------------------------------------------------------------------- shared


def _load_all(refs: tuple[str, ...], out: Any, base: str | None = None) -> list[Any]:
    """The adapters; ``base`` (--base) names the modules of kohya files."""
    from adapterops.io import load_adapter

    adapters = []
    with out.progress("loading", len(refs)) as advance:
        for ref in refs:
            adapters.append(load_adapter(ref, base=base))
            advance(ref)
    return adapters


def _one(out: Any, verb: str, ref: str, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Load one adapter and run a verb on it under a progress bar."""
    from adapterops.io import load_adapter

    loaded = load_adapter(ref, base=kwargs.get("base"))  # --base also names a kohya file's modules
    with out.progress(verb, len(loaded.modules)) as advance:
        return function(loaded, progress=advance, **kwargs)


def _adapter_command(record: type, kwargs: dict[str, Any], work: Callable[[Any], Any]) -> None:
    """Check the options and the output path before any work, run ``work(out)``, write, print, push."""
    from adapterops.io.atomic import check_output_path

    out = pop_display(kwargs)
    write = pop_write(kwargs)
    output, force = kwargs.pop("output"), kwargs.pop("force")
    if "weights" in kwargs:
        kwargs["weights"] = list(kwargs["weights"]) or None
    record(**kwargs)
    # a .safetensors or .gguf output is one file (a kohya or GGUF input's format); any other, a directory
    check_output_path(output.absolute(), force=force, file=output.suffix in (".safetensors", ".gguf"))

    out.run(lambda: _write(work(out), output, force, write, out))


def _write(adapter: Any, output: Path, force: bool, write: WriteOptions, out: Any) -> None:
    """Save with the command line and the summary in the record, print the summary, push if asked."""
    from adapterops.adapter import Solver
    from adapterops.io import save_adapter
    from adapterops.report import summarize, summary_line

    summary = summarize(adapter.report, (adapter.provenance or {}).get("budget"))
    argv = click.get_current_context().find_root().meta.get("argv", [])
    provenance = dict(adapter.provenance or {})
    provenance.update(command=recorded_command(argv), summary=summary_line(summary))
    save_adapter(replace(adapter, provenance=provenance), output, force=force, dtype=write.dtype.value)
    pushed = push_output(output, write)
    # what extract reports beyond the LoRA modules: modules stored whole, changes left out, unchanged modules
    details = {k: provenance[k] for k in ("modules_to_save", "skipped", "unchanged") if provenance.get(k)}
    if out.as_json:
        out.json(
            {
                "output": str(output),
                **summary,
                "per_module": [r.as_dict() for r in adapter.report],
                **details,
                "pushed": pushed,
            }
        )
        return
    if out.verbose:
        for r in adapter.report:
            out.line(
                f"{r.name}: rank {r.rank_in} -> {r.rank_out}, energy kept {100 * r.energy_kept:.4f}%, "
                f"relative error {r.rel_error:.3g}"
                + (f" ({r.note})" if r.note else "")
                + f" [{Solver(r.solver).value}]"
            )
        for name in details.get("modules_to_save", []):
            out.line(f"{name}: stored whole (modules_to_save)")
        for key, why in details.get("skipped", {}).items():
            out.line(f"{key}: left out, {why}")
        if details.get("unchanged"):
            out.line(f"unchanged, left out: {', '.join(details['unchanged'])}")
    out.line(f"wrote {output}: {summary_line(summary)}")
    if pushed:
        out.line(f"pushed {output} to {pushed}")


def push_output(output: Path, write: WriteOptions) -> str | None:
    """Upload ``output`` when --push was given; the commit URL."""
    if not write.push:
        return None
    from adapterops.hub import push_to_hub

    return push_to_hub(output, write.push, private=write.private)
