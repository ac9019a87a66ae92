"""Hostile inputs: every crafted file gives one deliberate error line and its exit code (2: invalid,
3: missing); never a traceback, a hang, an output, or a read outside the input directory.

Each test builds its files from bytes (no binary fixtures): a tiny base checkpoint holding one 4x4
float32 ``q_proj`` weight and a rank-2 adapter for it, then corrupts one thing. Everything runs
under a deadline (``bounded``), so a regression that loops fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.io import checkpoint as checkpoint_module
from adapterops.io import patterns, peft_config, safetensors_file
from adapterops.io.safetensors_file import MAX_HEADER, ShardWriter, TensorEntry, read_header

Q = "model.layers.0.self_attn.q_proj"
W = f"{Q}.weight"
E = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
DEADLINE = 10.0  # seconds; every case takes milliseconds


def bounded(work: Callable[[], Any], seconds: float = DEADLINE) -> Any:
    """``work()``'s result (or its exception), or a test failure if it has not returned in ``seconds``.

    A thread bounds Python loops and system calls; a hang inside C code that holds the GIL (re's
    backtracking) stops the waiting thread too: ``in_child`` bounds that.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box["result"]


def in_child(work: Callable[[], object], seconds: float = DEADLINE) -> None:
    """Run ``work`` in a forked process, killed if it has not finished in ``seconds``."""
    process = multiprocessing.get_context("fork").Process(target=work, daemon=True)
    process.start()
    process.join(seconds)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"still running after {seconds} s: it hangs")
    assert process.exitcode == 0


def cli_run(*args: str | Path) -> tuple[int, str, str]:
    result = bounded(lambda: CliRunner().invoke(cli, [str(a) for a in args]))
    return result.exit_code, result.stdout, result.stderr


def assert_refused(
    result: tuple[int, str, str], code: int, *fragments: str, output: Path | None = None
) -> None:
    """One deliberate ``error:`` line with ``code``, naming everything in ``fragments``; no output."""
    exit_code, out, err = result
    assert (exit_code, out) == (code, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert not err.startswith("error: unexpected ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


# ---------------------------------------------------------------------------------------------- builders


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes | int = 64) -> bytes:
    """An 8-byte length, the header (JSON of a dict, or raw bytes), then ``data`` (bytes or a zero count)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(raw)) + raw + body


def make_base(root: Path, header: dict[str, Any] | bytes | None = None, data: bytes | int = 64) -> Path:
    root.mkdir(parents=True)
    weight = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    raw = safetensors_bytes({W: E}, weight) if header is None else safetensors_bytes(header, data)
    (root / "model.safetensors").write_bytes(raw)
    (root / "config.json").write_text('{"model_type": "llama"}')
    return root


def make_adapter(root: Path, module: str = Q, **config: Any) -> Path:
    """A rank-2 PEFT adapter for ``module``; ``config`` overrides adapter_config.json (NaN and Infinity
    are written as Python's json writes them, as tokens Python's json reads back)."""
    root.mkdir(parents=True)
    full = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (root / "adapter_config.json").write_text(json.dumps(full))
    prefix = f"base_model.model.{module}"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }
    data = torch.linspace(-1, 1, 16, dtype=torch.float32).numpy().tobytes()
    (root / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, data))
    return root


def shape(value: Any) -> dict[str, Any]:
    return {W: {**E, "shape": value}}


def offsets(value: Any) -> dict[str, Any]:
    return {W: {**E, "data_offsets": value}}


V = f"{W}.second"  # a second tensor, for cases about the order of offsets
E2 = json.dumps(E).encode()
# (id, header, data bytes, what the message says): each is a checkpoint's whole model.safetensors
HEADERS = [
    ("array", b"[1, 2]", 64, "header does not start with '{' (a JSON object)"),
    ("scalar", b"3", 64, "header does not start with '{'"),
    ("nested-100000-deep", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 64, "nested too deeply"),
    ("cut-json", b'{"w": {"dtype"', 64, "header is not valid JSON"),
    ("not-utf8", b'{"\xff": 1}', 64, "header is not valid JSON"),
    ("lone-surrogate", b'{"\\ud800": ' + E2 + b"}", 64, "which is not valid Unicode (a lone surrogate"),
    ("metadata-list", {"__metadata__": [1], W: E}, 64, "__metadata__ is a JSON array"),
    ("metadata-number", {"__metadata__": {"a": 1}, W: E}, 64, "__metadata__ value of a is a JSON number"),
    ("entry-list", {W: [1]}, 64, f"tensor {W} is a JSON array, not an object"),
    ("dtype-number", {W: {**E, "dtype": 1}}, 64, f"tensor {W} has dtype 1, not a dtype name"),
    ("dtype-unknown", {W: {**E, "dtype": "F4"}}, 64, "has dtype F4, which adapterops cannot handle"),
    ("shape-negative", shape([-4, -4]), 64, "has shape [-4, -4], not a list of non-negative integers"),
    ("shape-bool", shape([True, 16]), 64, "has shape [True, 16], not a list"),
    ("shape-float", shape([4.5, 4]), 64, "has shape [4.5, 4], not a list"),
    ("shape-string", shape(["4", "4"]), 64, "has shape ['4', '4'], not a list"),
    ("shape-missing", shape(None), 64, "has shape None, not a list"),
    ("shape-over-int64", shape([0, 2**64]), 64, "has shape [0, 18446744073709551616], not a list"),
    ("shape-product-overflows", shape([2**62, 2**62]), 64, "whose element count overflows int64"),
    ("offsets-negative", offsets([0, -64]), 64, "has data_offsets [0, -64], not two non-negative"),
    ("offsets-reversed", offsets([64, 0]), 64, "has data_offsets [64, 0], which end before they begin"),
    ("offsets-three", offsets([0, 32, 64]), 64, "not two non-negative integers [begin, end]"),
    ("offsets-short-of-shape", offsets([0, 60]), 60, f"tensor {W} occupies bytes 0-60, expected 0-64"),
    ("offsets-overlap", {W: E, V: {**E, "data_offsets": [32, 96]}}, 96, "bytes 32-96, expected 64-128"),
    ("offsets-gap", {W: E, V: {**E, "data_offsets": [72, 136]}}, 136, "bytes 72-136, expected 64-128"),
    # passed the old checks, then made the copy of W spin at the end of the file forever
    ("negative-size-last", {W: E, V: {**E, "shape": [-4], "data_offsets": [64, 48]}}, 48, "has shape [-4]"),
    ("escape-in-name", {"\x1b[2J": {**E, "shape": [-1]}}, 64, "tensor '\\x1b[2J' has shape [-1]"),
    ("escape-in-name-2", {"\x1b[2J": offsets([64, 0])[W]}, 64, "tensor '\\x1b[2J' has data_offsets"),
    ("trailing-bytes", {W: E}, 65, "bytes on disk but the header describes"),
]
# whole files whose first 8 bytes are already wrong
FILES = [
    ("too-short", b"\x01\x02\x03", "too short to be a safetensors file (3 bytes)"),
    (
        "length-over-limit",
        struct.pack("<Q", MAX_HEADER + 1) + b"{}",
        "header length 100,000,001 bytes is over",
    ),
    ("length-2**64-1", b"\xff" * 8 + b"{}", "is over safetensors' limit of 100,000,000"),
    ("length-beyond-file", struct.pack("<Q", 1000) + b"{}", "length 1,000 does not fit the file (10 bytes)"),
]


ALL_FILES = [pytest.param(safetensors_bytes(h, d), m, id=i) for i, h, d, m in HEADERS] + [
    pytest.param(raw, m, id=i) for i, raw, m in FILES
]


# ---------------------------------------------------------------------------------- safetensors headers


@pytest.mark.parametrize(("raw", "message"), ALL_FILES)
def test_a_hostile_checkpoint_shard_is_refused_by_merge(tmp_path: Path, raw: bytes, message: str) -> None:
    base = make_base(tmp_path / "base")
    (base / "model.safetensors").write_bytes(raw)
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    assert_refused(result, 2, f"error: {base / 'model.safetensors'}: ", message, output=out)
    assert "\x1b" not in result[2]  # a name's terminal escapes are shown escaped, never sent


@pytest.mark.parametrize(("raw", "message"), ALL_FILES)
def test_a_hostile_adapter_weights_file_is_refused_by_info(tmp_path: Path, raw: bytes, message: str) -> None:
    """safetensors itself parses adapters (safe_open): its verdicts become one line too."""
    lora = make_adapter(tmp_path / "lora")
    (lora / "adapter_model.safetensors").write_bytes(raw)
    result = cli_run("info", lora)
    assert_refused(
        result, 2, f"error: {lora / 'adapter_model.safetensors'}: not a readable safetensors file ("
    )
    assert "\x1b" not in result[2]


def test_a_hostile_merged_checkpoint_is_refused_by_verify(tmp_path: Path) -> None:
    base, lora = make_base(tmp_path / "base"), make_adapter(tmp_path / "lora")
    merged = make_base(tmp_path / "merged", shape([-4, -4]))
    result = cli_run("verify", base, lora, merged)
    assert_refused(result, 2, f"error: {merged / 'model.safetensors'}: tensor {W} has shape [-4, -4]")


def test_the_api_raises_the_same_error(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", {"__metadata__": [1], W: E})
    lora = make_adapter(tmp_path / "lora")
    with pytest.raises(ao.AdapterFormatError, match=r"model.safetensors: __metadata__ is a JSON array"):
        bounded(lambda: ao.merge(base, [lora], out=tmp_path / "out", device="cpu"))
    with pytest.raises(ao.AdapterFormatError, match=r"__metadata__ is a JSON array"):
        bounded(lambda: ao.plan_merge(base, [lora]))
    assert not (tmp_path / "out").exists()


def test_copy_stops_at_an_early_end_of_file(tmp_path: Path) -> None:
    """A shard cut short after its header was read: the copy raises instead of spinning at EOF."""
    source = make_base(tmp_path / "base") / "model.safetensors"
    shard = read_header(source)
    os.truncate(source, source.stat().st_size - 10)
    writer = ShardWriter(tmp_path / "copy.safetensors", shard.entries, {})
    end = shard.data_start + 64 - 10
    with (
        source.open("rb") as handle,
        pytest.raises(ao.AdapterFormatError, match=f"ends at byte {end}, inside"),
    ):
        bounded(lambda: writer.copy(shard.entries[0], handle, shard), seconds=5)
    writer.close()


# -------------------------------------------------------------------------------- the header size limit


def test_a_merge_record_that_would_overflow_the_header_goes_to_the_sidecar_only(tmp_path: Path) -> None:
    """The base header is 200 bytes under safetensors' limit; the record (hundreds of bytes) does not
    fit beside it, so the shard is written without it, loadable, and the sidecar keeps the record."""
    head, tail = b'{"__metadata__":{"pad":"', b'"},' + json.dumps({W: E}).encode()[1:]
    pad = MAX_HEADER - 200 - len(head) - len(tail)
    base = make_base(tmp_path / "base", head + b"x" * pad + tail, torch.zeros(16).numpy().tobytes())
    out = tmp_path / "out"
    code, stdout, err = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out, "--device", "cpu")
    assert code == 0 and stdout.startswith(f"wrote {out}"), err
    assert err.startswith(
        "warning: model.safetensors: the merge record would push its safetensors header over"
    )
    assert err.count("\n") == 1 and "adapterops_merge.json only" in err
    from safetensors import safe_open  # the reference loader: refuses headers over its limit

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert sorted(handle.metadata()) == ["pad"]
        module = ao.load_adapter(tmp_path / "lora").modules[Q]
        want = module.scale * module.B.double() @ module.A.double()
        assert torch.allclose(handle.get_tensor(W).double(), want, rtol=1e-6, atol=0)
    record = json.loads((out / "adapterops_merge.json").read_text())
    assert len(record["merged"]) == 1 and record["history"][-1]["operation"] == "merge"


def test_a_header_over_the_limit_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_file, "MAX_HEADER", 200)
    entries = (TensorEntry(W, "F32", (4, 4), 0, 64),)
    with pytest.raises(
        ao.InvalidInputError, match=r"header would be 272 bytes, over safetensors' limit of 200"
    ):
        ShardWriter(tmp_path / "x.safetensors", entries, {"note": "y" * 150}, optional={"r": "z"})
    assert not (tmp_path / "x.safetensors").exists()
    writer = ShardWriter(tmp_path / "x.safetensors", entries, {"note": "y"}, optional={"r": "z" * 150})
    writer.write(entries[0], torch.zeros(4, 4))
    writer.close()
    assert writer.dropped == ("r",) and read_header(tmp_path / "x.safetensors").metadata == {"note": "y"}


# ------------------------------------------------------------------------------ index, links, config.json


def sharded_base(root: Path, index: Any = None) -> Path:
    """The base as one shard listed in model.safetensors.index.json (``index`` replaces the index)."""
    base = make_base(root)
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    text = (
        index
        if isinstance(index, str)
        else json.dumps(
            index
            if index is not None
            else {"metadata": {}, "weight_map": {W: "model-00001-of-00001.safetensors"}}
        )
    )
    (base / "model.safetensors.index.json").write_text(text)
    return base


def outside_shard(tmp_path: Path) -> Path:
    """A valid shard outside the checkpoint: read, it would merge without complaint."""
    return make_base(tmp_path / "elsewhere") / "model.safetensors"


def weight_map(shard: str) -> dict[str, Any]:
    return {"weight_map": {W: shard}}


SHARD = "model-00001-of-00001.safetensors"
# (id, the index given the test's tmp_path, what the message says)
INDEXES = [
    (
        "dot-dot",
        lambda t: weight_map("../elsewhere/model.safetensors"),
        "shard '../elsewhere/model.safetensors'",
    ),
    (
        "absolute",
        lambda t: weight_map(str(t / "elsewhere" / "m.safetensors")),
        "not a file name in the checkpoint",
    ),
    (
        "backslashes",
        lambda t: weight_map("..\\elsewhere\\m.safetensors"),
        "(no paths, no '..'); fix the index",
    ),
    ("drive", lambda t: weight_map("C:model.safetensors"), "names the shard 'C:model.safetensors'"),
    ("nul", lambda t: weight_map("model\x00.safetensors"), "names the shard 'model\\x00.safetensors'"),
    (
        "weight-map-list",
        lambda t: {"weight_map": [W]},
        "weight_map must be a non-empty object mapping tensor",
    ),
    ("weight-map-empty", lambda t: {"weight_map": {}}, "weight_map must be a non-empty object"),
    ("weight-map-missing", lambda t: {"metadata": {}}, "to shard files, found JSON null"),
    (
        "shard-number",
        lambda t: weight_map(3),
        f"weight_map maps '{W}' to the number 3, not a shard file name",
    ),
    ("shard-list", lambda t: weight_map(["a"]), "to a JSON array, not a shard file name"),
    ("index-list", lambda t: [1], "expected a JSON object with a weight_map, found a JSON array"),
    ("index-number", lambda t: 7, "found the number 7"),
    (
        "metadata-list",
        lambda t: {"metadata": [1], **weight_map(SHARD)},
        "metadata must be a JSON object, found",
    ),
    ("invalid-json", lambda t: '{"weight_map": ', "a safetensors index is not valid JSON (Expecting value"),
    (
        "nested-100000-deep",
        lambda t: "[" * 100_000 + "]" * 100_000,
        "a safetensors index nests JSON too deeply",
    ),
]


@pytest.mark.parametrize(("index", "message"), [pytest.param(i, m, id=n) for n, i, m in INDEXES])
def test_a_hostile_index_is_refused_before_any_shard_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: Callable[[Path], Any], message: str
) -> None:
    outside_shard(tmp_path)
    base = sharded_base(tmp_path / "base", index(tmp_path))
    opened = spy_on_reads(monkeypatch)
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    assert_refused(result, 2, f"error: {base / 'model.safetensors.index.json'}: ", message, output=out)
    assert opened == []


def test_a_shard_the_index_lists_but_the_directory_lacks_is_not_found(tmp_path: Path) -> None:
    base = sharded_base(tmp_path / "base", weight_map("model-00002-of-00002.safetensors"))
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    message = f"error: {base}: shard model-00002-of-00002.safetensors listed in model.safetensors.index.json"
    assert_refused(result, 3, message, "is missing; download it again", output=out)


def spy_on_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The shards whose headers open_checkpoint reads, in order."""
    opened: list[Path] = []

    def spy(path: Path) -> Any:
        opened.append(path)
        return read_header(path)

    monkeypatch.setattr(checkpoint_module, "read_header", spy)
    return opened


LINKED = ["model.safetensors", SHARD, "config.json", "model.safetensors.index.json", "tokenizer.json"]


@pytest.mark.parametrize("linked", LINKED)
def test_a_link_out_of_the_checkpoint_is_refused_and_nothing_outside_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: str
) -> None:
    target = outside_shard(tmp_path)
    if linked.endswith(".json"):
        target = target.with_name(linked)
        target.write_text(json.dumps(weight_map(SHARD)))
    base = sharded_base(tmp_path / "base") if linked != "model.safetensors" else make_base(tmp_path / "base")
    if (base / linked).exists():
        (base / linked).unlink()
    (base / linked).symlink_to(target)
    opened = spy_on_reads(monkeypatch)
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    where = f"error: {base / linked}: links to {target}, outside the input directory {base}; "
    assert_refused(result, 2, where, "copy the file in (cp -L) or remove the link", output=out)
    assert all(path.parent == base for path in opened)


def test_a_pipe_among_the_files_to_copy_is_refused(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    os.mkfifo(base / "tokenizer.json")  # copying it would block on the read
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    assert_refused(result, 2, f"error: {base / 'tokenizer.json'}: not a regular file", output=out)


def test_links_inside_the_checkpoint_and_the_hub_cache_layout_are_fine(tmp_path: Path) -> None:
    """A Hub cache snapshot links every file into the repo's blobs folder: that stays readable."""
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    built = sharded_base(tmp_path / "built")
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in built.iterdir():
        path.rename(blobs / f"sha-{path.name}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"sha-{path.name}")
    (snapshot / "notes.md").symlink_to("config.json")  # a link inside the checkpoint itself
    out = tmp_path / "out"
    code, stdout, err = cli_run(
        "merge", snapshot, make_adapter(tmp_path / "lora"), "-o", out, "--device", "cpu"
    )
    assert (code, err) == (0, "") and stdout.startswith(f"wrote {out}")
    assert (out / "notes.md").read_text() == '{"model_type": "llama"}'


CONFIGS = [
    ("invalid-json", "{", "a model config is not valid JSON (Expecting property name"),
    ("array", "[1]", "expected a JSON object, found a JSON array; fix or remove config.json"),
    (
        "nested-100000-deep",
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
        "a model config nests JSON too deeply",
    ),
    ("model-type-list", '{"model_type": ["gpt2"]}', "model_type must be a string, found a JSON array"),
    ("tie-string", '{"tie_word_embeddings": "false"}', "tie_word_embeddings must be true or false, found a"),
    ("not-utf8", b'{"model_type": "\xff"}', "a model config is not valid JSON ('utf-8' codec can't decode"),
]


@pytest.mark.parametrize(("text", "message"), [pytest.param(t, m, id=i) for i, t, m in CONFIGS])
def test_a_hostile_config_json_is_refused(tmp_path: Path, text: str | bytes, message: str) -> None:
    base = make_base(tmp_path / "base")
    path = base / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    result = cli_run("merge", base, make_adapter(tmp_path / "lora"), "-o", out)
    assert_refused(result, 2, f"error: {path}: {message}", output=out)


# ------------------------------------------------------------------------------------- adapter_config.json

NAN, INF = float("nan"), float("inf")
POSITIVE = "must map module patterns to positive numbers"
ADAPTER_CONFIGS = [
    ("alpha-nan", {"lora_alpha": NAN}, "lora_alpha must be a positive number, got nan (a finite number"),
    ("alpha-infinity", {"lora_alpha": INF}, "lora_alpha must be a positive number, got inf"),
    ("alpha-minus-infinity", {"lora_alpha": -INF}, "lora_alpha must be a positive number, got -inf"),
    ("alpha-1e308", {"lora_alpha": 1e308}, "got 1e+308 (a finite number above 0, at most 1e+30)"),
    ("alpha-bool", {"lora_alpha": True}, "lora_alpha must be a positive number, got True"),
    ("alpha-string", {"lora_alpha": "4"}, "lora_alpha must be a positive number, got '4'"),
    ("r-nan", {"r": NAN}, "r must be a positive number, got nan (a whole number from 1 to 2,147,483,647)"),
    ("r-infinity", {"r": INF}, "r must be a positive number, got inf"),
    ("r-1e308", {"r": 1e308}, "r must be a positive number, got 1e+308"),
    ("r-2**31", {"r": 2**31}, "r must be a positive number, got 2147483648"),
    ("r-fraction", {"r": 2.5}, "r must be a positive number, got 2.5"),  # was truncated to 2, silently
    ("r-bool", {"r": True}, "r must be a positive number, got True"),
    ("rank-pattern-nan", {"rank_pattern": {"q_proj": NAN}}, f"rank_pattern {POSITIVE}, got nan for 'q_proj'"),
    ("rank-pattern-huge", {"rank_pattern": {"q_proj": 2**40}}, "got 1099511627776 for 'q_proj'"),
    ("alpha-pattern-infinity", {"alpha_pattern": {"q_proj": INF}}, f"alpha_pattern {POSITIVE}, got inf"),
    ("alpha-pattern-bool", {"alpha_pattern": {"q_proj": False}}, "got False for 'q_proj'"),
    ("alpha-pattern-list", {"alpha_pattern": [["q_proj", 4]]}, f"{POSITIVE}, got [['q_proj', 4]]"),
    (
        "pattern-invalid",
        {"rank_pattern": {"q_proj(": 2}},
        "rank_pattern: pattern key 'q_proj(' is not a valid",
    ),
    ("pattern-global-flag", {"alpha_pattern": {"(?i)Q_PROJ": 2}}, "global flags not at the start"),
    (
        "pattern-backreference",
        {"rank_pattern": {r"(\w)+\1": 2}},
        "uses a backreference together with repeats",
    ),
    (
        "pattern-too-long",
        {"rank_pattern": {"q" * 2000: 2}},
        "is 2,000 characters, more than the 1,024 allowed",
    ),
    ("pattern-too-deep", {"rank_pattern": {"(" * 400 + "q" + ")" * 400: 2}}, "nests groups"),
    ("rslora-string", {"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
    ("dora-number", {"use_dora": 0}, "use_dora must be true or false, got 0"),
    (
        "target-parameters-string",
        {"target_parameters": "experts.gate_up_proj"},
        "target_parameters must be a list of parameter names, got 'experts.gate_up_proj'",
    ),
    ("target-parameters-numbers", {"target_parameters": [1, 2]}, "target_parameters must be a list of"),
]


@pytest.mark.parametrize(("config", "message"), [pytest.param(c, m, id=i) for i, c, m in ADAPTER_CONFIGS])
def test_a_hostile_adapter_config_is_refused_before_anything_is_written(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    lora = make_adapter(tmp_path / "lora", **config)
    out = tmp_path / "out"
    result = cli_run("merge", make_base(tmp_path / "base"), lora, "-o", out)
    assert_refused(result, 2, f"error: {lora / 'adapter_config.json'}: ", message, output=out)
    assert_refused(cli_run("info", lora), 2, f"error: {lora / 'adapter_config.json'}: ", message)


def test_a_nan_alpha_no_longer_merges_into_nan_weights(tmp_path: Path) -> None:
    """It used to exit 0 with every updated weight NaN; now nothing is written."""
    lora = make_adapter(tmp_path / "lora", lora_alpha=NAN)
    assert "NaN" in (lora / "adapter_config.json").read_text()  # the token Python's json reads back
    out = tmp_path / "merged"
    assert_refused(cli_run("merge", make_base(tmp_path / "base"), lora, "-o", out), 2, "got nan", output=out)
    with pytest.raises(ao.AdapterFormatError, match="lora_alpha must be a positive number, got nan"):
        bounded(lambda: ao.merge(tmp_path / "base", [lora], out=out, device="cpu"))
    assert not out.exists()


def test_a_catastrophic_pattern_matches_at_once_with_peft_semantics(tmp_path: Path) -> None:
    """``([\\w.]+)+!`` makes re try 2**n ways on an n-character module name that has no "!"; it still
    matches nothing (PEFT's answer, when PEFT finishes), instantly."""
    key = r"([\w.]+)+!"
    module = "model.decoder.layers.0.encoder_attn.k_proj"  # 42 characters: re would take days
    assert re.match(rf"(.*\.)?({key})$", "layers.0.q") is None  # PEFT's own matcher, on a short name
    in_child(lambda: peft_config.get_pattern_key([key], module), seconds=5)
    lora = make_adapter(tmp_path / "lora", module=module, rank_pattern={key: 3}, alpha_pattern={key: 5})
    adapter = bounded(lambda: ao.load_adapter(lora), seconds=5)
    assert adapter.modules[module].rank == 2 and adapter.modules[module].scale == 2.0  # r, lora_alpha


def test_a_pattern_too_costly_for_a_module_name_is_refused_naming_both(tmp_path: Path) -> None:
    """A lookahead that re-scans the rest of the name at every position: over the step budget."""
    module = "model.layers.0." + "ab" * 300 + ".q_proj"
    lora = make_adapter(tmp_path / "lora", module=module, rank_pattern={r"(?=(?:ab)*x)": 2})
    with pytest.raises(
        ao.AdapterFormatError, match=r"adapter_config.json: rank_pattern: pattern key"
    ) as caught:
        bounded(lambda: ao.load_adapter(lora), seconds=5)
    assert "needs more than 20,000 steps to match module 'model.layers.0.abab" in str(caught.value)


def test_a_module_name_too_long_for_patterns_is_refused(tmp_path: Path) -> None:
    module = "model." + "x" * 2000 + ".q_proj"
    lora = make_adapter(tmp_path / "lora", module=module, rank_pattern={"v_proj": 4})
    with pytest.raises(ao.AdapterFormatError, match=r"is 2,013 characters, more than the 1,024 adapterops"):
        bounded(lambda: ao.load_adapter(lora))


def test_the_bounded_matcher_agrees_with_re_on_random_patterns() -> None:
    """The reference is PEFT's own ``re.match(rf"(.*\\.)?({key})$", name)`` on short names, where re
    is quick; the set-of-positions evaluation is forced for every key (``_build``), including the
    ones ``patterns.matcher`` hands to re itself."""
    rng = random.Random(20240611)
    atoms = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\w", r"\W", r"\d", r"\s", "[a-c]", "A", "[^\\w.]", "\\n"]
    wrappers = (
        "({})* ({})+ ({})? ({}){{2}} ({}){{1,3}} ({})*? (?:{}|{}) (?={}) (?!{}) (?i:{}) (?s:{}) (?m:{})"
    )
    wrappers += r" (?a:{}) ^{} {}$ \b{} \B{} \A{} {}\Z"

    def pattern(depth: int) -> str:
        if depth == 0 or rng.random() < 0.25:
            return rng.choice(atoms)
        if rng.random() < 0.3:
            return pattern(depth - 1) + pattern(depth - 1)
        wrapper = rng.choice(wrappers.split())
        return wrapper.format(*(pattern(depth - 1) for _ in range(wrapper.count("{}"))))

    checked = 0
    for _ in range(300):
        key = rng.choice(["(?<=a)", "(?<!\\.)", ""]) + pattern(3)
        text = rf"(.*\.)?({key})$"
        tree = patterns._parser.parse(text, 0)
        node = patterns._build(tree, tree.state.flags)
        for _ in range(8):
            name = "".join(rng.choice("abAB.1_ \n\u00e9") for _ in range(rng.randint(0, 7)))
            want = re.match(text, name) is not None
            assert (node.ends(1, patterns._Subject(name, key)) != 0) == want, (key, name)
            assert peft_config.get_pattern_key([key], name) == (key if want else name)
            checked += 1
    assert checked == 2400


def test_a_corrupt_provenance_record_in_an_adapter_is_refused(tmp_path: Path) -> None:
    lora = make_adapter(tmp_path / "lora")
    path = lora / "adapter_model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = {"adapterops": "[1, 2]"}
    path.write_bytes(safetensors_bytes(header, raw[8 + length :]))
    assert_refused(cli_run("info", lora), 2, f"error: {path}: metadata 'adapterops' is not the JSON object")


def test_an_adapter_file_that_links_out_of_its_directory_is_not_read(tmp_path: Path) -> None:
    import shutil

    adapter = shutil.copytree(Path(__file__).parent.parent / "recipes" / "inputs" / "style-a", tmp_path / "a")
    secret = tmp_path / "elsewhere.safetensors"
    (adapter / "adapter_model.safetensors").rename(secret)
    (adapter / "adapter_model.safetensors").symlink_to(secret)
    result = CliRunner().invoke(cli, ["info", str(adapter)])
    assert result.exit_code == 2 and "outside the input directory" in result.stderr
