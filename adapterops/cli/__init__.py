"""The ``adapterops`` command: the group, error handling, and the registration of every command.

Command modules never import this one (they are registered here, explicitly), and import the
library inside their functions: ``adapterops --help``, ``--version`` and shell completion never
import torch.

    _options.py     click options generated from ``adapterops.options``; shared option bundles
    _console.py     Output (stdout/stderr, --json, --quiet) and every text rendering
    adapters.py     combine, negate, scale, resize, to-dora, to-lora, info
    checkpoints.py  merge, unmerge, verify
    hub.py          push
    recipe.py       run
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from adapterops._version import __version__
from adapterops.cli import adapters, checkpoints, hub, recipe
from adapterops.errors import AdapterOpsError, cli_spelling


class Group(click.Group):
    """Turns adapterops errors into one line on stderr and the error's exit code; errors name
    options as command-line flags (``errors.param``).

    Set ADAPTEROPS_DEBUG=1 for the traceback instead.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cli_spelling():
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


for command in (
    adapters.combine,
    adapters.negate,
    adapters.scale,
    adapters.resize,
    adapters.to_dora,
    adapters.to_lora,
    adapters.info,
    checkpoints.merge,
    checkpoints.unmerge,
    checkpoints.verify,
    hub.push,
    recipe.run,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="adapterops")
