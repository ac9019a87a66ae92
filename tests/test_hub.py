"""Hub ids resolve like paths, through huggingface_hub's real client against a local Hub server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.io.refs import parse_hub_id
from tests.conftest import Zoo
from tests.support.hubserver import FakeHub, set_offline

Q = "model.layers.0.self_attn.q_proj"


def publish(hub: FakeHub, zoo: Zoo) -> tuple[str, str]:
    """org/style with main = llama_a and a tag v1 = llama_emb; returns both commit shas."""
    old = hub.add_repo("org/style", zoo["llama_emb"])
    hub.create_tag("org/style", "v1", revision=old)
    new = hub.add_repo("org/style", zoo["llama_a"])
    return old, new


def test_hub_ids_and_revisions_load_the_right_files(fake_hub: FakeHub, zoo: Zoo) -> None:
    old, new = publish(fake_hub, zoo)
    latest = ao.load_adapter("org/style")
    assert torch.equal(latest.modules[Q].A, ao.load_adapter(zoo["llama_a"]).modules[Q].A)
    assert (latest.source.repo_id, latest.source.revision) == ("org/style", new)
    tagged = ao.load_adapter("org/style@v1")
    assert "model.embed_tokens" in tagged.modules and tagged.source.revision == old
    assert ao.load_adapter(f"org/style@{old}").source.sha256 == tagged.source.sha256


def test_missing_repo_and_revision(fake_hub: FakeHub, zoo: Zoo) -> None:
    publish(fake_hub, zoo)
    with pytest.raises(
        ao.NotFoundError, match="no local adapter directory of that name and no Hub repo org/nope"
    ):
        ao.load_adapter("org/nope")
    with pytest.raises(ao.NotFoundError, match="the Hub repo org/style has no revision 'v9'"):
        ao.load_adapter("org/style@v9")


def test_offline_uses_the_cache_and_says_so_when_it_cannot(fake_hub: FakeHub, zoo: Zoo, monkeypatch) -> None:
    publish(fake_hub, zoo)
    warm = ao.load_adapter("org/style")
    set_offline(monkeypatch)
    assert ao.load_adapter("org/style").source.sha256 == warm.source.sha256
    with pytest.raises(ao.HubError, match="not in the local cache while the Hub cannot be reached"):
        ao.load_adapter("org/other")


def test_cli_takes_hub_ids_and_records_them(fake_hub: FakeHub, zoo: Zoo, tmp_path: Path) -> None:
    _, new = publish(fake_hub, zoo)
    result = CliRunner().invoke(cli, ["scale", "org/style", "--by", "2", "-o", str(tmp_path / "x"), "-q"])
    assert result.exit_code == 0, result.stderr
    record = ao.load_adapter(tmp_path / "x").provenance["inputs"][0]
    assert (record["repo_id"], record["revision"], record["path"]) == ("org/style", new, "org/style")


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@v2", ("org/name", "v2")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("name", None),  # bare words are local paths, never Hub lookups
        ("./org/name", None),
        ("../x/y", None),
        ("/abs/path", None),
    ],
)
def test_parse_hub_id(spec: str, parsed) -> None:
    assert parse_hub_id(spec) == parsed
