"""LoRA on mixture-of-experts weights (PEFT ``target_parameters``), judged against PEFT and transformers.

PEFT's ``ParamWrapper`` stores the E experts of one parameter as lora_A (r*E, in), lora_B (out, r*E);
adapterops reads them as one module per expert (``adapter.split_experts``), does its factor arithmetic
expert by expert, writes them back in PEFT's layout, and merges each expert's update into whatever
tensors the checkpoint stores: per-expert 2-D tensors (Mixtral ``block_sparse_moe.experts.N.w1/w3/w2``,
Qwen3-MoE ``mlp.experts.N.gate_proj/up_proj/down_proj``) or fused 3-D ones (gpt-oss, stored (E, in, out)).
The references are PEFT's ``get_delta_weight`` / ``merge_and_unload`` in float64, and the merged
checkpoint as transformers itself loads it (its own conversion fuses the per-expert tensors back).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import adapterops as ao
from adapterops.adapter import LoraModule, ModuleKind, ParameterTarget, join_experts, split_experts
from adapterops.errors import IncompatibleAdaptersError, UnsupportedAdapterError
from adapterops.io.peft_config import WRAP_ORDER
from tests.support.factories import _quiet, make_adapter, peft_logits, peft_merged_state_dict, tiny_llama
from tests.support.moe import (
    EXPERTS,
    in_dtype,
    peft_parameter_deltas,
    tiny_gpt_oss,
    tiny_mixtral,
    tiny_qwen3_moe,
    wrapper_order,
)
from tests.support.rounding import nearest

BOTH = ["gate_up_proj", "down_proj"]
FACTORIES: dict[str, Callable[..., Any]] = {
    "mixtral": tiny_mixtral,
    "mixtral_all": tiny_mixtral,
    "mixtral_b": tiny_mixtral,
    "qwen_all": tiny_qwen3_moe,
    "gpt_oss": tiny_gpt_oss,
}
SPECS: dict[str, dict[str, Any]] = {
    # explicit targets, a rank and an alpha pattern on one expert parameter
    "mixtral": dict(
        seed=1,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=BOTH,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"gate_up_proj": 3},
    ),
    # what transformers 5 + PEFT make of "all-linear": the experts and the router's gate.weight too
    "mixtral_all": dict(seed=2, r=4, lora_alpha=8, target_modules="all-linear"),
    "mixtral_b": dict(seed=3, r=3, lora_alpha=6, use_rslora=True, target_modules=[], target_parameters=BOTH),
    "qwen_all": dict(seed=4, r=2, lora_alpha=4, target_modules="all-linear"),
    "gpt_oss": dict(seed=5, r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=BOTH),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_adapters")
    out = {}
    for name, spec in SPECS.items():
        kwargs = dict(spec)
        out[name] = make_adapter(FACTORIES[name], root / name, **kwargs)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, torch.dtype], Path]:
    root = tmp_path_factory.mktemp("moe_bases")
    out = {}
    for factory in (tiny_mixtral, tiny_qwen3_moe, tiny_gpt_oss):
        for dtype in (torch.bfloat16, torch.float32):
            path = root / f"{factory.__name__}-{str(dtype).removeprefix('torch.')}"
            with _quiet():
                factory().to(dtype).save_pretrained(path)
            out[factory.__name__, dtype] = path
    return out


def base_of(name: str, bases: dict[tuple[str, torch.dtype], Path], dtype: torch.dtype) -> Path:
    return bases[FACTORIES[name].__name__, dtype]


def expert_deltas(adapter: ao.Adapter) -> dict[str, torch.Tensor]:
    """adapterops's update per parameter, stacked like ``peft_parameter_deltas``: (E, out, in)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for module in adapter.modules.values():
        if module.target is not None:
            t = module.target
            groups.setdefault(t.tensor, {})[t.expert or 0] = module.delta(torch.float64)
    return {k: torch.stack([v[e] for e in sorted(v)]) if len(v) > 1 else v[0] for k, v in groups.items()}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        error = float((got[key] - value).abs().max())
        assert error <= rtol * float(value.abs().max()), (key, error)


# ----------------------------------------------------------------------------------------- reading


def test_the_expert_layout_by_hand() -> None:
    """E=2 experts, r=2: lora_A rows are expert-major, lora_B columns rank-major (k*E + e)."""
    A = torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 2]])  # rows: e0k0, e0k1, e1k0, e1k1
    B = torch.tensor([[10.0, 20, 30, 40]])  # columns: k0e0, k0e1, k1e0, k1e1
    (A0, B0), (A1, B1) = split_experts(A, B, 2)
    assert A0.tolist() == [[1, 0], [0, 1]] and B0.tolist() == [[10, 30]]
    assert A1.tolist() == [[2, 0], [0, 2]] and B1.tolist() == [[20, 40]]
    assert (B1 @ A1).tolist() == [[40, 80]]  # PEFT: einsum("o r e, e r i -> e o i") for expert 1
    target = ParameterTarget("experts", "down_proj", 0, 2)
    modules = [
        LoraModule(f"experts.down_proj.{e}", a, b, 0.5, ModuleKind.PARAMETER, target=target)
        for e, (a, b) in enumerate([(A0, B0), (A1, B1)])
    ]
    joined_A, joined_B, scale = join_experts(modules)
    assert torch.equal(joined_A, A) and torch.equal(joined_B, B) and scale == 0.5


def test_all_linear_targets_expert_parameters_and_the_router(adapters) -> None:
    """The configs adapterops used to refuse: all-linear on transformers 5 MoE adds target_parameters."""
    for name in ("mixtral_all", "qwen_all"):
        config = json.loads((adapters[name] / "adapter_config.json").read_text())
        assert set(config["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}
        adapter = ao.load_adapter(adapters[name])
        kinds = {m.name: m.kind for m in adapter.modules.values()}
        layer = "model.layers.0.mlp"
        assert kinds[f"{layer}.gate.weight"] is ModuleKind.PARAMETER  # the router: 2-D, one module
        assert kinds["model.layers.0.self_attn.q_proj"] is ModuleKind.LINEAR
        for parameter in BOTH:
            assert [kinds.get(f"{layer}.experts.{parameter}.{e}") for e in range(EXPERTS)] == [
                ModuleKind.PARAMETER
            ] * EXPERTS
        # PEFT fuses w1 and w3 into gate_up_proj with r and lora_alpha doubled (a regex pattern)
        gate_up = adapter.modules[f"{layer}.experts.gate_up_proj.0"]
        assert (gate_up.rank, gate_up.scale) == (2 * SPECS[name]["r"], 2.0)


@pytest.mark.parametrize("name", list(SPECS))
def test_each_expert_is_what_peft_computes(adapters, name) -> None:
    adapter = ao.load_adapter(adapters[name])
    want = peft_parameter_deltas(FACTORIES[name], adapters[name])
    assert_close(expert_deltas(adapter), want, rtol=1e-12)


def test_wrap_order_is_peft_nesting(adapters) -> None:
    """The nesting adapterops assumes (``WRAP_ORDER``, innermost first) is the one PEFT builds."""
    for name in ("mixtral", "qwen_all", "gpt_oss"):
        order = wrapper_order(FACTORIES[name], adapters[name])
        assert order["model.layers.0.mlp.experts"] == list(WRAP_ORDER), name


def test_info_shows_each_expert(adapters) -> None:
    report = ao.describe(adapters["mixtral"])
    rows = {m["name"]: m for m in report["modules"]}
    row = rows["model.layers.0.mlp.experts.down_proj.3"]
    assert (row["kind"], row["expert"], row["experts"], row["r"]) == ("parameter", 3, EXPERTS, 2)
    assert row["parameter"] == "model.layers.0.mlp.experts.down_proj" and row["weight_shape"] == [32, 24]
    assert row["scale"] == 8 / 2
    assert rows["model.layers.0.mlp.experts.gate_up_proj.0"]["scale"] == 3 / 4
    delta = (
        ao.load_adapter(adapters["mixtral"])
        .modules["model.layers.0.mlp.experts.down_proj.3"]
        .delta(torch.float64)
    )
    assert row["norm_delta"] == pytest.approx(float(delta.norm()), rel=1e-9)


def test_cli_merge_and_info_of_an_expert_adapter(adapters, bases, tmp_path) -> None:
    from click.testing import CliRunner

    from adapterops.cli import cli

    result = CliRunner().invoke(cli, ["info", str(adapters["qwen_all"])])
    assert result.exit_code == 0 and "expert 3/4" in result.stdout
    assert "LoRA on parameters (target_parameters): 3, one row per expert" in result.stdout
    base = base_of("qwen_all", bases, torch.bfloat16)
    result = CliRunner().invoke(
        cli, ["merge", str(base), str(adapters["qwen_all"]), "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["merge", str(base), str(adapters["gpt_oss"]), "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "module model.layers.0.mlp.experts.down_proj.0 updates a (32, 16) weight, but " in result.stderr
    assert (
        "model.layers.0.mlp.experts.0.down_proj.weight in " in result.stderr and not (tmp_path / "x").exists()
    )


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_info_with_base_reads_each_experts_weight(adapters, bases, name) -> None:
    """Per-expert tensors stacked (Mixtral w1 over w3) or the fused slice (gpt-oss, transposed back)."""
    base = base_of(name, bases, torch.float32)
    fused = transformers_state_dict(base, torch.float64)
    report = ao.describe(adapters[name], base=base)
    for row in report["modules"]:
        if "expert" not in row:
            continue
        W = fused[row["parameter"]][row["expert"]]
        W = W.T if name == "gpt_oss" else W  # gpt-oss stores (E, in, out)
        assert list(W.shape) == row["weight_shape"]
        assert row["norm_base"] == pytest.approx(float(W.norm()), rel=1e-12)


# ---------------------------------------------------------------------------------- factor arithmetic


def saved_deltas(adapter: ao.Adapter, path: Path, factory: Callable[..., Any]) -> dict[str, torch.Tensor]:
    """Save ``adapter``, check PEFT loads it, and return PEFT's deltas for it."""
    ao.save_adapter(adapter, path)
    return peft_parameter_deltas(factory, path)


def test_round_trip_is_bit_exact(adapters, tmp_path) -> None:
    for name in ("mixtral", "mixtral_all", "gpt_oss"):
        ao.save_adapter(ao.load_adapter(adapters[name]), tmp_path / name)
        before = load_file(adapters[name] / "adapter_model.safetensors")
        after = load_file(tmp_path / name / "adapter_model.safetensors")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert "model.layers.0.mlp.experts.gate_up_proj" in config["target_parameters"]


def test_combine_negate_scale_are_exact_per_expert(adapters, tmp_path) -> None:
    a, b = adapters["mixtral"], adapters["mixtral_b"]
    da, db = peft_parameter_deltas(tiny_mixtral, a), peft_parameter_deltas(tiny_mixtral, b)
    cases = {
        "combine": (ao.combine([a, b], [0.7, -0.3]), {k: 0.7 * da[k] + -0.3 * db[k] for k in da}),
        "cat": (ao.combine([a, b], [1.0, 2.0], method="cat"), {k: da[k] + 2.0 * db[k] for k in da}),
        "negate": (ao.negate(a), {k: -v for k, v in da.items()}),
        "scale": (ao.scale(b, -0.25), {k: -0.25 * v for k, v in db.items()}),
    }
    for label, (result, want) in cases.items():
        assert_close(saved_deltas(result, tmp_path / label, tiny_mixtral), want, rtol=1e-6)
    # one input: the factors stay bit for bit, the weight goes into lora_alpha
    scaled = load_file(tmp_path / "scale" / "adapter_model.safetensors")
    original = load_file(b / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    assert torch.equal(scaled[key], original[key])


def test_resize_is_the_best_rank_k_of_each_expert(adapters, tmp_path) -> None:
    source = adapters["mixtral_all"]
    before = peft_parameter_deltas(tiny_mixtral, source)
    resized = ao.resize(source, rank=2)
    after = saved_deltas(resized, tmp_path / "r2", tiny_mixtral)
    reports = {r.name: r for r in resized.report}
    for tensor, delta in before.items():
        stack = delta if delta.dim() == 3 else delta[None]
        for e, expert in enumerate(stack):
            U, S, Vh = torch.linalg.svd(expert)
            best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
            got = after[tensor][e] if delta.dim() == 3 else after[tensor]
            assert float((got - best).abs().max()) <= 1e-5 * float(best.abs().max())
            name = f"{tensor}.{e}" if delta.dim() == 3 else tensor
            tail = float(S[2:].square().sum().sqrt() / S.square().sum().sqrt())
            assert reports[name].rel_error == pytest.approx(tail, rel=1e-6)


def test_experts_of_different_ranks_or_scales_are_joined_for_peft(adapters, tmp_path) -> None:
    """PEFT gives all experts of a parameter one r and one scale. Per-module weights can give them
    different ones: lower ranks are zero-padded, other scales folded into lora_B."""
    a = adapters["mixtral"]
    da = peft_parameter_deltas(tiny_mixtral, a)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"

    def cancel_expert_0(module: str) -> float:
        return -1.0 if module == f"{gate_up}.0" else 1.0

    cancel_expert_0.spec = "-1 on gate_up_proj.0"  # type: ignore[attr-defined]  # what provenance records
    summed = ao.combine([a, a], [1.0, cancel_expert_0])  # expert 0 cancels to rank 1 (zero), others rank 4
    ranks = [summed.modules[f"{gate_up}.{e}"].rank for e in range(EXPERTS)]
    assert ranks[0] == 1 and set(ranks[1:]) == {4}
    want = {k: 2 * v for k, v in da.items()}
    want[gate_up][0] = 0
    assert_close(saved_deltas(summed, tmp_path / "ranks", tiny_mixtral), want, rtol=1e-6)

    def by_expert(module: str) -> float:
        return 1.0 + int(module.rpartition(".")[2]) if module.startswith(gate_up) else 1.0

    by_expert.spec = "1 + expert"  # type: ignore[attr-defined]
    weighted = ao.combine([a], [by_expert])  # one input: each expert keeps its factors, scales differ
    assert len({weighted.modules[f"{gate_up}.{e}"].scale for e in range(EXPERTS)}) == EXPERTS
    want = dict(da)
    want[gate_up] = torch.stack([(1 + e) * da[gate_up][e] for e in range(EXPERTS)])
    assert_close(saved_deltas(weighted, tmp_path / "scales", tiny_mixtral), want, rtol=1e-6)


def test_dora_is_refused_on_expert_weights(adapters, bases) -> None:
    with pytest.raises(UnsupportedAdapterError, match=r"experts\.down_proj\.0 is LoRA on a parameter"):
        ao.to_dora(adapters["mixtral_b"], base_of("mixtral", bases, torch.float32))


def test_saving_expert_weights_with_lora_bias_is_refused(adapters, tmp_path) -> None:
    """PEFT's ParamWrapper has no lora_bias (nor DoRA): such a mix could not be loaded."""
    biased = make_adapter(tiny_mixtral, tmp_path / "bias", seed=9, target_modules=["k_proj"], lora_bias=True)
    mix = ao.combine([adapters["mixtral_b"], biased])
    with pytest.raises(UnsupportedAdapterError, match="cannot also use DoRA or lora_bias"):
        ao.save_adapter(mix, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- merging


def transformers_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint as transformers loads it: per-expert tensors fused by its own conversion."""
    from transformers import AutoModelForCausalLM

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["mixtral", "mixtral_all", "qwen_all", "gpt_oss"])
def test_merge_is_peft_merge_correctly_rounded(adapters, bases, tmp_path, name) -> None:
    """Every tensor of the merged bf16 checkpoint, as transformers loads it, is PEFT's float64
    merge_and_unload of the same bf16 base, rounded once to bf16; verify agrees; unmerge undoes it."""
    base = base_of(name, bases, torch.bfloat16)
    ao.merge(base, [adapters[name]], out=tmp_path / "merged", device="cpu")
    want = peft_merged_state_dict(in_dtype(FACTORIES[name], torch.bfloat16), adapters[name], torch.float64)
    got = transformers_state_dict(tmp_path / "merged", torch.bfloat16)
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert torch.equal(value, nearest(want[key], torch.bfloat16)), key
    report = ao.verify(base, [adapters[name]], tmp_path / "merged")
    assert report.passed() and report.max_ulp <= 0.5
    assert sum(c.updated for c in report.checks) == expected_updates(name)
    ao.unmerge(tmp_path / "merged", [adapters[name]], out=tmp_path / "back", device="cpu")
    original, back = load_file(base / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    from adapterops.ops.rounding import ulp

    for key, W in original.items():
        step = ulp(torch.maximum(W.double().abs(), merged[key].double().abs()), W.dtype)
        assert bool(((back[key].double() - W.double()).abs() <= step).all()), key


def expected_updates(name: str) -> int:
    """Stored tensors an adapter touches: Mixtral and Qwen3-MoE store 3 per expert, gpt-oss 2 in all."""
    attention = {"mixtral": 2, "mixtral_all": 4, "qwen_all": 4, "gpt_oss": 1}[name]
    router = 1 if name.endswith("_all") else 0
    experts = 2 if name == "gpt_oss" else 3 * EXPERTS
    return attention + router + experts


@pytest.mark.parametrize("name", ["mixtral_all", "gpt_oss"])
def test_merged_model_gives_the_peft_models_logits(adapters, bases, tmp_path, name) -> None:
    from transformers import AutoModelForCausalLM

    base = base_of(name, bases, torch.float32)
    ao.merge(base, [adapters[name]], out=tmp_path / "merged", device="cpu")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    want = peft_logits(FACTORIES[name], adapters[name], ids)
    with _quiet():
        eager = {"experts_implementation": "eager"}
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", **eager).double().eval()
        plain = AutoModelForCausalLM.from_pretrained(base, **eager).double().eval()
    with torch.no_grad():
        got, before = merged(input_ids=ids).logits, plain(input_ids=ids).logits
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert float((before - want).abs().max()) > 1e-2 * scale  # the adapter matters at this tolerance


def test_merging_two_expert_adapters_is_their_weighted_sum(adapters, bases, tmp_path) -> None:
    base = base_of("mixtral", bases, torch.float32)
    names = ["mixtral", "mixtral_b"]
    ao.merge(base, [adapters[n] for n in names], [0.7, -0.3], out=tmp_path / "merged", device="cpu")
    start = transformers_state_dict(base, torch.float64)
    got = transformers_state_dict(tmp_path / "merged", torch.float32)
    deltas = [peft_parameter_deltas(tiny_mixtral, adapters[n]) for n in names]
    for tensor in deltas[0]:
        want = start[tensor] + 0.7 * deltas[0][tensor] + -0.3 * deltas[1][tensor]
        assert torch.equal(got[tensor], want.to(torch.float32)), tensor


def test_merge_refuses_an_expert_adapter_for_another_model(adapters, tmp_path) -> None:
    from tests.support.factories import save_base_checkpoint

    llama = save_base_checkpoint(tiny_llama, tmp_path / "llama", dtype=torch.float32)
    with pytest.raises(IncompatibleAdaptersError, match=r"experts\.down_proj\.0: no tensor .* or per-expert"):
        ao.merge(llama, [adapters["mixtral_b"]], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unknown_nested_parameters_are_refused(adapters, tmp_path) -> None:
    """Two wrapped parameters whose nesting order adapterops does not know: an error, not a guess."""
    copy = tmp_path / "odd"
    shutil.copytree(adapters["mixtral_b"], copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["target_parameters"] = ["w_in", "w_out"]
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match=r"model\.layers\.0\.mlp\.experts has 2 LoRA-wrapped"):
        ao.load_adapter(copy)


def test_moe_layouts_are_current() -> None:
    """adapterops/io/moe_layouts.py is what scripts/moe_layouts.py derives from this transformers."""
    script = Path(__file__).parent.parent / "scripts" / "moe_layouts.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from adapterops.io.moe_layouts import EXPERTS as LAYOUTS
    from adapterops.io.moe_layouts import RENAMINGS, TRANSPOSED

    assert LAYOUTS["mixtral"]["experts.gate_up_proj"] == ("w1.weight", "w3.weight")
    assert LAYOUTS["qwen3_moe"]["mlp.experts.down_proj"] == ("down_proj.weight",)
    assert "gpt_oss" in TRANSPOSED and "mixtral" not in TRANSPOSED and "mixtral" in RENAMINGS
