"""The ``adapterops`` command: one short function per verb, each parsing, calling one public
function and rendering its result. No tensor math lives here."""

from __future__ import annotations

import dataclasses
import os
import shlex
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from adapterops import __version__
from adapterops.adapter import Adapter
from adapterops.console import Output, summarize, summary_line
from adapterops.errors import AdapterOpsError
from adapterops.info import describe
from adapterops.io import load_adapter
from adapterops.io.atomic import check_output_path
from adapterops.ops import combine as ops

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class Group(click.Group):
    """Turns adapterops errors into one line on stderr and the error's exit code.

    Set ADAPTEROPS_DEBUG=1 for the traceback instead.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterOpsError as exc:
            if os.environ.get("ADAPTEROPS_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug, or input nothing checked: still one line, traceback on request
            if os.environ.get("ADAPTEROPS_DEBUG"):
                raise
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc} (set ADAPTEROPS_DEBUG=1 for the traceback, and "
                "please report it)",
                err=True,
            )
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adapterops")
def cli() -> None:
    """Exact arithmetic on LoRA adapters: combine, negate, scale, resize, convert DoRA, merge into
    checkpoints, verify, push.

    Inputs are PEFT adapter directories or Hub ids (org/name or org/name@revision); outputs are
    PEFT adapter directories that PeftModel.from_pretrained loads unchanged, or checkpoints that
    transformers loads unchanged.

    \b
    Exit codes: 0 ok, 1 failed check (verify) or other error, 2 invalid input or usage,
    3 not found, 4 output exists (use --force), 5 Hub unreachable or refused.
    Set ADAPTEROPS_DEBUG=1 to see tracebacks.
    """


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[str(param.name)] = value
    return value


def push_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--push REPO_ID / --private on every verb that writes: kept in ctx.meta, used by ``maybe_push``."""
    func = click.option(
        "--private",
        "push_private",
        is_flag=True,
        expose_value=False,
        callback=_remember,
        help="With --push: create the Hub repo private.",
    )(func)
    return click.option(
        "--push",
        "push_repo",
        metavar="REPO_ID",
        expose_value=False,
        callback=_remember,
        help="Also upload the output to this Hub repo, with a lineage card (see `adapterops push`).",
    )(func)


def maybe_push(output: Path, out: Output, uploader: Any = None) -> str | None:
    """Upload ``output`` when the command was given --push; returns the commit URL."""
    meta = click.get_current_context().meta
    if not meta.get("push_repo"):
        return None
    from adapterops.hub import push_to_hub

    url = push_to_hub(output, meta["push_repo"], private=bool(meta.get("push_private")), uploader=uploader)
    if not out.as_json:
        out.line(f"pushed {output} to {url}")
    return url


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """-o/--output, --force, --dtype, --json, --quiet, --verbose, --push for every verb that writes an adapter."""
    func = push_options(func)
    options = [
        click.option(
            "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory."
        ),
        click.option("--force", is_flag=True, help="Replace the output directory if it exists."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", *DTYPES]),
            default="auto",
            show_default=True,
            help="Storage dtype of the output factors; auto keeps the inputs'.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
        click.option("-v", "--verbose", is_flag=True, help="Print a line per module."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def dora_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--base and --form, for the verbs that accept DoRA inputs."""
    func = click.option(
        "--form",
        type=click.Choice(["lora", "dora"]),
        default="lora",
        show_default=True,
        help="Output form. dora (needs --base) holds any weighted sum of DoRA and LoRA updates exactly.",
    )(func)
    return click.option("--base", help="Base checkpoint (dir or Hub id): needed for DoRA inputs.")(func)


def rank_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--rank", type=click.IntRange(min=1), help="Keep the top K singular values per module."),
        click.option(
            "--energy",
            type=click.FloatRange(0, 1, min_open=True),
            help="Keep the fewest singular values holding this fraction of ||dW||^2 per module.",
        ),
        click.option(
            "--sv-ratio",
            type=click.FloatRange(min=1),
            help="Keep singular values within this factor of the largest, per module.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load_all(refs: Sequence[str], out: Output) -> list[Adapter]:
    adapters = []
    with out.progress("loading", len(refs)) as advance:
        for ref in refs:
            adapters.append(load_adapter(ref))
            advance(ref)
    return adapters


def _write(
    adapter: Adapter,
    output: Path,
    *,
    force: bool,
    dtype: str,
    out: Output,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save with provenance (command, version, summary) and print the summary."""
    summary = summarize(adapter.report)
    ctx = click.get_current_context()
    provenance = dict(adapter.provenance or {})
    provenance.update(
        command=shlex.join(["adapterops", *ctx.find_root().meta.get("argv", [])]),
        adapterops_version=__version__,
        summary=summary_line(summary),
        **(extra or {}),
    )
    adapter = dataclasses.replace(adapter, provenance=provenance)
    adapter.save(str(output), force=force, dtype=None if dtype == "auto" else DTYPES[dtype])
    if out.as_json:
        payload: dict[str, Any] = {"output": str(output), **summary}
        payload["per_module"] = [r.as_dict() for r in adapter.report]
        payload["pushed"] = maybe_push(output, out)
        out.json(payload)
        return
    if out.verbose:
        for r in adapter.report:
            out.line(
                f"{r.name}: rank {r.rank_in} -> {r.rank_out}, energy kept {100 * r.energy_kept:.4f}%, "
                f"relative error {r.rel_error:.3g}"
            )
    out.line(f"wrote {output}: {summary_line(summary)}")
    maybe_push(output, out)


def _run(out: Output, work: Callable[[], None]) -> None:
    """Run ``work`` and print the warnings it raised as one line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        work()
    for item in caught:
        if issubclass(item.category, (UserWarning,)) and item.filename.find("adapterops") >= 0:
            out.warn(str(item.message))


class WeightsCommand(click.Command):
    """Lets ``--weights 0.7 0.3`` (and negative ``-0.4``) follow the option, as users write it.

    Numbers after ``-w/--weights`` are rewritten to one ``--weights=N`` each before click parses;
    ``--weights 0.7,0.3`` works too.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        taking = False
        for arg in args:
            if arg in ("-w", "--weights"):
                taking = True
                continue
            if taking and _numbers(arg) is not None:
                rewritten += [f"--weights={value}" for value in _numbers(arg) or []]
                continue
            if arg.startswith("--weights="):
                rewritten += [f"--weights={value}" for value in (_numbers(arg.split("=", 1)[1]) or [arg])]
                continue
            taking = False
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _numbers(text: str) -> list[str] | None:
    parts = [p for p in text.split(",") if p]
    try:
        [float(p) for p in parts]
    except ValueError:
        return None
    return parts or None


@cli.command(cls=WeightsCommand)
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "-w",
    "--weights",
    type=float,
    multiple=True,
    help="One weight per adapter, in order (repeat the option or list them after it). Default: 1 each.",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in ops.Method]),
    default="exact",
    show_default=True,
    help="exact: the weighted sum at its numerical rank. cat: concatenated factors. svd: best "
    "rank-K form (needs --rank/--energy/--sv-ratio). linear: PEFT's approximation.",
)
@rank_options
@click.option(
    "--allow-different-bases",
    "force_bases",
    is_flag=True,
    help="Combine adapters whose configs name different base models.",
)
@dora_options
@output_options
def combine(
    adapters: tuple[str, ...],
    weights: tuple[float, ...],
    method: str,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    force_bases: bool,
    base: str | None,
    form: str,
    output: Path,
    force: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Weighted sum of adapters: dW = sum_i w_i dW_i for every module any input touches.

    \b
    Examples:
      adapterops combine ./style-a ./style-b --weights 0.7 0.3 -o ./mix
      adapterops combine a b c --weights 0.5 -0.4 1.2 --method svd --rank 16 -o ./mix16
      adapterops combine org/a@v2 org/b -w 1 -w 1 --method cat -o ./both
      adapterops combine ./dora-a ./lora-b --weights 0.6 0.4 --base ./base -o ./mix
      adapterops combine ./dora-a ./dora-b --weights 0.5 0.5 --base ./base --form dora -o ./mix
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    check_output_path(output.absolute(), force=force)

    def work() -> None:
        loaded = _load_all(adapters, out)
        with out.progress("combining", len(set().union(*(a.modules for a in loaded)))) as advance:
            result = ops.combine(
                loaded,
                list(weights) if weights else None,
                method=method,
                rank=rank,
                energy=energy,
                sv_ratio=sv_ratio,
                force=force_bases,
                progress=advance,
                base=base,
                form=form,
            )
        _write(result, output, force=force, dtype=dtype, out=out)

    _run(out, work)


@cli.command()
@click.argument("adapter")
@dora_options
@output_options
def negate(
    adapter: str,
    base: str | None,
    form: str,
    output: Path,
    force: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Flip an adapter's update: dW -> -dW (lora_B changes sign, nothing else).

    A DoRA input needs --base; its effective update is negated and re-factored as a LoRA.

    \b
    Examples:
      adapterops negate ./toxic -o ./anti-toxic
      adapterops negate ./dora --base ./base -o ./anti
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    check_output_path(output.absolute(), force=force)
    _run(
        out,
        lambda: _write(
            ops.negate(load_adapter(adapter), base=base, form=form), output, force=force, dtype=dtype, out=out
        ),
    )


@cli.command()
@click.argument("adapter")
@click.option("--by", "factor", type=float, required=True, help="The factor F in dW -> F dW.")
@dora_options
@output_options
def scale(
    adapter: str,
    factor: float,
    base: str | None,
    form: str,
    output: Path,
    force: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Multiply an adapter's update by a factor; the factors stay as stored, lora_alpha absorbs it.

    \b
    Example:
      adapterops scale ./style-a --by 0.5 -o ./half
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    check_output_path(output.absolute(), force=force)
    _run(
        out,
        lambda: _write(
            ops.scale(load_adapter(adapter), factor, base=base, form=form),
            output,
            force=force,
            dtype=dtype,
            out=out,
        ),
    )


@cli.command()
@click.argument("adapter")
@rank_options
@output_options
def resize(
    adapter: str,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    output: Path,
    force: bool,
    dtype: str,
    as_json: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Truncate each module to its best low-rank form (SVD of dW, computed from the factors).

    \b
    Examples:
      adapterops resize ./big --rank 8 -o ./small
      adapterops resize ./big --energy 0.99 -o ./small
      adapterops resize ./big --sv-ratio 20 -o ./small
    """
    out = Output(as_json=as_json, quiet=quiet, verbose=verbose)
    if rank is None and energy is None and sv_ratio is None:
        raise click.UsageError("give a target: --rank K, --energy F or --sv-ratio R")
    check_output_path(output.absolute(), force=force)

    def work() -> None:
        loaded = load_adapter(adapter)
        with out.progress("resizing", len(loaded.modules)) as advance:
            result = ops.resize(loaded, rank=rank, energy=energy, sv_ratio=sv_ratio, progress=advance)
        _write(result, output, force=force, dtype=dtype, out=out)

    _run(out, work)


@cli.command()
@click.argument("adapter")
@click.option(
    "--base", help="Base checkpoint: adds DoRA magnitudes against base row norms and effective update norms."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(adapter: str, base: str | None, as_json: bool) -> None:
    """Show an adapter's modules: kind, shape, rank, scale, dtype and update norms.

    \b
    Examples:
      adapterops info ./style-a
      adapterops info org/style-b@v2 --json | jq '.modules[0]'
      adapterops info ./dora --base ./base
    """
    out = Output(as_json=as_json)
    report = describe(load_adapter(adapter), base=base)
    if as_json:
        out.json(report)
        return
    from adapterops.info import render

    render(report, out.out)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--revision", help="Branch to push to (created if missing); default main.")
@click.option("--commit-message", help="Commit message; default names the kind of output.")
@click.option("--token", help="Hub token; default HF_TOKEN or the login cache. Never printed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def push(
    path: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    token: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Upload an adapter or merged checkpoint to the Hub with a model card of its lineage.

    The card records the inputs (repo@revision or path, sha256), weights, method, rank, recipe,
    adapterops version and the error figures the operation reported.

    \b
    Examples:
      adapterops push ./mix me/style-mix --private
      adapterops push ./merged me/llama-merged --revision v2
    """
    from adapterops.hub import push_to_hub

    out = Output(as_json=as_json, quiet=quiet)
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
        )
    if as_json:
        out.json({"repo_id": repo_id, "revision": revision or "main", "commit_url": url})
    else:
        out.line(f"pushed {path} to {url}")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (steps, inputs, outputs, sizes, memory) and stop."
)
@click.option(
    "--output-dir", type=click.Path(path_type=Path), help="Write outputs here instead of beside the recipe."
)
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def run(
    recipe: Path, dry_run: bool, output_dir: Path | None, force: bool, as_json: bool, quiet: bool
) -> None:
    """Run a pipeline from a recipe file (YAML): load, combine, negate, scale, resize, DoRA
    conversions, merge, push. The file is validated first; its errors give the line.

    \b
    Examples:
      adapterops run recipes/blend-and-merge.yaml
      adapterops run recipes/blend-and-merge.yaml --dry-run
      adapterops run my-recipe.yaml --output-dir /data/out --force
    """
    from adapterops.recipe import load_recipe, plan, run_recipe

    out = Output(as_json=as_json, quiet=quiet)
    parsed = load_recipe(recipe)
    if dry_run:
        rows = plan(parsed, output_dir)
        if as_json:
            out.json(rows)
            return
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
        return
    results: list[Any] = []

    def work() -> None:
        with out.progress("recipe", len(parsed.steps)) as advance:
            results.extend(run_recipe(recipe, output_dir=output_dir, force=force, progress=advance))

    _run(out, work)
    if as_json:
        out.json([r.__dict__ for r in results])
        return
    for result in results:
        where = f" -> {result.output}" if result.output else ""
        pushed = f" (pushed: {result.pushed})" if result.pushed else ""
        out.line(f"{result.name}: {result.verb}{where}: {result.summary}{pushed}")


from adapterops import cli_dora, cli_merge  # noqa: E402, F401  (register their commands)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="adapterops")
