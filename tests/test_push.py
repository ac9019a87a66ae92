"""push_to_hub against the local Hub server: files, card, token handling, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard

import adapterops as ao
from adapterops.cli import cli
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama
from tests.support.hubserver import FakeHub, set_offline

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def test_push_an_adapter_with_its_lineage_card(
    fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    a, b = ao.load_adapter(zoo["llama_a"]), ao.load_adapter(zoo["llama_b"])
    ao.save_adapter(ao.combine([a, b], [0.7, 0.3], method="svd", rank=4), tmp_path / "mix")
    monkeypatch.setenv("HF_TOKEN", "secret-token-123")
    url = ao.push_to_hub(tmp_path / "mix", "me/mix", private=True)
    assert "me/mix" in url
    files = fake_hub.files("me/mix")
    local = {p.name: p.read_bytes() for p in (tmp_path / "mix").iterdir()}
    assert files["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert files["adapter_config.json"] == local["adapter_config.json"]
    assert fake_hub.is_lfs("me/mix", "adapter_model.safetensors")
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert set(card.data.tags) >= {"adapterops", "lora"}
    text = card.text
    assert a.source.sha256 in text and b.source.sha256 in text
    assert "- method: `svd`" in text and "- weights: `[0.7, 0.3]`" in text and "- rank: `4`" in text
    assert fake_hub.last_token == "secret-token-123"
    assert all("secret-token-123" not in v.decode(errors="ignore") for v in files.values())
    # pushing the same files again succeeds and adds no empty commit
    before = fake_hub.commits("me/mix")
    ao.push_to_hub(tmp_path / "mix", "me/mix")
    assert fake_hub.commits("me/mix") == before


def test_push_a_merged_checkpoint(fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.bfloat16, max_shard_size="20KB")
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    monkeypatch.setenv("HF_TOKEN", "t")
    result = CliRunner().invoke(
        cli, ["push", str(tmp_path / "merged"), "me/merged", "--revision", "v1", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    files = fake_hub.files("me/merged", revision="v1")
    assert set(files) >= {p.name for p in (tmp_path / "merged").iterdir()}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "merge" in card.data.tags
    assert ao.load_adapter(zoo["llama_a"]).source.sha256 in card.text
    assert json.loads(files["adapterops_merge.json"])["merged"][0]["sha256"] in card.text


def test_push_failures_are_one_clear_line(zoo: Zoo, tmp_path: Path, monkeypatch) -> None:
    with FakeHub(tmp_path / "hub", tokens={"good"}) as hub:
        from tests.support.hubserver import fake_hub_env

        fake_hub_env(monkeypatch, hub, tmp_path / "cache")
        monkeypatch.setenv("HF_TOKEN", "bad-secret")
        result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x"])
        assert result.exit_code == 5
        assert result.stderr.startswith("error: the Hub refused the upload to me/x (HTTP 401): log in")
        assert "bad-secret" not in result.stderr + result.stdout
        set_offline(monkeypatch)
        result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x", "--token", "good"])
        assert (result.exit_code, result.stderr) == (
            5,
            "error: cannot push me/x: HF_HUB_OFFLINE is set; unset it to upload\n",
        )
    result = CliRunner().invoke(cli, ["push", str(tmp_path), "me/x"])
    assert result.exit_code == 2 and "neither a PEFT adapter" in result.stderr


def test_writing_verbs_push_with_a_flag(fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "t")
    args = [
        "combine",
        str(zoo["llama_a"]),
        str(zoo["llama_b"]),
        "-w",
        "0.7",
        "0.3",
        "-o",
        str(tmp_path / "mix"),
        "--push",
        "me/mix",
        "--private",
        "--json",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    assert "me/mix" in json.loads(result.stdout)["pushed"]
    pushed = fake_hub.files("me/mix")
    assert (
        pushed["adapter_model.safetensors"] == (tmp_path / "mix" / "adapter_model.safetensors").read_bytes()
    )
    assert "adapterops combine" in pushed["README.md"].decode()  # the command is in the card


def test_merge_push_uploads_shards_while_merging(
    fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    """Each shard is pre-uploaded from the temporary directory as soon as it is written, then one
    commit lands; an interrupted push resumes without re-sending what the Hub has."""
    from huggingface_hub import HfApi

    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.bfloat16, max_shard_size="20KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 2
    sent: list[str] = []
    original = HfApi.preupload_lfs_files

    def spy(self, repo_id, additions, **kwargs):
        additions = list(additions)
        for a in additions:
            source = a.path_or_fileobj
            sent.append(source if isinstance(source, str) else getattr(source, "name", ""))
        return original(self, repo_id, additions, **kwargs)

    monkeypatch.setattr(HfApi, "preupload_lfs_files", spy)
    monkeypatch.setenv("HF_TOKEN", "t")
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            str(base),
            str(zoo["llama_a"]),
            "-o",
            str(tmp_path / "merged"),
            "--push",
            "me/merged",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.stderr
    during = [Path(p).name for p in sent if ".merged.tmp-" in p]
    assert sorted(during) == shards  # every shard went up from the temporary directory, mid-merge
    files = fake_hub.files("me/merged")
    for name in shards:
        assert files[name] == (tmp_path / "merged" / name).read_bytes()
    uploads = len(fake_hub.lfs_uploads)
    ao.push_to_hub(tmp_path / "merged", "me/merged")  # nothing changed: nothing re-sent
    assert len(fake_hub.lfs_uploads) == uploads
