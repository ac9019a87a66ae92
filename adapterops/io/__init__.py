"""Everything that touches disk or network: one module per format, output directories, Hub resolution.

    refs.py              a local directory or Hub id -> a local folder
    peft.py              PEFT adapter directory <-> Adapter (tensors, keys, layouts)
    peft_config.py       adapter_config.json semantics (ranks, alphas, refused variants)
    safetensors_file.py  the safetensors byte format: headers, pread reads, ordered writer
    checkpoint.py        checkpoint directories: shards, key matching, layouts, base weights
    atomic.py            whole-or-nothing output directories

A new adapter format is one module here plus an entry in ``load_adapter``'s dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter, Source
from adapterops.errors import InvalidInputError
from adapterops.io import peft
from adapterops.io.peft_config import CONFIG_NAME
from adapterops.io.refs import resolve

__all__ = ["FORMATS", "AdapterFormat", "load_adapter", "save_adapter"]


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter file format: how to recognize it, read it and write it.

    ``detect(path)`` says whether a local path holds this format; ``hub_files`` are the patterns
    to download for a Hub id; ``read(path, source)`` returns an ``Adapter``; ``write(adapter, path,
    force=, dtype=)`` writes one atomically.
    """

    name: str
    detect: Callable[[Path], bool]
    hub_files: tuple[str, ...]
    read: Callable[[Path, Source], Adapter]
    write: Callable[..., Path]


# one entry per format, tried in order; the last one's reader explains what a path lacks
FORMATS: dict[str, AdapterFormat] = {
    "peft": AdapterFormat(
        "peft",
        lambda path: (path / CONFIG_NAME).is_file(),
        (CONFIG_NAME, peft.SAFETENSORS_NAME, peft.BIN_NAME),
        peft.read_adapter,
        peft.save_adapter,
    ),
}


def load_adapter(ref: str | Path) -> Adapter:
    """Load an adapter from a local path or a Hub id (``org/name`` or ``org/name@rev``).

    The format is detected (``FORMATS``; PEFT adapter directories today). Tensors keep their
    stored dtype.

    Raises:
        NotFoundError: a missing path, repo or revision.
        AdapterFormatError: files adapterops cannot read exactly.

    Example:
        >>> load_adapter("org/style@v2").source.revision   # the commit the revision resolved to
    """
    patterns = list(dict.fromkeys(p for f in FORMATS.values() for p in f.hub_files))
    resolved = resolve(ref, allow_patterns=patterns)
    source = Source(path=str(ref), repo_id=resolved.repo_id, revision=resolved.revision)
    fmt = next((f for f in FORMATS.values() if f.detect(resolved.path)), list(FORMATS.values())[-1])
    return fmt.read(resolved.path, source)


def save_adapter(adapter: Adapter, path: str | Path, *, format: str = "peft", **options: Any) -> Path:
    """Write ``adapter`` at ``path`` in ``format`` (default ``peft``), atomically.

    ``options`` go to the format's writer: for PEFT, ``force`` (replace an existing ``path``) and
    ``dtype`` (storage dtype of the factors, a torch dtype or its name; default: keep them).

    Example:
        >>> save_adapter(combine(["./a", "./b"]), "./mix", dtype="bfloat16")
    """
    if format not in FORMATS:
        raise InvalidInputError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[format].write(adapter, path, **options)
