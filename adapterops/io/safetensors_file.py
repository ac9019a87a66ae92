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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from adapterops.errors import AdapterFormatError

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
MAX_HEADER = 100 * 1024 * 1024


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
    """Parse and check a safetensors header: offsets contiguous, in order, within the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise AdapterFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        length = int.from_bytes(raw, "little")
        if length > min(MAX_HEADER, size - 8):
            raise AdapterFormatError(
                f"{path}: header length {length} does not fit the file; it is truncated or not safetensors"
            )
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(
                f"{path}: header is not valid JSON ({exc}); the file is corrupt"
            ) from exc
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = TensorEntry(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"{path}: header entry {name!r} is malformed ({exc})") from exc
        if entry.dtype not in DTYPES:
            raise AdapterFormatError(
                f"{path}: tensor {name} has dtype {entry.dtype}, which adapterops cannot handle"
            )
        entries.append(entry)
    entries.sort(key=lambda e: e.begin)
    position = 0
    for entry in entries:
        element = torch.empty((), dtype=entry.torch_dtype).element_size()
        expected = element * _numel(entry.shape)
        if entry.begin != position or entry.nbytes != expected:
            raise AdapterFormatError(
                f"{path}: tensor {entry.name} occupies bytes {entry.begin}-{entry.end}, expected "
                f"{position}-{position + expected}; the file is corrupt"
            )
        position = entry.end
    data_start = 8 + length
    if data_start + position != size:
        raise AdapterFormatError(
            f"{path}: {size} bytes on disk but the header describes {data_start + position}; the file is "
            "truncated or was modified: download or save it again"
        )
    return Shard(path=path, data_start=data_start, entries=tuple(entries), metadata=dict(metadata))


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
            raise AdapterFormatError(f"{shard.path}: unexpected end of file reading {entry.name}")
        done += n
    return out.reshape(entry.shape)


class ShardWriter:
    """Writes a safetensors file whose header is fixed up front; tensors then arrive in order."""

    def __init__(self, path: Path, entries: tuple[TensorEntry, ...], metadata: Mapping[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        header.update({e.name: e.header() for e in entries})
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
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

    def copy(self, entry: TensorEntry, source: BinaryIO, shard: Shard) -> None:
        """The input's bytes for ``entry`` as they are, copied by the kernel where it can."""
        self._check_position(entry)
        self.handle.flush()
        remaining, offset = entry.nbytes, shard.data_start + entry.begin
        while remaining:
            try:
                n = os.copy_file_range(source.fileno(), self.handle.fileno(), remaining, offset)
            except OSError:
                n = 0
            if n <= 0:  # no kernel copy on this filesystem: plain reads
                chunk = os.pread(source.fileno(), min(remaining, 1 << 24), offset)
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
