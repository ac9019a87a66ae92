"""Adapters made by PEFT go in, adapters PEFT loads come out, and the numbers match float64 references.

References come from PEFT itself: ``peft_deltas`` loads a directory with ``PeftModel.from_pretrained``
on a float64 base model and returns each layer's ``get_delta_weight``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import adapterops as ao
from tests.conftest import ZOO, Zoo
from tests.support.factories import peft_bias_deltas, peft_deltas, peft_logits


def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """Every module present on both sides, each within rtol of the largest entry of the reference."""
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max())
        err = float((got[name].double() - want[name]).abs().max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("name", sorted(n for n in ZOO if n != "llama_dora"))
def test_reading_gives_peft_deltas(zoo: Zoo, name: str) -> None:
    """Scale (alpha/r, rsLoRA, patterns), layout (fan_in_fan_out, embedding, conv) as PEFT reads them."""
    adapter = ao.load_adapter(zoo[name])
    ours = {n: m.delta(torch.float64) for n, m in adapter.modules.items()}
    close(ours, peft_deltas(zoo.factory(name), zoo[name]), rtol=1e-12)


def test_reading_dora_keeps_the_magnitude(zoo: Zoo) -> None:
    adapter = ao.load_adapter(zoo["llama_dora"])
    assert adapter.is_dora
    with safe_open(zoo["llama_dora"] / "adapter_model.safetensors", "pt") as f:
        stored = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    assert torch.equal(adapter.modules["model.layers.0.self_attn.q_proj"].magnitude, stored)


@pytest.mark.parametrize(
    ("a", "b", "weights"),
    [
        ("llama_a", "llama_b", (0.7, -0.3)),  # patterns + rsLoRA, different targets
        ("gpt2_a", "gpt2_b", (0.5, 1.5)),  # Conv1D fan_in_fan_out
        ("llama_emb", "llama_emb_b", (1.0, -2.0)),  # embedding LoRA
        ("conv_a", "conv_b", (0.25, 0.75)),  # Conv2d LoRA
        ("llama_bf16", "llama_bf16_b", (0.6, 0.4)),  # bf16 storage
    ],
)
@pytest.mark.parametrize("method", ["exact", "cat"])
def test_combined_output_loads_in_peft_as_the_weighted_sum(zoo: Zoo, tmp_path, a, b, weights, method) -> None:
    mix = ao.combine([ao.load_adapter(zoo[a]), ao.load_adapter(zoo[b])], weights, method=method)
    ao.save_adapter(mix, tmp_path / "mix")
    got = peft_deltas(zoo.factory(a), tmp_path / "mix")
    ref_a, ref_b = peft_deltas(zoo.factory(a), zoo[a]), peft_deltas(zoo.factory(b), zoo[b])
    want = {n: weights[0] * ref_a.get(n, 0) + weights[1] * ref_b.get(n, 0) for n in set(ref_a) | set(ref_b)}
    # output factors are stored in the inputs' dtype: float32 rounding, or bf16's 8-bit mantissa
    bf16 = ao.load_adapter(zoo[a]).dtype == torch.bfloat16
    close(got, want, rtol=2e-2 if bf16 else 1e-5)
    written = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert written["use_rslora"] is False
    with safe_open(tmp_path / "mix" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if "lora_" in k} == {ao.load_adapter(zoo[a]).dtype}


@pytest.mark.parametrize(("a", "b"), [("llama_a", "llama_b"), ("gpt2_a", "gpt2_b"), ("conv_a", "conv_b")])
def test_svd_output_is_optimal_for_its_rank(zoo: Zoo, tmp_path, a, b) -> None:
    k = 3
    mix = ao.combine([ao.load_adapter(zoo[a]), ao.load_adapter(zoo[b])], [1.0, 0.5], method="svd", rank=k)
    ao.save_adapter(mix, tmp_path / "mix")
    got = peft_deltas(zoo.factory(a), tmp_path / "mix")
    ref_a, ref_b = peft_deltas(zoo.factory(a), zoo[a]), peft_deltas(zoo.factory(b), zoo[b])
    reports = {r.name: r for r in mix.report}
    for name in set(ref_a) | set(ref_b):
        exact = ref_a.get(name, 0) + 0.5 * ref_b.get(name, 0)
        matrix = exact.reshape(exact.shape[0], -1)
        S = torch.linalg.svdvals(matrix)
        optimal = float(S[k:].pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm((got[name] - exact).reshape(matrix.shape)))
        assert error <= optimal * (1 + 1e-4) + 1e-6 * float(S[0]), name
        assert reports[name].rel_error == pytest.approx(
            optimal / float(S.pow(2).sum().sqrt()), rel=1e-4, abs=1e-6
        )


def test_forward_pass_of_the_combined_adapter_matches_float64_math(zoo: Zoo, tmp_path) -> None:
    """Logits of PeftModel(mix) equal those of the base model with W + 0.7 dW_a - 0.3 dW_b written in."""
    mix = ao.combine([ao.load_adapter(zoo["llama_a"]), ao.load_adapter(zoo["llama_b"])], [0.7, -0.3])
    ao.save_adapter(mix, tmp_path / "mix")
    inputs = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    got = peft_logits(zoo.factory("llama_a"), tmp_path / "mix", inputs)
    ref_a = peft_deltas(zoo.factory("llama_a"), zoo["llama_a"])
    ref_b = peft_deltas(zoo.factory("llama_b"), zoo["llama_b"])
    deltas = {n: 0.7 * ref_a.get(n, 0) - 0.3 * ref_b.get(n, 0) for n in set(ref_a) | set(ref_b)}
    model = zoo.factory("llama_a")().double().eval()
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta
        want = model(input_ids=inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_a", "gpt2_bias", "llama_emb"])
def test_negate_scale_resize_outputs_load_in_peft(zoo: Zoo, tmp_path, name: str) -> None:
    adapter = ao.load_adapter(zoo[name])
    ref = peft_deltas(zoo.factory(name), zoo[name])
    ao.save_adapter(ao.negate(adapter), tmp_path / "neg")
    close(peft_deltas(zoo.factory(name), tmp_path / "neg"), {n: -d for n, d in ref.items()}, rtol=1e-12)
    ao.save_adapter(ao.scale(adapter, 0.3), tmp_path / "scaled")
    close(
        peft_deltas(zoo.factory(name), tmp_path / "scaled"), {n: 0.3 * d for n, d in ref.items()}, rtol=1e-12
    )
    full_rank = max(m.rank for m in adapter.modules.values())
    ao.save_adapter(ao.resize(adapter, rank=full_rank), tmp_path / "same")
    close(peft_deltas(zoo.factory(name), tmp_path / "same"), ref, rtol=1e-5)


def test_lora_bias_is_combined_and_loads(zoo: Zoo, tmp_path) -> None:
    adapter = ao.load_adapter(zoo["gpt2_bias"])
    ao.save_adapter(ao.combine([adapter, ao.load_adapter(zoo["gpt2_b"])], [0.5, 1.0]), tmp_path / "mix")
    got = peft_bias_deltas(zoo.factory("gpt2_bias"), tmp_path / "mix")
    want = peft_bias_deltas(zoo.factory("gpt2_bias"), zoo["gpt2_bias"])
    close(got, {n: 0.5 * d for n, d in want.items()}, rtol=1e-6)


def test_modules_to_save_are_carried_and_loaded(zoo: Zoo, tmp_path) -> None:
    adapter = ao.load_adapter(zoo["llama_mts"])
    assert set(adapter.full_tensors) == {"lm_head.weight"}
    ao.save_adapter(ao.combine([adapter, ao.load_adapter(zoo["llama_a"])], [1.0, 1.0]), tmp_path / "mix")
    with safe_open(zoo["llama_mts"] / "adapter_model.safetensors", "pt") as f:
        head = f.get_tensor("base_model.model.lm_head.weight")
    with safe_open(tmp_path / "mix" / "adapter_model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("base_model.model.lm_head.weight"), head)
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]


def test_provenance_is_written_into_metadata_and_card(zoo: Zoo, tmp_path) -> None:
    a, b = ao.load_adapter(zoo["llama_a"]), ao.load_adapter(zoo["llama_b"])
    ao.save_adapter(ao.combine([a, b], [0.7, 0.3], method="svd", rank=4), tmp_path / "mix")
    with safe_open(tmp_path / "mix" / "adapter_model.safetensors", "pt") as f:
        record = json.loads(f.metadata()["adapterops"])
    assert record["weights"] == [0.7, 0.3] and record["method"] == "svd" and record["rank"] == 4
    assert [i["sha256"] for i in record["inputs"]] == [a.source.sha256, b.source.sha256]
    card = (tmp_path / "mix" / "README.md").read_text()
    assert a.source.sha256 in card and "library_name: peft" in card
    assert ao.load_adapter(tmp_path / "mix").provenance == record


def test_parity_with_peft_add_weighted_adapter(zoo: Zoo, tmp_path) -> None:
    """Our cat and svd equal PEFT's numbers on PEFT's own inputs; our linear is PEFT's linear."""
    from peft import PeftModel

    from tests.support.factories import tiny_gpt2

    weights = [0.8, -0.5]
    model = PeftModel.from_pretrained(tiny_gpt2().double(), zoo["gpt2_a"], adapter_name="a")
    model.load_adapter(zoo["gpt2_b"], adapter_name="b")
    a, b = ao.load_adapter(zoo["gpt2_a"]), ao.load_adapter(zoo["gpt2_b"])
    for combination, ours in [
        ("cat", {"method": "cat"}),
        ("svd", {"method": "svd", "rank": 4}),
        ("linear", {"method": "linear"}),
    ]:
        if combination == "linear":  # PEFT's linear needs equal ranks
            model.add_weighted_adapter(["a", "a"], weights, "peft_linear", combination_type="linear")
            with pytest.warns(ao.ApproximationWarning):
                mine = ao.combine([a, a], weights, **ours)
            peft_name = "peft_linear"
        else:
            model.add_weighted_adapter(
                ["a", "b"], weights, f"peft_{combination}", combination_type=combination, svd_rank=4
            )
            mine = ao.combine([a, b], weights, **ours)
            peft_name = f"peft_{combination}"
        ao.save_adapter(mine, tmp_path / combination)
        got = peft_deltas(tiny_gpt2, tmp_path / combination)
        for module_name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and peft_name in module.lora_A:
                theirs = module.get_delta_weight(peft_name)
                scale = float(theirs.abs().max())
                assert float((got[module_name] - theirs).abs().max()) <= 1e-5 * scale, (
                    combination,
                    module_name,
                )
