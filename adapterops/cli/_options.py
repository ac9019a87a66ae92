"""Click options generated from the verbs' option records (``adapterops.options``), and the option
bundles every command shares: where to write (``write_options``) and how to print (``display_options``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field
from enum import Enum
from pathlib import Path
from typing import Any

import click

from adapterops.options import COUNT, WEIGHTS, WriteOptions, option_fields

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def click_option(f: Field[Any], *, help: str | None = None) -> Decorator:
    """The click option for one field of an options record."""
    meta = f.metadata
    kind = meta["type"]
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    text = help or meta["help"]
    if kind == WEIGHTS:
        return click.option("-w", "--weights", f.name, type=float, multiple=True, help=text)
    if kind is bool:
        return click.option(flag, f.name, is_flag=True, help=text)
    if kind == COUNT:  # "20M" stays text here: the record parses and checks it, one error line
        return click.option(flag, f.name, type=str, metavar=meta["metavar"], help=text)
    kwargs: dict[str, Any] = {"help": text, "metavar": meta["metavar"], "required": meta["required"]}
    default = None if f.default is MISSING else f.default
    if isinstance(kind, type) and issubclass(kind, Enum):
        kwargs["type"] = click.Choice([m.value for m in kind])
        default = default.value if isinstance(default, Enum) else default
        kwargs.pop("metavar")
    elif kind is int:
        kwargs["type"] = click.IntRange(min=meta["min"], max=meta["max"])
    elif kind is float:
        bounded = meta["min"] is not None or meta["max"] is not None
        kwargs["type"] = (
            click.FloatRange(min=meta["min"], max=meta["max"], min_open=meta["min_open"])
            if bounded
            else float
        )
    if default is not None:
        kwargs.update(default=default, show_default=True)
    return click.option(flag, f.name, **kwargs)


def options_from(
    record: type, *, exclude: tuple[str, ...] = (), helps: dict[str, str] | None = None
) -> Decorator:
    """Every option of ``record`` (but ``exclude``) as click options, in the record's field order."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(option_fields(record)):
            if f.name not in exclude and f.metadata["cli"]:
                func = click_option(f, help=(helps or {}).get(f.name))(func)
        return func

    return decorate


def display_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--json, -q/--quiet and -v/--verbose: on every command."""
    func = click.option("-v", "--verbose", is_flag=True, help="Print a line per module or tensor.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(func)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(func)


def write_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """-o/--output, --force and ``WriteOptions`` (--dtype, --push, --private), then the display options."""
    func = display_options(func)
    func = options_from(WriteOptions)(func)
    func = click.option("--force", is_flag=True, help="Replace the output directory if it exists.")(func)
    return click.option(
        "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory."
    )(func)


def pop_display(kwargs: dict[str, Any]) -> Any:
    """The command's ``Output``, built from (and removing) the display options."""
    from adapterops.cli._console import Output

    return Output(as_json=kwargs.pop("as_json"), quiet=kwargs.pop("quiet"), verbose=kwargs.pop("verbose"))


def pop_write(kwargs: dict[str, Any]) -> WriteOptions:
    """The ``WriteOptions`` among a command's arguments, removed from them."""
    return WriteOptions(**{f.name: kwargs.pop(f.name) for f in option_fields(WriteOptions)})


# flags that change what a command prints or where it sends its output, not what the output holds
_COSMETIC = {"-q", "--quiet", "-v", "--verbose", "--json", "--force", "--private", "--dry-run"}
_COSMETIC_WITH_VALUE = {"--push"}


def recorded_command(argv: list[str]) -> str:
    """The command line to record in an output: the same inputs and options give the same record,
    whatever cosmetic flags (-q, --json, --force, --push ...) were passed.

    Example: ``["merge", "b", "a", "-o", "m", "-q", "--push", "me/m"]`` -> ``adapterops merge b a -o m``.
    """
    import shlex

    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _COSMETIC or (arg.split("=", 1)[0] in _COSMETIC_WITH_VALUE and "=" in arg):
            continue
        if arg in _COSMETIC_WITH_VALUE:
            skip = True
            continue
        kept.append(arg)
    return shlex.join(["adapterops", *kept])


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
