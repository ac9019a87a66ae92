"""Everything that touches disk or network: one module per format, output directories, Hub resolution.

    refs.py              a local directory or Hub id -> a local folder
    peft.py              PEFT adapter directory <-> Adapter (tensors, keys, layouts)
    gguf.py              llama.cpp GGUF LoRA file <-> Adapter (tensor names, alpha, q/k permutation)
    kohya.py             kohya LoRA / LoCon single files (Stable Diffusion UNet, text encoders) <-> Adapter
    peft_config.py       adapter_config.json semantics (ranks, alphas, refused variants)
    safetensors_file.py  the safetensors byte format: headers, pread reads, ordered writer
    checkpoint.py        checkpoint directories: shards, key matching, layouts, base weights
    atomic.py            whole-or-nothing output directories

A new adapter format is one module here plus an entry in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter, Source
from adapterops.errors import InvalidInputError
from adapterops.io import gguf, kohya, peft
from adapterops.io.peft_config import CONFIG_NAME
from adapterops.io.refs import resolve

__all__ = ["FORMATS", "AdapterFormat", "load_adapter", "save_adapter"]


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter file format: how to recognize it, read it and write it.

    ``detect(path)`` says whether a local path holds this format; ``hub_files`` are the patterns
    to download for a Hub id; ``read(path, source)`` returns an ``Adapter``; ``write(adapter, path,
    force=, dtype=)`` writes one atomically (GGUF takes ``base=`` too). ``single_file``: the format is
    one file (read from a file path, written to one), not a directory.
    """

    name: str
    detect: Callable[[Path], bool]
    hub_files: tuple[str, ...]
    read: Callable[[Path, Source], Adapter]
    write: Callable[..., Path]
    single_file: bool = False


# one entry per format, tried in order; PEFT's reader explains what a path lacks
FORMATS: dict[str, AdapterFormat] = {
    "kohya": AdapterFormat("kohya", kohya.detect, (), kohya.read_adapter, kohya.save_adapter, True),
    "peft": AdapterFormat(
        "peft",
        lambda path: (path / CONFIG_NAME).is_file(),
        (CONFIG_NAME, peft.SAFETENSORS_NAME, peft.BIN_NAME),
        peft.read_adapter,
        peft.save_adapter,
    ),
    "gguf": AdapterFormat("gguf", gguf.is_gguf_adapter, (), gguf.read_adapter, gguf.save_adapter, True),
}


def load_adapter(ref: str | Path, base: str | Path | Mapping[str, Any] | None = None) -> Adapter:
    """Load an adapter from a local path or a Hub id (``org/name`` or ``org/name@rev``).

    The format is detected (``FORMATS``: PEFT adapter directories, kohya ``.safetensors`` files,
    GGUF LoRA files). Tensors keep their stored dtype. ``base`` (kohya files only: a diffusers UNet
    folder or a state dict) maps kohya's flattened names back to module names through the base's
    own names.

    Raises:
        NotFoundError: a missing path, repo or revision.
        AdapterFormatError: files adapterops cannot read exactly.

    Example:
        >>> load_adapter("org/style@v2").source.revision   # the commit the revision resolved to
    """
    local = Path(ref).expanduser()
    if kohya.detect(local):  # ``base`` maps kohya's flattened names back to module names
        return kohya.read_adapter(local, Source(path=str(ref)), base=base)
    if base is not None:
        raise InvalidInputError(f"{ref}: a base for reading applies to kohya files only")
    for fmt in FORMATS.values():  # single files are read where they are; resolve refuses files
        if fmt.single_file and fmt.detect(local):
            return fmt.read(local, Source(path=str(ref)))
    patterns = list(dict.fromkeys(p for f in FORMATS.values() for p in f.hub_files))
    resolved = resolve(ref, allow_patterns=patterns)
    source = Source(path=str(ref), repo_id=resolved.repo_id, revision=resolved.revision)
    fmt = next((f for f in FORMATS.values() if f.detect(resolved.path)), FORMATS["peft"])
    return fmt.read(resolved.path, source)


def save_adapter(adapter: Adapter, path: str | Path, *, format: str | None = None, **options: Any) -> Path:
    """Write ``adapter`` at ``path`` in ``format``, atomically.

    The default format is the one the adapter was read in (``adapter.config["format"]``; a
    combination keeps its first input's), else ``peft``.

    ``options`` go to the format's writer: for PEFT, ``force`` (replace an existing ``path``) and
    ``dtype`` (storage dtype of the factors, a torch dtype or its name; default: keep them). GGUF
    also needs ``base`` (the base model's directory or Hub id, for its config.json).

    Example:
        >>> save_adapter(combine(["./a", "./b"]), "./mix", dtype="bfloat16")
    """
    if format is None:
        format = str(adapter.config.get("format", "peft"))
    if format not in FORMATS:
        raise InvalidInputError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    suffix = Path(path).suffix
    if not FORMATS[format].single_file and suffix in (".safetensors", ".gguf"):
        # a directory under a file's name would hide what was written
        raise InvalidInputError(
            f"{path}: the result is a {format} adapter, which is a directory, not a {suffix} file; name the "
            f"output without {suffix}, or convert it --to kohya or gguf"
        )
    return FORMATS[format].write(adapter, path, **options)
