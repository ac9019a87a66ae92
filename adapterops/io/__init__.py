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

from pathlib import Path

from adapterops.adapter import Adapter, Source
from adapterops.io.peft import BIN_NAME, SAFETENSORS_NAME, read_adapter, save_adapter
from adapterops.io.peft_config import CONFIG_NAME
from adapterops.io.refs import resolve

__all__ = ["load_adapter", "save_adapter"]


def load_adapter(ref: str | Path) -> Adapter:
    """Load a PEFT LoRA adapter from a local directory or a Hub id (``org/name`` or ``org/name@rev``).

    Tensors keep their stored dtype. Raises ``NotFoundError`` for a missing path or repo and
    ``AdapterFormatError`` for files adapterops cannot read exactly.
    """
    resolved = resolve(ref, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
    source = Source(path=str(ref), repo_id=resolved.repo_id, revision=resolved.revision)
    return read_adapter(resolved.path, source)
