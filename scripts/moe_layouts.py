"""Write adapterops/io/moe_layouts.py from transformers' own checkpoint conversion mapping.

transformers 5 keeps mixture-of-experts weights fused in memory (``mlp.experts.gate_up_proj``, an
(E, 2I, H) parameter) but many checkpoints store them per expert (``experts.N.gate_proj.weight``).
Its ``conversion_mapping`` says how one becomes the other; adapterops needs the same facts to merge
an adapter on the fused parameter into the per-expert tensors, without importing transformers.
This script extracts them, so the table is derived rather than copied by hand:

- per model type, each fused parameter's per-expert source tensors, in concatenation order
  (``WeightConverter`` with exactly ``MergeModulelist(dim=0)`` [+ ``Concatenate(dim=1)``]);
- per model type, its key renamings (``WeightRenaming``: the regex transformers compiles and its
  replacement, e.g. Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``), when none captures groups;
- the model types whose fused experts are stored (E, in, out) (``use_experts_implementation(
  is_transposed=True)`` in their modeling file), for fused checkpoints whose shapes cannot tell.

Model types with any other expert conversion (interleaved, transposed or split experts) are left
out: adapterops refuses to merge fused-parameter LoRA into their per-expert checkpoints.

python scripts/moe_layouts.py           # rewrite adapterops/io/moe_layouts.py
python scripts/moe_layouts.py --check   # exit 1 if it is stale (a test runs this check)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parent.parent / "adapterops" / "io" / "moe_layouts.py"

_REGEX_META = re.compile(r"[\\^$*+?{}\[\]()|]")


def _expert_converter(converter: Any) -> tuple[str, tuple[str, ...]] | None:
    """(fused parameter path, per-expert source leaves) for a plain stack [+ concat] of experts."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []))
    sources = list(converter._original_source_patterns)
    targets = list(converter._original_target_patterns)
    plain_stack = [type(op) for op in ops] == [MergeModulelist] and ops[0].dim == 0 and len(sources) == 1
    stack_concat = (
        [type(op) for op in ops] == [MergeModulelist, Concatenate]
        and ops[0].dim == 0
        and ops[1].dim == 1
        and len(sources) > 1
    )
    if not (plain_stack or stack_concat) or len(targets) != 1:
        return None
    containers, leaves = set(), []
    for source in sources:
        text = source.replace(r"\.", ".")
        if text.count(".*.") != 1 or _REGEX_META.search(text.replace(".*.", ".")):
            return None
        container, leaf = text.split(".*.")
        containers.add(container.lstrip("."))
        leaves.append(leaf)
    target = targets[0].replace(r"\.", ".").lstrip(".")
    (container,) = containers if len(containers) == 1 else (None,)
    if container is None or not target.startswith(container + ".") or _REGEX_META.search(target):
        return None
    return target, tuple(leaves)


def _transposed_model_types() -> list[str]:
    import transformers

    models = Path(transformers.__file__).parent / "models"
    found = set()
    for modeling in sorted(models.glob("*/modeling_*.py")):
        text = modeling.read_text()
        if not re.search(r"@use_experts_implementation\([^)]*is_transposed=True", text):
            continue
        for configuration in modeling.parent.glob("configuration_*.py"):
            found.update(re.findall(r'^\s+model_type = "([^"]+)"', configuration.read_text(), flags=re.M))
    return sorted(found)


def extract() -> tuple[dict[str, dict[str, tuple[str, ...]]], dict[str, list[tuple[str, str]]], list[str]]:
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    experts: dict[str, dict[str, tuple[str, ...]]] = {}
    renamings: dict[str, list[tuple[str, str]]] = {}
    for model_type, transforms in sorted(_build_checkpoint_conversion_mapping().items()):
        fused: dict[str, tuple[str, ...]] = {}
        renames: list[tuple[str, str]] | None = []
        unsupported = False
        for transform in transforms:
            if isinstance(transform, WeightConverter):
                parsed = _expert_converter(transform)
                if parsed is not None:
                    fused[parsed[0]] = parsed[1]
                elif any("expert" in p for p in transform._original_source_patterns):
                    unsupported = True
            elif type(transform) is WeightRenaming and renames is not None:
                # the regex transformers compiles and the replacement it substitutes for the match
                replacement = transform.target_patterns[0] if len(transform.target_patterns) == 1 else "\\1"
                if len(transform.source_patterns) != 1 or re.search(r"\\\d", replacement):
                    renames = None  # a one-to-many or capturing renaming: not reproduced here
                else:
                    renames.append((transform.compiled_sources.pattern, replacement))
            else:
                renames = None  # PrefixChange and the like
        if fused and not unsupported:
            experts[model_type] = fused
            if renames:
                renamings[model_type] = renames
    return experts, renamings, _transposed_model_types()


def _str(text: str) -> str:
    return json.dumps(text)  # a double-quoted Python literal, as ruff format writes it


def render() -> str:
    import transformers

    experts, renamings, transposed = extract()
    layouts: dict[tuple[tuple[str, tuple[str, ...]], ...], list[str]] = {}
    for model_type, fused in experts.items():
        layouts.setdefault(tuple(sorted(fused.items())), []).append(model_type)
    lines = [
        '"""Mixture-of-experts checkpoint layouts, generated by scripts/moe_layouts.py from transformers',
        f"{transformers.__version__}'s conversion mapping; do not edit (a test checks it is current).",
        "",
        "``EXPERTS[model_type]`` maps a fused expert parameter (as transformers names it in memory, from",
        "its experts module on) to the per-expert tensors a checkpoint stores instead, in concatenation",
        "order: expert ``e`` of ``mlp.experts.gate_up_proj`` is ``mlp.experts.<e>.gate_proj.weight`` on top",
        "of ``mlp.experts.<e>.up_proj.weight`` (rows). ``RENAMINGS[model_type]`` are the key renamings",
        "transformers applies to checkpoint keys on load, in order: the regex it searches for and the",
        "replacement of the first match. ``TRANSPOSED`` lists the model types whose fused experts are",
        "stored (E, in, out) rather than (E, out, in).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from collections.abc import Mapping",
        "from types import MappingProxyType",
        "",
    ]
    names = {}
    for i, (layout, model_types) in enumerate(sorted(layouts.items(), key=lambda kv: kv[1][0])):
        names[layout] = f"_LAYOUT_{i}"
        shown = ", ".join(model_types[:4]) + (", ..." if len(model_types) > 4 else "")
        lines.append(f"{names[layout]}: dict[str, tuple[str, ...]] = {{  # {shown}")
        for param, leaves in layout:
            joined = ", ".join(_str(leaf) for leaf in leaves) + ("," if len(leaves) == 1 else "")
            lines.append(f"    {_str(param)}: ({joined}),")
        lines.append("}")
    lines += ["", "EXPERTS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(", "    {"]
    for model_type, fused in experts.items():
        lines.append(f"        {_str(model_type)}: {names[tuple(sorted(fused.items()))]},")
    lines += [
        "    }",
        ")",
        "",
        "RENAMINGS: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType(",
        "    {",
    ]
    for model_type, renames in renamings.items():
        lines.append(f"        {_str(model_type)}: (")
        lines += [f"            ({_str(pattern)}, {_str(replacement)})," for pattern, replacement in renames]
        lines.append("        ),")
    lines += ["    }", ")", "", "TRANSPOSED = frozenset(", "    {"]
    lines += [f"        {_str(model_type)}," for model_type in transposed]
    lines += ["    }", ")", ""]
    return "\n".join(lines)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python scripts/moe_layouts.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
