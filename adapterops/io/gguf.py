"""GGUF LoRA adapters (llama.cpp): write an ``Adapter`` as one ``.gguf`` file, read one back.

The file follows llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha`` (float32, ONE for the whole file) and
``general.architecture``; per module two tensors ``<base tensor>.lora_a`` (r, in) and
``<base tensor>.lora_b`` (out, r), e.g. ``blk.0.attn_q.weight.lora_a``. llama.cpp applies

    W x + s * B (A x)     s = adapter_scale * alpha / r     (r = lora_b.ne[0], the tensor's rank;
                                                             alpha = 0 means s = adapter_scale)

so a module whose scale is not ``alpha / r`` for the file's alpha has the ratio
``scale * r / alpha`` folded into its lora_b, computed in float64 and rounded once to float32
(lora_b of such modules is stored float32 whatever its input dtype). ``alpha`` is the most
common ``scale * r``, so a PEFT adapter without rank/alpha patterns folds nothing (bit-exact).

Architectures: llama, mistral (written as llama), qwen2, qwen3, gemma, gemma2, gemma3 (text,
``Gemma3ForCausalLM``); checked against llama.cpp's ``conversion/`` package (llama-cpp-python 0.3.36).
The llama family (``LlamaForCausalLM``, ``MistralForCausalLM``) has its q_proj / k_proj rows
permuted by llama.cpp (``LlamaModel.permute``: the rotary halves interleaved per head); for a
LoRA the permutation acts on lora_b's rows only. The head counts are written as
``<arch>.attention.head_count`` / ``head_count_kv`` (llama.cpp ignores them in an adapter) so the
reader can undo the permutation without the base model.

Refused with one line: DoRA, lora_B bias, modules stored whole (modules_to_save), parameter
targets, embedding / conv modules, architectures and module names not in ``ARCHITECTURES``,
quantized tensor types on reading. The ``gguf`` package (an optional extra) is imported lazily.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterops.adapter import Adapter, LoraModule, ModuleKind, Source
from adapterops.errors import AdapterFormatError, InvalidInputError, UnsupportedAdapterError
from adapterops.io.atomic import atomic_output_file
from adapterops.io.refs import base_config

SUFFIX = ".gguf"
FORMAT = "gguf"
CONFIG_KEY = "adapterops.peft_config"  # the adapter's passthrough config fields, JSON
PROVENANCE_KEY = "adapterops.provenance"


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp converts one HF architecture: its GGUF name and whether q/k rows are permuted."""

    gguf_name: str
    permute_qk: bool


# the HF ``architectures[0]`` llama.cpp's convert_hf_to_gguf.py maps, and how
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", True),
    "MistralForCausalLM": Architecture("llama", True),
    "Qwen2ForCausalLM": Architecture("qwen2", False),
    # conversion/qwen.py: Qwen3Model(Qwen2Model), no permutation (q_norm / k_norm are not LoRA targets)
    "Qwen3ForCausalLM": Architecture("qwen3", False),
    # conversion/gemma.py: GemmaModel, Gemma2Model, Gemma3Model (text); their only weight transforms are
    # norm.weight + 1 and Gemma 3's token_embd vocabulary trim, neither on a LoRA target
    "GemmaForCausalLM": Architecture("gemma", False),
    "Gemma2ForCausalLM": Architecture("gemma2", False),
    "Gemma3ForCausalLM": Architecture("gemma3", False),
}
# a config.json without ``architectures`` (a bare ``PretrainedConfig.save_pretrained``) names its model_type
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# HF module name (inside model.layers.N.) -> llama.cpp tensor name (inside blk.N.)
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
_GGUF_NAME = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<rest>[a-z_]+)\.weight\.lora_(?P<part>[ab])$")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UnsupportedAdapterError("GGUF needs the gguf package: pip install 'adapterops[gguf]'") from None
    return gguf


# ----------------------------------------------------------------------------------------------- names


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's base tensor name for a HF module name: model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight."""
    match = _HF_NAME.match(name)
    if match is None or match["rest"] not in _LAYER_TENSORS:
        known = ", ".join(f"model.layers.N.{k}" for k in _LAYER_TENSORS)
        raise UnsupportedAdapterError(
            f"module {name}: no llama.cpp tensor name adapterops knows for it (GGUF adapters hold {known}); "
            "leave it out of the adapter (adapterops combine --include ...) or convert with llama.cpp"
        )
    return f"blk.{int(match['layer'])}.{_LAYER_TENSORS[match['rest']]}.weight"


def _hf_module_name(layer: str, tensor: str, where: Path) -> str:
    inverse = {v: k for k, v in _LAYER_TENSORS.items()}
    if tensor not in inverse:
        raise UnsupportedAdapterError(
            f"{where}: tensor blk.{layer}.{tensor}: adapterops reads LoRA on {', '.join(inverse)} only"
        )
    return f"model.layers.{int(layer)}.{inverse[tensor]}"


# ----------------------------------------------------------------------------------------------- permutation


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``w``: per head, the two rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rows``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(arch_name: str, module: str, n_head: int, n_head_kv: int) -> int | None:
    """How many heads' rows of ``module``'s lora_b llama.cpp permutes (None: not permuted)."""
    if not ARCHITECTURES_BY_GGUF.get(arch_name, False):
        return None
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv  # llama.cpp: permute(w, n_head, n_head_kv) uses n_head_kv when they differ
    return None


ARCHITECTURES_BY_GGUF = {a.gguf_name: a.permute_qk for a in ARCHITECTURES.values()}
# the HF class written back for a GGUF architecture (mistral is written as llama: the same layout)
_HF_BY_GGUF = {a.gguf_name: hf for hf, a in reversed(ARCHITECTURES.items())}


# ----------------------------------------------------------------------------------------------- scales


def file_alpha(adapter: Adapter) -> tuple[float, list[str]]:
    """The file's alpha (float32-representable) and the modules whose scale is folded into lora_b.

    A module needs no folding when float32(alpha) / r == its scale exactly (in float64).
    """
    products = Counter(float(np.float32(m.scale * m.rank)) for m in adapter.modules.values())
    alpha = products.most_common(1)[0][0] if products else 1.0
    if alpha == 0.0:  # llama.cpp reads alpha 0 as "no alpha" (scale = adapter_scale)
        alpha = 1.0
    folded = [n for n, m in sorted(adapter.modules.items()) if alpha / m.rank != m.scale]
    return alpha, folded


# ----------------------------------------------------------------------------------------------- writing


def _base_config(base: str | Path | None) -> dict[str, Any]:
    if base is None:
        raise InvalidInputError(
            "writing GGUF needs the base model's config.json (architecture, head counts): pass --base BASE"
        )
    return base_config(base)


def _recorded_config(adapter: Adapter) -> dict[str, Any]:
    """The architecture and head counts a GGUF input recorded when it was read (``read_adapter``), as
    the config.json fields ``save_adapter`` reads; without them the base model is needed."""
    recorded = adapter.config.get(FORMAT) if adapter.config.get("format") == FORMAT else None
    if not isinstance(recorded, dict) or not recorded.get("architecture") or not recorded.get("head_count"):
        return _base_config(None)  # the one error line asking for --base
    return {
        "architectures": [recorded["architecture"]],
        "num_attention_heads": recorded["head_count"],
        "num_key_value_heads": recorded.get("head_count_kv") or recorded["head_count"],
    }


# llama.cpp reads a token_embd LoRA flipped (lora_a (vocab, r), through llm_build_inp_embd), and a tied
# output head (gemma, tie_word_embeddings) would apply the same pair as a matmul LoRA
_EMBEDDING = (
    "is an embedding LoRA (llama.cpp's token_embd LoRA is stored flipped and, with tied embeddings, reaches "
    "the output head too; adapterops does not write it)"
)


def check_writable(adapter: Adapter) -> None:
    """One error line for what a llama.cpp LoRA cannot hold."""
    if adapter.full_tensors:
        first = sorted(adapter.full_tensors)[0]
        raise UnsupportedAdapterError(
            f"tensor {first} is stored whole (modules_to_save / trained embeddings); a GGUF LoRA adapter holds "
            "lora_a/lora_b pairs only: drop it from the adapter or merge it into the base model"
        )
    for name, m in sorted(adapter.modules.items()):
        what = (
            "is DoRA (lora_magnitude_vector)"
            if m.is_dora
            else "has a lora_B bias"
            if m.bias is not None
            else "targets a parameter (target_parameters)"
            if m.target is not None
            else _EMBEDDING
            if m.kind is ModuleKind.EMBEDDING
            else f"is a {m.kind.value} LoRA"
            if m.kind is not ModuleKind.LINEAR or m.transposed
            else None
        )
        if what:
            raise UnsupportedAdapterError(
                f"module {name} {what}, which llama.cpp's GGUF LoRA cannot represent; "
                "convert a plain LoRA (adapterops to-lora for DoRA) or merge into the base model"
            )
        gguf_tensor_name(name)


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    *,
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    base: str | Path | None = None,
) -> Path:
    """Write ``adapter`` as a llama.cpp GGUF LoRA file at ``path``, atomically.

    ``base`` (a directory or Hub id with config.json) gives the architecture and head counts.
    ``dtype`` must be None/"auto" (tensors keep their dtype; folded lora_b are float32).
    """
    if dtype not in (None, "auto"):
        raise InvalidInputError("GGUF output keeps the factors' dtypes; leave --dtype at auto")
    check_writable(adapter)
    config = _base_config(base) if base is not None else _recorded_config(adapter)
    names = config.get("architectures") or []
    arch_hf = (
        names[0] if isinstance(names, list) and names else _BY_MODEL_TYPE.get(str(config.get("model_type")))
    )
    if arch_hf not in ARCHITECTURES:
        raise UnsupportedAdapterError(
            f"base architecture {arch_hf!r}: adapterops writes GGUF for {', '.join(ARCHITECTURES)}; "
            "use llama.cpp's convert_lora_to_gguf.py for others"
        )
    arch = ARCHITECTURES[arch_hf]
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    alpha, folded = file_alpha(adapter)

    gguf = _gguf()
    target = Path(path)
    with atomic_output_file(target, force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_uint32(f"{arch.gguf_name}.attention.head_count", n_head)
        writer.add_uint32(f"{arch.gguf_name}.attention.head_count_kv", n_head_kv)
        writer.add_string(CONFIG_KEY, json.dumps(dict(adapter.config), sort_keys=True, default=str))
        if adapter.provenance:
            writer.add_string(PROVENANCE_KEY, json.dumps(adapter.provenance, sort_keys=True, default=str))
        for name, m in sorted(adapter.modules.items(), key=lambda kv: _order(kv[0])):
            A, B = m.A, m.B
            if name in folded:
                B = (B.double() * (m.scale * m.rank / alpha)).float()
            heads = _heads(arch.gguf_name, name, n_head, n_head_kv) if arch.permute_qk else None
            if heads is not None:
                B = permute_rows(B, heads)
            base_name = gguf_tensor_name(name)
            _add_tensor(gguf, writer, base_name + ".lora_a", A)
            _add_tensor(gguf, writer, base_name + ".lora_b", B)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def _order(name: str) -> tuple[int, str]:
    match = _HF_NAME.match(name)
    return (int(match["layer"]) if match else -1, name)


def _add_tensor(gguf: Any, writer: Any, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw bytes, typed BF16
        raw = data.view(torch.int16).numpy().view(np.uint8)
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
    elif data.dtype in (torch.float16, torch.float32):
        writer.add_tensor(name, data.numpy())
    else:  # float64: llama.cpp has F64 but no LoRA math in it; one rounding, as documented
        raise UnsupportedAdapterError(
            f"tensor {name} is {data.dtype}; GGUF LoRA factors are float32, float16 or bfloat16: "
            "save the adapter with --dtype float32 first"
        )


# ----------------------------------------------------------------------------------------------- reading


def is_gguf_adapter(path: Path) -> bool:
    """A ``.gguf`` file whose ``general.type`` is ``adapter``."""
    if not (path.is_file() and path.suffix.lower() == SUFFIX):
        return False
    try:
        return _field(_reader(path), "general.type") == "adapter"
    except (AdapterFormatError, UnsupportedAdapterError):
        return False


def _reader(path: Path) -> Any:
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise AdapterFormatError(f"{path}: not a readable GGUF file ({str(exc)[:200]})") from None


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_adapter(path: Path, source: Source | None = None) -> Adapter:
    """Parse a GGUF LoRA adapter file (see the module docstring) into an ``Adapter``."""
    from adapterops.io.peft import file_sha256

    gguf = _gguf()
    reader = _reader(path)
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise UnsupportedAdapterError(
            f"{path}: a GGUF file that is not a LoRA adapter (general.type, adapter.type)"
        )
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES_BY_GGUF:
        raise UnsupportedAdapterError(
            f"{path}: GGUF architecture {arch!r}; adapterops reads {', '.join(sorted(ARCHITECTURES_BY_GGUF))}"
        )
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    n_head, n_head_kv = (_field(reader, f"{arch}.attention.{k}") for k in ("head_count", "head_count_kv"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        match = _GGUF_NAME.match(t.name)
        if match is None:
            raise UnsupportedAdapterError(
                f"{path}: tensor {t.name} is not a blk.N.<tensor>.weight.lora_a/lora_b LoRA factor"
            )
        module = _hf_module_name(match["layer"], match["rest"], path)
        parts.setdefault(module, {})[match["part"]] = _torch(gguf, t, path)
    modules: dict[str, LoraModule] = {}
    for name, entry in sorted(parts.items()):
        if set(entry) != {"a", "b"}:
            raise AdapterFormatError(
                f"{path}: module {name} has lora_{'a' if 'a' not in entry else 'b'} missing"
            )
        A, B = entry["a"], entry["b"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise AdapterFormatError(
                f"{path}: module {name}: lora_a {tuple(A.shape)} and lora_b {tuple(B.shape)} are not a LoRA pair"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFormatError(f"{path}: module {name}: factors contain NaN or Inf values")
        heads = _heads(arch, name, int(n_head or 0), int(n_head_kv or 0))
        if heads is not None:
            if not n_head:
                raise UnsupportedAdapterError(
                    f"{path}: {arch} q/k LoRA with no {arch}.attention.head_count in the file (not written by "
                    "adapterops): the row permutation llama.cpp applied cannot be undone without the head counts"
                )
            B = unpermute_rows(B, heads)
        rank = int(A.shape[0])
        scale = alpha / rank if alpha else 1.0
        modules[name] = LoraModule(name=name, A=A, B=B, scale=scale)
    if not modules:
        raise AdapterFormatError(f"{path}: no LoRA tensors")
    config = dict(_json_field(reader, CONFIG_KEY, path) or {})
    # what writing it back as GGUF needs without the base model (``_base_config``)
    config.update(
        format=FORMAT,
        gguf={"architecture": _HF_BY_GGUF[arch], "head_count": n_head, "head_count_kv": n_head_kv},
    )
    provenance = _json_field(reader, PROVENANCE_KEY, path)
    src = source or Source(path=str(path))
    src = Source(path=src.path, repo_id=src.repo_id, revision=src.revision, sha256=file_sha256(path))
    return Adapter(modules=modules, config=config, source=src, provenance=provenance)


def _json_field(reader: Any, key: str, path: Path) -> dict[str, Any] | None:
    text = _field(reader, key)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{path}: metadata {key!r} is not the JSON object adapterops writes")
    return value


def _torch(gguf: Any, t: Any, path: Path) -> torch.Tensor:
    """One GGUF tensor as torch, in math layout (GGUF lists dims innermost first)."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = gguf.GGMLQuantizationType
    if t.tensor_type == kind.F32:
        data = torch.from_numpy(np.array(t.data, dtype=np.float32))
    elif t.tensor_type == kind.F16:
        data = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif t.tensor_type == kind.BF16:
        data = torch.from_numpy(np.array(t.data).view(np.int16).copy()).view(torch.bfloat16)
    else:
        raise UnsupportedAdapterError(
            f"{path}: tensor {t.name} is {t.tensor_type.name}; adapterops reads F32, F16 and BF16 LoRA "
            "factors only (a quantized factor is not exact)"
        )
    return data.reshape(shape).clone()
