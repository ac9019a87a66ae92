"""The safetensors byte format, one tensor at a time: headers, ``pread`` reads, an ordered writer.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets relative to the end of the header, plus an optional ``__metadata__`` of strings),
then the tensor bytes.

Why not the safetensors package (``safe_open``, including its ``backend="pread"``): a merge
reads into reusable (pinned) buffers and copies untouched tensors with ``copy_file_range``, which
needs each tensor's raw file offsets; no safetensors API exposes them. Reading parses headers
only and fetches single tensors with ``os.pread``: no mmap, so resident memory stays about one
tensor. Writing needs no incremental writer: the output header is known before any tensor is
computed, so it is written first and the tensor bytes follow in order.

Files are untrusted: ``read_header`` accepts only what safetensors itself would load (and refuses
some of what it would not notice), so every later step can rely on the layout; headers over
safetensors' limit are neither read nor written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import torch

from adapterops.errors import AdapterFormatError, InvalidInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# safetensors' own loader refuses longer headers (MAX_HEADER_SIZE in its Rust crate): a file with one
# could not be loaded by anything else, so adapterops neither reads nor writes one
MAX_HEADER = 100_000_000
_INT64_MAX = 2**63 - 1  # a shape, its element count and a byte offset must all fit torch's int64
_FIX = "the file is corrupt or was not written by a safetensors library: download or save it again"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: ``begin``/``end`` are offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def header(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.begin, self.end]}


@dataclass(frozen=True)
class Shard:
    """A safetensors file's layout: its tensors in file order and where their bytes start."""

    path: Path
    data_start: int
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return self.entries[-1].end if self.entries else 0


def read_header(path: Path) -> Shard:
    """Parse and check a safetensors header the way safetensors itself does, and no more leniently.

    Checked: the header length (at most ``MAX_HEADER``, within the file), UTF-8 JSON text that
    starts with ``{``, ``__metadata__`` a string-to-string object, every other value an object with
    a dtype adapterops handles, a shape of non-negative integers whose product fits int64, and
    ``data_offsets`` that tile the data section exactly (in order, no gaps, no overlaps, up to the
    end of the file). Each failure is one ``AdapterFormatError`` naming the file and the tensor.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise AdapterFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        length = int.from_bytes(raw, "little")
        if length > MAX_HEADER:
            raise AdapterFormatError(
                f"{path}: header length {length:,} bytes is over safetensors' limit of {MAX_HEADER:,}; {_FIX}"
            )
        if length > size - 8:
            raise AdapterFormatError(
                f"{path}: header length {length:,} does not fit the file ({size:,} bytes); it is truncated "
                "or not safetensors"
            )
        header = _parse_header(path, handle.read(length))
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = sorted(
        (_entry(path, name, info) for name, info in header.items()), key=lambda e: (e.begin, e.end)
    )
    position = 0
    for entry in entries:
        element = torch.empty((), dtype=entry.torch_dtype).element_size()
        expected = element * _numel(entry.shape)
        if entry.begin != position or entry.nbytes != expected:
            raise AdapterFormatError(
                f"{path}: tensor {_short(entry.name)} occupies bytes {entry.begin}-{entry.end}, expected "
                f"{position}-{position + expected}; the file is corrupt"
            )
        position = entry.end
    data_start = 8 + length
    if data_start + position != size:
        raise AdapterFormatError(
            f"{path}: {size} bytes on disk but the header describes {data_start + position}; the file is "
            "truncated or was modified: download or save it again"
        )
    return Shard(path=path, data_start=data_start, entries=tuple(entries), metadata=metadata)


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise AdapterFormatError(f"{path}: header does not start with '{{' (a JSON object); {_FIX}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:  # json's C parser recurses once per nesting level
        raise AdapterFormatError(f"{path}: header JSON is nested too deeply; {_FIX}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise AdapterFormatError(f"{path}: header is not valid JSON ({_short(exc)}); {_FIX}") from None
    if not isinstance(header, dict):  # unreachable after the "{" check; keeps the type exact
        raise AdapterFormatError(f"{path}: header is a JSON {_json_type(header)}, not an object; {_FIX}")
    # a \uD800-\uDFFF escape can leave a lone surrogate, which is not Unicode: safetensors refuses it,
    # and it could not be written back as UTF-8
    if _SURROGATE_ESCAPE.search(raw):
        for text in _strings(header):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise AdapterFormatError(
                    f"{path}: header holds the string {_short(text)}, which is not valid Unicode (a lone "
                    f"surrogate escape); {_FIX}"
                ) from None
    return header


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _strings(header: Mapping[str, Any]) -> Iterator[str]:
    for name, info in header.items():
        yield name
        if isinstance(info, dict):
            yield from (s for item in info.items() for s in item if isinstance(s, str))


def _metadata(path: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError(
            f"{path}: __metadata__ is a JSON {_json_type(metadata)}; safetensors metadata maps strings to "
            f"strings, so {_FIX}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise AdapterFormatError(
                f"{path}: __metadata__ value of {_short(key)} is a JSON {_json_type(value)}, not a string; "
                f"{_FIX}"
            )
    return metadata


def _entry(path: Path, name: str, info: Any) -> TensorEntry:
    """One tensor's header entry, checked field by field (safetensors' own types: usize, never bool)."""
    if not isinstance(info, dict):
        problem = f"is a JSON {_json_type(info)}, not an object with dtype, shape and data_offsets"
    elif not isinstance(dtype := info.get("dtype"), str):
        problem = f'has dtype {_short(repr(dtype))}, not a dtype name such as "F32"'
    elif not _naturals(shape := info.get("shape")):
        problem = f"has shape {_short(shape)}, not a list of non-negative integers"
    elif _overflows(shape):
        problem = f"has shape {_short(shape)}, whose element count overflows int64"
    elif not _naturals(offsets := info.get("data_offsets")) or len(offsets) != 2:
        problem = f"has data_offsets {_short(offsets)}, not two non-negative integers [begin, end]"
    elif offsets[0] > offsets[1]:
        problem = f"has data_offsets {_short(offsets)}, which end before they begin"
    else:
        if dtype not in DTYPES:
            raise AdapterFormatError(
                f"{path}: tensor {_short(name)} has dtype {_short(dtype, 20)}, which adapterops cannot handle"
            )
        return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    raise AdapterFormatError(f"{path}: tensor {_short(name)} {problem}; {_FIX}")


def _overflows(shape: list[int]) -> bool:
    """The running product leaves int64 (safetensors multiplies in order with checked arithmetic)."""
    n = 1
    for d in shape:
        n *= d
        if n > _INT64_MAX:
            return True
    return False


def _naturals(value: Any) -> TypeGuard[list[int]]:
    """A JSON list of integers in [0, 2**63) (bool is an int in Python, not in JSON)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _INT64_MAX for v in value
    )


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(value: Any, limit: int = 60) -> str:
    """``value`` for a message: strings and exceptions as their text, anything else as ``repr``, escaped
    if unprintable and cut to ``limit`` characters, so a message stays one harmless line whatever the
    input holds."""
    text = str(value) if isinstance(value, str | BaseException) else repr(value)
    if not text.isprintable():  # newlines, terminal escape sequences, lone surrogates: shown escaped
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_tensor(
    handle: BinaryIO, shard: Shard, entry: TensorEntry, *, pin: bool = False, into: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor's bytes with ``os.pread``, into ``into`` (a uint8 buffer at least ``entry.nbytes``
    long, reused by the caller) or fresh, optionally pinned, memory."""
    numel = _numel(entry.shape)
    if into is not None:
        out = into[: entry.nbytes].view(entry.torch_dtype)
    else:
        out = torch.empty(numel, dtype=entry.torch_dtype, pin_memory=pin)
    view = out.view(torch.uint8).numpy().data if numel else memoryview(b"")
    done = 0
    while done < entry.nbytes:
        n = os.preadv(handle.fileno(), [view[done:]], shard.data_start + entry.begin + done)
        if n <= 0:
            raise AdapterFormatError(
                f"{shard.path}: unexpected end of file reading {_short(entry.name)}; the file was truncated "
                "or changed while being read: download or save it again"
            )
        done += n
    return out.reshape(entry.shape)


def encode_header(entries: tuple[TensorEntry, ...], metadata: Mapping[str, str]) -> bytes:
    """The header bytes a ``ShardWriter`` writes: compact UTF-8 JSON (as safetensors writes it),
    padded with spaces so the data section starts 8-byte aligned, as safetensors aligns it."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update({e.name: e.header() for e in entries})
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, from keys no safetensors file can hold
        raise InvalidInputError(
            f"a tensor name or metadata value is not valid Unicode ({_short(exc)}); rename it before saving"
        ) from None
    return raw + b" " * (-len(raw) % 8)


class ShardWriter:
    """Writes a safetensors file whose header is fixed up front; tensors then arrive in order.

    The header never exceeds ``MAX_HEADER`` (safetensors could not load the file): ``optional``
    metadata is written only if it fits, and ``dropped`` names what was left out; if the header
    is too large even without it, ``InvalidInputError`` is raised before anything is written.
    """

    def __init__(
        self,
        path: Path,
        entries: tuple[TensorEntry, ...],
        metadata: Mapping[str, str],
        optional: Mapping[str, str] | None = None,
    ) -> None:
        raw = encode_header(entries, {**metadata, **(optional or {})})
        self.dropped: tuple[str, ...] = ()
        if len(raw) > MAX_HEADER and optional:
            raw, self.dropped = encode_header(entries, metadata), tuple(optional)
        if len(raw) > MAX_HEADER:
            raise InvalidInputError(
                f"{path}: its safetensors header would be {len(raw):,} bytes, over safetensors' limit of "
                f"{MAX_HEADER:,}, so no library could load it; shorten the metadata or split the tensors "
                "over more shards"
            )
        self.path = path
        self.handle = path.open("wb")
        self.handle.write(len(raw).to_bytes(8, "little") + raw)
        self.data_start = 8 + len(raw)
        self.expected = iter(entries)

    def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        self._check_position(entry)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.handle.write(data.view(torch.uint8).numpy().data)

    def copy(
        self, entry: TensorEntry, source: BinaryIO, shard: Shard, source_entry: TensorEntry | None = None
    ) -> None:
        """The bytes of ``source_entry`` (default: ``entry``) of ``shard`` as they are, written as ``entry``;
        copied by the kernel where it can."""
        self._check_position(entry)
        self.handle.flush()
        source_entry = source_entry or entry
        if source_entry.nbytes != entry.nbytes:
            raise RuntimeError(
                f"{self.path}: {entry.name} cannot be copied from {source_entry.name} (sizes differ)"
            )
        remaining, offset = entry.nbytes, shard.data_start + source_entry.begin
        while remaining > 0:  # every pass copies at least one byte or raises: no spinning at EOF
            try:
                n = os.copy_file_range(source.fileno(), self.handle.fileno(), remaining, offset)
            except (OSError, AttributeError):  # AttributeError: no copy_file_range outside Linux
                n = 0
            if n <= 0:  # no kernel copy on this filesystem, or end of file: plain reads tell which
                chunk = os.pread(source.fileno(), min(remaining, 1 << 24), offset)
                if not chunk:
                    raise AdapterFormatError(
                        f"{shard.path}: ends at byte {offset:,}, inside tensor {_short(entry.name)}; the file "
                        "was truncated or changed while being read: download or save it again"
                    )
                self.handle.write(chunk)
                n = len(chunk)
            else:
                self.handle.seek(0, os.SEEK_END)
            remaining -= n
            offset += n

    def _check_position(self, entry: TensorEntry) -> None:
        expected = next(self.expected)
        if expected.name != entry.name or self.handle.tell() != self.data_start + entry.begin:
            raise RuntimeError(f"{self.path}: wrote {entry.name} out of order (expected {expected.name})")

    def close(self) -> None:
        # no fsync: atomicity comes from the final rename; durability across power loss is the
        # filesystem's, as for cp
        self.handle.close()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file with a byte-for-byte reproducible header (sorted names and metadata keys).

    safetensors' own writer keeps metadata in a hash map, so its key order, and the file's bytes,
    change from run to run.
    """
    entries, position = [], 0
    for name in sorted(tensors):
        tensor = tensors[name]
        dtype = next(k for k, v in DTYPES.items() if v == tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(TensorEntry(name, dtype, tuple(tensor.shape), position, position + nbytes))
        position += nbytes
    writer = ShardWriter(path, tuple(entries), dict(sorted(metadata.items())))
    try:
        for entry in entries:
            writer.write(entry, tensors[entry.name])
    finally:
        writer.close()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read sequentially in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Every tensor of an adapter's safetensors file, its metadata and the file's sha256.

    Hashed first (a sequential read), then parsed through mmap, which hits the page cache. A file
    that safetensors (the header) or torch (shapes it cannot hold) refuses is one error line.
    """
    from safetensors import SafetensorError, safe_open

    sha256 = file_sha256(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as exc:
        detail = str(exc).split("\n", 1)[0][:300]  # torch appends a C++ stack trace
        if not detail.isprintable():  # a tensor name's terminal escapes, shown, never sent
            detail = repr(detail)
        raise AdapterFormatError(
            f"{path}: not a readable safetensors file ({detail}); it is corrupt, or the download or save was "
            "cut short: fetch or save it again"
        ) from None
    return tensors, metadata, sha256
