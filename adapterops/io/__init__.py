"""Everything that touches disk or network: adapter formats, output directories, Hub resolution."""

from __future__ import annotations

from pathlib import Path

from adapterops.adapter import Adapter, Source
from adapterops.io.hub import resolve
from adapterops.io.peft import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, read_adapter, save_adapter

__all__ = ["load_adapter", "save_adapter"]


def load_adapter(ref: str | Path) -> Adapter:
    """Load a PEFT LoRA adapter from a local directory or a Hub id (``org/name`` or ``org/name@rev``).

    Tensors keep their stored dtype. Raises ``NotFoundError`` for a missing path or repo and
    ``AdapterFormatError`` for files adapterops cannot read exactly.
    """
    resolved = resolve(ref, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
    source = Source(path=str(ref), repo_id=resolved.repo_id, revision=resolved.revision)
    return read_adapter(resolved.path, source)
