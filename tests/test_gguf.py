"""GGUF LoRA adapters (llama.cpp): ``convert --to gguf`` and reading them back.

Judged by the ``gguf`` package's own GGUFReader (what llama.cpp's Python tools read) and by a
float64 reference of llama.cpp's merge rule, written here from llama.cpp's sources:

    W_gguf' = W_gguf + (alpha / r) * lora_b @ lora_a     (llm_build_lora_mm, adapter_scale 1)
    W_gguf  = permute(W_hf) for the llama family's q_proj / k_proj (convert_hf_to_gguf.py's
              LlamaModel.permute), W_hf otherwise

which must equal permute(PEFT's merge_and_unload weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.errors import InvalidInputError, UnsupportedAdapterError
from tests.support.factories import (
    make_adapter,
    peft_deltas,
    peft_merged_state_dict,
    tiny_gpt2,
    tiny_llama,
)

gguf = pytest.importorskip("gguf")  # a test extra: always installed where the suite runs

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def tiny_qwen2(seed: int = 0) -> Any:
    """A 2-layer Qwen2 (hidden 32, 4 heads, 2 kv heads; q/k/v biases) with random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def base_dir(factory: Any, path: Path) -> Path:
    model = factory()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    return path


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = (
                torch.from_numpy(np.array(t.data).view(np.int16).copy()).view(torch.bfloat16).float().numpy()
            )
        else:
            data = np.array(t.data)
        tensors[t.name] = data.reshape(shape)
    return fields, tensors


def llama_cpp_deltas(path: Path) -> dict[str, np.ndarray]:
    """``{blk.N.x.weight: float64 (alpha / r) * lora_b @ lora_a}`` from the file alone."""
    fields, tensors = read_gguf(path)
    alpha = float(fields["adapter.lora.alpha"])
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            A = tensors[name].astype(np.float64)
            B = tensors[base + ".lora_b"].astype(np.float64)
            rank = B.shape[1]  # lora_b.ne[0]
            out[base] = (alpha / rank if alpha else 1.0) * (B @ A)
    return out


def hf_to_gguf(name: str) -> str:
    parts = name.split(".")  # model.layers.N.(self_attn|mlp).x_proj.weight
    return f"blk.{parts[2]}.{LLAMA_NAMES[parts[4]]}.weight"


@pytest.mark.parametrize(
    ("factory", "permuted"),
    [(tiny_llama, True), (tiny_qwen2, False)],
    ids=["llama", "qwen2"],
)
@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
        {"r": 8, "lora_alpha": 16, "use_rslora": True},
    ],
    ids=["plain", "patterns", "rslora"],
)
def test_llama_cpp_merge_rule_on_the_file_equals_peft_merge(
    tmp_path: Path, factory: Any, permuted: bool, config: dict[str, Any]
) -> None:
    adapter = make_adapter(factory, tmp_path / "a", seed=3, target_modules=ALL, **config)
    base = base_dir(factory, tmp_path / "base")
    out = ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)

    fields, tensors = read_gguf(out)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    names = {f"blk.{i}.{t}.weight.lora_{p}" for i in (0, 1) for t in LLAMA_NAMES.values() for p in "ab"}
    assert set(tensors) == names
    assert fields["general.architecture"] == ("llama" if permuted else "qwen2")
    merged = peft_merged_state_dict(factory, adapter)
    model = factory().double()
    state = model.state_dict()
    deltas = llama_cpp_deltas(out)
    assert len(deltas) == 2 * len(ALL)
    folded = config != {"r": 4, "lora_alpha": 8}
    worst = 0.0
    for key, w_merged in merged.items():
        if not key.endswith("proj.weight"):
            continue
        w_hf = state[key].numpy()
        expected = w_merged.numpy()
        if permuted and (".q_proj." in key or ".k_proj." in key):
            kv = 2 if ".k_proj." in key else 4
            w_hf = llama_cpp_permute(w_hf, 4, kv)
            expected = llama_cpp_permute(expected, 4, kv)
        got = w_hf + deltas[hf_to_gguf(key)]
        err = np.abs(got - expected).max() / np.abs(expected - w_hf).max()
        worst = max(worst, err)
    # no folding: the same float32 factors, float64 products; folding: one float32 rounding of lora_b
    assert worst < (1e-6 if folded else 1e-12), worst
    if not folded:
        assert float(fields["adapter.lora.alpha"]) == 8.0


def test_round_trip_is_bit_exact_and_peft_loads_it(tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=1, target_modules=ALL, r=4, lora_alpha=4)
    base = base_dir(tiny_llama, tmp_path / "base")
    ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    back = ao.convert(tmp_path / "a.gguf", tmp_path / "back", to="peft")
    original, again = ao.load_adapter(adapter), ao.load_adapter(back)
    assert set(original.modules) == set(again.modules)
    for name, m in original.modules.items():
        n = again.modules[name]
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B) and m.scale == n.scale, name
    assert again.base_model == "tiny-llama"
    expected, got = peft_deltas(tiny_llama, adapter), peft_deltas(tiny_llama, back)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_folded_scales_round_trip_within_one_float32_rounding(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama, tmp_path / "a", seed=2, target_modules=ALL, r=4, lora_alpha=8, alpha_pattern={"o_proj": 5}
    )
    base = base_dir(tiny_llama, tmp_path / "base")
    ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    original, again = ao.load_adapter(adapter), ao.load_adapter(tmp_path / "a.gguf")
    for name, m in original.modules.items():
        n = again.modules[name]
        assert torch.equal(m.A, n.A)
        if "o_proj" in name:  # 5/4 folded into B as 5/8 of the file's 8/4
            assert n.scale == 2.0 and n.B.dtype == torch.float32
            rel = (n.B.double() * n.scale - m.B.double() * m.scale).norm() / (m.B.double() * m.scale).norm()
            assert 0 < rel < 2**-24
        else:
            assert torch.equal(m.B, n.B) and n.scale == m.scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_keep_their_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=1, target_modules=["q_proj"], save_dtype=dtype)
    base = base_dir(tiny_llama, tmp_path / "base")
    ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    _, tensors = read_gguf(tmp_path / "a.gguf")
    assert len(tensors) == 4
    again, original = ao.load_adapter(tmp_path / "a.gguf"), ao.load_adapter(adapter)
    for name, m in original.modules.items():
        assert again.modules[name].A.dtype == dtype
        assert torch.equal(again.modules[name].A, m.A) and torch.equal(again.modules[name].B, m.B)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_modules": ["q_proj"], "use_dora": True}, "is DoRA"),
        ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_B bias"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "stored whole"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embedding"),
        ({"target_modules": ["q_proj", "lm_head"]}, "no llama.cpp tensor name"),
    ],
    ids=["dora", "bias", "modules_to_save", "embedding", "lm_head"],
)
def test_what_llama_cpp_cannot_hold_is_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=1, **config)
    base = base_dir(tiny_llama, tmp_path / "base")
    with pytest.raises(UnsupportedAdapterError, match=message):
        ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)
    assert not (tmp_path / "a.gguf").exists()


def test_bad_requests_are_one_line(tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=1, target_modules=["q_proj"])
    with pytest.raises(InvalidInputError, match="pass --base|base"):
        ao.convert(adapter, tmp_path / "a.gguf", to="gguf")
    with pytest.raises(InvalidInputError, match="unknown to 'onnx'"):
        ao.convert(adapter, tmp_path / "x", to="onnx")
    with pytest.raises(InvalidInputError, match="base is not used"):
        ao.convert(adapter, tmp_path / "x", to="peft", base=tmp_path)
    gpt2 = make_adapter(tiny_gpt2, tmp_path / "g", seed=1, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(UnsupportedAdapterError, match="Conv1D|gpt2|linear"):
        ao.convert(gpt2, tmp_path / "g.gguf", to="gguf", base=base_dir(tiny_gpt2, tmp_path / "gbase"))
    mistral = base_dir(tiny_llama, tmp_path / "unknown")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["PhiForCausalLM"]}))
    with pytest.raises(UnsupportedAdapterError, match="PhiForCausalLM"):
        ao.convert(adapter, tmp_path / "p.gguf", to="gguf", base=mistral)


def test_reading_a_llama_file_without_head_counts_is_refused(tmp_path: Path) -> None:
    """Files from llama.cpp's converter carry no head counts: the q/k permutation cannot be undone."""
    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((32, 4), np.float32))
    writer.add_tensor("blk.0.attn_v.weight.lora_a", np.ones((4, 32), np.float32))
    writer.add_tensor("blk.0.attn_v.weight.lora_b", np.ones((16, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedAdapterError, match="head_count"):
        ao.load_adapter(path)
    model = tmp_path / "model.gguf"  # a GGUF model, not an adapter: the sniffer's line
    writer = gguf.GGUFWriter(str(model), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ao.AdapterOpsError, match="GGUF"):
        ao.load_adapter(model)


def test_cli_convert(tmp_path: Path) -> None:
    adapter = make_adapter(
        tiny_llama, tmp_path / "a", seed=1, target_modules=ALL, alpha_pattern={"v_proj": 3}
    )
    base = base_dir(tiny_llama, tmp_path / "base")
    out = tmp_path / "a.gguf"
    args = ["convert", str(adapter), "--to", "gguf", "--base", str(base), "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["modules"] == 14 and len(summary["folded"]) == 2
    assert CliRunner().invoke(cli, args).exit_code == 4  # exists
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0
    result = CliRunner().invoke(cli, ["convert", str(out), "--to", "peft", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    result = CliRunner().invoke(
        cli, ["convert", str(adapter), "--to", "gguf", "-o", str(tmp_path / "b.gguf")]
    )
    assert result.exit_code == 2 and "--base" in result.output


def test_convert_options_are_python_parameters_and_cli_options() -> None:
    """``convert`` is not a recipe verb (not in ``options.VERBS``), so the architecture test skips it."""
    import inspect

    import click

    from adapterops import verbs
    from adapterops.options import ConvertOptions, option_fields

    fields = {f.name for f in option_fields(ConvertOptions)}
    assert fields <= set(inspect.signature(verbs.convert).parameters)
    command = cli.get_command(click.Context(cli), "convert")
    assert command is not None
    assert fields <= {p.name for p in command.params if p.name}


def test_a_verb_on_a_gguf_input_writes_gguf_without_the_base(tmp_path: Path) -> None:
    """resize x.gguf -o y.gguf keeps the format (the file records architecture and head counts), and
    llama.cpp's rule on the output gives the resized update; a directory format named .gguf is refused."""
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=2, target_modules=ALL, r=4, lora_alpha=8)
    ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base_dir(tiny_llama, tmp_path / "base"))
    result = CliRunner().invoke(
        cli, ["resize", str(tmp_path / "a.gguf"), "--rank", "2", "-o", str(tmp_path / "b.gguf")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.gguf").is_file()
    fields, _ = read_gguf(tmp_path / "b.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    # llama.cpp's deltas of the output, un-permuted, against the float64 best rank-2 of each input update
    got = llama_cpp_deltas(tmp_path / "b.gguf")
    original = ao.load_adapter(adapter)
    for name, module in original.modules.items():
        delta = module.delta(torch.float64).numpy()
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        want = (u[:, :2] * s[:2]) @ vt[:2]
        key = hf_to_gguf(name + ".weight")
        out = got[key]
        if ".q_proj" in name or ".k_proj" in name:
            want = llama_cpp_permute(want, 4, 2 if ".k_proj" in name else 4)
        assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), name
    refused = CliRunner().invoke(
        cli, ["resize", str(tmp_path / "a"), "--rank", "2", "-o", str(tmp_path / "c.gguf")]
    )
    assert refused.exit_code == 2 and "is a directory, not a .gguf file" in refused.output
    assert not (tmp_path / "c.gguf").exists()
    with pytest.raises(InvalidInputError, match="is a directory, not a .safetensors file"):
        ao.save_adapter(ao.load_adapter(tmp_path / "a"), tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_a_damaged_gguf_file_is_one_error_line(tmp_path: Path, damage: str) -> None:
    """A cut-short adapter (the header survives, the tensors do not) or bytes that only start like GGUF."""
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=4, target_modules=ALL, r=4, lora_alpha=8)
    good = ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base_dir(tiny_llama, tmp_path / "base"))
    bad = tmp_path / "bad.gguf"
    data = good.read_bytes()
    bad.write_bytes(
        data[: len(data) // 3] if damage == "truncated" else b"GGUF\x03\x00\x00\x00" + b"\xff" * 64
    )
    result = CliRunner().invoke(cli, ["resize", str(bad), "--rank", "1", "-o", str(tmp_path / "out.gguf")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "bad.gguf" in result.output
    assert not (tmp_path / "out.gguf").exists()


def tiny_causal_lm(model_type: str) -> Any:
    """A 2-layer model of ``model_type`` (hidden 32, 4 heads of 8, 2 kv heads, vocab 128), seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


FAMILIES = {"qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_unpermuted_families_name_map_merge_rule_and_round_trip(tmp_path: Path, model_type: str) -> None:
    """Qwen3 and Gemma 1/2/3: llama.cpp's names (the gguf package's own TensorNameMap), no q/k
    permutation, llama.cpp's merge rule on the file equals PEFT's merge, and GGUF -> PEFT is bit-exact."""
    from functools import partial

    factory = partial(tiny_causal_lm, model_type)
    adapter = make_adapter(factory, tmp_path / "a", seed=4, target_modules=ALL, r=4, lora_alpha=8)
    base = base_dir(factory, tmp_path / "base")
    out = ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base)

    fields, tensors = read_gguf(out)
    arch = FAMILIES[model_type]
    assert fields["general.architecture"] == arch
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    merged = peft_merged_state_dict(factory, adapter)
    state = factory().double().state_dict()
    deltas = llama_cpp_deltas(out)
    assert len(deltas) == 2 * len(ALL)
    for key, w_merged in merged.items():
        if not key.endswith("proj.weight"):
            continue
        gguf_name = name_map.get_name(key, try_suffixes=(".weight",))
        assert gguf_name == hf_to_gguf(key)
        expected, w_hf = w_merged.numpy(), state[key].numpy()
        err = np.abs(w_hf + deltas[gguf_name] - expected).max() / np.abs(expected - w_hf).max()
        assert err < 1e-12, (key, err)

    back = ao.convert(out, tmp_path / "back", to="peft")
    original, again = ao.load_adapter(adapter), ao.load_adapter(back)
    assert set(original.modules) == set(again.modules)
    for name, m in original.modules.items():
        n = again.modules[name]
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B) and m.scale == n.scale, name
    # writing GGUF again from the GGUF input needs no base: the recorded architecture is this family's
    again_path = ao.save_adapter(ao.load_adapter(out), tmp_path / "again.gguf")
    assert read_gguf(again_path)[0]["general.architecture"] == arch
    rewritten = read_gguf(again_path)[1]
    assert rewritten.keys() == tensors.keys() and all(
        np.array_equal(rewritten[k], tensors[k]) for k in tensors
    )
