"""What every output records about how it was made: one schema, one place.

An adapter's record (safetensors metadata key ``adapterops``, and its README card) is a dict:

    {"operation": "combine", "method": ..., "weights": [...], "inputs": [input_record, ...],
     "base": checkpoint_record (DoRA verbs), "adapterops_version": ..., and from the CLI or a
     recipe: "command" or "recipe" + "recipe_step", "summary"}

A merged checkpoint's record (``adapterops_merge.json`` and every shard's metadata key
``adapterops``) lists what is merged into it and the history of merges and unmerges:

    {"merged": [adapter_entry, ...], "history": [{"operation", "base", "adapters", "adapterops_version"}]}

A step may also say how the weights were written: ``dtype`` (a quantized base written
dequantized), ``quantization`` (written quantized: its format and each requantized tensor's
error, for ``verify``), and ``notes`` (an lm_head untied from the embedding).

DoRA merges also keep the row norms unmerge needs, keyed ``<first 16 hex of the adapter's
sha256>/<tensor name>``, in ``adapterops/dora_norms.safetensors``: a subfolder, because serving
engines load every top-level ``*.safetensors`` of a directory without an index as weights.
Outputs of adapterops 0.1.0 kept them at the top level (``LEGACY_NORMS_NAME``); both are read.

Records are read from files anyone can edit: ``read_record`` and ``recorded_norms`` check what
they hold before anything uses it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from adapterops._version import __version__
from adapterops.adapter import Adapter
from adapterops.errors import InvalidInputError, UnsupportedAdapterError, param
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.peft import file_sha256

RECORD_NAME = "adapterops_merge.json"
RECORD_KEY = "adapterops"  # safetensors metadata key, in adapters and in merged shards
_SHA256 = re.compile(r"[0-9a-f]{64}")
NORMS_NAME = "adapterops/dora_norms.safetensors"
LEGACY_NORMS_NAME = "adapterops_dora_norms.safetensors"


def input_record(adapter: Adapter) -> dict[str, Any]:
    """Where an input came from (path or repo_id@revision, sha256) and, if recorded, how it was made.

    An adapter that was never a file (made in memory, or by an earlier recipe step that wrote no
    output) is identified by ``content_sha256``, a digest of its tensors.
    """
    record: dict[str, Any] = adapter.source.as_dict() if adapter.source else {"path": "<in memory>"}
    if not record.get("sha256"):
        record["content_sha256"] = content_sha256(adapter)
    if adapter.provenance:
        record["made_by"] = adapter.provenance
    return record


def content_sha256(adapter: Adapter) -> str:
    """sha256 of an adapter's tensors and scales (``Adapter.content_sha256``, computed once per object)."""
    return adapter.content_sha256


def checkpoint_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """A base checkpoint as a record: its path, its Hub id and commit when it came from the Hub, and
    the sha256 of its shards where they are known without reading them (Hub cache blobs are named
    by their sha256); ``shard_sha256s`` computes the others."""
    record: dict[str, Any] = {"path": str(checkpoint.root)}
    if checkpoint.repo_id:
        record.update(repo_id=checkpoint.repo_id, revision=checkpoint.revision)
    known = _known_shard_sha256s(checkpoint)
    if len(known) == len(checkpoint.shards):
        record["shards"] = known
    return record


def _known_shard_sha256s(checkpoint: Checkpoint) -> dict[str, str]:
    if not checkpoint.repo_id:
        return {}
    found = {}
    for shard in checkpoint.shards:
        blob = shard.path.resolve().name
        if _SHA256.fullmatch(blob):
            found[shard.path.name] = blob
    return found


def shard_sha256s(checkpoint: Checkpoint) -> dict[str, str]:
    """The sha256 of every shard file of ``checkpoint`` (read in full where not known already)."""
    known = _known_shard_sha256s(checkpoint)
    return {s.path.name: known.get(s.path.name) or file_sha256(s.path) for s in checkpoint.shards}


def with_shard_sha256s(record: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, Any]:
    """``record`` with the base of its last history step naming its shards' sha256."""
    history = [dict(step) for step in record.get("history", [])]
    if history:
        history[-1]["base"] = {**dict(history[-1].get("base") or {}), "shards": dict(hashes)}
    return {**record, "history": history}


def operation_record(operation: str, inputs: Sequence[Adapter], **fields: Any) -> dict[str, Any]:
    """An adapter verb's record: operation, inputs, the given fields (None values dropped), version."""
    record: dict[str, Any] = {"operation": operation}
    record.update({k: v for k, v in fields.items() if v is not None})
    record["inputs"] = [input_record(a) for a in inputs]
    record["adapterops_version"] = __version__
    return record


# ------------------------------------------------------------------------------------- merge records


def adapter_entry(adapter: Adapter, weight: float) -> dict[str, Any]:
    """An adapter in a merge record: where it came from (as ``input_record``), its weight, its size."""
    entry = input_record(adapter)
    entry.pop("made_by", None)
    if adapter.provenance:
        entry["operation"] = adapter.provenance.get("operation")
    return {**entry, "weight": weight, "modules": len(adapter.modules), "dora": adapter.is_dora}


def read_record(checkpoint: Checkpoint) -> dict[str, Any]:
    """The merge record a checkpoint carries (sidecar file, else shard metadata); empty if none.

    The record is checked: ``merged`` and ``history`` are lists of objects, sha256 values are
    strings and weights numbers. Anything else is an error that names the file.
    """
    path = checkpoint.root / RECORD_NAME
    sidecar = path.is_file() and not checkpoint.single_file  # a single file's folder is not its own
    where = str(path) if sidecar else f"{checkpoint.describe()} (shard metadata {RECORD_KEY!r})"
    try:
        if sidecar:
            record = json.loads(path.read_text())
        else:
            texts = [s.metadata[RECORD_KEY] for s in checkpoint.shards if RECORD_KEY in s.metadata]
            record = json.loads(texts[0]) if texts else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{where}: the merge record is not valid JSON ({exc}); {_FIX}") from None
    _check_record(record, where)
    return record


_FIX = "restore it from the merge's output or delete it (the checkpoint then counts as never merged)"


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: the merge record is not a JSON object; {_FIX}")
    for key in ("merged", "history"):
        items = record.get(key, [])
        if not isinstance(items, list) or not all(isinstance(e, dict) for e in items):
            raise InvalidInputError(f"{where}: the merge record's {key!r} is not a list of objects; {_FIX}")
    for entry in record.get("merged", []):
        sha, weight = entry.get("sha256"), entry.get("weight", 1.0)
        if (
            (sha is not None and not isinstance(sha, str))
            or isinstance(weight, bool)
            or not isinstance(weight, int | float)
        ):
            raise InvalidInputError(
                f"{where}: the merge record lists an adapter with a malformed sha256 or weight; {_FIX}"
            )


def identity(adapter: Adapter) -> str:
    """What identifies an adapter in records: its file's sha256, else the digest of its tensors."""
    return (adapter.source.sha256 if adapter.source else None) or content_sha256(adapter)


def _entry_identity(entry: Mapping[str, Any]) -> str | None:
    return entry.get("sha256") or entry.get("content_sha256")


def recorded_weights(record: Mapping[str, Any], adapters: Sequence[Adapter]) -> list[float | None]:
    """The weight the record lists for each adapter (by sha256), None where it lists none."""
    listed = {_entry_identity(e): float(e.get("weight", 1.0)) for e in record.get("merged", [])}
    listed.pop(None, None)
    return [listed.get(identity(a)) for a in adapters]


def weights_for(
    record: Mapping[str, Any],
    adapters: Sequence[Adapter],
    given: Sequence[float] | None,
    ignore_record: bool,
    where: str,
) -> list[float]:
    """The weights to unmerge or verify with: those given, else those the merge record lists (1
    where it lists none). Given weights that contradict the record are an error unless ``ignore_record``."""
    recorded = recorded_weights(record, adapters)
    if given is None:
        if not record:
            warnings.warn(
                f"{where} has no merge record; assuming weight 1 for each adapter", UserWarning, stacklevel=4
            )
        return [1.0 if r is None else r for r in recorded]
    for adapter, weight, listed in zip(adapters, given, recorded, strict=True):
        if listed is not None and listed != float(weight) and not ignore_record:
            raise InvalidInputError(
                f"{adapter.describe()} was merged into {where} with weight {listed} (its merge record says so), "
                f"not {weight}; leave the weights out to use the recorded ones, or pass "
                f"{param('ignore_record', True)}"
            )
    return [float(w) for w in given]


def next_record(
    prior: Mapping[str, Any],
    checkpoint: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    operation: str,
    remerge: bool,
    command: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record after merging (or unmerging) ``adapters`` into a checkpoint whose record is ``prior``.

    ``fields`` go into this step as they are (``dtype``, ``notes`` on untying)."""
    merged = [dict(e) for e in prior.get("merged", [])]
    for adapter, weight in zip(adapters, weights, strict=True):
        sha = identity(adapter)
        listed = [e for e in merged if _entry_identity(e) == sha]
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
        **({"command": command} if command else {}),
        **dict(fields or {}),
    }
    return {"merged": merged, "history": [*prior.get("history", []), step]}


def with_quantization(
    record: Mapping[str, Any], description: str, errors: Mapping[str, Any]
) -> dict[str, Any]:
    """``record`` with its last history step naming the quantization its weights were written in, and
    each requantized tensor's error (``ops.quantize.QuantizationError`` as a dict)."""
    history = [dict(step) for step in record.get("history", [])]
    if history:
        history[-1]["quantization"] = {"format": description, "tensors": dict(sorted(errors.items()))}
    return {**record, "history": history}


def recorded_quantization(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-tensor quantization errors the last merge of ``record`` reported (empty if none)."""
    history = record.get("history") or [{}]
    tensors = (history[-1].get("quantization") or {}).get("tensors") or {}
    return {k: dict(v) for k, v in tensors.items() if isinstance(v, dict)}


def norms_prefix(adapter: Adapter) -> str:
    return f"{identity(adapter)[:16]}/"


def recorded_norms(checkpoint: Checkpoint, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The DoRA row norms the merge of ``adapter`` recorded, by tensor name, checked finite and positive."""
    path = checkpoint.root / NORMS_NAME
    if not path.is_file():
        path = checkpoint.root / LEGACY_NORMS_NAME
    if not path.is_file() or checkpoint.single_file:
        raise UnsupportedAdapterError(
            f"{checkpoint.describe()}: no {NORMS_NAME}; a DoRA merge cannot be undone without the row norms its "
            "merge recorded (merge with adapterops to keep them)"
        )
    try:
        stored = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise InvalidInputError(
            f"{path}: not a readable safetensors file ({exc}); restore it from the merge"
        ) from None
    prefix = norms_prefix(adapter)
    norms = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
    if not norms:
        raise UnsupportedAdapterError(
            f"{path}: no row norms recorded for {adapter.describe()} (sha256 {identity(adapter)})"
        )
    for key, norm in norms.items():
        if (
            norm.dim() != 1
            or not norm.is_floating_point()
            or not bool((torch.isfinite(norm) & (norm > 0)).all())
        ):
            raise InvalidInputError(
                f"{path}: the row norms of {key} are not a vector of positive finite numbers; restore it from the merge"
            )
    return norms


def norms_file(root: Path) -> Path | None:
    """Where a checkpoint directory keeps its DoRA row norms (this version's place, else the old one)."""
    for name in (NORMS_NAME, LEGACY_NORMS_NAME):
        if (root / name).is_file():
            return root / name
    return None
