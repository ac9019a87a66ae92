"""Outputs under concurrency, signals and failing disks: two runs on one output, SIGTERM and Ctrl-C,
odd leftovers beside the output, unusable output paths, and OSErrors as one line with an exit code.

Real processes where the behaviour is about processes (the lock, the signals): each runs the real
command line, held inside the output directory by a patched ``_write_shard`` until the test lets
it go, so nothing depends on timing. The rest goes through click's CliRunner, in process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.io.safetensors_file import ShardWriter

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "recipes" / "inputs"
BASE, STYLE_A, STYLE_B = INPUTS / "tiny-llama-64", INPUTS / "style-a", INPUTS / "style-b"

# the real CLI, stopped just inside the output directory (before the first shard) until <marker>.go exists
HELD = """
import importlib, pathlib, sys, time
execute = importlib.import_module("adapterops.merging.execute")
marker = pathlib.Path(sys.argv[1])
write_shard = execute._write_shard
def held(*args, **kwargs):
    marker.touch()
    while not marker.with_suffix(".go").exists():
        time.sleep(0.01)
    return write_shard(*args, **kwargs)
execute._write_shard = held
from adapterops.cli import main
main(sys.argv[2:])
"""


def start(*args: str | Path, held_at: Path | None = None) -> subprocess.Popen[str]:
    """``python -m adapterops ARGS`` from this checkout; with ``held_at``, held as HELD says."""
    env = {k: v for k, v in os.environ.items() if k != "ADAPTEROPS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    head = ["-c", HELD, str(held_at)] if held_at else ["-m", "adapterops"]
    return subprocess.Popen(
        [sys.executable, *head, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,  # a test runner started in the background may ignore SIGINT
    )


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def wait_until_held(marker: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), proc.communicate(timeout=5)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Hold ``lock`` as another adapterops run writing the output would."""
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def busy(out: Path) -> str:
    return (
        f"error: {out} is being written by another process (it holds .{out.name}.lock); wait for it to finish "
        "or choose another output path\n"
    )


# ---- 1. two runs, one output ----------------------------------------------------------------------------


def test_a_merge_into_an_output_being_written_is_refused_and_the_first_merge_wins(tmp_path: Path) -> None:
    out, marker = tmp_path / "merged", tmp_path / "first"
    first = start("merge", BASE, STYLE_A, "-o", out, held_at=marker)
    wait_until_held(marker, first)
    assert [n for n in names(tmp_path) if n.startswith(".merged.tmp-")]  # the first is mid-write
    # --force, the case where both would report success and the one to rename last would win
    second = start("merge", BASE, STYLE_B, "-o", out, "--force")
    assert finish(second) == (4, "", busy(out))
    marker.with_suffix(".go").touch()
    code, stdout, stderr = finish(first)
    assert (code, stderr) == (0, "") and stdout.startswith(f"wrote {out}: ")
    assert ao.verify(BASE, [STYLE_A], out).ok  # the first merge's result, whole
    assert names(tmp_path) == ["first", "first.go", "merged"]  # no lock file, no temporary sibling


def test_a_combine_into_an_output_another_process_holds_is_refused_then_works(tmp_path: Path) -> None:
    out = tmp_path / "mix"
    with locked(tmp_path / ".mix.lock"):
        assert run("combine", STYLE_A, STYLE_B, "-o", out, "--force") == (4, "", busy(out))
        with pytest.raises(ao.OutputExistsError, match="is being written by another process"):
            ao.save_adapter(ao.load_adapter(STYLE_A), out)
    assert names(tmp_path) == [".mix.lock"]  # the holder's; nothing of the refused runs
    code, _, stderr = run("combine", STYLE_A, STYLE_B, "-o", out)
    assert (code, stderr) == (0, "")
    assert names(tmp_path) == ["mix"]  # the left-over lock file was taken over and removed


# ---- 2. signals -----------------------------------------------------------------------------------------


def test_sigterm_and_ctrl_c_remove_the_unfinished_output_and_exit_128_plus_the_signal(tmp_path: Path) -> None:
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        folder = tmp_path / sig.name
        folder.mkdir()
        runs[sig] = folder, start("merge", BASE, STYLE_A, "-o", folder / "merged", held_at=folder / "held")
    for sig, (folder, proc) in runs.items():
        wait_until_held(folder / "held", proc)
        assert [n for n in names(folder) if n.startswith(".merged.tmp-")]
        proc.send_signal(sig)
    for sig, (folder, proc) in runs.items():
        name = "SIGINT (Ctrl-C)" if sig == signal.SIGINT else "SIGTERM"
        assert finish(proc) == (
            128 + sig,
            "",
            f"error: stopped by {name}; outputs not yet complete were removed\n",
        )
        assert names(folder) == ["held"]


def test_ctrl_c_in_process_is_one_line_and_exit_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: ShardWriter, *_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    out, before = tmp_path / "merged", signal.getsignal(signal.SIGTERM)
    assert run("merge", BASE, STYLE_A, "-o", out) == (
        130,
        "",
        "error: stopped by SIGINT (Ctrl-C); outputs not yet complete were removed\n",
    )
    assert names(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again


# ---- 3. odd leftovers beside the output -----------------------------------------------------------------


def test_odd_leftovers_beside_the_output_never_break_a_run(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / ".out.tmp-99999999999999999999-abcd").mkdir()  # no such PID can exist (OverflowError)
    (tmp_path / ".out.tmp-99999999999999999999-abcd" / "shard").write_bytes(b"half")
    (tmp_path / ".out.tmp-2147483647-ab").write_bytes(b"a file, not a folder")
    (tmp_path / ".out.old-0-cd").mkdir()
    (tmp_path / ".out.tmp-2147483646-ef").symlink_to(elsewhere)  # the link goes, not what it points to
    (tmp_path / ".out.lock").write_text("")  # left by a killed run; nobody holds it
    kept = [
        ".out.tmp-not-a-pid",
        ".out.tmp-",
        f".out.tmp-{os.getpid()}-12",
        ".outer.tmp-1-ab",
        ".out.v2.tmp-1-ab",
    ]
    for name in kept:  # not ours, or a live process's
        (tmp_path / name).mkdir()
    ao.save_adapter(ao.load_adapter(STYLE_A), out)
    assert names(tmp_path) == sorted(["elsewhere", "out", *kept])


# ---- 4. output paths that cannot be an output -----------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "output", "message"),
    [
        (
            lambda d: (d / "loop").symlink_to("loop"),
            "loop",
            "{d}/loop is a symbolic link to loop, which leads nowhere (a loop or a missing target); give the "
            "path it should point to, or remove the link",
        ),
        (
            lambda d: (d / "link").symlink_to(d / "missing"),
            "link",
            "{d}/link is a symbolic link to {d}/missing, which leads nowhere (a loop or a missing target); "
            "give the path it should point to, or remove the link",
        ),
        (
            lambda d: (d / "link").symlink_to(d),
            "link",
            "{d}/link is a symbolic link to {d}; give the path it points to, or remove the link",
        ),
        (
            lambda d: (d / "file").write_text("x"),
            "file/out",
            "{d}/file is not a directory; choose another output path",
        ),
        (
            lambda d: (d / "loop").symlink_to("loop"),
            "loop/out",
            "{d}/loop is a symbolic link that leads nowhere (a loop or a missing target); fix the link or "
            "choose another output path",
        ),
        (
            lambda d: (d / "sub").mkdir(),
            "sub/..",
            "{d}/sub/.. names no directory of its own; give the output folder's name",
        ),
        (
            lambda d: (d / "file").write_text("x"),
            "file",
            "{d}/file exists and is not a directory; remove it or choose another output path",
        ),
    ],
    ids=[
        "symlink-loop",
        "dangling-symlink",
        "symlink-to-a-folder",
        "parent-is-a-file",
        "parent-is-a-loop",
        "dot-dot",
        "output-is-a-file",
    ],
)
@pytest.mark.parametrize("command", ["merge", "combine", "combine --force"])
def test_an_output_path_that_cannot_be_an_output_is_one_line_before_any_work(
    tmp_path: Path, command: str, setup, output: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapterops.io as io

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("inputs were loaded before the output path was checked")

    monkeypatch.setattr(io, "load_adapter", no_work)
    setup(tmp_path)
    before = names(tmp_path)
    verb, *force = command.split()
    inputs = [BASE, STYLE_A] if verb == "merge" else [STYLE_A, STYLE_B]
    got = run(verb, *inputs, "-o", tmp_path / output, *force)
    assert got == (2, "", f"error: {message.format(d=tmp_path)}\n")
    assert names(tmp_path) == before


# ---- 5. disks that refuse the output --------------------------------------------------------------------

CANNOT_WRITE = {
    errno.ENOSPC: "no space left on the device (ENOSPC); free some space or choose an output path on another disk",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT); free some space within the quota or choose an output "
    "path on another disk",
    errno.EFBIG: "a file is larger than the filesystem allows (EFBIG); choose an output path on another "
    "filesystem (FAT32, for one, stops at 4 GiB)",
    errno.EROFS: "the filesystem is read-only (EROFS); choose an output path on a writable filesystem",
}


@pytest.mark.parametrize("code", list(CANNOT_WRITE), ids=[errno.errorcode[c] for c in CANNOT_WRITE])
@pytest.mark.parametrize("verb", ["merge", "combine"])
def test_a_disk_that_refuses_the_output_is_one_line_exit_6_and_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, verb: str
) -> None:
    def refused(self: ShardWriter, *_: object) -> None:
        self.handle.write(b"half a tensor")
        raise OSError(code, os.strerror(code))  # as file.write raises it: no file name

    monkeypatch.setattr(ShardWriter, "write", refused)
    out = tmp_path / "out"
    inputs = [BASE, STYLE_A] if verb == "merge" else [STYLE_A, STYLE_B]
    assert run(verb, *inputs, "-o", out) == (
        6,
        "",
        f"error: could not write {out}: {CANNOT_WRITE[code]}; nothing was left behind\n",
    )
    assert names(tmp_path) == []
    with pytest.raises(OSError) as caught:  # from Python: an OSError with the cause's errno
        ao.save_adapter(ao.load_adapter(STYLE_A), out)
    assert isinstance(caught.value, ao.AdapterOpsError) and caught.value.errno == code
    assert names(tmp_path) == []


def test_no_permission_on_the_output_is_exit_6_but_on_an_input_it_names_the_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    culprit: list[Path] = []

    def denied(self: ShardWriter, *_: object) -> None:
        path = culprit[0] if culprit else self.path
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ShardWriter, "write", denied)
    out = tmp_path / "out"
    assert run("combine", STYLE_A, STYLE_B, "-o", out) == (
        6,
        "",
        f"error: could not write {out}: permission denied in {tmp_path} (EACCES); fix the folder's "
        "permissions or choose another output path; nothing was left behind\n",
    )
    culprit.append(STYLE_A / "adapter_model.safetensors")  # as if reading an input failed mid-write
    assert run("combine", STYLE_A, STYLE_B, "-o", out) == (
        1,
        "",
        f"error: {culprit[0]}: Permission denied (EACCES)\n",
    )
    assert names(tmp_path) == []


def test_a_full_disk_elsewhere_names_that_path_not_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: ShardWriter, *_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x")

    monkeypatch.setattr(ShardWriter, "write", full)
    assert run("merge", BASE, STYLE_A, "-o", tmp_path / "out") == (
        6,
        "",
        "error: /cache/blobs/x: No space left on device (ENOSPC)\n",
    )
    assert names(tmp_path) == []


# ---- 6. any other OSError: one line naming the path -----------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (
            OSError(errno.EIO, "Input/output error", "/data/a/adapter_model.safetensors"),
            1,
            "/data/a/adapter_model.safetensors: Input/output error (EIO)",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/gone"),
            3,
            "/gone: No such file or directory (ENOENT)",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/cache/x"),
            6,
            "/cache/x: No space left on device (ENOSPC)",
        ),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"),
            1,
            "/a -> /b: Invalid cross-device link (EXDEV)",
        ),
        (OSError("no errno here"), 1, "no errno here"),
    ],
    ids=["EIO", "ENOENT", "ENOSPC", "two-paths", "no-errno"],
)
def test_an_oserror_from_anywhere_is_one_line_that_names_the_path(
    monkeypatch: pytest.MonkeyPatch, raised: OSError, code: int, line: str
) -> None:
    import adapterops.info

    def fails(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(adapterops.info, "describe", fails)
    assert run("info", STYLE_A) == (code, "", f"error: {line}\n")
