"""Every error adapterops raises on purpose.

Each class also inherits the builtin a caller would catch without knowing adapterops
(``except ValueError`` still works). Messages follow one shape: what is wrong, where
(file, module, key, shape), and how to fix it. The CLI prints the message as one line and
exits with the class's ``exit_code``; a traceback appears only with ``ADAPTEROPS_DEBUG=1``.
"""

from __future__ import annotations


class AdapterOpsError(Exception):
    """Root of every adapterops error."""

    exit_code = 1


class InvalidInputError(AdapterOpsError, ValueError):
    """An argument or an input file holds something adapterops cannot use as given."""

    exit_code = 2


class AdapterFormatError(InvalidInputError):
    """An adapter directory or file is malformed, or uses a PEFT feature that cannot be handled exactly."""


class UnsupportedAdapterError(AdapterFormatError, NotImplementedError):
    """The adapter is well formed but its meaning cannot be reproduced exactly by this operation."""


class IncompatibleAdaptersError(InvalidInputError):
    """Two inputs cannot be combined: different shapes for one module, different base models, ..."""


class NotFoundError(AdapterOpsError, FileNotFoundError):
    """A local path or a Hub repository, revision or file does not exist."""

    exit_code = 3


class OutputExistsError(AdapterOpsError, FileExistsError):
    """The output path exists and ``force`` was not given."""

    exit_code = 4


class HubError(AdapterOpsError, ConnectionError):
    """The Hub could not be reached, or refused the request."""

    exit_code = 5
