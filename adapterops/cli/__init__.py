"""The ``adapterops`` command: the group, error handling, and the registration of every command.

Command modules never import this one (they are registered here, explicitly), and import the
library inside their functions: ``adapterops --help``, ``--version`` and shell completion never
import torch.

    _options.py     click options generated from ``adapterops.options``; shared option bundles
    _console.py     Output (stdout/stderr, --json, --quiet) and every text rendering
    adapters.py     combine, negate, scale, resize, to-dora, to-lora, extract, info
    checkpoints.py  merge, unmerge, verify
    hub.py          push
    recipe.py       run
    example.py      example
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from adapterops._version import __version__
from adapterops.cli import adapters, checkpoints, example, hub, recipe
from adapterops.errors import AdapterOpsError, cli_spelling

# errno values that mean "cannot write here", outside an output directory too: exit code 6 as well
_CANNOT_WRITE = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so outputs not yet complete are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Group(click.Group):
    """Turns adapterops errors into one line on stderr and the error's exit code; errors name
    options as command-line flags (``errors.param``).

    Any other OSError is one line that names its path, too. SIGINT (Ctrl-C), SIGTERM and SIGHUP
    unwind the command, so a half-written output is removed, print one line and exit 128 + the
    signal's number (130, 143, 129).

    Set ADAPTEROPS_DEBUG=1 for the traceback instead.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cli_spelling(), _stopped_by_signals():
                return super().invoke(ctx)
        except AdapterOpsError as exc:
            if os.environ.get("ADAPTEROPS_DEBUG"):
                raise
            _fail(ctx, str(exc), exc.exit_code, type(exc).__name__)
        except (KeyboardInterrupt, Stopped) as exc:
            signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
            if os.environ.get("ADAPTEROPS_DEBUG"):
                traceback.print_exc()
            name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
            _fail(ctx, f"stopped by {name}; outputs not yet complete were removed", 128 + signum, "Stopped")
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE or os.environ.get("ADAPTEROPS_DEBUG"):
                raise  # a closed pipe (| head) is click's to handle: it exits quietly
            code = 6 if exc.errno in _CANNOT_WRITE else 3 if isinstance(exc, FileNotFoundError) else 1
            _fail(ctx, _describe_os_error(exc), code, type(exc).__name__)
        except Exception as exc:  # a bug, or input nothing checked: still one line, traceback on request
            if os.environ.get("ADAPTEROPS_DEBUG"):
                raise
            message = (
                f"unexpected {type(exc).__name__}: {exc} (set ADAPTEROPS_DEBUG=1 for the traceback, and "
                "please report it)"
            )
            _fail(ctx, message, 1, type(exc).__name__)


def _fail(ctx: click.Context, message: str, code: int, kind: str) -> None:
    """One ``error:`` line on stderr; with --json also ``{"error": {...}}`` on stdout, for scripts."""
    click.echo(f"error: {message}", err=True)
    if "--json" in ctx.meta.get("argv", []):
        click.echo(
            json.dumps({"error": {"type": kind, "message": message, "exit_code": code}}, sort_keys=True)
        )
    ctx.exit(code)


def _describe_os_error(exc: OSError) -> str:
    """``<path>: <what> (ENOSPC)``, with both paths of a rename: one line, whatever raised it."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno is not None and exc.errno in errno.errorcode:
        what += f" ({errno.errorcode[exc.errno]})"
    paths = [os.fsdecode(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(paths)
    return f"{where}: {what}" if where else what


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise Stopped (once: a second one during the clean-up
    is ignored). Signals already ignored (nohup) stay ignored; off the main thread, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_IGN)
        raise Stopped(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in before.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in before.items():
            if handler is not None:
                signal.signal(signum, handler)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adapterops")
def cli() -> None:
    """Exact arithmetic on LoRA adapters: combine, negate, scale, resize, convert DoRA, extract from
    fine-tunes, merge into checkpoints, verify, push.

    Inputs are PEFT adapter directories or Hub ids (org/name or org/name@revision); outputs are
    PEFT adapter directories that PeftModel.from_pretrained loads unchanged, or checkpoints that
    transformers loads unchanged.

    \b
    Exit codes: 0 ok, 1 failed check (verify) or other error, 2 invalid input or usage,
    3 not found, 4 output exists (use --force) or is being written by another process,
    5 Hub unreachable or refused, 6 output could not be written (disk full, read-only, no
    permission), 130 and 143 stopped by Ctrl-C or SIGTERM (nothing half written is left).
    Set ADAPTEROPS_DEBUG=1 to see tracebacks.
    """


for command in (
    adapters.combine,
    adapters.negate,
    adapters.scale,
    adapters.resize,
    adapters.to_dora,
    adapters.to_lora,
    adapters.extract,
    adapters.info,
    adapters.convert,
    checkpoints.merge,
    checkpoints.unmerge,
    checkpoints.verify,
    hub.push,
    recipe.run,
    example.example,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="adapterops")
