"""What every output records about how it was made: one schema, one place.

An adapter's record (safetensors metadata key ``adapterops``, and its README card) is a dict:

    {"operation": "combine", "method": ..., "weights": [...], "inputs": [input_record, ...],
     "base": checkpoint_record (DoRA verbs), "adapterops_version": ..., and from the CLI or a
     recipe: "command" or "recipe" + "recipe_step", "summary"}

A merged checkpoint's record (``adapterops_merge.json`` and every shard's metadata key
``adapterops``) lists what is merged into it and the history of merges and unmerges:

    {"merged": [adapter_entry, ...], "history": [{"operation", "base", "adapters", "adapterops_version"}]}

DoRA merges also keep the row norms unmerge needs (``adapterops_dora_norms.safetensors``), keyed
``<first 16 hex of the adapter's sha256>/<tensor name>``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file

from adapterops._version import __version__
from adapterops.adapter import Adapter
from adapterops.errors import InvalidInputError, UnsupportedAdapterError, param
from adapterops.io.checkpoint import Checkpoint

RECORD_NAME = "adapterops_merge.json"
RECORD_KEY = "adapterops"  # safetensors metadata key, in adapters and in merged shards
NORMS_NAME = "adapterops_dora_norms.safetensors"


def input_record(adapter: Adapter) -> dict[str, Any]:
    """Where an input came from (path or repo_id@revision, sha256) and, if recorded, how it was made."""
    record: dict[str, Any] = adapter.source.as_dict() if adapter.source else {"path": "<in memory>"}
    if adapter.provenance:
        record["made_by"] = adapter.provenance
    return record


def checkpoint_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """A base checkpoint as a record: its path, and its Hub id and commit when it came from the Hub."""
    record: dict[str, Any] = {"path": str(checkpoint.root)}
    if checkpoint.repo_id:
        record.update(repo_id=checkpoint.repo_id, revision=checkpoint.revision)
    return record


def operation_record(operation: str, inputs: Sequence[Adapter], **fields: Any) -> dict[str, Any]:
    """An adapter verb's record: operation, inputs, the given fields (None values dropped), version."""
    record: dict[str, Any] = {"operation": operation}
    record.update({k: v for k, v in fields.items() if v is not None})
    record["inputs"] = [input_record(a) for a in inputs]
    record["adapterops_version"] = __version__
    return record


# ------------------------------------------------------------------------------------- merge records


def adapter_entry(adapter: Adapter, weight: float) -> dict[str, Any]:
    entry = adapter.source.as_dict() if adapter.source else {"path": "<in memory>"}
    return {**entry, "weight": weight, "modules": len(adapter.modules), "dora": adapter.is_dora}


def read_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """The merge record a checkpoint carries (sidecar file, else shard metadata); empty if none."""
    path = checkpoint.root / RECORD_NAME
    try:
        if path.is_file():
            record = json.loads(path.read_text())
        else:
            texts = [s.metadata[RECORD_KEY] for s in checkpoint.shards if RECORD_KEY in s.metadata]
            record = json.loads(texts[0]) if texts else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"{checkpoint.describe()}: its merge record is not valid JSON ({exc})"
        ) from None
    if not isinstance(record, dict):
        raise InvalidInputError(f"{checkpoint.describe()}: its merge record is not a JSON object")
    return record


def next_record(
    prior: Mapping[str, Any],
    checkpoint: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    operation: str,
    remerge: bool,
) -> dict[str, Any]:
    """The record after merging (or unmerging) ``adapters`` into a checkpoint whose record is ``prior``."""
    merged = [dict(e) for e in prior.get("merged", [])]
    for adapter, weight in zip(adapters, weights, strict=True):
        sha = adapter.source.sha256 if adapter.source else None
        listed = [e for e in merged if sha and e.get("sha256") == sha]
        if operation == "merge":
            if listed and not remerge:
                raise InvalidInputError(
                    f"{adapter.describe()} is already merged into this checkpoint (its record lists sha256 {sha}); "
                    f"pass {param('remerge', True)} to merge it again"
                )
            merged.append(adapter_entry(adapter, weight))
        elif listed:
            merged.remove(listed[0])
        else:
            warnings.warn(
                f"{adapter.describe()} is not listed in the checkpoint's merge record; unmerging it anyway",
                UserWarning,
                stacklevel=4,
            )
    step = {
        "operation": operation,
        "base": checkpoint_record(checkpoint),
        "adapters": [adapter_entry(a, w) for a, w in zip(adapters, weights, strict=True)],
        "adapterops_version": __version__,
    }
    return {"merged": merged, "history": [*prior.get("history", []), step]}


def norms_prefix(adapter: Adapter) -> str:
    return f"{((adapter.source.sha256 if adapter.source else None) or '')[:16]}/"


def recorded_norms(checkpoint: Checkpoint, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The DoRA row norms the merge of ``adapter`` recorded, by tensor name."""
    path = checkpoint.root / NORMS_NAME
    if not path.is_file():
        raise UnsupportedAdapterError(
            f"{checkpoint.describe()}: no {NORMS_NAME}; a DoRA merge cannot be undone without the row norms its "
            "merge recorded (merge with adapterops to keep them)"
        )
    prefix = norms_prefix(adapter)
    norms = {k.removeprefix(prefix): v for k, v in load_file(path).items() if k.startswith(prefix)}
    if not norms:
        raise UnsupportedAdapterError(
            f"{path}: no row norms recorded for {adapter.describe()} (sha256 {adapter.source and adapter.source.sha256})"
        )
    return norms
