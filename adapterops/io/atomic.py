"""Outputs appear whole or not at all: write into a temporary sibling, rename into place at the end.

For an output ``DIR/out`` a run uses, beside it:

    DIR/.out.lock              locked (``flock``) by the one run writing ``out``, from the check that
                               ``out`` may be written until the final rename; removed when done
    DIR/.out.tmp-PID-RANDOM    the output being written; renamed to ``out`` once complete
    DIR/.out.old-PID-RANDOM    with ``force``: the replaced output, between two renames

Two runs never write one output at once: while the lock is held, a second run fails at once with
``OutputBusyError`` (exit code 4, like an existing output) instead of waiting, since its result
would be refused (``out`` exists) or would replace the first one's anyway. Runs that do not overlap
behave as run one after the other: the second is refused, or replaces the first with ``force``.

A run that was killed (SIGKILL, power loss) leaves its temporary sibling; the next run writing the
same output removes it. Only names of the shapes above whose PID is not running are removed.

An OSError that says the output cannot be written (disk full, quota, file too large, read-only
filesystem, no permission) becomes one ``OutputWriteError`` (exit code 6) naming the output.
POSIX only (``fcntl.flock``), like ``os.pread`` elsewhere in ``io``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from adapterops.errors import InvalidInputError, OutputBusyError, OutputExistsError, OutputWriteError

_SIBLING = re.compile(r"(?:tmp|old)-(\d+)-[0-9a-f]+")  # what follows ".NAME." in a sibling's name

# errno -> (what happened, what to do); EACCES and EPERM only count when they name the output
_CANNOT_WRITE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an output path on another disk"),
    errno.EFBIG: (
        "a file is larger than the filesystem allows",
        "choose an output path on another filesystem (FAT32, for one, stops at 4 GiB)",
    ),
    errno.EROFS: ("the filesystem is read-only", "choose an output path on a writable filesystem"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or choose another output path"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions or choose another output path"),
}
if hasattr(errno, "EDQUOT"):
    _CANNOT_WRITE[errno.EDQUOT] = (
        "the disk quota is exceeded",
        "free some space within the quota or choose an output path on another disk",
    )
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def check_output_path(target: Path, *, force: bool, file: bool = False) -> None:
    """Refuse, before any work, an output path that could not become a directory of results.

    That is: a parent that is not a directory; a symbolic link (replacing it would replace the
    link, not what it points to); an existing file; an existing directory without ``force``.
    With ``file`` (a single-file output), the other way round: an existing directory is refused
    and an existing file is replaced with ``force``.
    """
    target = Path(target)
    parent = target.parent
    if target.name in ("", ".."):
        raise InvalidInputError(f"{target} names no directory of its own; give the output folder's name")
    if not parent.is_dir():
        raise InvalidInputError(f"{parent} {_not_a_directory(parent)}")
    if target.is_symlink():
        points_to = os.readlink(target)
        fix = (
            "; give the path it points to"
            if target.exists()
            else ", which leads nowhere (a loop or a missing target); give the path it should point to"
        )
        raise InvalidInputError(f"{target} is a symbolic link to {points_to}{fix}, or remove the link")
    if file and target.is_dir():
        raise InvalidInputError(
            f"{target} is a directory and the output is one file; remove it or choose another output path"
        )
    if not file and target.exists() and not target.is_dir():
        raise InvalidInputError(
            f"{target} exists and is not a directory; remove it or choose another output path"
        )
    if target.exists() and not force:
        raise OutputExistsError(
            f"{target} already exists; choose another output path or pass --force to replace it"
        )


def _not_a_directory(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return (
            "is a symbolic link that leads nowhere (a loop or a missing target); fix the link or choose "
            "another output path"
        )
    if os.path.lexists(path):
        return "is not a directory; choose another output path"
    return "does not exist; create it first or choose another output path"


@contextmanager
def atomic_output_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; on success it becomes ``target``.

    On any exception, KeyboardInterrupt included, the temporary directory is removed and
    ``target`` is left as it was. See the module docstring for the lock and the errors.
    """
    target = Path(target).absolute()
    check_output_path(target, force=force)
    with _cannot_write_is_one_error(target), _locked(target):
        check_output_path(target, force=force)  # again, under the lock: another run may have finished
        _remove_stale(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            yield tmp
            if not force and os.path.lexists(target):  # made meanwhile by something that takes no lock
                raise OutputExistsError(
                    f"{target} appeared while this run was writing it; the result was discarded: choose "
                    "another output path or pass --force to replace it"
                )
            _move_into_place(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def atomic_output_file(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it is renamed to ``target``.

    The single-file twin of ``atomic_output_dir``: same lock, same checks, same errors.
    """
    target = Path(target).absolute()
    check_output_path(target, force=force, file=True)
    with _cannot_write_is_one_error(target), _locked(target):
        check_output_path(target, force=force, file=True)
        _remove_stale(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
            if not force and os.path.lexists(target):
                raise OutputExistsError(
                    f"{target} appeared while this run was writing it; the result was discarded: choose "
                    "another output path or pass --force to replace it"
                )
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


def _move_into_place(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    trash = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.replace(trash, target)  # put the old output back
        raise
    _remove(trash)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target``, or raise OutputBusyError if another run holds it."""
    path = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"{target} is being written by another process (it holds {path.name}); wait for it to "
                "finish or choose another output path"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            break  # a filesystem without locks: go on unlocked (the final existence check still runs)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed this lock file as it finished: lock the new one
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()  # while still locked: a run that opened this file sees it gone, and retries
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _remove_stale(target: Path) -> None:
    """Temporary siblings left by runs that were killed (their process is gone) take disk: remove them.

    Called with the lock held, so no live run of this version is writing them; the PID check
    spares runs that took no lock. Names of any other shape are left alone.
    """
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = _SIBLING.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
        if match and not _alive(int(match[1])):
            _remove(target.parent / name)


def _alive(pid: int) -> bool:
    if not 0 < pid < 2**31:  # no process has this PID (os.kill would raise OverflowError)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, and someone else's
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree; never raise."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


@contextmanager
def _cannot_write_is_one_error(target: Path) -> Iterator[None]:
    """Turn an OSError that says ``target`` cannot be written into an OutputWriteError naming it.

    The error must name a file of this output, or name none (``file.write`` names none) with an
    errno that only writing gives (ENOSPC, EDQUOT, EFBIG, EROFS): a merge also reads its inputs
    inside this block, and their errors stay theirs.
    """
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE or not _about_output(exc, target):
            raise
        what, advice = _CANNOT_WRITE[exc.errno]
        if exc.errno in (errno.EACCES, errno.EPERM):
            what = f"{what} in {target.parent}"
        error = OutputWriteError(
            f"could not write {target}: {what} ({errno.errorcode[exc.errno]}); {advice}; nothing was left "
            "behind"
        )
        error.errno = exc.errno
        raise error from exc


def _about_output(exc: OSError, target: Path) -> bool:
    named = [os.fsdecode(n) for n in (exc.filename, exc.filename2) if n is not None]
    if not named:
        return exc.errno not in (errno.EACCES, errno.EPERM)
    ours = str(target.parent / f".{target.name}.")
    return any(path.startswith(ours) or path in (str(target), str(target.parent)) for path in named)
