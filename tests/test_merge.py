"""Streaming merge / unmerge / verify on tiny real checkpoints, judged against float64 and PEFT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapterops as ao
from adapterops.provenance import NORMS_NAME, RECORD_NAME
from tests.conftest import Zoo
from tests.support.factories import peft_deltas, peft_logits, peft_merged_state_dict, save_base_checkpoint
from tests.support.hf import stored as tensors
from tests.support.rounding import nearest

SHARD = "20KB"  # several shards for the tiny models


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.factories import tiny_gpt2, tiny_llama

    root = tmp_path_factory.mktemp("bases")
    return {
        "llama_bf16": save_base_checkpoint(
            tiny_llama, root / "llama_bf16", dtype=torch.bfloat16, max_shard_size=SHARD
        ),
        "llama_f32": save_base_checkpoint(
            tiny_llama, root / "llama_f32", dtype=torch.float32, max_shard_size=SHARD
        ),
        "gpt2_bf16": save_base_checkpoint(tiny_gpt2, root / "gpt2_bf16", dtype=torch.bfloat16),
    }


def base_key(module: str, keys: set[str]) -> str:
    return f"{module}.weight" if f"{module}.weight" in keys else f"model.{module}.weight"


@pytest.mark.parametrize(
    ("base", "adapters", "weights"),
    [
        ("llama_bf16", ["llama_a"], [1.0]),
        ("llama_bf16", ["llama_a", "llama_b"], [0.7, -0.3]),  # patterns, rsLoRA, different targets
        ("llama_f32", ["llama_bf16", "llama_emb"], [1.0, 0.5]),  # bf16 factors, embedding LoRA
        ("gpt2_bf16", ["gpt2_a", "gpt2_b"], [1.0, 2.0]),  # Conv1D, stored in x out
    ],
)
def test_merged_tensors_are_the_correctly_rounded_float64_sum(
    zoo: Zoo, bases, tmp_path, base, adapters, weights
):
    result = ao.merge(bases[base], [zoo[a] for a in adapters], weights, out=tmp_path / "merged", device="cpu")
    assert result.output == tmp_path / "merged"
    before, after = tensors(bases[base]), tensors(tmp_path / "merged")
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {
        k: (v.dtype, v.shape) for k, v in before.items()
    }
    expected = {k: v.double() for k, v in before.items()}
    for name, weight in zip(adapters, weights, strict=True):
        for module, delta in peft_deltas(ZOO_FACTORY[base], zoo[name]).items():
            expected[module + ".weight"] += weight * delta
    for key, value in after.items():
        want = nearest(expected[key], value.dtype)
        assert torch.equal(value, want), f"{key}: not the correctly rounded float64 result"
    assert (bases[base] / "config.json").read_bytes() == (tmp_path / "merged" / "config.json").read_bytes()
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == sorted([*(p.name for p in bases[base].iterdir()), RECORD_NAME, "README.md"])


ZOO_FACTORY: dict[str, object] = {}


@pytest.fixture(autouse=True)
def _factories() -> None:
    from tests.support.factories import tiny_gpt2, tiny_llama

    ZOO_FACTORY.update(llama_bf16=tiny_llama, llama_f32=tiny_llama, gpt2_bf16=tiny_gpt2)


def test_shards_index_and_untouched_tensors_are_kept(zoo: Zoo, bases, tmp_path) -> None:
    base = bases["llama_bf16"]
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    index_in = json.loads((base / "model.safetensors.index.json").read_text())
    index_out = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    sizes = sum(v.numel() * v.element_size() for v in tensors(tmp_path / "merged").values())
    assert index_out["metadata"]["total_size"] == sizes
    touched = {f"{m}.weight" for m in ao.load_adapter(zoo["llama_a"]).modules}
    before, after = tensors(base), tensors(tmp_path / "merged")
    for key in before:
        assert torch.equal(before[key], after[key]) is (key not in touched), key


def test_transformers_loads_the_merge_and_its_logits_match_peft(zoo: Zoo, bases, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.support.factories import tiny_llama

    ao.merge(bases["llama_f32"], [zoo["llama_a"]], out=tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    inputs = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=inputs).logits
    want = peft_logits(tiny_llama, zoo["llama_a"], inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 rounding of merged weights


def test_unmerge_gives_back_the_base_within_one_step(zoo: Zoo, bases, tmp_path) -> None:
    """bf16 keeps 8 bits: W' - dW can only be within one step of the dtype at max(|W|, |W'|)."""
    base = bases["llama_bf16"]
    ao.merge(base, [zoo["llama_a"], zoo["llama_b"]], [0.7, -0.3], out=tmp_path / "merged")
    ao.unmerge(tmp_path / "merged", [zoo["llama_a"], zoo["llama_b"]], [0.7, -0.3], out=tmp_path / "back")
    before, merged, after = tensors(base), tensors(tmp_path / "merged"), tensors(tmp_path / "back")
    for key, W in before.items():
        step = ao_ulp(torch.maximum(W.double().abs(), merged[key].double().abs()), W.dtype)
        assert bool(((after[key].double() - W.double()).abs() <= step).all()), key
    record = json.loads((tmp_path / "back" / RECORD_NAME).read_text())
    assert record["merged"] == [] and [h["operation"] for h in record["history"]] == ["merge", "unmerge"]


def ao_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from adapterops.ops.rounding import ulp

    return ulp(x, dtype)


def test_dora_merge_matches_peft_and_unmerges_with_its_record(zoo: Zoo, bases, tmp_path) -> None:
    from tests.support.factories import tiny_llama

    base = bases["llama_bf16"]
    ao.merge(base, [zoo["llama_dora"]], out=tmp_path / "merged")
    assert (tmp_path / "merged" / NORMS_NAME).is_file()
    after = tensors(tmp_path / "merged")
    # PEFT's merge_and_unload on the same bf16 weights, computed in float32, rounded to bf16
    peft = peft_merged_state_dict(_bf16_base(tiny_llama), zoo["llama_dora"], dtype=torch.float32)
    for module in ao.load_adapter(zoo["llama_dora"]).modules:
        key = f"{module}.weight"
        theirs = peft[key].to(torch.bfloat16)
        steps = (after[key].double() - theirs.double()).abs() / ao_ulp(theirs.double(), torch.bfloat16)
        assert float(steps.max()) <= 1.0, (
            key
        )  # float32 vs float64 arithmetic: at most one rounding step apart
    ao.unmerge(tmp_path / "merged", [zoo["llama_dora"]], out=tmp_path / "back")
    before, back = tensors(base), tensors(tmp_path / "back")
    for key, W in before.items():
        # DoRA rescales rows by m/n: one bf16 step of W' maps back to at most (n/m) steps of W
        step = 2 * ao_ulp(torch.maximum(W.double().abs(), after[key].double().abs()), W.dtype)
        assert bool(((back[key].double() - W.double()).abs() <= step).all()), key
    assert not (tmp_path / "back" / NORMS_NAME).exists()


def test_dora_merge_on_float32_is_peft_float64_correctly_rounded(zoo: Zoo, bases, tmp_path) -> None:
    """float32 keeps 24 bits: tight enough to catch any error in the norm or the magnitude."""
    from tests.support.factories import tiny_llama

    ao.merge(bases["llama_f32"], [zoo["llama_dora"]], out=tmp_path / "merged")
    after = tensors(tmp_path / "merged")
    peft = peft_merged_state_dict(tiny_llama, zoo["llama_dora"], dtype=torch.float64)
    for module in ao.load_adapter(zoo["llama_dora"]).modules:
        key = f"{module}.weight"
        steps = (after[key].double() - peft[key]).abs() / ao_ulp(peft[key], torch.float32)
        assert float(steps.max()) <= 0.5 + 1e-6, key


def _bf16_base(factory):
    """The factory's model rounded to bf16 (the checkpoint's values), returned in float32."""

    def make(*args, **kwargs):
        return factory(*args, **kwargs).to(torch.bfloat16).float()

    make.__name__ = factory.__name__
    return make


def test_verify_reports_half_an_ulp_and_finds_tampering(zoo: Zoo, bases, tmp_path) -> None:
    base = bases["llama_bf16"]
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    report = ao.verify(base, [zoo["llama_a"]], tmp_path / "merged")
    assert report.ok and 0 < report.max_ulp <= 0.5
    assert report.as_dict()["tensors_updated"] == len(ao.load_adapter(zoo["llama_a"]).modules)
    # merged with another weight: verify takes it from the record; at weight 1 it sees errors far above 0.5
    ao.merge(base, [zoo["llama_a"]], [0.5], out=tmp_path / "half")
    assert ao.verify(base, [zoo["llama_a"]], tmp_path / "half").passed()
    with pytest.raises(ao.InvalidInputError, match=r"with weight 0.5 \(its merge record says so\), not 1.0"):
        ao.verify(base, [zoo["llama_a"]], tmp_path / "half", [1.0])
    assert ao.verify(base, [zoo["llama_a"]], tmp_path / "half", [1.0], ignore_record=True).max_ulp > 2
    # an untouched tensor changed: listed
    ao.merge(base, [zoo["llama_b"]], out=tmp_path / "other")
    wrong = ao.verify(base, [zoo["llama_a"]], tmp_path / "other")
    assert not wrong.ok and "model.layers.0.self_attn.k_proj.weight" in wrong.changed_untouched


def test_modules_to_save_replace_and_bias_is_merged(zoo: Zoo, bases, tmp_path) -> None:
    from tests.support.factories import tiny_gpt2

    ao.merge(bases["llama_bf16"], [zoo["llama_mts"]], out=tmp_path / "mts")
    with safe_open(zoo["llama_mts"] / "adapter_model.safetensors", "pt") as handle:
        head = handle.get_tensor("base_model.model.lm_head.weight")
    assert torch.equal(tensors(tmp_path / "mts")["lm_head.weight"], head.to(torch.bfloat16))
    with pytest.raises(ao.UnsupportedAdapterError, match="replaced lm_head.weight on merge"):
        ao.unmerge(tmp_path / "mts", [zoo["llama_mts"]], out=tmp_path / "x")

    ao.merge(bases["gpt2_bf16"], [zoo["gpt2_bias"]], out=tmp_path / "bias")
    peft = peft_merged_state_dict(_bf16_base(tiny_gpt2), zoo["gpt2_bias"], dtype=torch.float64)
    got = tensors(tmp_path / "bias")
    for key in ("transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"):
        assert torch.equal(got[key], nearest(peft[key], torch.bfloat16)), key


def test_merging_twice_needs_force_and_unlisted_unmerge_warns(zoo: Zoo, bases, tmp_path) -> None:
    ao.merge(bases["llama_bf16"], [zoo["llama_a"]], out=tmp_path / "once")
    with pytest.raises(
        ao.InvalidInputError, match="is already merged into this checkpoint .* pass remerge=True"
    ):
        ao.merge(tmp_path / "once", [zoo["llama_a"]], out=tmp_path / "twice")
    ao.merge(tmp_path / "once", [zoo["llama_a"]], out=tmp_path / "twice", remerge=True)
    record = json.loads((tmp_path / "twice" / RECORD_NAME).read_text())
    assert len(record["merged"]) == 2
    with pytest.warns(UserWarning, match="is not listed in the checkpoint's merge record"):
        ao.unmerge(bases["llama_bf16"], [zoo["llama_b"]], out=tmp_path / "odd")


@pytest.mark.parametrize(
    ("base", "adapter", "error", "message"),
    [
        (
            "llama_bf16",
            "gpt2_a",
            ao.IncompatibleAdaptersError,
            "module transformer.h.0.attn.c_attn: no tensor transformer.h.0.attn.c_attn.weight in",
        ),
        (
            "gpt2_bf16",
            "llama_a",
            ao.IncompatibleAdaptersError,
            "no tensor model.layers.0.mlp.down_proj.weight",
        ),
    ],
)
def test_adapters_for_other_models_are_refused(
    zoo: Zoo, bases, tmp_path, base, adapter, error, message
) -> None:
    with pytest.raises(error, match=message):
        ao.merge(bases[base], [zoo[adapter]], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dora_unmerge_without_record_is_refused(zoo: Zoo, bases, tmp_path) -> None:
    with pytest.raises(ao.UnsupportedAdapterError, match="cannot be undone without the row norms"):
        ao.unmerge(bases["llama_bf16"], [zoo["llama_dora"]], out=tmp_path / "out")


KILL_SCRIPT = """
import sys, time, pathlib
import adapterops as ao
marker = pathlib.Path(sys.argv[3])
def slow(nbytes, name):
    marker.touch()
    time.sleep(0.2)
ao.merge(sys.argv[1], [sys.argv[2]], out=sys.argv[4], progress=slow, device="cpu")
"""


def test_a_killed_merge_leaves_nothing_at_the_output_and_a_rerun_works(zoo: Zoo, bases, tmp_path) -> None:
    out, marker = tmp_path / "merged", tmp_path / "started"
    args = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        str(bases["llama_bf16"]),
        str(zoo["llama_a"]),
        str(marker),
        str(out),
    ]
    proc = subprocess.Popen(args, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the merge never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert any(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir())  # it was mid-write
    ao.merge(bases["llama_bf16"], [zoo["llama_a"]], out=out)
    assert ao.verify(bases["llama_bf16"], [zoo["llama_a"]], out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merged",
        "started",
    ]  # the dead run's leftovers went


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_equals_cpu_merge(zoo: Zoo, bases, tmp_path) -> None:
    ao.merge(
        bases["llama_bf16"], [zoo["llama_a"], zoo["llama_b"]], [0.7, 0.3], out=tmp_path / "cpu", device="cpu"
    )
    ao.merge(
        bases["llama_bf16"], [zoo["llama_a"], zoo["llama_b"]], [0.7, 0.3], out=tmp_path / "gpu", device="cuda"
    )
    cpu, gpu = tensors(tmp_path / "cpu"), tensors(tmp_path / "gpu")
    for key in cpu:
        steps = (cpu[key].double() - gpu[key].double()).abs() / ao_ulp(cpu[key].double(), cpu[key].dtype)
        assert float(steps.max()) <= 1.0, key


def test_base_from_the_hub_and_tied_lm_head(zoo: Zoo, fake_snapshots, tmp_path) -> None:
    from functools import partial

    from tests.support.factories import make_adapter, tiny_llama

    fake_snapshots.add(
        "org/tiny-llama", save_base_checkpoint(tiny_llama, tmp_path / "base", max_shard_size=SHARD)
    )
    ao.merge("org/tiny-llama", [zoo["llama_a"]], out=tmp_path / "merged")
    assert [c.repo_id for c in fake_snapshots.calls] == ["org/tiny-llama"]
    assert ao.verify(tmp_path / "base", [zoo["llama_a"]], tmp_path / "merged").ok
    record = json.loads((tmp_path / "merged" / RECORD_NAME).read_text())
    assert record["merged"][0]["sha256"] == ao.load_adapter(zoo["llama_a"]).source.sha256

    tied = partial(tiny_llama, tie_word_embeddings=True)
    tied.__name__ = "tiny_llama_tied"  # type: ignore[attr-defined]
    base = save_base_checkpoint(tied, tmp_path / "tied")
    head = make_adapter(tied, tmp_path / "head", seed=3, r=2, target_modules=["lm_head"])
    # a LoRA on the tied head unties it (tests/test_tied.py checks the logits)
    with pytest.warns(UserWarning, match="untied lm_head.weight from model.embed_tokens.weight"):
        ao.merge(base, [head], out=tmp_path / "x")
    assert json.loads((tmp_path / "x" / "config.json").read_text())["tie_word_embeddings"] is False


def test_the_card_of_a_merge_names_its_hub_base(zoo: Zoo, fake_snapshots, tmp_path) -> None:
    from adapterops.hub import inspect_output, model_card
    from tests.support.factories import tiny_llama

    fake_snapshots.add(
        "org/tiny-llama", save_base_checkpoint(tiny_llama, tmp_path / "base", max_shard_size=SHARD)
    )
    ao.merge("org/tiny-llama", [zoo["llama_a"]], out=tmp_path / "merged")
    output = inspect_output(tmp_path / "merged")
    assert output.base_model == "org/tiny-llama"
    assert "base_model: org/tiny-llama" in model_card(output, "me/merged")


def test_not_enough_disk_space_is_refused_before_writing(zoo: Zoo, bases, tmp_path, monkeypatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(ao.OutputWriteError, match=r"GiB free but the output needs .* free space or choose"):
        ao.merge(bases["llama_bf16"], [zoo["llama_a"]], out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
