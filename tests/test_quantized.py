"""Merging into quantized checkpoints: written back in their format with the error reported, or
dequantized and correctly rounded, or refused with what to do instead.

Every result is judged against a float64 reference built outside adapterops: the base dequantized
block by block (``tests.support.quantized.reference_dequantize``, or bitsandbytes through PEFT's own
``dequantize_bnb_weight``) plus PEFT's ``get_delta_weight``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops.cli import cli
from adapterops.ops.quantize import quantize
from adapterops.ops.rounding import round_to
from tests.support.factories import make_adapter, peft_deltas, save_base_checkpoint, tiny_llama
from tests.support.quantized import (
    bnb_checkpoint,
    fp8_block_checkpoint,
    reference_dequantize,
    scaled_checkpoint,
)
from tests.support.rounding import nearest

TARGETS = ["q_proj", "v_proj", "down_proj"]
EDGY = (24, 24)  # 32 = 24 + 8 and 64 = 24 + 24 + 16: partial blocks at every edge


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    base = save_base_checkpoint(tiny_llama, root / "base", dtype=torch.bfloat16)
    return {
        "base": base,
        "fp8": fp8_block_checkpoint(base, root / "fp8", block=EDGY),
        "fp8_16": fp8_block_checkpoint(base, root / "fp8_16", block=(16, 16)),
        "adapter": make_adapter(
            tiny_llama, root / "adapter", seed=1, r=4, lora_alpha=8, target_modules=TARGETS
        ),
    }


@pytest.fixture(scope="module")
def deltas(made: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {f"{k}.weight": v for k, v in peft_deltas(tiny_llama, made["adapter"]).items()}


def fp8_steps(values: torch.Tensor) -> torch.Tensor:
    """The float8_e4m3fn spacing at each value (3 mantissa bits; subnormal spacing 2^-9), from its definition."""
    exponent = torch.floor(torch.log2(values.abs().clamp_min(2.0**-6)))
    return torch.pow(2.0, exponent - 3)


def merge_quietly(*args, **kwargs) -> ao.MergeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ao.ApproximationWarning)
        return ao.merge(*args, **kwargs)


# ------------------------------------------------------------------------------------ FP8 block-scaled


def test_fp8_block_merge_is_written_as_fp8_rounded_to_nearest_with_its_error_reported(
    made: dict[str, Path], deltas: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    with pytest.warns(
        ao.ApproximationWarning, match=r"written back as fp8 \(float8_e4m3fn, scaled 24x24 blocks\)"
    ):
        result = ao.merge(made["fp8"], [made["adapter"]], out=tmp_path / "m")
    base, out = (
        load_file(str(made["fp8"] / "model.safetensors")),
        load_file(str(tmp_path / "m" / "model.safetensors")),
    )
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert set(result.quantization) == set(deltas)
    for key, delta in deltas.items():
        scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
        exact = reference_dequantize(base[key], base[scale_key], EDGY) + delta
        got = reference_dequantize(out[key], out[scale_key], EDGY)
        # the new scales: each block's largest magnitude lands on 448, the largest float8_e4m3fn
        scale = out[scale_key].double()
        full = scale.repeat_interleave(24, 0)[: exact.shape[0]].repeat_interleave(24, 1)[:, : exact.shape[1]]
        top = (exact.abs() / full).max()
        assert 448 * (1 - 2**-20) < float(top) <= 448
        # rounded to nearest on that grid, and the reported error is the measured one
        t = exact / full
        assert bool(((got - exact).abs() <= 0.5 * fp8_steps(t) * full * (1 + 1e-12)).all()), key
        rel = float((got - exact).norm() / exact.norm())
        assert result.quantization[key].rel_error == pytest.approx(rel, rel=1e-9)
        assert result.quantization[key].update_ratio == pytest.approx(
            float((got - exact).norm() / delta.norm())
        )
    for key in base:  # tensors no adapter touches, and their scales, are the base's bytes
        if key.removesuffix("_scale_inv").removesuffix(".weight") + ".weight" not in deltas:
            assert torch.equal(out[key].view(torch.uint8), base[key].view(torch.uint8)), key
    record = json.loads((tmp_path / "m" / "adapterops_merge.json").read_text())
    reported = record["history"][-1]["quantization"]["tensors"]
    assert reported.keys() == deltas.keys()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"][
        "weight_block_size"
    ] == [24, 24]
    report = ao.verify(made["fp8"], [made["adapter"]], tmp_path / "m")
    assert report.passed() and 0.49 < report.max_ulp <= 0.5
    assert all(c.rel_error == pytest.approx(c.reported_rel_error) for c in report.checks if c.updated)


def test_fp8_output_is_read_by_transformers_as_adapterops_wrote_it(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """transformers (on a CPU it dequantizes FP8 to bf16 as it loads) sees the weights we computed."""
    from transformers import AutoModelForCausalLM

    merge_quietly(made["fp8_16"], [made["adapter"]], out=tmp_path / "m")
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.k_proj",
    ):
        ours = reference_dequantize(out[f"{name}.weight"], out[f"{name}.weight_scale_inv"], (16, 16))
        theirs = model.get_submodule(name).weight.detach()
        assert torch.equal(theirs, ours.to(theirs.dtype)), name


def test_fp8_dequantized_to_bfloat16_is_correctly_rounded_and_drops_the_quantization(
    made: dict[str, Path], deltas: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    result = ao.merge(made["fp8"], [made["adapter"]], out=tmp_path / "m", dtype="bfloat16")
    assert not result.quantization
    base, out = (
        load_file(str(made["fp8"] / "model.safetensors")),
        load_file(str(tmp_path / "m" / "model.safetensors")),
    )
    assert not any(k.endswith("_scale_inv") for k in out)
    for key in (k for k in base if not k.endswith("_scale_inv")):
        if base[key].dtype != torch.float8_e4m3fn:
            assert torch.equal(out[key], base[key]), key
            continue
        exact = reference_dequantize(base[key], base[key.removesuffix(".weight") + ".weight_scale_inv"], EDGY)
        exact = exact + deltas.get(key, 0)
        assert out[key].dtype == torch.bfloat16
        assert torch.equal(out[key], nearest(exact, torch.bfloat16)), key
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    record = json.loads((tmp_path / "m" / "adapterops_merge.json").read_text())
    assert record["history"][-1]["dtype"] == "bfloat16"
    report = ao.verify(made["fp8"], [made["adapter"]], tmp_path / "m")
    assert report.passed() and len(report.checks) == len(out) and report.max_ulp <= 0.5


def test_a_weight_and_its_scale_in_different_shards(made: dict[str, Path], tmp_path: Path) -> None:
    """The scales' shard comes first: each new scale is computed with its weight, which waits for
    its own shard; dequantized, the scales' shard disappears from the output and its index."""
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    state = load_file(str(made["fp8"] / "model.safetensors"))
    names = {"model-00001-of-00002.safetensors": sorted(k for k in state if k.endswith("_scale_inv"))}
    names["model-00002-of-00002.safetensors"] = sorted(
        set(state) - set(names["model-00001-of-00002.safetensors"])
    )
    for file, keys in names.items():
        save_file({k: state[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in names.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (sharded / "config.json").write_text((made["fp8"] / "config.json").read_text())

    one = merge_quietly(made["fp8"], [made["adapter"]], out=tmp_path / "one")
    two = merge_quietly(sharded, [made["adapter"]], out=tmp_path / "two")
    assert two.quantization == one.quantization
    merged = load_file(str(tmp_path / "one" / "model.safetensors"))
    for file, keys in names.items():
        shard = load_file(str(tmp_path / "two" / file))
        assert all(torch.equal(shard[k].view(torch.uint8), merged[k].view(torch.uint8)) for k in keys)
    assert ao.verify(sharded, [made["adapter"]], tmp_path / "two").passed()

    ao.merge(sharded, [made["adapter"]], out=tmp_path / "bf16", dtype="bfloat16")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00002-of-00002.safetensors"}
    assert not (tmp_path / "bf16" / "model-00001-of-00002.safetensors").exists()
    assert ao.verify(sharded, [made["adapter"]], tmp_path / "bf16").passed()


def test_verify_catches_a_requantized_weight_off_by_one_step(made: dict[str, Path], tmp_path: Path) -> None:
    merge_quietly(made["fp8"], [made["adapter"]], out=tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.weight"
    bits = tensors[key].view(torch.uint8).clone()
    bits[3, 5] += 1  # the next float8 value: a step away from the nearest
    tensors[key] = bits.view(torch.float8_e4m3fn)
    save_file(tensors, str(path), metadata={"format": "pt"})
    report = ao.verify(made["fp8"], [made["adapter"]], tmp_path / "m")
    assert not report.passed()
    assert report.max_ulp > 0.5


# ------------------------------------------------------------------------------ per-row int8 and float8


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("with_config", [True, False])
def test_per_row_scaled_weights_are_not_merged_as_if_unscaled(
    made: dict[str, Path],
    deltas: dict[str, torch.Tensor],
    tmp_path: Path,
    dtype: torch.dtype,
    with_config: bool,
) -> None:
    """Before, an int8 weight with a weight_scale merged as if the scale were 1 (and exited 0)."""
    quantized = scaled_checkpoint(made["base"], tmp_path / "q", dtype, with_config=with_config)
    result = merge_quietly(quantized, [made["adapter"]], out=tmp_path / "m")
    base, out = (
        load_file(str(quantized / "model.safetensors")),
        load_file(str(tmp_path / "m" / "model.safetensors")),
    )
    for key, delta in deltas.items():
        scale_key = key.removesuffix(".weight") + ".weight_scale"
        exact = base[key].double() * base[scale_key].double() + delta
        scale = out[scale_key].double()
        got = out[key].double() * scale
        step = scale.expand_as(exact) if dtype == torch.int8 else fp8_steps(exact / scale) * scale
        assert out[key].dtype == dtype and bool(((got - exact).abs() <= 0.5 * step * (1 + 1e-12)).all()), key
        assert result.quantization[key].rel_error == pytest.approx(float((got - exact).norm() / exact.norm()))
    assert ao.verify(quantized, [made["adapter"]], tmp_path / "m").passed()
    ao.merge(quantized, [made["adapter"]], out=tmp_path / "f", dtype="float32")
    dequantized = load_file(str(tmp_path / "f" / "model.safetensors"))
    for key, delta in deltas.items():
        exact = base[key].double() * base[key.removesuffix(".weight") + ".weight_scale"].double() + delta
        assert torch.equal(dequantized[key], exact.float()), key  # float64 -> float32 is one rounding
    assert ao.verify(quantized, [made["adapter"]], tmp_path / "f").passed()


# ------------------------------------------------------------------------------------------ bitsandbytes


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_needs_a_dtype_and_merges_into_its_own_dequantization(
    made: dict[str, Path], deltas: dict[str, torch.Tensor], tmp_path: Path, bits: int
) -> None:
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    quantized = bnb_checkpoint(made["base"], tmp_path / "bnb", bits)
    code, out, err = run("merge", quantized, made["adapter"], "-o", tmp_path / "refused")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "far smaller than a quantization step" in err and "--dtype bfloat16" in err
    assert not (tmp_path / "refused").exists()

    ao.merge(quantized, [made["adapter"]], out=tmp_path / "m", dtype="bfloat16")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu")
    for key, delta in deltas.items():
        layer = model.get_submodule(key.removesuffix(".weight"))
        W = dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).double()
        assert torch.equal(merged[key], nearest(W + delta, torch.bfloat16)), key
    assert not any(
        k.endswith(("absmax", "quant_map", "SCB", "weight_format")) or "quant_state" in k for k in merged
    )
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert ao.verify(quantized, [made["adapter"]], tmp_path / "m").passed()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # an ordinary bf16 model now
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# ----------------------------------------------------------------------------------------------- refusals


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def packed_checkpoint(made: dict[str, Path], out: Path, method: str, keys: dict[str, torch.Tensor]) -> Path:
    out.mkdir()
    state = load_file(str(made["base"] / "model.safetensors"))
    state.update(keys)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((made["base"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("method", "keys", "message"),
    [
        ("gptq", ["qweight", "qzeros", "scales", "g_idx"], "GPTQ-quantized"),
        ("awq", ["qweight", "qzeros", "scales"], "AWQ-quantized"),
        ("compressed-tensors", ["weight_packed", "weight_scale", "weight_shape"], "packed"),
        ("hqq", [], "quantized with 'hqq'"),
    ],
)
def test_packed_int4_and_unknown_methods_are_refused_with_what_to_do(
    made: dict[str, Path], tmp_path: Path, method: str, keys: list[str], message: str
) -> None:
    prefix = "model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.{k}": torch.zeros(4, 8, dtype=torch.int32) for k in keys}
    quantized = packed_checkpoint(made, tmp_path / method, method, tensors)
    code, out, err = run("merge", quantized, made["adapter"], "-o", tmp_path / "m")
    assert (code, out) == (2, "") and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert (
        "merge the adapter into the original 16-bit checkpoint" in err
        and "quantize the merged model again" in err
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_quantized_weight_without_its_scale_is_refused(
    made: dict[str, Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    (tmp_path / "q").mkdir()
    state = load_file(str(made["base"] / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = state[key].float().clamp(-100, 100).to(dtype)
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text((made["base"] / "config.json").read_text())
    with pytest.raises(
        ao.UnsupportedAdapterError, match=rf"{key} is stored as (I8|F8_E4M3) with no scale tensor"
    ):
        ao.merge(tmp_path / "q", [made["adapter"]], out=tmp_path / "m")


def test_dtype_is_for_quantized_checkpoints_and_merge_steps_take_it_inside(
    made: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ao.InvalidInputError, match="dtype=bfloat16 dequantizes a quantized checkpoint"):
        ao.merge(made["base"], [made["adapter"]], out=tmp_path / "m", dtype="bfloat16")
    code, _, err = run("merge", made["fp8"], made["adapter"], "-o", tmp_path / "m", "--dtype", "int4")
    assert code == 2 and "int4" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{base: {made['fp8']}, a: {made['adapter']}}}\n"
        "steps:\n  - name: m\n    merge: {base: base, inputs: [a], dtype: bfloat16}\n    output: out/m\n"
    )
    ao.run_recipe(recipe)
    assert (
        load_file(str(tmp_path / "out" / "m" / "model.safetensors"))[
            "model.layers.0.mlp.up_proj.weight"
        ].dtype
        == torch.bfloat16
    )
    recipe.write_text(
        recipe.read_text().replace("    output: out/m\n", "    output: out/n\n    dtype: bfloat16\n")
    )
    with pytest.raises(
        ao.RecipeError, match=r"r.yaml:6: step 'm': a step's dtype is the dtype of an adapter"
    ):
        ao.run_recipe(recipe)


def test_dry_run_and_cli_say_what_happens_to_a_quantized_base(made: dict[str, Path], tmp_path: Path) -> None:
    plan = ao.merge(made["fp8"], [made["adapter"]], out=tmp_path / "m", dry_run=True, dtype="bfloat16").plan
    assert plan["quantization"] == "fp8 (float8_e4m3fn, scaled 24x24 blocks)"
    assert plan["dtype"] == "bfloat16" and plan["tensors_dequantized"] == 14
    assert plan["output_bytes"] > (made["fp8"] / "model.safetensors").stat().st_size  # bf16 is wider than fp8
    code, out, err = run("merge", made["fp8"], made["adapter"], "-o", tmp_path / "m", "-v")
    assert code == 0
    assert err.startswith("warning: 6 tensor(s) written back as fp8") and "relative error up to" in err
    lines = [line for line in out.splitlines() if line.startswith("  model.")]
    assert len(lines) == 6 and all("steps of its grid" in line for line in lines)


# ------------------------------------------------------------------------------------- the kernels, by hand


def test_quantize_worked_by_hand() -> None:
    """The docstring's example: one block, amax 8 -> s = 1/56; 0.3 / s = 16.8 lands on 16 (steps of 2)."""
    X = torch.tensor([[8.0, -1.0, 0.3]], dtype=torch.float64)
    q, s, error = quantize(X, torch.float8_e4m3fn, (1, 3), torch.float32)
    assert q.float().tolist() == [[448.0, -56.0, 16.0]]
    assert float(s) == pytest.approx(1 / 56) and float(s) * 448 >= 8.0
    assert error.max_abs_error == pytest.approx(0.3 - 16 / 56, rel=1e-6)
    assert error.max_step == pytest.approx(0.4, rel=1e-5)


def test_round_to_float8_is_nearest_even_off_every_midpoint() -> None:
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    values = values[torch.isfinite(values)].unique()
    midpoints = (values[1:] + values[:-1]) / 2
    for side in (-1.0, 1.0):
        x = midpoints + side * 2.0**-40 * midpoints.abs().clamp_min(2.0**-9)
        nearest_value = values[(x[:, None] - values[None, :]).abs().argmin(dim=1)]
        assert torch.equal(round_to(x, torch.float8_e4m3fn).double(), nearest_value)
    assert not torch.equal(x.to(torch.float8_e4m3fn).double(), nearest_value)  # torch's cast rounds twice
    assert math.isclose(float(round_to(torch.tensor([1e9], dtype=torch.float64), torch.float8_e4m3fn)), 448)


@pytest.mark.parametrize(
    ("quantization_config", "message"),
    [
        ([1, 2], "config.json's quantization_config is a list, not an object; fix config.json"),
        (
            {"quant_method": "fp8", "weight_block_size": "128"},
            "config.json's weight_block_size is '128', not two positive integers; fix config.json",
        ),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 0]},
            "config.json's weight_block_size is [128, 0], not two positive integers; fix config.json",
        ),
    ],
)
def test_a_malformed_quantization_config_is_one_clear_line(
    tmp_path: Path, quantization_config: object, message: str
) -> None:
    import shutil

    inputs = Path(__file__).parent.parent / "recipes" / "inputs"
    base = shutil.copytree(inputs / "tiny-llama-64", tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    code, out, err = run("merge", base, inputs / "style-a", "-o", tmp_path / "out")
    assert (code, out) == (2, "") and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
