"""diffusers pipeline LoRA files: read, write, convert and the verbs, judged by diffusers and PEFT themselves.

The files read here are written by diffusers' own ``save_lora_weights`` (with ``lora_adapter_metadata``)
or by the test following diffusers' key layout; what adapterops writes is loaded by diffusers
(``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``, ``load_lora_adapter``
for Flux) and fused. References: float64 ``W + scale · B @ A`` with the scale PEFT's own layers hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from adapterops.cli import cli
from adapterops.errors import AdapterOpsError
from adapterops.io import load_adapter, save_adapter
from adapterops.io.diffusers import METADATA_KEY, WEIGHTS_NAME
from tests.support.diffusion import tiny_flux
from tests.test_kohya import CONV, LINEAR, _unet, raw, reference_deltas, write_kohya

SD = diffusers.StableDiffusionPipeline
TE_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.mlp.fc1"]


def _text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def _flux() -> torch.nn.Module:
    return tiny_flux(2)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """PEFT initializes lora_B to zero; give every factor values so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _peft_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """float64 scale · B @ A per LoRA layer, with the scale PEFT's layer holds (the client's reading)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            (adapter,) = layer.scaling
            A = layer.lora_A[adapter].weight.detach().double()
            B = layer.lora_B[adapter].weight.detach().double()
            dw = layer.scaling[adapter] * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1))
            out[name] = dw.reshape(layer.get_base_layer().weight.shape)
    return out


def _fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights after fusing: diffusers' fuse_lora for its models, PEFT's merge for a text encoder."""
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
    else:
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def _load_unet(path: Path) -> torch.nn.Module:
    state, alphas, metadata = SD.lora_state_dict(str(path), return_lora_metadata=True)
    unet = _unet()
    SD.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
    return unet


def _one_line(excinfo: pytest.ExceptionInfo[AdapterOpsError], *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def invoke(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def unet_base() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _unet().state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A UNet + text encoder LoRA saved by diffusers' save_lora_weights, with rank and alpha patterns,
    and the float64 deltas PEFT's layers held when it was saved."""
    unet, te = _unet(), _text_encoder()
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "proj_in", "conv1", "time_emb_proj"],
        rank_pattern={"^down_blocks.0.attentions.0.proj_in": 2},
        alpha_pattern={"to_k": 3, "conv1": 1.5},
    )
    te_config = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "fc1"], alpha_pattern={"fc1": 2})
    unet.add_adapter(unet_config)
    te.add_adapter(te_config)
    _randomize(unet, 0)
    _randomize(te, 1)
    path = tmp_path_factory.mktemp("trained")
    SD.save_lora_weights(
        str(path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    deltas = _peft_deltas(unet) | {f"text_encoder.{k}": v for k, v in _peft_deltas(te).items()}
    return path, deltas


# ------------------------------------------------------------------------------------------- reading


def test_reads_what_diffusers_writes(trained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, deltas = trained
    for ref in (path, path / WEIGHTS_NAME):  # the folder or the file
        adapter = load_adapter(ref)
        assert adapter.config["format"] == "diffusers"
        # transformers >= 5 names CLIP's modules without text_model.; the file keeps what PEFT saved
        assert sorted(adapter.modules) == sorted(deltas)
        for name, dw in deltas.items():
            m = adapter.modules[name]
            torch.testing.assert_close(m.delta(torch.float64).reshape(dw.shape), dw, rtol=1e-12, atol=0)
    assert adapter.modules["down_blocks.0.attentions.0.proj_in"].rank == 2
    assert adapter.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].scale == 3 / 4


def test_without_metadata_every_scale_is_one_as_diffusers_reads_it(tmp_path: Path, unet_base: dict) -> None:
    """No lora_adapter_metadata: diffusers uses lora_alpha = r per module (get_peft_kwargs), so dW = B @ A."""
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name, rank in ((LINEAR[0], 4), (LINEAR[1], 2), (CONV[2], 4)):
        W = unet_base[f"{name}.weight"]
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, *W.shape[1:], generator=g)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(
            W.shape[0], rank, *(1,) * (W.dim() - 2), generator=g
        )
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    adapter = load_adapter(tmp_path / "plain.safetensors")
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    fused = _fused(_load_unet(tmp_path / "plain.safetensors"))
    for name, m in adapter.modules.items():
        expected = unet_base[f"{name}.weight"].double() + m.delta(torch.float64).reshape(m.weight_shape)
        torch.testing.assert_close(fused[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)


def test_older_key_spellings_are_read_as_diffusers_reads_them(tmp_path: Path, unet_base: dict) -> None:
    """unet ``.lora.down/.lora.up`` and text encoder ``.lora_linear_layer.down/.up`` (diffusers < 0.2x)."""
    g = torch.Generator().manual_seed(5)
    te = _text_encoder()
    tensors = {}
    for name in LINEAR[:2]:
        W = unet_base[f"{name}.weight"]
        tensors[f"unet.{name}.lora.down.weight"] = torch.randn(2, W.shape[1], generator=g)
        tensors[f"unet.{name}.lora.up.weight"] = torch.randn(W.shape[0], 2, generator=g)
    te_weights = dict(te.named_parameters())
    for name in TE_MODULES:
        W = te_weights[f"{name.removeprefix('text_model.')}.weight"]
        tensors[f"text_encoder.{name}.lora_linear_layer.down.weight"] = torch.randn(
            2, W.shape[1], generator=g
        )
        tensors[f"text_encoder.{name}.lora_linear_layer.up.weight"] = torch.randn(W.shape[0], 2, generator=g)
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path))
    adapter = load_adapter(path)
    fused = _fused(_load_unet(path))
    for name in LINEAR[:2]:
        expected = unet_base[f"{name}.weight"].double() + adapter.modules[name].delta(torch.float64)
        torch.testing.assert_close(fused[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)
    state, alphas, metadata = SD.lora_state_dict(str(path), return_lora_metadata=True)
    base = {k: v.detach().clone() for k, v in te.state_dict().items()}
    SD.load_lora_into_text_encoder(state, alphas, text_encoder=te, metadata=metadata)
    fused_te = _fused(te)
    for name in TE_MODULES:
        key = f"{name.removeprefix('text_model.')}.weight"
        expected = base[key].double() + adapter.modules[f"text_encoder.{name}"].delta(torch.float64)
        torch.testing.assert_close(fused_te[key].double(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- writing


def test_diffusers_loads_a_converted_kohya_file_exactly(tmp_path: Path, unet_base: dict) -> None:
    """Per-module alphas (one missing) on linear, 1x1 and 3x3 conv modules go into alpha_pattern; diffusers'
    fused weights equal W + alpha / r · up @ down computed from the kohya file in float64."""
    alphas: dict[str, float | None] = {LINEAR[0]: 1.0, LINEAR[1]: 7.0, CONV[2]: None, CONV[0]: 0.5}
    kohya = write_kohya(tmp_path / "k.safetensors", unet_base, LINEAR + CONV, alphas=alphas)
    out = tmp_path / "k-diffusers"
    invoke("convert", kohya, "--to", "diffusers", "-o", out)
    assert (out / WEIGHTS_NAME).is_file()
    metadata = json.loads(raw(out / WEIGHTS_NAME)[1][METADATA_KEY])
    assert metadata["unet.r"] == 4 and metadata["unet.alpha_pattern"]  # alphas differ per module
    fused = _fused(_load_unet(out))
    reference = reference_deltas(kohya)
    for name in LINEAR + CONV:
        expected = unet_base[f"{name}.weight"].double() + reference["lora_unet_" + name.replace(".", "_")]
        torch.testing.assert_close(fused[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight"
    assert torch.equal(fused[untouched], unet_base[untouched])
    # and back: the kohya file's tensors, alpha dtypes and metadata (hashes included) travel along, so the
    # bytes are those of the kohya file rewritten directly
    invoke("convert", out, "--to", "kohya", "-o", tmp_path / "back.safetensors")
    (before, meta_before), (after, meta_after) = raw(kohya), raw(tmp_path / "back.safetensors")
    assert sorted(before) == sorted(after) and meta_after == meta_before
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    direct = save_adapter(load_adapter(kohya), tmp_path / "direct.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == direct.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_to_diffusers_to_peft_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    from peft import get_peft_model

    unet = _unet()
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_v", "conv_shortcut", "proj_out"],
        rank_pattern={"proj_out": 2},
        alpha_pattern={"to_v": 1},
        use_rslora=True,
    )
    model = get_peft_model(unet, config)
    _randomize(model, 6)
    model.to(dtype).save_pretrained(tmp_path / "peft")
    invoke("convert", tmp_path / "peft", "--to", "diffusers", "-o", tmp_path / "d")
    invoke("convert", tmp_path / "d", "--to", "peft", "-o", tmp_path / "p2")
    before, after = load_adapter(tmp_path / "peft"), load_adapter(tmp_path / "p2")
    assert sorted(before.modules) == sorted(after.modules)
    for name, m in before.modules.items():
        n = after.modules[name]
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B) and m.A.dtype == n.A.dtype == dtype
        assert m.scale == n.scale  # rsLoRA's alpha / sqrt(r) stated as lora_alpha = scale · r
    fused = _fused(_load_unet(tmp_path / "d"))  # diffusers reads the same scales
    base = {k: v for k, v in _unet().state_dict().items()}
    for name, m in before.modules.items():
        expected = base[f"{name}.weight"].double() + m.delta(torch.float64).reshape(m.weight_shape)
        torch.testing.assert_close(fused[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)


def test_diffusers_round_trip_keeps_tensors_and_scales(tmp_path: Path, trained: tuple[Path, dict]) -> None:
    path, deltas = trained
    out = save_adapter(load_adapter(path), tmp_path / "again.safetensors")
    (before, _), (after, _) = raw(path / WEIGHTS_NAME), raw(out)
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    again = load_adapter(out)
    for name, dw in deltas.items():
        torch.testing.assert_close(
            again.modules[name].delta(torch.float64).reshape(dw.shape), dw, rtol=1e-12, atol=0
        )
    # diffusers itself reads the rewritten metadata to the same deltas, text encoder included
    unet = _load_unet(out)
    state, alphas, metadata = SD.lora_state_dict(str(out), return_lora_metadata=True)
    te = _text_encoder()
    SD.load_lora_into_text_encoder(state, alphas, text_encoder=te, metadata=metadata)
    loaded = _peft_deltas(unet) | {f"text_encoder.{k}": v for k, v in _peft_deltas(te).items()}
    assert sorted(loaded) == sorted(deltas)
    for name, dw in deltas.items():
        torch.testing.assert_close(loaded[name], dw, rtol=1e-12, atol=0)


def test_flux_transformer_keys(tmp_path: Path) -> None:
    """``transformer.`` keys: bare names in memory; Flux has proj_out and single_transformer_blocks.0.proj_out,
    so the patterns are anchored; diffusers' load_lora_adapter reads back the scales PEFT had."""
    flux = _flux()
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "proj_out", "x_embedder"],
        rank_pattern={"^proj_out": 2},
        alpha_pattern={"^single_transformer_blocks.0.proj_out": 9, "x_embedder": 0.5},
    )
    flux.add_adapter(config)
    _randomize(flux, 7)
    deltas = _peft_deltas(flux)
    diffusers.FluxPipeline.save_lora_weights(
        str(tmp_path / "f"),
        transformer_lora_layers=get_peft_model_state_dict(flux),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    adapter = load_adapter(tmp_path / "f")
    assert sorted(adapter.modules) == sorted(deltas) and "proj_out" in deltas
    resized = tmp_path / "r"
    save_adapter(adapter, resized)
    assert all(k.startswith("transformer.") for k in raw(resized / WEIGHTS_NAME)[0])
    fresh = _flux()
    base = {k: v.detach().clone() for k, v in fresh.state_dict().items()}
    fresh.load_lora_adapter(str(resized), prefix="transformer", weight_name=WEIGHTS_NAME)
    assert sorted(_peft_deltas(fresh)) == sorted(deltas)
    fused = _fused(fresh)
    for name, dw in deltas.items():
        torch.testing.assert_close(
            fused[f"{name}.weight"].double(), base[f"{name}.weight"].double() + dw, rtol=0, atol=1e-5
        )


# ------------------------------------------------------------------------------------------- verbs


def test_info_resize_and_combine_keep_the_format(tmp_path: Path, trained: tuple[Path, dict]) -> None:
    path, deltas = trained
    assert "format: diffusers" in invoke("info", path)
    invoke("resize", path, "--rank", 1, "-o", tmp_path / "small")
    small = load_adapter(tmp_path / "small")
    assert small.config["format"] == "diffusers" and {m.rank for m in small.modules.values()} == {1}
    for name, dw in deltas.items():  # the best rank-1 approximation of each update
        matrix = dw.reshape(dw.shape[0], -1)
        s = torch.linalg.svdvals(matrix)
        got = small.modules[name].delta(torch.float64).reshape(matrix.shape)
        error = float(torch.linalg.matrix_norm(got - matrix))
        assert error == pytest.approx(float(s[1:].square().sum().sqrt()), rel=1e-4, abs=1e-5), name
    invoke("combine", path, tmp_path / "small", "-o", tmp_path / "mix.safetensors")
    mix = load_adapter(tmp_path / "mix.safetensors")
    assert mix.config["format"] == "diffusers"
    for name, dw in deltas.items():
        expected = dw + small.modules[name].delta(torch.float64).reshape(dw.shape)
        got = mix.modules[name].delta(torch.float64).reshape(dw.shape)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- refused


def test_bad_files_are_refused_with_one_line(tmp_path: Path, trained: tuple[Path, dict]) -> None:
    path, _ = trained
    tensors, metadata = raw(path / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight") and k.startswith("unet."))

    def refused(name: str, tensors: dict, metadata: dict, *words: str) -> None:
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad), metadata=metadata)
        with pytest.raises(AdapterOpsError) as excinfo:
            load_adapter(bad)
        _one_line(excinfo, *words)

    refused(
        "unknown",
        {**tensors, "unet.conv_in.lora_magnitude_vector": torch.ones(8)},
        metadata,
        "not a diffusers",
    )
    refused("alpha", {**tensors, "unet.conv_in.alpha": torch.tensor(1.0)}, metadata, ".alpha")
    refused(
        "nan",
        {**tensors, key: torch.full_like(tensors[key], float("nan"))},
        metadata,
        "NaN",
        key.removesuffix(".lora_A.weight"),
    )
    refused("shape", {**tensors, key: torch.zeros(3, tensors[key].shape[1])}, metadata, "rank")
    wrong_r = {**tensors, key: torch.zeros(2, tensors[key].shape[1])}
    wrong_r[key.replace("lora_A", "lora_B")] = torch.zeros(tensors[key].shape[1], 2)
    refused("rank", wrong_r, metadata, "r=4", METADATA_KEY)
    refused("json", tensors, {**metadata, METADATA_KEY: "{not json"}, "not valid JSON")
    refused("field", tensors, {**metadata, METADATA_KEY: json.dumps({"vae.r": 4})}, "vae.r")
    bad_alpha = json.loads(metadata[METADATA_KEY]) | {"unet.lora_alpha": -1}
    refused("alpha-value", tensors, {**metadata, METADATA_KEY: json.dumps(bad_alpha)}, "lora_alpha")
    dora = json.loads(metadata[METADATA_KEY]) | {"unet.use_dora": True}
    refused("dora", tensors, {**metadata, METADATA_KEY: json.dumps(dora)}, "use_dora")
    mixed = {k.replace("lora_A.weight", "lora.down.weight") if k == key else k: v for k, v in tensors.items()}
    mixed = {
        k.replace("lora_B.weight", "lora.up.weight") if k == key.replace("lora_A", "lora_B") else k: v
        for k, v in mixed.items()
    }
    refused("mixed-spelling", mixed, metadata, "mixes two key spellings")
    refused(
        "kohya-and-diffusers",
        {**tensors, "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4)},
        metadata,
        "kohya",
    )
    refused("missing", {k: v for k, v in tensors.items() if k != key}, metadata, "lora_A")


def test_what_a_diffusers_file_cannot_hold_is_refused(tmp_path: Path) -> None:
    """A language model adapter (model.layers.*) has no pipeline component: refused, nothing written."""
    examples = Path(__file__).resolve().parents[1] / "recipes" / "inputs" / "style-a"
    result = CliRunner().invoke(
        cli, ["convert", str(examples), "--to", "diffusers", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2, result.output
    assert "language model" in result.output and not (tmp_path / "x").exists()


def test_kohya_text_encoder_alphas_reach_a_transformers_5_clip(tmp_path: Path) -> None:
    """kohya's lora_te_text_model_* modules with their own alphas: written under text_encoder.text_model.*,
    their alpha_pattern keys match CLIP's module names without text_model. (transformers >= 5)."""
    te = _text_encoder()
    weights = {k: v.detach().clone() for k, v in te.state_dict().items()}
    g = torch.Generator().manual_seed(8)
    tensors, expected = {}, {}
    for name, alpha in zip(TE_MODULES, (1.0, 6.0), strict=True):
        key = "lora_te_" + name.replace(".", "_")
        W = weights[f"{name.removeprefix('text_model.')}.weight"]
        down, up = torch.randn(2, W.shape[1], generator=g), torch.randn(W.shape[0], 2, generator=g)
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        expected[name] = W.double() + alpha / 2 * (up.double() @ down.double())
    save_file(tensors, str(tmp_path / "te.safetensors"))
    invoke("convert", tmp_path / "te.safetensors", "--to", "diffusers", "-o", tmp_path / "d")
    state, alphas, metadata = SD.lora_state_dict(str(tmp_path / "d"), return_lora_metadata=True)
    SD.load_lora_into_text_encoder(state, alphas, text_encoder=te, metadata=metadata)
    fused = _fused(te)
    for name, W in expected.items():
        torch.testing.assert_close(
            fused[f"{name.removeprefix('text_model.')}.weight"].double(), W, rtol=0, atol=1e-5
        )
