"""Bad adapters on disk: each gives one clear error naming the file and module, and runs no code."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapterops as ao
from tests.conftest import Zoo

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def copy(zoo: Zoo, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(zoo[name], tmp_path / name))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("pissa", "init_lora_weights='pissa' trains against a modified base weight"),
        ("pissa_niter_4", "init_lora_weights='pissa_niter_4' trains against a modified base weight"),
        ("olora", "not a delta on the original base"),
        ("corda", "path_initial_model_for_weight_conversion"),
        ("loftq", "modified base weight"),
    ],
)
def test_base_modifying_inits_are_refused_with_the_way_out(
    zoo: Zoo, tmp_path: Path, init: str, message: str
) -> None:
    path = copy(zoo, "llama_a", tmp_path)
    edit_config(path, init_lora_weights=init)
    with pytest.raises(ao.UnsupportedAdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ao.load_adapter(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type is IA3; adapterops handles LoRA adapters"),
        ({"use_qalora": True}, "use_qalora is set"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"r": 16, "rank_pattern": {}}, "rank 4 in its tensors but r=16"),
        ({"lora_alpha": "eight"}, "lora_alpha must be a positive number, got 'eight'"),
        ({"rank_pattern": {"v_proj": "two"}}, "rank_pattern must map module patterns to positive numbers"),
    ],
)
def test_configs_that_do_not_match_plain_lora_are_refused(zoo: Zoo, tmp_path: Path, changes, message) -> None:
    path = copy(zoo, "llama_a", tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ao.AdapterFormatError, match=message):
        ao.load_adapter(path)


def test_nan_in_factors_names_the_module(zoo: Zoo, tmp_path: Path) -> None:
    path = copy(zoo, "llama_a", tmp_path)
    edit_tensors(path, lambda t: t[f"{Q}.lora_B.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(
        ao.AdapterFormatError, match=r"module model.layers.0.self_attn.q_proj: lora_B contains NaN"
    ):
        ao.load_adapter(path)


def test_missing_factor_and_rank_mismatch(zoo: Zoo, tmp_path: Path) -> None:
    path = copy(zoo, "llama_a", tmp_path)
    edit_tensors(path, lambda t: t.pop(f"{Q}.lora_A.weight"))
    with pytest.raises(ao.AdapterFormatError, match="q_proj has no lora_A tensor"):
        ao.load_adapter(path)
    path = copy(zoo, "llama_b", tmp_path)
    edit_tensors(path, lambda t: t.__setitem__(f"{Q}.lora_B.weight", torch.zeros(32, 3)))
    with pytest.raises(ao.UnsupportedAdapterError, match="lora_A has rank 8 but lora_B has 3 columns"):
        ao.load_adapter(path)


def test_dora_flag_and_file_must_agree(zoo: Zoo, tmp_path: Path) -> None:
    path = copy(zoo, "llama_dora", tmp_path)
    edit_config(path, use_dora=False)
    with pytest.raises(ao.AdapterFormatError, match="has a lora_magnitude_vector but use_dora is false"):
        ao.load_adapter(path)


def test_truncated_file_is_reported_as_such(zoo: Zoo, tmp_path: Path) -> None:
    path = copy(zoo, "llama_a", tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ao.AdapterFormatError, match="not a readable safetensors file .* cut short"):
        ao.load_adapter(path)


def test_missing_files(tmp_path: Path, zoo: Zoo) -> None:
    with pytest.raises(ao.NotFoundError, match="no adapter_config.json; expected a PEFT adapter directory"):
        ao.load_adapter(tmp_path)
    path = copy(zoo, "llama_a", tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ao.NotFoundError, match=r"no adapter_model.safetensors \(or adapter_model.bin\)"):
        ao.load_adapter(path)
    with pytest.raises(ao.NotFoundError, match="no such adapter directory"):
        ao.load_adapter(tmp_path / "nothing-here")


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(BOOM_MARKER),))


BOOM_MARKER = ""


def test_pickle_bin_loads_tensors_but_never_runs_code(zoo: Zoo, tmp_path: Path) -> None:
    global BOOM_MARKER
    path = copy(zoo, "llama_a", tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    from_bin = ao.load_adapter(path)
    assert torch.equal(from_bin.modules["model.layers.0.self_attn.q_proj"].A, tensors[f"{Q}.lora_A.weight"])

    BOOM_MARKER = str(tmp_path / "pwned")
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ao.AdapterFormatError, match="does not execute pickled code"):
        ao.load_adapter(path)
    assert not Path(BOOM_MARKER).exists()


def test_output_that_exists_is_not_overwritten_without_force(zoo: Zoo, tmp_path: Path) -> None:
    adapter = ao.load_adapter(zoo["llama_a"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(
        ao.OutputExistsError, match="already exists; choose another output path or pass --force"
    ):
        ao.save_adapter(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    ao.save_adapter(adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left
