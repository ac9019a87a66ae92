"""Outputs appear whole or not at all: write into a temporary sibling, rename into place at the end."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterops.errors import InvalidInputError, OutputExistsError


def check_output_path(target: Path, *, force: bool) -> None:
    """Refuse an existing output without ``force``, and a parent folder that does not exist."""
    if target.exists() and not force:
        raise OutputExistsError(
            f"{target} already exists; choose another output path or pass --force to replace it"
        )
    if target.exists() and not target.is_dir():
        raise InvalidInputError(
            f"{target} exists and is not a directory; remove it or choose another output path"
        )
    parent = target.parent
    if not parent.is_dir():
        raise InvalidInputError(f"{parent} does not exist; create it first or choose another output path")


def _remove_stale(target: Path) -> None:
    """Temporary siblings left by runs that were killed (their process is gone) take disk: remove them."""
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it becomes ``target``.

    On any exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target).absolute()
    check_output_path(target, force=force)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
