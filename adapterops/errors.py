"""Every error and warning adapterops raises on purpose.

Each error class also inherits the builtin a caller would catch without knowing adapterops
(``except ValueError`` still works): a script written against plain Python keeps working, and
the CLI maps the class to an exit code. Messages follow one shape: what is wrong, where (file,
module, key, shape), and how to fix it. The CLI prints the message as one line and exits with the
class's ``exit_code``; a traceback appears only with ``ADAPTEROPS_DEBUG=1``.

A message that tells the user which option to change names it with ``param``, so it reads
``--sv-ratio`` on the command line and ``sv_ratio`` from Python.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_SPELLING: contextvars.ContextVar[str] = contextvars.ContextVar("adapterops_spelling", default="python")


# options whose CLI flag is not their name (``options.option(flag=...)`` says the same; a test checks)
FLAGS = {"engine": "--for"}


def param(name: str, value: object = None) -> str:
    """How the caller spells option ``name`` (with ``value``): ``--sv-ratio 20`` or ``sv_ratio=20``.

    Example: ``param("allow_different_bases", True)`` -> ``allow_different_bases=True`` from
    Python, ``--allow-different-bases`` from the CLI (a flag carries no value there).
    """
    if _SPELLING.get() == "cli":
        flag = FLAGS.get(name) or "--" + name.replace("_", "-")
        return flag if value is None or value is True else f"{flag} {value}"
    return name if value is None else f"{name}={value}"


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Within this block, ``param`` spells options as command-line flags (the CLI wraps each command)."""
    token = _SPELLING.set("cli")
    try:
        yield
    finally:
        _SPELLING.reset(token)


class AdapterOpsError(Exception):
    """Root of every adapterops error."""

    exit_code = 1


class InvalidInputError(AdapterOpsError, ValueError):
    """An argument or an input file holds something adapterops cannot use as given (a ValueError)."""

    exit_code = 2


class AdapterFormatError(InvalidInputError):
    """An adapter directory or file is malformed, or uses a PEFT feature that cannot be handled exactly."""


class UnsupportedAdapterError(AdapterFormatError, NotImplementedError):
    """The adapter is well formed but its meaning cannot be reproduced exactly by this operation."""


class IncompatibleAdaptersError(InvalidInputError):
    """Two inputs cannot be combined: different shapes for one module, different base models, ..."""


class RecipeError(InvalidInputError):
    """A recipe file is not valid; the message names the file and line."""


class NotFoundError(AdapterOpsError, FileNotFoundError):
    """A local path or a Hub repository, revision or file does not exist (a FileNotFoundError)."""

    exit_code = 3


class OutputExistsError(AdapterOpsError, FileExistsError):
    """The output path exists and overwriting was not asked for (a FileExistsError)."""

    exit_code = 4


class OutputBusyError(OutputExistsError):
    """Another process is writing the same output path right now (also an OutputExistsError)."""


class HubError(AdapterOpsError, ConnectionError):
    """The Hub could not be reached, or refused the request (a ConnectionError)."""

    exit_code = 5


class OutputWriteError(AdapterOpsError, OSError):
    """The output could not be written: disk full or over quota, a file too large for the filesystem,
    a read-only filesystem, no permission (an OSError whose ``errno`` is the cause's).

    Nothing is left half written. Not invalid input: the same command succeeds elsewhere.
    """

    exit_code = 6


class ApproximationWarning(UserWarning):
    """An operation returned something other than the exact result, on request; the error is reported."""


class RankCapWarning(UserWarning):
    """A rank target asked for more than some modules hold; they keep their full rank, each with a note."""
