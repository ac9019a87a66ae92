"""``convert --for ENGINE``: adapters a serving engine reads exactly as PEFT does, judged by PEFT,
diffusers and float64 references written here from PEFT's rule (not adapterops's reading).

PEFT's rule for one module (peft/tuners/lora/layer.py, config.py):

    r_m     = rank_pattern[key] if a key matches the module name ((.*\\.)?key$) else r
    alpha_m = alpha_pattern[key] if a key matches else lora_alpha
    dW_m    = alpha_m / r_m · B @ A        (rsLoRA: alpha_m / sqrt(r_m))

A served PEFT directory must say one r, lora_alpha = r and no patterns, so its dW is B' @ A'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops import serving
from adapterops.cli import cli
from adapterops.errors import InvalidInputError, UnsupportedAdapterError, cli_spelling, param
from tests.support.factories import base_logits, make_adapter, peft_logits, tiny_llama
from tests.test_gguf import base_dir

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[1, 5, 9, 33, 77, 100, 3]])


def read_peft(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "adapter_config.json").read_text()), load_file(
        str(path / "adapter_model.safetensors")
    )


def _pattern(pattern: dict, name: str) -> object:
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def reference_deltas(path: Path) -> dict[str, torch.Tensor]:
    """float64 dW per module from the files, by PEFT's rule above (patterns and rsLoRA by hand)."""
    config, tensors = read_peft(path)
    out = {}
    for key in tensors:
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A = tensors[key].double()
        B = tensors[key.replace("lora_A", "lora_B")].double()
        r = _pattern(config.get("rank_pattern") or {}, name) or config["r"]
        alpha = _pattern(config.get("alpha_pattern") or {}, name)
        alpha = config["lora_alpha"] if alpha is None else alpha
        assert A.shape[0] == r, (name, A.shape, r)  # the config describes these tensors
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[name] = scale * B @ A
    return out


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert sorted(got) == sorted(want)
    return {n: float((got[n] - want[n]).norm() / want[n].norm()) for n in want}


def patterned(tmp_path: Path, **kwargs: object) -> Path:
    """A float32 Llama adapter with everything that makes scales differ: rsLoRA, a rank pattern and
    an alpha pattern (q_proj rank 6, v_proj alpha 3, the rest r 4 and alpha 8)."""
    options: dict = dict(
        r=4,
        lora_alpha=8,
        target_modules=ALL,
        rank_pattern={"q_proj": 6},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
    )
    options.update(kwargs)
    return make_adapter(tiny_llama, tmp_path / "in", seed=3, **options)


# --------------------------------------------------------------------------------------- PEFT engines


@pytest.mark.parametrize("engine", ["vllm", "sglang", "tgi"])
def test_served_adapter_is_one_rank_scale_one_and_peft_gives_the_same_outputs(
    tmp_path: Path, engine: str
) -> None:
    adapter = patterned(tmp_path)
    base = base_dir(tiny_llama, tmp_path / "base") if engine == "tgi" else None
    out = ao.convert(adapter, tmp_path / engine, engine=engine, base=base)
    config, tensors = read_peft(out)
    # what every engine reads: one r, lora_alpha = r, no patterns, no rsLoRA, short target names
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert config["lora_alpha"] == config["r"] == 6 and config["use_rslora"] is False
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {6}
    assert config["target_modules"] == sorted(ALL)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # float32 in, float32 out
    # the update of every module against the original's, by PEFT's rule by hand: float32 rounding of B
    errors = relative_errors(reference_deltas(out), reference_deltas(adapter))
    assert 0 < max(errors.values()) < 2**-23
    # PEFT itself, on a tiny Llama in float64: the same logits
    want, got = peft_logits(tiny_llama, adapter, TOKENS), peft_logits(tiny_llama, out, TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (want - base_logits(tiny_llama, TOKENS)).abs().max() > 1e-3  # the adapter does something


def test_the_reported_error_is_the_error_of_the_written_updates(tmp_path: Path) -> None:
    adapter = patterned(tmp_path)
    out, served = serving.write(ao.load_adapter(adapter), tmp_path / "out", "vllm")
    errors = relative_errors(reference_deltas(out), reference_deltas(adapter))
    assert served.max_rel_error == pytest.approx(max(errors.values()), rel=1e-6)
    by_module = {r.name: r.rel_error for r in served.reports}
    for name, error in errors.items():
        assert by_module[name] == pytest.approx(error, rel=1e-6, abs=1e-300)
    q = [n for n in errors if n.endswith("q_proj")]
    assert set(served.padded) == set(errors) - set(q)  # rank 4 -> 6; q_proj already 6
    assert set(served.folded) == set(errors)


def test_power_of_two_scales_fold_bit_exactly(tmp_path: Path) -> None:
    """alpha / r = 2 and 1/2: B' = 2B, B/2 exactly, PEFT's deltas equal to the last bit."""
    adapter = make_adapter(
        tiny_llama,
        tmp_path / "in",
        seed=4,
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION,
        alpha_pattern={"o_proj": 2},
    )
    out, served = serving.write(ao.load_adapter(adapter), tmp_path / "out", "vllm")
    assert served.max_rel_error == 0.0 and served.padded == ()
    got, want = reference_deltas(out), reference_deltas(adapter)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_half_and_the_error_is_its_rounding(tmp_path: Path, dtype: torch.dtype) -> None:
    adapter = patterned(tmp_path, save_dtype=dtype)
    out, served = serving.write(ao.load_adapter(adapter), tmp_path / "out", "sglang")
    _, tensors = read_peft(out)
    assert {t.dtype for t in tensors.values()} == {dtype}
    errors = relative_errors(reference_deltas(out), reference_deltas(adapter))
    unit = 2.0 ** -(8 if dtype is torch.bfloat16 else 11)
    assert 0 < max(errors.values()) <= unit
    assert served.max_rel_error == pytest.approx(max(errors.values()), rel=1e-6)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("engine", "options", "words"),
    [
        ("vllm", dict(target_modules=ATTENTION, use_dora=True), "DoRA"),
        ("tgi", dict(target_modules=ATTENTION, lora_bias=True), "lora_B bias"),
        ("vllm", dict(target_modules=ATTENTION, modules_to_save=["lm_head"]), "tensors stored whole"),
        ("sglang", dict(target_modules=["q_proj", "v_proj"]), "but not on k_proj"),
        ("sglang", dict(target_modules=["gate_proj"]), "but not on up_proj"),
        ("sglang", dict(target_modules=[*ATTENTION, "lm_head"]), "LoRA on lm_head"),
        ("tgi", dict(target_modules=[*ATTENTION, "lm_head"]), "LoRA on lm_head"),
        ("tgi", dict(target_modules=ATTENTION, layers_to_transform=[0]), "layer 1 without LoRA on"),
        ("vllm", dict(target_modules=["q_proj"], r=513, lora_alpha=8), "rank 513"),
        ("llama.cpp", dict(target_modules=ATTENTION, use_dora=True), "DoRA"),
    ],
)
def test_what_the_engine_cannot_read_is_refused_with_one_line(
    tmp_path: Path, engine: str, options: dict, words: str
) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "in", seed=5, **{"r": 4, "lora_alpha": 8, **options})
    base = base_dir(tiny_llama, tmp_path / "base") if engine in ("tgi", "llama.cpp") else None
    with pytest.raises(UnsupportedAdapterError) as info:
        ao.convert(adapter, tmp_path / "out", engine=engine, base=base)
    message = str(info.value)
    assert words in message and "adapterops merge" in message and "\n" not in message
    assert message.startswith(f"{engine} cannot read")
    assert not (tmp_path / "out").exists()


def test_embedding_lora_is_refused_where_the_engine_has_none(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama,
        tmp_path / "in",
        seed=6,
        r=4,
        target_modules=["embed_tokens", "q_proj"],
        save_embedding_layers=False,
    )
    base = base_dir(tiny_llama, tmp_path / "base")
    for engine, engine_base in (("sglang", None), ("tgi", base)):
        with pytest.raises(UnsupportedAdapterError, match="embedding LoRA"):
            ao.convert(adapter, tmp_path / engine, engine=engine, base=engine_base)
    # vLLM reads lora_embedding_A/B: served, and PEFT gives the same outputs
    out = ao.convert(adapter, tmp_path / "vllm", engine="vllm")
    torch.testing.assert_close(
        peft_logits(tiny_llama, out, TOKENS), peft_logits(tiny_llama, adapter, TOKENS), rtol=1e-6, atol=1e-6
    )


def test_options_take_exactly_one_of_to_and_for(tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "in", seed=7, r=4, target_modules=ATTENTION)
    with pytest.raises(InvalidInputError, match="not both"):
        ao.convert(adapter, tmp_path / "o", to="peft", engine="vllm")
    with pytest.raises(InvalidInputError, match="none was given"):
        ao.convert(adapter, tmp_path / "o")
    with pytest.raises(InvalidInputError, match="unknown engine 'onnx'"):
        ao.convert(adapter, tmp_path / "o", engine="onnx")
    with pytest.raises(InvalidInputError, match="base is not used"):
        ao.convert(adapter, tmp_path / "o", engine="vllm", base=tmp_path)
    with pytest.raises(InvalidInputError, match="pass the base model"):
        ao.convert(adapter, tmp_path / "o", engine="tgi")
    with cli_spelling():
        assert param("engine", "vllm") == "--for vllm"
    result = CliRunner().invoke(cli, ["convert", str(adapter), "-o", str(tmp_path / "o")])
    assert (
        result.exit_code == 2
        and "give one of --to FORMAT" in result.output
        and "--for ENGINE" in result.output
    )


def test_every_renamed_flag_is_spelled_the_same_in_messages() -> None:
    from adapterops.errors import FLAGS
    from adapterops.options import VERBS, ConvertOptions, WriteOptions, option_fields

    renamed = {
        f.name: f.metadata["flag"]
        for record in (*VERBS.values(), ConvertOptions, WriteOptions)
        for f in option_fields(record)
        if f.metadata.get("flag")
    }
    assert renamed == FLAGS == {"engine": "--for"}


def test_cli_json(tmp_path: Path) -> None:
    adapter = patterned(tmp_path)
    base = base_dir(tiny_llama, tmp_path / "base")
    args = [
        "convert",
        str(adapter),
        "--for",
        "tgi",
        "--base",
        str(base),
        "-o",
        str(tmp_path / "out"),
        "--json",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["engine"] == "tgi" and summary["format"] == "peft" and summary["rank"] == 6
    assert summary["alpha"] == 6 and summary["modules"] == 14 and len(summary["folded"]) == 14
    assert 0 < summary["max_rel_error"] < 2**-23
    text = CliRunner().invoke(
        cli, ["convert", str(adapter), "--for", "tgi", "--base", str(base), "-o", str(tmp_path / "o2")]
    )
    assert "for tgi (peft), 14 modules, r 6, alpha 6; scale folded into lora_b of 14 modules" in text.output


# ------------------------------------------------------------------------------------------- llama.cpp


def test_llama_cpp_is_the_gguf_path_after_the_checks(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    adapter = patterned(tmp_path)
    base = base_dir(tiny_llama, tmp_path / "base")
    served = ao.convert(adapter, tmp_path / "a.gguf", engine="llama.cpp", base=base)
    plain = ao.convert(adapter, tmp_path / "b.gguf", to="gguf", base=base)
    mine, theirs = gguf.GGUFReader(str(served)), gguf.GGUFReader(str(plain))
    assert [t.name for t in mine.tensors] == [t.name for t in theirs.tensors]
    assert all((a.data == b.data).all() for a, b in zip(mine.tensors, theirs.tensors, strict=True))
    with pytest.raises(InvalidInputError, match="--base|base"):
        ao.convert(adapter, tmp_path / "c.gguf", engine="llama.cpp")


# ------------------------------------------------------------------------------------------- diffusers

UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",  # 3x3
    "up_blocks.0.resnets.0.conv_shortcut",  # 1x1
]


def _diffusers_deltas(path: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers 0.42.1 makes of a kohya file: lora_state_dict + load_lora_into_unet (the two
    steps of StableDiffusionPipeline.load_lora_weights for the UNet), fused, minus the base."""
    from tests.test_kohya import _unet

    pipeline = diffusers.StableDiffusionPipeline
    state_dict, alphas = pipeline.lora_state_dict(str(path))
    unet = _unet().double()
    pipeline.load_lora_into_unet(state_dict, alphas, unet=unet)
    unet.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    return {n: merged[f"{n}.weight"].double() - base[f"{n}.weight"].double() for n in UNET_MODULES}


def test_diffusers_reads_one_alpha_file_exactly_and_per_module_alphas_wrongly(tmp_path: Path) -> None:
    from adapterops.io.kohya import flatten
    from tests.test_kohya import _unet, write_kohya
    from tests.test_kohya import reference_deltas as kohya_reference

    base = {k: v for k, v in _unet().state_dict().items()}
    alphas = {UNET_MODULES[1]: 7.0, UNET_MODULES[3]: 0.5}  # the rest 2.0
    # per-module alphas, and two ranks: 4, and 2 for the feed-forward projection
    four = write_kohya(
        tmp_path / "four.safetensors", base, UNET_MODULES[:2] + UNET_MODULES[3:], alphas=alphas
    )
    two = write_kohya(tmp_path / "two.safetensors", base, UNET_MODULES[2:3], rank=2, seed=1)
    original = tmp_path / "per-module.safetensors"
    save_file({**load_file(str(four)), **load_file(str(two))}, str(original))
    want = {n: kohya_reference(original)["lora_unet_" + flatten(n)] for n in UNET_MODULES}

    # the bug: the alpha_pattern key diffusers builds for an attention module is in the old
    # attention-processor form (attn2.processor.to_k_lora.down.weight), matches nothing, and PEFT
    # ignores it: to_k gets the most common alpha, 2 instead of 7
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):
        wrong = relative_errors(_diffusers_deltas(original, base), want)
    assert wrong[UNET_MODULES[1]] == pytest.approx(1 - 2 / 7, rel=1e-9)

    out = ao.convert(original, tmp_path / "one-alpha.safetensors", engine="diffusers")
    with safe_open(str(out), framework="pt") as f:
        served_alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert len(served_alphas) == 1
    got = relative_errors(_diffusers_deltas(out, base), want)
    assert max(got.values()) < 1e-6
    # one rank (the rank-2 module zero-padded, exact); the modules with the common scale (2/4) are
    # written bit for bit
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")} == {4}
    kept = kohya_reference(out)
    for name in (UNET_MODULES[0], UNET_MODULES[4]):
        assert torch.equal(kept["lora_unet_" + flatten(name)], want[name])


# ------------------------------------------------------------------------------------------ by hand


def test_fold_and_pad_by_hand() -> None:
    from adapterops.adapter import LoraModule
    from adapterops.ops.uniform import fold_scale, pad_rank

    one = torch.ones(1, 1)
    halved, error = fold_scale(LoraModule("m", one, 3 * one, 0.5), 1.0)
    assert halved.B.item() == 1.5 and halved.scale == 1.0 and error == 0.0
    third, error = fold_scale(LoraModule("m", one, one, 1 / 3), 1.0)
    assert third.B.item() == torch.tensor(1 / 3, dtype=torch.float32).item()
    assert error == pytest.approx(abs(third.B.double().item() - 1 / 3) * 3, rel=1e-12)
    assert 0 < error < 2**-24
    padded = pad_rank(LoraModule("m", torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]]), 1.0), 3)
    assert padded.A.tolist() == [[1, 2], [0, 0], [0, 0]] and padded.B.tolist() == [[3, 0, 0], [4, 0, 0]]
