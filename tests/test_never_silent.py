"""Never silently wrong: results that cannot be right are refused, records hold what a user needs
later, cards carry no local paths, and lossy conversions say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops.cli import cli
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama

INPUTS = Path(__file__).parent.parent / "recipes" / "inputs"
BASE = INPUTS / "tiny-llama-64"


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base_checkpoint(tiny_llama, tmp_path_factory.mktemp("fp16") / "base", dtype=torch.float16)


def test_a_merge_that_overflows_the_dtype_is_refused(zoo: Zoo, fp16_base: Path, tmp_path: Path) -> None:
    ao.save_adapter(ao.scale(zoo["llama_a"], 1e9), tmp_path / "huge")
    code, out, err = run("merge", fp16_base, tmp_path / "huge", "-o", tmp_path / "merged")
    assert (code, out) == (2, "")
    assert err.startswith("error: model.") and "would write NaN or Inf" in err and "overflows float16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"]


def test_verify_fails_on_nan_or_inf_in_a_merged_tensor(zoo: Zoo, tmp_path: Path) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    shard = tmp_path / "merged" / "model.safetensors"
    tensors = load_file(shard)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key][0, 0] = float("nan")
    metadata = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    save_file(tensors, shard, metadata=metadata["__metadata__"])
    report = ao.verify(base, [zoo["llama_a"]], tmp_path / "merged")
    assert not report.passed() and report.non_finite == (key,)
    code, out, _ = run("verify", base, zoo["llama_a"], tmp_path / "merged")
    assert code == 1 and f"non finite: {key}" in out and "FAILED" in out
