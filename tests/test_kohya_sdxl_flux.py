"""kohya files for SDXL and Flux: names mapped back through the base's own key list.

The Flux files here follow sd-scripts' naming (``networks/lora_flux.py``: ``lora_unet_`` + the BFL
module path with '.' -> '_'); their BFL layout is that of black-forest-labs/flux
``src/flux/modules/layers.py``: ``DoubleStreamBlock.img_attn.qkv`` is q, k, v stacked by rows,
``SingleStreamBlock.linear1`` is q, k, v then the MLP's first layer (``torch.split(...,
[3 * hidden_size, mlp_hidden_dim])``), and ``LastLayer.adaLN_modulation`` yields (shift, scale).
diffusers' own loader judges the mapping onto its FluxTransformer2DModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterops.cli import cli
from adapterops.errors import AdapterOpsError
from adapterops.io import load_adapter, save_adapter
from tests.support.diffusion import tiny_flux, tiny_unet
from tests.support.rounding import nearest

HIDDEN = 8


def _flux() -> torch.nn.Module:
    return tiny_flux(0, guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flux")
    _flux().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_weights(flux_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(flux_dir / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _swap(w: torch.Tensor) -> torch.Tensor:
    half = w.shape[0] // 2
    return torch.cat([w[half:], w[:half]])


# BFL module -> the diffusers weights it stacks by rows (written from the BFL source, see above)
BFL = {
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                     "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"],
    "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                     "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks.0.txt_mod.lin": ["transformer_blocks.0.norm1_context.linear"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "single_blocks.0.modulation.lin": ["single_transformer_blocks.0.norm.linear"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # BFL (shift, scale) = diffusers (scale, shift) swapped
}  # fmt: skip


def bfl_state_dict(weights: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for bfl, parts in BFL.items():
        w = torch.cat([weights[f"{p}.weight"] for p in parts])
        out[f"{prefix}{bfl}.weight"] = _swap(w) if bfl.startswith("final_layer.adaLN") else w
    return out


def write_flux_kohya(path: Path, weights: dict[str, torch.Tensor], names: list[str], seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    bfl = bfl_state_dict(weights)
    tensors = {}
    for i, name in enumerate(names):
        out_features, in_features = bfl[f"{name}.weight"].shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=g)
        tensors[f"{key}.lora_up.weight"] = 0.3 * torch.randn(out_features, 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor([1.0, 2.0, 8.0][i % 3])
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_base_model_version": "flux1"})
    return path


def reference(path: Path) -> dict[str, torch.Tensor]:
    """float64 dW = alpha / r * up @ down per kohya module, from the file's tensors."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).double() for k in f.keys()}
    out = {}
    for key in {k.split(".")[0] for k in t}:
        down, up = t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"]
        out[key] = float(t[f"{key}.alpha"]) / down.shape[0] * up @ down
    return out


def _key(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


# diffusers 0.42.1 splits single_blocks linear1 at Flux-dev's widths (3072, 3072, 3072, 12288), so its
# loader cannot take a tiny model's linear1; and it names the modules outside the blocks (img_in,
# time_in, final_layer, ...) without the "transformer." prefix that load_lora_into_transformer keeps,
# so it drops them. Those are judged by the BFL layout instead (below).
FOR_DIFFUSERS = [
    n for n in BFL if n.startswith(("double_blocks", "single_blocks")) and not n.endswith("linear1")
]


def test_diffusers_loads_the_kohya_flux_file_as_adapterops_maps_it(
    tmp_path: Path, flux_dir: Path, flux_weights: dict
) -> None:
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, FOR_DIFFUSERS)
    state_dict = diffusers.FluxPipeline.lora_state_dict(str(path))
    model = _flux()
    diffusers.FluxPipeline.load_lora_into_transformer(state_dict, None, transformer=model)
    model.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = load_adapter(path, base=flux_dir)
    expected_modules = sorted(p for n in FOR_DIFFUSERS for p in BFL[n])
    assert sorted(adapter.modules) == expected_modules
    for name in expected_modules:
        ours = flux_weights[f"{name}.weight"].double() + adapter.modules[name].delta(torch.float64)
        torch.testing.assert_close(merged[f"{name}.weight"].double(), ours, rtol=0, atol=2e-6)
    untouched = "single_transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(merged[untouched], flux_weights[untouched])


def test_a_kohya_flux_file_converted_to_diffusers_loads_in_diffusers_exactly(
    tmp_path: Path, flux_dir: Path, flux_weights: dict
) -> None:
    """The issue's `convert my_flux_lora.safetensors --to diffusers --base transformer/`: every BFL
    module (fused qkv and linear1 split at the base's widths, the modules outside the blocks
    included) loaded by diffusers' own load_lora_adapter and fused gives W + dW of the kohya file."""
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, list(BFL), seed=11)
    _invoke("convert", path, "--to", "diffusers", "--base", flux_dir, "-o", tmp_path / "flux-lora")
    model = _flux()
    model.load_state_dict(flux_weights)
    model.load_lora_adapter(
        str(tmp_path / "flux-lora"), prefix="transformer", weight_name="pytorch_lora_weights.safetensors"
    )
    model.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    bfl = load_adapter(path)  # BFL names, read without a base: the file's own updates
    ref = reference(path)
    assert sorted(bfl.modules) == sorted(BFL)
    for bfl_name, parts in BFL.items():
        dw = ref[_key(bfl_name)]
        if bfl_name == "final_layer.adaLN_modulation.1":  # diffusers' norm_out.linear: (scale, shift)
            dw = _swap(dw)
        rows = 0
        for part in parts:
            w = flux_weights[f"{part}.weight"]
            expected = w.double() + dw[rows : rows + w.shape[0]]
            torch.testing.assert_close(merged[f"{part}.weight"].double(), expected, rtol=0, atol=2e-6)
            rows += w.shape[0]
        assert rows == dw.shape[0]


def test_fused_layers_split_exactly_by_the_base_widths(
    tmp_path: Path, flux_dir: Path, flux_weights: dict
) -> None:
    names = ["single_blocks.0.linear1", "double_blocks.0.txt_attn.qkv", "final_layer.adaLN_modulation.1"]
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, names, seed=3)
    adapter = load_adapter(path, base=flux_dir)
    ref = reference(path)
    for bfl in names:
        parts = [adapter.modules[p].delta(torch.float64) for p in BFL[bfl]]
        stacked = torch.cat(parts)
        if bfl.startswith("final_layer"):
            stacked = _swap(stacked)
        assert torch.equal(stacked, ref[_key(bfl)]) or torch.allclose(
            stacked, ref[_key(bfl)], rtol=0, atol=1e-12
        )
    linear1 = [adapter.modules[p] for p in BFL["single_blocks.0.linear1"]]
    assert [m.out_features for m in linear1] == [HIDDEN, HIDDEN, HIDDEN, 4 * HIDDEN]
    assert all(torch.equal(m.A, linear1[0].A) for m in linear1)  # lora_down shared


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_against_its_bfl_single_file_keeps_bfl_names_and_writes_back_bit_exact(
    tmp_path: Path, flux_weights: dict, prefix: str
) -> None:
    base = tmp_path / "flux1.safetensors"
    save_file(bfl_state_dict(flux_weights, prefix), str(base))
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, list(BFL), seed=5)
    adapter = load_adapter(path, base=base)
    assert sorted(adapter.modules) == sorted(BFL)
    ref = reference(path)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(torch.float64), ref[_key(name)], rtol=0, atol=1e-12)
    out = save_adapter(adapter, tmp_path / "back.safetensors")
    with safe_open(str(path), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert b.metadata()["ss_base_model_version"] == "flux1"


def test_without_a_base_a_flux_file_keeps_the_names_its_bfl_single_file_gives(
    tmp_path: Path, flux_weights: dict
) -> None:
    base = tmp_path / "flux1.safetensors"
    save_file(bfl_state_dict(flux_weights), str(base))
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, list(BFL), seed=3)
    alone, named = load_adapter(path), load_adapter(path, base=base)
    assert sorted(alone.modules) == sorted(named.modules) == sorted(BFL)
    for name, module in alone.modules.items():
        assert torch.equal(module.delta(torch.float64), named.modules[name].delta(torch.float64))
    summary = json.loads(_invoke("info", path, "--json"))
    assert (summary["format"], summary["model"], summary["modules_count"]) == (
        "kohya",
        "flux, flux1",
        len(BFL),
    )
    assert "format: kohya (flux, flux1)" in _invoke("info", path)
    # diffusers looks modules up by its own names: BFL names are refused there, named through a base
    result = CliRunner().invoke(cli, ["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "d")])
    assert result.exit_code != 0 and "--base" in result.output and not (tmp_path / "d").exists()


def test_split_modules_are_not_written_back_as_kohya(
    tmp_path: Path, flux_dir: Path, flux_weights: dict
) -> None:
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, ["double_blocks.0.img_attn.qkv"])
    adapter = load_adapter(path, base=flux_dir)
    with pytest.raises(AdapterOpsError, match="save as PEFT"):
        save_adapter(adapter, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    save_adapter(adapter, tmp_path / "peft", format="peft")  # in diffusers' names, PEFT holds it


# ------------------------------------------------------------------------------------------- SDXL

SGM = {  # a few weights of an original SDXL single file (sgm keys), with their shapes
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (16, 16),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (16, 16, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (64, 16),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
}


def _sgm_module(key: str) -> str:
    name = key.removesuffix(".weight")
    if name.startswith("conditioner.embedders.0.transformer."):
        return "text_encoder." + name.removeprefix("conditioner.embedders.0.transformer.")
    return name.removeprefix("model.diffusion_model.")


def write_sdxl(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) for k, s in SGM.items()}
    save_file(base, str(tmp_path / "sdxl.safetensors"))
    tensors = {}
    for k, shape in SGM.items():
        if k.startswith(("first_stage_model", "conditioner.embedders.1")):
            continue
        name = _sgm_module(k)
        key = ("lora_te1_" + name.removeprefix("text_encoder.") if name.startswith("text_encoder.") else
               "lora_unet_" + name).replace(".", "_")  # fmt: skip
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], 2, *(1 for _ in shape[2:]), generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(
        tensors, str(tmp_path / "lora.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"}
    )
    return tmp_path / "sdxl.safetensors", tmp_path / "lora.safetensors"


def test_sdxl_names_come_back_through_the_single_file_base(tmp_path: Path) -> None:
    base, path = write_sdxl(tmp_path)
    adapter = load_adapter(path, base=base)
    alone = load_adapter(path)  # sgm's own vocabulary gives the same names
    assert sorted(alone.modules) == sorted(adapter.modules)
    expected = [_sgm_module(k) for k in SGM if not k.startswith(("first_stage", "conditioner.embedders.1"))]
    assert sorted(adapter.modules) == sorted(expected)
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).double() for k in f.keys()}
    for name, module in adapter.modules.items():
        key = ("lora_te1_" + name.removeprefix("text_encoder.") if name.startswith("text_encoder.") else
               "lora_unet_" + name).replace(".", "_")  # fmt: skip
        down, up = t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"]
        dw = (up.reshape(up.shape[0], -1) @ down.reshape(2, -1)) / 2
        torch.testing.assert_close(module.delta(torch.float64).reshape(dw.shape), dw, rtol=0, atol=1e-12)
    out = save_adapter(adapter, tmp_path / "back.safetensors")
    with safe_open(str(path), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_name_two_base_modules_flatten_to_is_refused(tmp_path: Path) -> None:
    base = {"blocks.a_b.proj.weight": torch.zeros(4, 4), "blocks.a.b_proj.weight": torch.zeros(4, 4)}
    save_file(
        {"lora_unet_blocks_a_b_proj.lora_down.weight": torch.ones(1, 4),
         "lora_unet_blocks_a_b_proj.lora_up.weight": torch.ones(4, 1)},
        str(tmp_path / "x.safetensors"),
    )  # fmt: skip
    with pytest.raises(AdapterOpsError, match="flattening of 2 modules") as excinfo:
        load_adapter(tmp_path / "x.safetensors", base=base)
    assert "\n" not in str(excinfo.value)


# ------------------------------------------------------------------------------------------- merging


def _invoke(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_single_file_sdxl_checkpoint_merges_into_one_file_rounded_once(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    base, path = write_sdxl(tmp_path)
    stored = {k: v.to(dtype) for k, v in load_file(str(base)).items()}
    save_file(stored, str(base), metadata={"modelspec.title": "tiny sdxl"})
    out = tmp_path / "sdxl-styled.safetensors"
    _invoke("merge", base, path, "--weights", 0.5, "-o", out)
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).double() for k in f.keys()}
    merged = load_file(str(out))
    assert sorted(merged) == sorted(stored)
    updated = 0
    for key, W in stored.items():
        name = _sgm_module(key)
        kohya = ("lora_te1_" + name.removeprefix("text_encoder.") if name.startswith("text_encoder.") else
                 "lora_unet_" + name).replace(".", "_")  # fmt: skip
        if f"{kohya}.lora_down.weight" not in t:
            assert torch.equal(merged[key], W), key  # copied bit for bit
            continue
        down, up = t[f"{kohya}.lora_down.weight"], t[f"{kohya}.lora_up.weight"]
        dw = 0.5 * (up.reshape(up.shape[0], -1) @ down.reshape(2, -1)) / 2  # weight 0.5, alpha 1 / r 2
        expected = nearest(W.double() + dw.reshape(W.shape), dtype)
        assert merged[key].dtype == dtype and torch.equal(merged[key], expected), key
        updated += 1
    assert updated == 6
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    record = json.loads(metadata["adapterops"])  # the merge record, in the file: it has no folder
    assert (
        metadata["modelspec.title"] == "tiny sdxl" and record["history"][-1]["adapters"][0]["weight"] == 0.5
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["sdxl.safetensors", "lora.safetensors", out.name]
    )


def test_a_single_file_merge_refuses_a_directory_output_and_keeps_an_existing_file(tmp_path: Path) -> None:
    base, path = write_sdxl(tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(base), str(path), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "name the output *.safetensors" in result.output, result.output
    assert not (tmp_path / "merged").exists()
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    result = CliRunner().invoke(cli, ["merge", str(base), str(path), "-o", str(out)])
    assert result.exit_code != 0 and out.read_bytes() == b"old"
    _invoke("merge", base, path, "-o", out, "--force")
    assert len(load_file(str(out))) == len(SGM)


def test_a_flux_kohya_file_merges_into_its_bfl_single_file(tmp_path: Path, flux_weights: dict) -> None:
    base = tmp_path / "flux1.safetensors"
    stored = bfl_state_dict(flux_weights, "model.diffusion_model.")
    save_file(stored, str(base))
    path = write_flux_kohya(tmp_path / "flux.safetensors", flux_weights, list(BFL), seed=9)
    out = tmp_path / "flux1-styled.safetensors"
    _invoke("merge", base, path, "-o", out)
    ref, merged = reference(path), load_file(str(out))
    for bfl in BFL:
        key = f"model.diffusion_model.{bfl}.weight"
        expected = nearest(stored[key].double() + ref[_key(bfl)], torch.float32)
        assert torch.equal(merged[key], expected), key


def test_cli_verbs_name_an_sdxl_file_through_base(tmp_path: Path) -> None:
    """resize --base reads the SDXL names, writes kohya with the file's own keys, the best rank-1 of each."""
    base, path = write_sdxl(tmp_path)
    _invoke("resize", path, "--rank", 1, "--base", base, "-o", tmp_path / "r.safetensors")
    _invoke("resize", path, "--rank", 1, "-o", tmp_path / "alone.safetensors")  # sgm's own vocabulary
    small, full = reference_any(tmp_path / "r.safetensors"), reference_any(path)
    alone = reference_any(tmp_path / "alone.safetensors")
    assert sorted(alone) == sorted(small) and all(torch.equal(alone[k], small[k]) for k in small)
    assert sorted(small) == sorted(full)
    for key, dw in full.items():
        s = torch.linalg.svdvals(dw)
        error = float(torch.linalg.matrix_norm(small[key] - dw))
        assert error == pytest.approx(float(s[1:].square().sum().sqrt()), rel=1e-4), key
    assert "input_blocks.4.1.proj_in" in _invoke("info", tmp_path / "r.safetensors", "--base", base)


def reference_any(path: Path) -> dict[str, torch.Tensor]:
    """float64 dW (out, in * k * k) per kohya module of any shape, from the file's tensors."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).double() for k in f.keys()}
    out = {}
    for key in {k.split(".")[0] for k in t}:
        down, up = t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"]
        r = down.shape[0]
        alpha = float(t[f"{key}.alpha"]) if f"{key}.alpha" in t else r
        out[key] = alpha / r * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return out


# ------------------------------------------------------------------------------- SDXL on a diffusers UNet


def _sdxl_like_unet() -> torch.nn.Module:
    return tiny_unet(1, sdxl_pattern=True)


# kohya SDXL keys (sgm names) written by hand for this UNet, and the diffusers module each is
SDXL_KEYS = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_1_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_in_layers_2": "up_blocks.1.resnets.1.conv1",
    "out_2": "conv_out",
}  # fmt: skip


def test_an_sdxl_file_on_a_diffusers_unet_is_mapped_as_diffusers_maps_it(tmp_path: Path) -> None:
    unet = _sdxl_like_unet()
    unet.save_pretrained(tmp_path / "unet")
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for key, name in SDXL_KEYS.items():
        W = weights[f"{name}.weight"]
        tensors[f"lora_unet_{key}.lora_down.weight"] = torch.randn(2, *W.shape[1:], generator=g)
        tensors[f"lora_unet_{key}.lora_up.weight"] = torch.randn(
            W.shape[0], 2, *(1 for _ in W.shape[2:]), generator=g
        )
        tensors[f"lora_unet_{key}.alpha"] = torch.tensor(1.0)  # diffusers gives a file one alpha
    path = tmp_path / "sdxl-lora.safetensors"
    save_file(tensors, str(path))
    pipeline = diffusers.StableDiffusionXLPipeline
    state_dict, alphas = pipeline.lora_state_dict(str(path), unet_config=unet.config)
    pipeline.load_lora_into_unet(state_dict, alphas, unet=unet)
    unet.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    adapter = load_adapter(path, base=tmp_path / "unet")
    assert sorted(adapter.modules) == sorted(SDXL_KEYS.values())
    for name in SDXL_KEYS.values():
        ours = weights[f"{name}.weight"].double() + adapter.modules[name].delta(torch.float64)
        torch.testing.assert_close(merged[f"{name}.weight"].double(), ours, rtol=0, atol=1e-5)
    with pytest.raises(AdapterOpsError, match="in diffusers' names: save as PEFT"):
        save_adapter(adapter, tmp_path / "back.safetensors")
