"""Golden files: pin, byte for byte after one normalization, what adapterops writes and prints.

Each test runs a public verb (``import adapterops as ao``, or the CLI through click's CliRunner) on the
bundled deterministic inputs in ``recipes/inputs/`` and compares its output files and stdout with the
expected files under ``tests/data/golden/<case>/``. On a mismatch the failure shows a unified diff.

- Text files (configs, cards, merge records, indexes) and CLI text are compared verbatim.
- A safetensors file is pinned by its header (the JSON that the 8-byte length prefix announces,
  re-dumped with sorted keys, with the ``__metadata__`` values that are JSON, the provenance record,
  parsed too) and by the sha256 of its tensor data (the bytes after the header).
- ``--json`` outputs and headers are compared as parsed JSON, floats to 1e-12 relative: the float64
  statistics they carry move in their last bits from one CPU to another (see ``same_json``).

The commands run in a scratch directory holding a copy of ``recipes/`` (the inputs bit for bit) and
use relative paths, so the recorded commands and input paths, and with them the output files and the
sha256 the cards quote, do not depend on where the tests run. CUDA is hidden, so ``--device auto``
means the CPU, where the outputs are deterministic.

``normalize`` is the only normalization: the adapterops version becomes ``<VERSION>``, the scratch
directory ``<TMP>``, the repository root ``<REPO>``, and timings (seconds, MiB/s, JSON ``seconds``)
``<T>``. The sha256 a card quotes for its own weights file hashes the header too, version included,
so it becomes ``<SHA256>`` (``check_dir`` checks it against the file first). Everything else is kept
as written: the point is to pin the format.

After an intended change of output, regenerate the expected files, then review them with ``git diff``:

    ADAPTEROPS_UPDATE_GOLDEN=1 python3 -m pytest -q -p no:cacheprovider tests/test_golden.py
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
UPDATE = os.environ.get("ADAPTEROPS_UPDATE_GOLDEN") == "1"

STYLE_A, STYLE_B = "recipes/inputs/style-a", "recipes/inputs/style-b"
BASE = "recipes/inputs/tiny-llama-64"
RECIPE = "recipes/blend-and-merge.yaml"
SVD_MIX = (STYLE_A, STYLE_B, "--weights", "0.7", "0.3", "--method", "svd", "--rank", "4")
TEXT_AND_JSON = pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])


def normalize(text: str, tmp: Path) -> str:
    """The one normalization of every pinned text.

    - the scratch directory (``tmp``, as given and resolved) -> ``<TMP>``; the repository root -> ``<REPO>``
    - ``ao.__version__`` as a whole token -> ``<VERSION>``
    - timings: ``0.01 s`` -> ``<T> s``, ``30 MiB/s`` -> ``<T> MiB/s``, JSON ``"seconds": 0.007`` -> ``"<T>"``
    - in a card, the sha256 of its own ``adapter_model.safetensors`` -> ``<SHA256>``
    """
    for path, token in ((tmp.resolve(), "<TMP>"), (tmp, "<TMP>"), (REPO, "<REPO>")):
        text = text.replace(str(path), token)
    text = re.sub(rf"(?<![\w.]){re.escape(ao.__version__)}(?![\w]|\.\w)", "<VERSION>", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?= s\b| MiB/s\b)", "<T>", text)
    text = re.sub(r'("seconds": )-?[0-9][0-9.eE+-]*', r'\1"<T>"', text)
    return re.sub(r"(adapter_model\.safetensors sha256: `)[0-9a-f]{64}", r"\1<SHA256>", text)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def same_json(a: Any, b: Any) -> bool:
    """Equal JSON values, types included; floats to 1e-12 relative. The float64 statistics (norms,
    energies, errors) move in their last bits with MKL's code path, i.e. from one CPU to another
    (seen with MKL_ENABLE_INSTRUCTIONS=AVX2); the rounded figures in the text outputs do not."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check(case: str, name: str, actual: str, *, parsed: bool = False) -> None:
    """Compare ``actual`` with ``tests/data/golden/<case>/<name>`` (as JSON when ``parsed``), or rewrite it."""
    path = GOLDEN / case / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
        return
    assert path.is_file(), f"no golden file {path}; create it with ADAPTEROPS_UPDATE_GOLDEN=1"
    expected = path.read_bytes().decode("utf-8")
    if same_json(json.loads(expected), json.loads(actual)) if parsed else expected == actual:
        return
    diff = difflib.unified_diff(
        expected.splitlines(keepends=True),
        actual.splitlines(keepends=True),
        f"golden/{case}/{name}",
        "actual",
    )
    pytest.fail(
        f"{case}/{name} differs from its golden file (if intended: ADAPTEROPS_UPDATE_GOLDEN=1, see the "
        f"module docstring):\n{''.join(diff)}",
        pytrace=False,
    )


def safetensors_header(path: Path) -> Any:
    """The JSON header (metadata values that are JSON parsed too) and the sha256 of the tensor data.

    The 8-byte length prefix is checked, not pinned: it counts the characters of the version string."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data_end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert (length % 8, len(raw)) == (0, 8 + length + data_end), f"{path}: bad header length {length}"
    metadata = header.get("__metadata__", {})
    for key, value in metadata.items():
        try:
            value = json.loads(value)
        except ValueError:
            continue
        if isinstance(value, (dict, list)):
            metadata[key] = value
    return {"data_sha256": hashlib.sha256(raw[8 + length :]).hexdigest(), "header": header}


def check_dir(case: str, directory: Path, tmp: Path) -> None:
    """Pin a written directory: its file list, each text file verbatim, each safetensors header."""
    names = sorted(p.name for p in directory.iterdir())
    check(case, "files.txt", "".join(f"{name}\n" for name in names))
    if (
        "README.md" in names and "adapter_model.safetensors" in names
    ):  # the card quotes its weights file's sha256; normalize() hides it
        sha = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert f"adapter_model.safetensors sha256: `{sha}`" in (directory / "README.md").read_text()
    for name in names:
        if name.endswith(".safetensors"):
            header = normalize(dump(safetensors_header(directory / name)), tmp)
            check(case, f"{name}.header.json", header, parsed=True)
        else:
            check(case, name, normalize((directory / name).read_bytes().decode("utf-8"), tmp))


def run_cli(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def check_stdout(case: str, stdout: str, tmp: Path, *, as_json: bool) -> None:
    if as_json:
        check(case, "stdout.json", normalize(dump(json.loads(stdout)), tmp), parsed=True)
    else:
        check(case, "stdout.txt", normalize(stdout, tmp))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd: a scratch directory with a copy of ``recipes/``; CPU only; rich never forced into terminal mode."""
    shutil.copytree(REPO / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("out"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_cli_combine_svd_adapter_config_header_card_and_summary(work: Path) -> None:
    check_stdout("cli-combine-svd", run_cli("combine", *SVD_MIX, "-o", "mix"), work, as_json=False)
    check_dir("cli-combine-svd", work / "mix", work)
    check_stdout(
        "cli-combine-svd", run_cli("combine", *SVD_MIX, "-o", "mix-json", "--json"), work, as_json=True
    )


def test_api_combine_svd_save_adapter_config_header_and_card(work: Path) -> None:
    a, b = ao.load_adapter(STYLE_A), ao.load_adapter(STYLE_B)
    ao.save_adapter(ao.combine([a, b], weights=[0.7, 0.3], method="svd", rank=4), "mix")
    check_dir("api-combine-svd", work / "mix", work)


def test_cli_negate_adapter_config_header_card_and_summary(work: Path) -> None:
    check_stdout("cli-negate", run_cli("negate", STYLE_A, "-o", "anti"), work, as_json=False)
    check_dir("cli-negate", work / "anti", work)
    check_stdout("cli-negate", run_cli("negate", STYLE_A, "-o", "anti-json", "--json"), work, as_json=True)


def test_cli_merge_record_index_shard_headers_file_list_and_summary(work: Path) -> None:
    check_stdout("cli-merge", run_cli("merge", BASE, STYLE_A, "-o", "merged"), work, as_json=False)
    check_dir("cli-merge", work / "merged", work)
    check_stdout(
        "cli-merge", run_cli("merge", BASE, STYLE_A, "-o", "merged-json", "--json"), work, as_json=True
    )


@TEXT_AND_JSON
def test_cli_info_table_and_json(work: Path, as_json: bool) -> None:
    stdout = run_cli("info", STYLE_A, *(["--json"] if as_json else []))
    check_stdout("cli-info", stdout, work, as_json=as_json)


@TEXT_AND_JSON
def test_cli_verify_table_verdict_and_json(work: Path, as_json: bool) -> None:
    ao.merge(BASE, [STYLE_A], out="merged")
    stdout = run_cli("verify", BASE, STYLE_A, "merged", *(["--json"] if as_json else []))
    check_stdout("cli-verify", stdout, work, as_json=as_json)


@TEXT_AND_JSON
def test_cli_run_dry_run_plan(work: Path, as_json: bool) -> None:
    stdout = run_cli("run", RECIPE, "--dry-run", *(["--json"] if as_json else []))
    check_stdout("cli-run-dry-run", stdout, work, as_json=as_json)
    assert not (work / "recipes" / "out").exists()


@TEXT_AND_JSON
def test_cli_run_step_lines_and_written_outputs(work: Path, as_json: bool) -> None:
    stdout = run_cli("run", RECIPE, "--output-dir", work / "run", *(["--json"] if as_json else []))
    check_stdout("cli-run", stdout, work, as_json=as_json)
    if not as_json:  # the same files either way; pinned once
        check_dir("cli-run/mix", work / "run" / "out" / "mix", work)
        check_dir("cli-run/merged", work / "run" / "out" / "merged", work)
