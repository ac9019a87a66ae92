"""kohya LoRA / LoCon files: read, write, resize and combine, judged by diffusers and float64 references.

The files are written here by the test's own code, following sd-scripts' naming rule (``lora_unet_``
+ the module path with '.' -> '_'; lora_down (r, in[, k, k]), lora_up (out, r[, 1, 1]), alpha).
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
from adapterops.io.kohya import flatten, unflatten
from tests.support.diffusion import tiny_unet

LINEAR = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.resnets.0.time_emb_proj",
]
CONV = [
    "down_blocks.0.attentions.0.proj_in",  # 1x1
    "up_blocks.0.resnets.0.conv_shortcut",  # 1x1
    "down_blocks.0.resnets.0.conv1",  # 3x3 (LoCon)
    "up_blocks.0.upsamplers.0.conv",  # 3x3
]
METADATA = {
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_output_name": "tiny",
    "sshs_model_hash": "ab",
}


def _unet() -> torch.nn.Module:
    return tiny_unet(0)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unet")
    _unet().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(unet_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(unet_dir / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_kohya(
    path: Path,
    base: dict[str, torch.Tensor],
    names: list[str],
    *,
    rank: int = 4,
    alphas: dict[str, float | None] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A kohya file with random factors on ``names`` (alpha 2.0 unless ``alphas`` says; None: no alpha key)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        W = base[f"{name}.weight"]
        key = "lora_unet_" + name.replace(".", "_")
        down_shape = (rank, *W.shape[1:])
        up_shape = (W.shape[0], rank, *(1 for _ in W.shape[2:]))
        tensors[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=g).to(dtype)
        tensors[f"{key}.lora_up.weight"] = (0.3 * torch.randn(up_shape, generator=g)).to(dtype)
        alpha = (alphas or {}).get(name, 2.0)
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(tensors, str(path), metadata=METADATA if metadata is None else metadata)
    return path


def raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def reference_deltas(path: Path) -> dict[str, torch.Tensor]:
    """float64 dW = alpha / r * up @ down per module, straight from the file, keyed by kohya name."""
    tensors, _ = raw(path)
    out = {}
    for key in {k.split(".")[0] for k in tensors}:
        down, up = tensors[f"{key}.lora_down.weight"].double(), tensors[f"{key}.lora_up.weight"].double()
        r = down.shape[0]
        alpha = float(tensors[f"{key}.alpha"]) if f"{key}.alpha" in tensors else r
        dw = (alpha / r) * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))
        out[key] = dw.reshape(up.shape[0], *down.shape[1:])
    return out


def invoke(*args: object) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


# ------------------------------------------------------------------------------------------- naming


def test_every_unet_module_name_comes_back_from_its_flattening_without_a_base() -> None:
    names = [n for n, m in _unet().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(names) > 50
    assert all(unflatten(flatten(n)) == n for n in names)
    for clip in ("text_model.encoder.layers.11.self_attn.out_proj", "text_model.encoder.layers.0.mlp.fc2"):
        assert unflatten(flatten(clip)) == clip
    # original-layout names come back in their model's own vocabulary (sgm's UNet, BFL's Flux)
    assert unflatten("input_blocks_4_1_proj_in") == "input_blocks.4.1.proj_in"
    assert unflatten("final_layer_adaLN_modulation_1") == "final_layer.adaLN_modulation.1"
    assert unflatten("input_blocks_4_1_bogus_proj_in") is None  # a word of no vocabulary: no guess


def test_names_through_the_base_equal_those_without(tmp_path: Path, unet_dir: Path, base: dict) -> None:
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV)
    assert sorted(load_adapter(path).modules) == sorted(LINEAR + CONV)
    assert sorted(load_adapter(path, base=unet_dir).modules) == sorted(LINEAR + CONV)


# ------------------------------------------------------------------------------------------- diffusers


def test_diffusers_merges_what_adapterops_reads(tmp_path: Path, base: dict) -> None:
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV)
    pipeline = diffusers.StableDiffusionPipeline
    state_dict, alphas = pipeline.lora_state_dict(str(path))
    unet = _unet()
    pipeline.load_lora_into_unet(state_dict, alphas, unet=unet)
    unet.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    reference = reference_deltas(path)
    adapter = load_adapter(path)
    for name in LINEAR + CONV:
        expected = base[f"{name}.weight"].double() + reference["lora_unet_" + flatten(name)]
        ours = base[f"{name}.weight"].double() + adapter.modules[name].delta(torch.float64)
        torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight"
    assert torch.equal(merged[untouched], base[untouched])


def test_per_module_alphas_and_a_missing_alpha(tmp_path: Path, base: dict) -> None:
    alphas: dict[str, float | None] = {LINEAR[0]: 1.0, LINEAR[1]: 7.0, CONV[2]: None, CONV[0]: 0.5}
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV, alphas=alphas)
    adapter = load_adapter(path)
    reference = reference_deltas(path)
    assert adapter.modules[CONV[2]].scale == 1.0  # alpha = r
    assert adapter.modules[LINEAR[1]].scale == 7.0 / 4
    for name, m in adapter.modules.items():
        torch.testing.assert_close(
            m.delta(torch.float64), reference["lora_unet_" + flatten(name)], rtol=0, atol=1e-12
        )


def test_alpha_zero_is_read_as_rank_as_sd_scripts_trains_it(tmp_path: Path, base: dict) -> None:
    # sd-scripts' LoRAModule: ``alpha = self.lora_dim if alpha is None or alpha == 0 else alpha``
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR, alphas={LINEAR[0]: 0.0, LINEAR[1]: 2.0})
    with pytest.warns(UserWarning, match=r"1 module\(s\) store alpha 0 .* scale 0"):
        adapter = load_adapter(path)
    tensors, _ = raw(path)
    key = "lora_unet_" + flatten(LINEAR[0])
    by_hand = tensors[key + ".lora_up.weight"].double() @ tensors[key + ".lora_down.weight"].double()
    torch.testing.assert_close(adapter.modules[LINEAR[0]].delta(torch.float64), by_hand, rtol=0, atol=1e-12)
    assert adapter.modules[LINEAR[1]].scale == 2.0 / adapter.modules[LINEAR[1]].rank


# ------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_exact(tmp_path: Path, base: dict, dtype: torch.dtype) -> None:
    alphas: dict[str, float | None] = {LINEAR[1]: 3.0, CONV[2]: None}
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV, alphas=alphas, dtype=dtype)
    out = save_adapter(load_adapter(path), tmp_path / "b.safetensors")
    (before, meta_before), (after, meta_after) = raw(path), raw(out)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert meta_after == meta_before  # the hash stays: the tensors are the same


def test_cli_resize_keeps_the_format_and_is_the_best_rank(tmp_path: Path, base: dict) -> None:
    alphas: dict[str, float | None] = {LINEAR[0]: 1.0, CONV[2]: 8.0}
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV, alphas=alphas)
    invoke("resize", path, "--rank", 2, "-o", tmp_path / "small.safetensors")
    small = tmp_path / "small.safetensors"
    assert small.is_file()
    tensors, metadata = raw(small)
    assert all(t.shape[0] == 2 for k, t in tensors.items() if k.endswith("lora_down.weight"))
    assert "sshs_model_hash" not in metadata and metadata["ss_network_dim"] == "2"
    assert metadata["ss_output_name"] == "tiny" and "adapterops" in metadata
    got, full = reference_deltas(small), reference_deltas(path)
    for key, dw in full.items():
        s = torch.linalg.svdvals(dw.reshape(dw.shape[0], -1))
        optimal = float(s[2:].square().sum().sqrt())
        error = float(torch.linalg.matrix_norm((got[key] - dw).reshape(dw.shape[0], -1)))
        assert error == pytest.approx(optimal, rel=1e-4, abs=1e-5), key
    assert "format: kohya" in invoke("info", small)


def test_cli_combine_keeps_the_format_and_adds_exactly(tmp_path: Path, base: dict) -> None:
    a = write_kohya(tmp_path / "a.safetensors", base, LINEAR + CONV, alphas={LINEAR[0]: 1.0}, seed=1)
    b = write_kohya(tmp_path / "b.safetensors", base, LINEAR[:3] + CONV[2:], alphas={CONV[2]: 3.0}, seed=2)
    invoke("combine", a, b, "-o", tmp_path / "mix.safetensors")
    mix, da, db = (reference_deltas(p) for p in (tmp_path / "mix.safetensors", a, b))
    assert sorted(mix) == sorted(da)
    for key, dw in da.items():
        expected = dw + db.get(key, torch.zeros_like(dw))
        torch.testing.assert_close(mix[key], expected, rtol=0, atol=1e-5)


def test_force_replaces_an_existing_output_file(tmp_path: Path, base: dict) -> None:
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR)
    out = tmp_path / "small.safetensors"
    out.write_bytes(b"old")
    result = CliRunner().invoke(cli, ["resize", str(path), "--rank", "2", "-o", str(out)])
    assert result.exit_code != 0 and out.read_bytes() == b"old"
    invoke("resize", path, "--rank", "2", "-o", out, "--force")
    assert raw(out)[0]


# ------------------------------------------------------------------------------------------- refused


def _one_line(excinfo: pytest.ExceptionInfo[AdapterOpsError], *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_files_are_refused_with_one_line(tmp_path: Path, unet_dir: Path, base: dict) -> None:
    good = write_kohya(tmp_path / "good.safetensors", base, LINEAR[:2])
    tensors, _ = raw(good)

    unknown = tmp_path / "unknown.safetensors"
    save_file({**tensors, "lora_unet_conv_in.oft_blocks": torch.zeros(2, 2)}, str(unknown))
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(unknown)
    _one_line(excinfo, "oft_blocks", "not a kohya LoRA key")

    missing = tmp_path / "missing.safetensors"
    key = "lora_unet_" + flatten(LINEAR[0])
    save_file({k: v for k, v in tensors.items() if k != f"{key}.lora_up.weight"}, str(missing))
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(missing)
    _one_line(excinfo, key, "lora_up.weight")

    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, f"{key}.lora_down.weight": torch.zeros(4, 5)}, str(wrong))
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(wrong, base=unet_dir)
    _one_line(excinfo, key, "base")

    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 2),
        },
        str(sdxl),
    )
    bogus = tmp_path / "bogus.safetensors"  # an sgm name with a word sgm's UNet does not have
    save_file({k.replace("_1_proj", "_1_bogus_proj"): v for k, v in load_file(str(sdxl)).items()}, str(bogus))
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(bogus)
    _one_line(excinfo, "base=")
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(sdxl, base=unet_dir)
    _one_line(excinfo, "original single-file checkpoint")


def test_provenance_is_written_as_json(tmp_path: Path, base: dict) -> None:
    path = write_kohya(tmp_path / "a.safetensors", base, LINEAR[:1])
    invoke("resize", path, "--rank", 1, "-o", tmp_path / "r.safetensors")
    record = json.loads(raw(tmp_path / "r.safetensors")[1]["adapterops"])
    assert record["operation"] == "resize"
    assert load_adapter(tmp_path / "r.safetensors").provenance == record


def test_text_encoder_modules_keep_their_prefix(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for key, (out, inn) in {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": (16, 8),
    }.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, inn, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "te.safetensors"))
    adapter = load_adapter(tmp_path / "te.safetensors")
    assert sorted(adapter.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
    ]
    after, _ = raw(save_adapter(adapter, tmp_path / "back.safetensors"))
    assert sorted(after) == sorted(tensors) and all(torch.equal(after[k], tensors[k]) for k in tensors)


def test_a_language_model_adapter_has_no_kohya_form(tmp_path: Path) -> None:
    """convert --to kohya of a Llama adapter would write lora_unet_model_layers_... keys that no kohya
    reader maps back: refused, exit 2, nothing written."""
    out = tmp_path / "x.safetensors"
    examples = Path(__file__).resolve().parents[1] / "recipes" / "inputs" / "style-a"
    result = CliRunner().invoke(cli, ["convert", str(examples), "--to", "kohya", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "is not a module of a Stable Diffusion UNet or CLIP text encoder" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("part", "value"), [("alpha", float("nan")), ("alpha", float("inf")), ("lora_down", float("nan"))]
)
def test_non_finite_values_are_refused(tmp_path: Path, part: str, value: float) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(4, 8),
        f"{key}.lora_up.weight": torch.randn(8, 4),
        f"{key}.alpha": torch.tensor(2.0),
    }
    name = f"{key}.alpha" if part == "alpha" else f"{key}.lora_down.weight"
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterOpsError, match=f"{part} contains NaN or Inf values"):
        load_adapter(tmp_path / "x.safetensors")
