"""The one model-card renderer: the README.md every output carries, and the card a push uploads.

A card is YAML card data (library, base model, tags) and a lineage section rendered from the
output's record (``provenance``): the command or recipe, the operation and its options, the
inputs (Hub id @ revision, or the local directory's *name*: no absolute local paths in a card),
their sha256, weights, and the adapterops version.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from adapterops._version import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LINEAGE_START = "<!-- adapterops lineage: start (rewritten by adapterops; text outside it is kept) -->"
LINEAGE_END = "<!-- adapterops lineage: end -->"
_FIELDS = (
    "operation",
    "method",
    "space",
    "density",
    "majority_sign",
    "seed",
    "common_fraction",
    "weights",
    "rank",
    "energy",
    "sv_ratio",
    "max_rank",
    "budget_params",
    "budget_error",
    "by",
    "form",
    "finetuned",
    "base",
    "summary",
)


def render_card(
    kind: str,
    title: str,
    provenance: Mapping[str, Any],
    *,
    base_model: str | None = None,
    facts: Sequence[str] = (),
) -> str:
    """A README.md for an ``adapter`` or a merged ``checkpoint``.

    ``base_model`` goes into the card data only when it is a Hub id. ``facts`` are extra lines
    (module counts, file hashes) listed after the lineage.

    Example: ``render_card("adapter", "mix", {"operation": "negate"})`` starts with
    ``---\\nlibrary_name: peft\\n`` and lists ``- operation: `negate```.
    """
    checkpoint = kind == "checkpoint"
    merged = checkpoint and bool(provenance.get("merged") or provenance.get("history"))
    lines = ["---", f"library_name: {'transformers' if checkpoint else 'peft'}"]
    if base_model and _HUB_ID.match(base_model):
        lines.append(f"base_model: {base_model}")  # a Hub id: a plain YAML scalar
    lines += ["tags:", "- adapterops", *(["- lora"] if merged or not checkpoint else [])]
    lines += [*(["- merge"] if merged else []), "---", ""]
    lines += [f"# {title}", "", _what(checkpoint, merged), "", lineage_section(provenance, facts)]
    return "\n".join(lines)


def lineage_section(provenance: Mapping[str, Any], facts: Sequence[str] = ()) -> str:
    """The ``## Lineage`` section between markers, so a later write can replace just this part."""
    lines = [LINEAGE_START, "## Lineage", ""]
    lines += lineage_lines(provenance) or ["No adapterops record: this output was not made by adapterops."]
    lines += [f"- {fact}" for fact in facts]
    lines += ["", f"Card written by adapterops {__version__}.", LINEAGE_END, ""]
    return "\n".join(lines)


def with_lineage(readme: str, section: str) -> str:
    """``readme`` (a card someone wrote) with its adapterops lineage section replaced, or appended."""
    start, end = readme.find(LINEAGE_START), readme.find(LINEAGE_END)
    if start != -1 and end > start:
        return readme[:start] + section.rstrip("\n") + readme[end + len(LINEAGE_END) :]
    return readme.rstrip("\n") + "\n\n" + section


def _what(checkpoint: bool, merged: bool) -> str:
    if merged:
        return (
            "A checkpoint with LoRA adapters merged in. Load it as the base model loads, with the transformers "
            "class its config.json names (`AutoModelForCausalLM.from_pretrained(path_or_repo_id)` for a causal LM)."
        )
    if checkpoint:
        return "A checkpoint. Load it with the transformers class its config.json names."
    return "A LoRA adapter. Load it with `PeftModel.from_pretrained(base_model, path_or_repo_id)`."


def public_name(item: Mapping[str, Any]) -> str:
    """How a card names an input or base: its Hub id, else the local directory's name."""
    if item.get("repo_id"):
        return str(item["repo_id"])
    return PurePath(str(item.get("path", "?"))).name or str(item.get("path", "?"))


_ABSOLUTE = re.compile(r"""(?<![\w./~-])(?:/|~/)[^\s'"\]\[{},]*""")


def without_local_paths(text: str) -> str:
    """``text`` with every absolute local path replaced by its last component: a public card must not
    show the author's directories. Example: ``merge /home/me/base ./a`` -> ``merge base ./a``."""
    return _ABSOLUTE.sub(lambda m: PurePath(m.group(0)).name or m.group(0), text)


def lineage_lines(provenance: Mapping[str, Any]) -> list[str]:
    """The lineage section of a card, from an adapter's record or a checkpoint's merge record."""
    lines: list[str] = []
    if provenance.get("command"):
        lines += ["```", without_local_paths(str(provenance["command"])), "```", ""]
    if provenance.get("recipe"):
        recipe = without_local_paths(str(provenance["recipe"]).rstrip())
        lines += ["Recipe:", "", "```yaml", recipe, "```", ""]
    for key in _FIELDS:
        value = provenance.get(key)
        if value is not None:
            if key in ("finetuned", "base") and isinstance(value, Mapping):
                value = public_name(value) + (f"@{value['revision']}" if value.get("revision") else "")
            lines.append(f"- {key}: `{value}`")
    for item in [*(provenance.get("inputs") or []), *(provenance.get("merged") or [])]:
        revision = f" @ `{item['revision']}`" if item.get("revision") else ""
        sha = f" (sha256 `{item['sha256']}`)" if item.get("sha256") else ""
        weight = f", weight {item['weight']}" if "weight" in item else ""
        lines.append(f"- input: `{public_name(item)}`{revision}{sha}{weight}")
    if provenance.get("adapterops_version"):
        lines.append(f"- made with adapterops {provenance['adapterops_version']}")
    for step in provenance.get("history", []):
        names = ", ".join(public_name(a) for a in step.get("adapters", []))
        base = step.get("base") or {}
        into = f" into `{public_name(base)}`" + (f" @ `{base['revision']}`" if base.get("revision") else "")
        lines.append(
            f"- {step.get('operation')}: {names}{into if base else ''} (adapterops {step.get('adapterops_version')})"
        )
        if step.get("command"):
            lines.append(f"  - command: `{without_local_paths(str(step['command']))}`")
        for shard, sha in sorted((base.get("shards") or {}).items()):
            lines.append(f"  - base shard `{shard}` sha256 `{sha}`")
    return lines
