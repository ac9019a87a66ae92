"""Seeded builders of tiny *real* models and PEFT LoRA adapters, plus float64 references computed by PEFT.

Everything here is CPU-only, offline and fast (each model has well under 100k parameters).

* ``tiny_llama`` / ``tiny_gpt2`` / ``tiny_conv`` build randomly initialised models from a seed. The global
  torch RNG state is left untouched (``torch.random.fork_rng``), so calling a factory never perturbs the
  randomness of the calling test.
* ``make_adapter`` wraps the factory's default-seed base model with ``peft.get_peft_model`` and gives every
  LoRA parameter fresh random values derived from ``seed``; two seeds give two different adapters for the
  *same* base model.
* ``peft_deltas`` / ``peft_merged_state_dict`` / ``peft_logits`` load an adapter with ``PeftModel`` and
  return what PEFT itself computes, in float64, to be used as ground truth.
* ``save_base_checkpoint`` writes the base model the way ``transformers`` does (``model.safetensors`` or
  shards plus ``model.safetensors.index.json``, ``config.json``, ``generation_config.json``).

PEFT 0.21.2 notes (checked empirically):

* Saved keys drop the adapter name: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``<module>.lora_embedding_A`` (r, num_embeddings) / ``lora_embedding_B`` (dim, r) for embeddings,
  ``<module>.lora_magnitude_vector`` for DoRA and ``<module>.lora_B.bias`` for ``lora_bias=True``.
* When an embedding layer is targeted, ``save_embedding_layers="auto"`` resolves to True and the *base*
  embedding weight is saved too (``<module>.base_layer.weight``, in the base model's dtype, not cast with
  the adapter). On load it overwrites the base model's embedding. With ``"auto"`` and no targeted
  embedding, PEFT queries the Hub for ``<base_model_name_or_path>/config.json``; ``make_adapter`` therefore
  always passes an explicit bool.
* ``PeftModel.from_pretrained`` creates the LoRA modules in the base layer's dtype and copies the saved
  tensors into them, so a float64 base yields float64 LoRA factors even for a bf16 adapter file; we still
  cast the whole ``PeftModel`` to float64 afterwards as a guard.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import Gemma3ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

__all__ = [
    "TinyConvNet",
    "base_logits",
    "factory_name",
    "make_adapter",
    "peft_bias_deltas",
    "peft_deltas",
    "peft_logits",
    "peft_merge_and_unload_logits",
    "peft_merged_state_dict",
    "save_base_checkpoint",
    "tiny_conv",
    "tiny_gemma3",
    "tiny_gpt2",
    "tiny_llama",
]

ModelFactory = Callable[..., nn.Module]

VOCAB_SIZE = 128
# Passed as ``**kwargs`` (accepted at runtime by transformers 5 configs, unknown to their type stubs).
_EAGER: dict[str, Any] = {"attn_implementation": "eager"}
HIDDEN_SIZE = 32


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence known-noisy, irrelevant warnings raised by transformers / PEFT on these toy models."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=r".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=r".*save_embedding_layers.*")
        warnings.filterwarnings("ignore", message=r".*Could not find a config file.*")
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*")
        # PEFT 0.21.2 false positive: a 1-D ``lora_B.bias`` (lora_bias=True) is reported as an ungathered shard.
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with ``torch.manual_seed(seed)`` without changing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def tiny_llama(
    seed: int = 0, tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, intermediate 64, 4 heads, 2 kv heads, vocab 128) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
        **_EAGER,
    )
    with _seeded(seed), _quiet():
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """A 2-layer Gemma 3 text model (hidden 32, 4 heads of 8, 2 kv heads, vocab 128, sliding window 16) with
    random weights: scaled embeddings, logit soft-capping, and ``tie_word_embeddings`` true by default."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **_EAGER,
    )
    with _seeded(seed), _quiet():
        model: Any = Gemma3ForCausalLM(config)
    return model.eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (n_embd 32, 4 heads, vocab 128, n_positions 64), dropout disabled, random weights.

    Its attention/MLP projections are ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out)), which
    PEFT handles with ``fan_in_fan_out=True``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=HIDDEN_SIZE,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_EAGER,
    )
    with _seeded(seed), _quiet():
        model: Any = GPT2LMHeadModel(config)
    return model.eval()


class TinyConvNet(nn.Module):
    """conv1 (3->8, k3) -> relu -> conv2 (8->8, k1) -> relu -> global mean pool -> head (Linear 8->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(-2, -1)))


def tiny_conv(seed: int = 0) -> TinyConvNet:
    """A small Conv2d network (``TinyConvNet``); target ``conv1``, ``conv2`` and/or ``head`` with LoRA."""
    with _seeded(seed):
        model = TinyConvNet()
    return model.eval()


def factory_name(model_factory: ModelFactory) -> str:
    """``tiny_llama`` -> ``"tiny-llama"`` (``functools.partial`` objects are unwrapped)."""
    func: Any = model_factory
    while isinstance(func, functools.partial):
        func = func.func
    return str(getattr(func, "__name__", "tiny-model")).replace("_", "-")


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def _randomize_lora_parameters(model: nn.Module, seed: int) -> None:
    """Give every LoRA parameter fresh seeded values (in a deterministic, name-sorted order)."""
    params = sorted((n, p) for n, p in model.named_parameters() if "lora_" in n)
    with _seeded(seed), torch.no_grad():
        for name, param in params:
            if "lora_magnitude_vector" in name:
                # Keep PEFT's (positive) column norms, jittered so the magnitude really matters.
                factor = 0.75 + 0.5 * torch.rand(param.shape, dtype=torch.float64)
                param.copy_(param.detach().double().abs().clamp_min(1e-3) * factor)
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn(param.shape, dtype=torch.float64))
            else:
                param.copy_(0.1 * torch.randn(param.shape, dtype=torch.float64))


def make_adapter(
    model_factory: ModelFactory,
    out_dir: str | Path,
    *,
    seed: int,
    save_dtype: torch.dtype | None = None,
    save_embedding_layers: bool | str = "auto",
    **lora_config_kwargs: Any,
) -> Path:
    """Build a LoRA adapter for ``model_factory()`` (its default seed) and ``save_pretrained`` it.

    ``lora_config_kwargs`` go to ``peft.LoraConfig`` (``init_lora_weights`` is forced to False). All LoRA
    parameters are then re-drawn from ``torch.manual_seed(seed)``; DoRA magnitudes stay positive.
    ``save_dtype`` (e.g. ``torch.bfloat16``) casts the adapter parameters before saving.
    ``save_embedding_layers="auto"`` means "True iff an embedding layer carries LoRA" (PEFT's own rule,
    without its Hub lookup). ``base_model_name_or_path`` defaults to ``factory_name(model_factory)``.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Embedding as LoraEmbedding

    out_dir = Path(out_dir)
    base_name = lora_config_kwargs.pop("base_model_name_or_path", None) or factory_name(model_factory)
    lora_config_kwargs.pop("init_lora_weights", None)
    config = LoraConfig(init_lora_weights=False, **lora_config_kwargs)

    with _quiet(), _seeded(seed):
        model = get_peft_model(model_factory(), config)
    _randomize_lora_parameters(model, seed)

    if save_dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(save_dtype)

    if save_embedding_layers == "auto":
        save_embedding_layers = any(isinstance(m, LoraEmbedding) for m in model.modules())

    model.peft_config["default"].base_model_name_or_path = base_name
    with _quiet():
        model.save_pretrained(str(out_dir), save_embedding_layers=save_embedding_layers)
    return out_dir


def _load_peft(model_factory: ModelFactory, adapter_dir: str | Path, dtype: torch.dtype) -> Any:
    """Base model in ``dtype`` + ``PeftModel.from_pretrained`` with PEFT's default options.

    PEFT creates the LoRA modules in the base dtype, except that ``autocast_adapter_dtype=True`` (default)
    upcasts them to float32 on a float16/bfloat16 base; that is left as is (it is what PEFT users get). For
    float64 the whole model is cast again after loading, as a guard.
    """
    from peft import PeftModel

    base = model_factory().to(dtype)
    with _quiet():
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    if dtype == torch.float64:
        peft_model = peft_model.to(torch.float64)
    return peft_model.eval()


def _lora_layers(peft_model: Any) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def peft_deltas(model_factory: ModelFactory, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{module name in the base model: float64 weight delta}`` as computed by PEFT.

    The delta has the base weight's storage layout: (out, in) for Linear, (in, out) for GPT-2 Conv1D,
    (num_embeddings, dim) for Embedding and the full kernel for Conv. For plain LoRA it is
    ``layer.get_delta_weight("default")``; for DoRA (whose effective delta is not that) it is
    ``merged weight - base weight`` from ``layer.merge()``. Bias deltas (``lora_bias``) are not included;
    use ``peft_merged_state_dict`` for those.
    """
    peft_model = _load_peft(model_factory, adapter_dir, torch.float64)
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in _lora_layers(peft_model):
            if "default" not in layer.scaling:
                continue
            if layer.use_dora.get("default", False):
                base_weight = layer.get_base_layer().weight
                before = base_weight.detach().clone()
                layer.merge(adapter_names=["default"])
                delta = layer.get_base_layer().weight.detach() - before
                layer.unmerge()
            else:
                delta = layer.get_delta_weight("default")
            assert delta.dtype == torch.float64, (name, delta.dtype)
            deltas[name] = delta.detach().clone()
    return deltas


def peft_merged_state_dict(
    model_factory: ModelFactory, adapter_dir: str | Path, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Base model in ``dtype`` + adapter, ``merge_and_unload()``-ed by PEFT; keys as in the base model.

    For a float16/bfloat16 ``dtype`` PEFT keeps the LoRA factors in float32 (``autocast_adapter_dtype``) and
    rounds only the merged weight to ``dtype``. ``lora_bias`` is merged into the base bias.
    """
    peft_model = _load_peft(model_factory, adapter_dir, dtype)
    with torch.no_grad(), _quiet():
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_bias_deltas(model_factory: ModelFactory, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{module name: float64 bias delta}`` for ``lora_bias=True`` adapters (PEFT merges
    ``scaling * lora_B.bias`` into the base bias), computed as merged bias - base bias."""
    peft_model = _load_peft(model_factory, adapter_dir, torch.float64)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in _lora_layers(peft_model):
            if not layer.lora_bias.get("default", False):
                continue
            before = layer.get_base_layer().bias.detach().clone()
            layer.merge(adapter_names=["default"])
            out[name] = layer.get_base_layer().bias.detach() - before
            layer.unmerge()
    return out


def peft_logits(
    model_factory: ModelFactory, adapter_dir: str | Path, input_ids: torch.Tensor
) -> torch.Tensor:
    """float64 output of the *unmerged* ``PeftModel``: LM logits for token ids, or ``model(x)`` for a
    float input (e.g. images for ``tiny_conv``)."""
    peft_model = _load_peft(model_factory, adapter_dir, torch.float64)
    with torch.no_grad():
        if input_ids.is_floating_point():
            return peft_model(input_ids.to(torch.float64)).detach()
        return peft_model(input_ids=input_ids).logits.detach()


def peft_merge_and_unload_logits(
    model_factory: ModelFactory, adapter_dir: str | Path, input_ids: torch.Tensor
) -> torch.Tensor:
    """float64 LM logits of the model PEFT's own ``merge_and_unload()`` returns (to compare with
    ``peft_logits``, the unmerged model's)."""
    peft_model = _load_peft(model_factory, adapter_dir, torch.float64)
    with torch.no_grad(), _quiet():
        return peft_model.merge_and_unload()(input_ids=input_ids).logits.detach()


def base_logits(model_factory: ModelFactory, inputs: torch.Tensor) -> torch.Tensor:
    """float64 output of the bare base model (same input convention as ``peft_logits``)."""
    model = model_factory().double().eval()
    with torch.no_grad():
        if inputs.is_floating_point():
            return model(inputs.to(torch.float64)).detach()
        return model(input_ids=inputs).logits.detach()


# --------------------------------------------------------------------------------------------------
# Base checkpoints
# --------------------------------------------------------------------------------------------------


def save_base_checkpoint(
    model_factory: ModelFactory,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save ``model_factory()`` cast to ``dtype`` like ``transformers`` does and return ``out_dir``.

    HF models: ``model.save_pretrained`` -> ``config.json``, ``generation_config.json`` and either
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (tied weights such as a tied ``lm_head.weight`` are saved once, under ``model.embed_tokens.weight``).
    Plain modules (``tiny_conv``): the same safetensors layout plus a minimal ``config.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model: Any = model_factory().to(dtype)
    if _is_hf_model(model):
        kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        with _quiet():
            model.save_pretrained(out_dir, **kwargs)
        return out_dir

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    split_kwargs: dict[str, Any] = {"filename_pattern": "model{suffix}.safetensors"}
    if max_shard_size is not None:
        split_kwargs["max_shard_size"] = max_shard_size
    split = split_torch_state_dict_into_shards(state_dict, **split_kwargs)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state_dict[k] for k in keys}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config = {"model_type": factory_name(model_factory), "dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
