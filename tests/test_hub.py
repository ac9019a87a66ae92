"""Hub ids resolve like paths: what adapterops asks snapshot_download for and how it words the client's errors
(against tests/support/fakehub.py), and one end-to-end resolution through the real client (marker ``hub``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub.errors import RepositoryNotFoundError

import adapterops as ao
from adapterops.cli import cli
from adapterops.io.checkpoint import FOREIGN_WEIGHTS, open_checkpoint
from adapterops.io.refs import parse_hub_id
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama
from tests.support.fakehub import FakeSnapshots, connection_error, http_error, set_offline
from tests.support.hubserver import FakeHub

Q = "model.layers.0.self_attn.q_proj"
# the files of every directory format: mlx-lm's (adapters.safetensors), PEFT's, then diffusers'
ADAPTER_FILES = [
    "adapter_config.json",
    "adapters.safetensors",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.safetensors",
]
API = "https://huggingface.co/api/models/org/style/revision/main"


def publish(snapshots: FakeSnapshots, zoo: Zoo) -> tuple[str, str]:
    """org/style with main = llama_a and a tag v1 = llama_emb; returns both commit shas."""
    old = snapshots.add("org/style", zoo["llama_emb"])
    snapshots.tag("org/style", "v1", old)
    new = snapshots.add("org/style", zoo["llama_a"])
    return old, new


def test_hub_ids_load_the_snapshot_of_their_revision(fake_snapshots: FakeSnapshots, zoo: Zoo) -> None:
    old, new = publish(fake_snapshots, zoo)
    latest = ao.load_adapter("org/style")
    assert torch.equal(latest.modules[Q].A, ao.load_adapter(zoo["llama_a"]).modules[Q].A)
    assert (latest.source.repo_id, latest.source.revision) == ("org/style", new)
    tagged = ao.load_adapter("org/style@v1")
    assert "model.embed_tokens" in tagged.modules and tagged.source.revision == old
    assert ao.load_adapter(f"org/style@{old}").source.sha256 == tagged.source.sha256
    # the revision after @ goes to the client as written; only the adapter's own files are asked for
    calls = fake_snapshots.calls
    assert [(c.repo_id, c.revision) for c in calls] == [
        ("org/style", None),
        ("org/style", "v1"),
        ("org/style", old),
    ]
    assert all(c.allow_patterns == ADAPTER_FILES and not c.ignore_patterns for c in calls)
    snapshot = fake_snapshots.cache / "models--org--style" / "snapshots" / new
    assert sorted(p.name for p in snapshot.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_hub_checkpoint_is_fetched_without_foreign_weights(
    fake_snapshots: FakeSnapshots, tmp_path: Path
) -> None:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", max_shard_size="20KB")
    (base / "pytorch_model.bin").write_bytes(b"not needed")
    sha = fake_snapshots.add("org/base", base)
    checkpoint = open_checkpoint("org/base@main")
    (call,) = fake_snapshots.calls
    assert (call.repo_id, call.revision, call.allow_patterns) == ("org/base", "main", ["*"])
    assert call.ignore_patterns == list(FOREIGN_WEIGHTS)
    assert checkpoint.root.name == sha and not (checkpoint.root / "pytorch_model.bin").exists()
    assert {p.name for p in checkpoint.root.iterdir()} == {p.name for p in base.iterdir()} - {
        "pytorch_model.bin"
    }


def test_missing_repo_and_revision(fake_snapshots: FakeSnapshots, zoo: Zoo) -> None:
    publish(fake_snapshots, zoo)
    with pytest.raises(
        ao.NotFoundError, match="no local adapter directory of that name and no Hub repo org/nope"
    ) as missing:
        ao.load_adapter("org/nope")
    assert isinstance(
        missing.value.__cause__, RepositoryNotFoundError
    )  # the client's error, for the traceback
    with pytest.raises(ao.NotFoundError, match="the Hub repo org/style has no revision 'v9'"):
        ao.load_adapter("org/style@v9")
    result = CliRunner().invoke(cli, ["info", "org/style@v9"])
    assert (result.exit_code, result.stderr.count("\n")) == (3, 1)
    assert result.stderr.startswith("error: org/style@v9: the Hub repo org/style has no revision 'v9'; check")


def test_offline_uses_the_cache_and_says_so_when_it_cannot(
    fake_snapshots: FakeSnapshots, zoo: Zoo, monkeypatch
) -> None:
    publish(fake_snapshots, zoo)
    warm = ao.load_adapter("org/style")
    set_offline(monkeypatch)
    assert ao.load_adapter("org/style").source.sha256 == warm.source.sha256
    with pytest.raises(ao.HubError, match="not in the local cache while the Hub cannot be reached"):
        ao.load_adapter("org/other")
    result = CliRunner().invoke(cli, ["info", "org/other"])
    assert result.exit_code == 5 and "(offline or HF_HUB_OFFLINE=1)" in result.stderr


REFUSED = "org/style: the Hub refused the download: "
MISSING = (
    "org/style: no local adapter directory of that name and no Hub repo org/style (or it is private: log in"
)
UNREACHABLE = "org/style: could not reach the Hub ("


@pytest.mark.parametrize(
    ("error", "start", "detail", "exit_code"),
    [
        pytest.param(
            lambda: http_error(401, API, method="GET", error="Invalid credentials in Authorization header"),
            REFUSED,
            "Invalid credentials in Authorization header",
            5,
            id="401",
        ),
        pytest.param(
            lambda: http_error(403, API, method="GET", error="Access denied"),
            REFUSED,
            "403 Forbidden: Access denied",
            5,
            id="403",
        ),
        pytest.param(
            lambda: http_error(403, API, method="GET", error_code="GatedRepo", error="Gated"),
            MISSING,
            "`hf auth login` or set HF_TOKEN)",
            3,
            id="gated",
        ),
        pytest.param(
            lambda: OSError(101, "Network is unreachable"),
            UNREACHABLE,
            "[Errno 101] Network is unreachable); check the network or set HF_HUB_OFFLINE=1",
            5,
            id="oserror",
        ),
        pytest.param(
            connection_error,
            UNREACHABLE,
            "Connection refused); check the network or set HF_HUB_OFFLINE=1",
            5,
            id="client-connect-error",
        ),
    ],
)
def test_client_errors_become_adapterops_errors(
    fake_snapshots: FakeSnapshots, error, start: str, detail: str, exit_code: int
) -> None:
    fake_snapshots.fail_with(error())
    result = CliRunner().invoke(cli, ["info", "org/style"])
    assert result.exit_code == exit_code, result.stderr
    assert result.stderr.startswith("error: " + start) and detail in result.stderr
    with pytest.raises(ao.HubError if exit_code == 5 else ao.NotFoundError) as caught:
        ao.load_adapter("org/style")
    assert str(caught.value).startswith(start) and detail in str(caught.value)


def test_a_refused_download_is_one_line(fake_snapshots: FakeSnapshots) -> None:
    fake_snapshots.fail_with(http_error(403, API, method="GET", error="Access denied"))
    result = CliRunner().invoke(cli, ["info", "org/style"])
    assert result.exit_code == 5 and result.stderr.count("\n") == 1


def test_a_download_error_echoing_the_token_does_not_print_it(
    fake_snapshots: FakeSnapshots, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_download")
    fake_snapshots.fail_with(http_error(403, API, method="GET", error="bad token hf_secret_download"))
    result = CliRunner().invoke(cli, ["info", "org/style"])
    assert result.exit_code == 5 and "hf_secret_download" not in result.stderr + result.stdout


def test_cli_takes_hub_ids_and_records_them(fake_snapshots: FakeSnapshots, zoo: Zoo, tmp_path: Path) -> None:
    _, new = publish(fake_snapshots, zoo)
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


def test_local_paths_never_reach_the_hub(fake_snapshots: FakeSnapshots, zoo: Zoo, tmp_path: Path) -> None:
    assert ao.load_adapter(zoo["llama_a"]).source.repo_id is None
    with pytest.raises(ao.NotFoundError, match="name: no such adapter directory"):
        ao.load_adapter("name")
    with pytest.raises(ao.NotFoundError, match="is a file; pass the adapter directory that contains it"):
        ao.load_adapter(zoo["llama_a"] / "adapter_config.json")
    assert fake_snapshots.calls == []


@pytest.mark.hub
def test_hub_ids_and_revisions_through_the_real_client(fake_hub: FakeHub, zoo: Zoo) -> None:
    old = fake_hub.add_repo("org/style", zoo["llama_emb"])
    fake_hub.create_tag("org/style", "v1", revision=old)
    new = fake_hub.add_repo("org/style", zoo["llama_a"])
    latest = ao.load_adapter("org/style")
    assert torch.equal(latest.modules[Q].A, ao.load_adapter(zoo["llama_a"]).modules[Q].A)
    assert (latest.source.repo_id, latest.source.revision) == ("org/style", new)
    tagged = ao.load_adapter("org/style@v1")
    assert "model.embed_tokens" in tagged.modules and tagged.source.revision == old
    assert ao.load_adapter(f"org/style@{old}").source.sha256 == tagged.source.sha256
    with pytest.raises(ao.NotFoundError, match="the Hub repo org/style has no revision 'v9'"):
        ao.load_adapter("org/style@v9")
