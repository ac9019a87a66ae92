"""The local Hub server (tests/support/hubserver.py) against huggingface_hub's real client, for the calls
adapterops makes: snapshot_download, create_repo, create_branch, preupload_lfs_files, create_commit."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from tests.support.hubserver import FakeHub

# huggingface_hub's LFS upload passes a file object as `data=`; httpx2 warns about it, not our business
pytestmark = [pytest.mark.hub, pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]

REPO = "org/adapter"
V1 = {
    "adapter_config.json": b'{"r": 4, "version": 1}',
    "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)),
    "README.md": b"# v1\n",
    "extra/notes.txt": b"first revision",
}
V2 = {
    "adapter_config.json": b'{"r": 8, "version": 2}',
    "adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(255, -1, -1)),
    "README.md": b"# v2\n",
}


def _read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_snapshot_download_of_branches_tags_and_shas(fake_hub: FakeHub, tmp_path: Path) -> None:
    sha1 = fake_hub.add_repo(REPO, V1)
    sha2 = fake_hub.add_repo(REPO, V2, revision="dev")
    fake_hub.create_tag(REPO, "v1.0", revision=sha1)
    assert len(sha1) == 40 and int(sha1, 16) >= 0 and sha1 != sha2
    assert [fake_hub.resolve(REPO, r) for r in ("main", "dev", "v1.0", "nope")] == [sha1, sha2, sha1, None]
    main = snapshot_download(REPO)
    assert Path(main).name == sha1 and _read_tree(main) == V1
    dev = snapshot_download(REPO, revision="dev")
    assert Path(dev).name == sha2 and _read_tree(dev) == V2
    assert _read_tree(snapshot_download(REPO, revision=sha1)) == V1
    assert Path(snapshot_download(REPO, revision="v1.0")).name == sha1
    assert fake_hub.last_authorization is None  # no token anywhere: none was sent
    folder = snapshot_download(
        REPO,
        allow_patterns=["*.json", "*.safetensors"],
        ignore_patterns=["*.json"],
        cache_dir=tmp_path / "c1",
    )
    assert Path(folder).name == sha1 and set(_read_tree(folder)) == {"adapter_model.safetensors"}
    sub = snapshot_download(REPO, allow_patterns=["extra/*"], cache_dir=tmp_path / "c2")
    assert _read_tree(sub) == {"extra/notes.txt": b"first revision"}


def test_missing_repos_revisions_and_private_repos(fake_hub: FakeHub) -> None:
    fake_hub.add_repo(REPO, V1)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing")
    with pytest.raises(RevisionNotFoundError) as missing_revision:
        snapshot_download(REPO, revision="no-such-branch")
    assert not isinstance(missing_revision.value, RepositoryNotFoundError)
    sha = fake_hub.add_repo("org/private", {"a.txt": b"secret"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/private")
    assert _read_tree(snapshot_download("org/private", token="hf_reader")) == {"a.txt": b"secret"}
    assert fake_hub.last_token == "hf_reader" and fake_hub.resolve("org/private") == sha


def test_create_repo_branch_preupload_and_commit(fake_hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(token="x")
    assert api.create_repo("org/pushed", private=True).repo_id == "org/pushed"
    assert fake_hub.last_authorization == "Bearer x"
    assert api.create_repo("org/pushed", exist_ok=True).repo_id == "org/pushed"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/pushed")
    assert conflict.value.response.status_code == 409
    api.create_branch("org/pushed", branch="dev")
    api.create_branch("org/pushed", branch="dev", exist_ok=True)
    assert fake_hub.resolve("org/pushed", "dev") == fake_hub.resolve("org/pushed")

    weights = os.urandom(4096)
    (tmp_path / "w.safetensors").write_bytes(weights)
    files = {"w.safetensors": weights, "adapter_config.json": b'{"r": 16}', "README.md": b"# pushed\n"}
    operations = [
        CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=str(tmp_path / "w.safetensors")),
        CommitOperationAdd(path_in_repo="adapter_config.json", path_or_fileobj=files["adapter_config.json"]),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=files["README.md"]),
    ]
    for operation in operations:
        api.preupload_lfs_files("org/pushed", [operation], revision="dev")
    oid = hashlib.sha256(weights).hexdigest()
    assert fake_hub.lfs_uploads == [oid]  # only the weights went through the LFS upload URL
    # the other preupload rules: big or binary content goes to LFS whatever its name
    assert fake_hub.wants_lfs("a.txt", 10 * 2**20, b"x") and fake_hub.wants_lfs("b.txt", 5, b"\0")
    assert not fake_hub.wants_lfs("c.txt", 5, b"x")
    commit = api.create_commit("org/pushed", operations, commit_message="push it", revision="dev")
    assert commit.oid == fake_hub.resolve("org/pushed", "dev") != fake_hub.resolve("org/pushed")
    assert commit.commit_url == f"{fake_hub.endpoint}/org/pushed/commit/{commit.oid}"
    assert fake_hub.is_lfs("org/pushed", "w.safetensors", "dev")
    assert not fake_hub.is_lfs("org/pushed", "adapter_config.json", "dev")
    stored = fake_hub.files("org/pushed", "dev")
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == files
    assert _read_tree(snapshot_download("org/pushed", revision="dev", token="x")) == stored
    writes = [
        r for r in fake_hub.requests if any(k in r.path for k in ("/preupload/", "/commit/", "lfs/objects"))
    ]
    assert writes and all(r.authorization == "Bearer x" for r in writes)
    assert not fake_hub.errors

    # content the server has is not uploaded again, and an unchanged commit is skipped by the client
    again = CommitOperationAdd(path_in_repo="w.safetensors", path_or_fileobj=weights)
    api.preupload_lfs_files("org/pushed", [again], revision="dev")
    assert fake_hub.lfs_uploads == [oid]
    api.create_commit("org/pushed", [again], commit_message="again", revision="dev")
    assert fake_hub.resolve("org/pushed", "dev") == commit.oid


def test_writes_need_a_token(fake_hub: FakeHub) -> None:
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token=False).create_repo("org/anonymous")
    assert denied.value.response.status_code == 401
    assert not fake_hub.repo_exists("org/anonymous")


def test_the_client_is_aimed_at_the_server(fake_hub: FakeHub, tmp_path: Path) -> None:
    assert fake_hub.endpoint == hf_constants.ENDPOINT == os.environ["HF_ENDPOINT"]
    assert huggingface_hub.hf_api.api.endpoint == fake_hub.endpoint
    assert str(tmp_path / "hf-cache" / "hub") == hf_constants.HF_HUB_CACHE
    assert hf_constants.HF_HUB_OFFLINE is False and "HF_TOKEN" not in os.environ
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "w.safetensors").write_bytes(b"\x00weights")
    (folder / "sub" / "cfg.json").write_bytes(b"{}")
    sha = fake_hub.add_repo("org/fixture", folder)  # a folder is copied as the tree
    assert fake_hub.is_lfs("org/fixture", "w.safetensors")
    assert not fake_hub.is_lfs("org/fixture", "sub/cfg.json")
    snapshot = snapshot_download("org/fixture")
    assert snapshot == str(tmp_path / "hf-cache" / "hub" / "models--org--fixture" / "snapshots" / sha)
    assert _read_tree(snapshot) == {"w.safetensors": b"\x00weights", "sub/cfg.json": b"{}"}


def test_stop_closes_the_port(tmp_path: Path) -> None:
    server = FakeHub(tmp_path / "hub").start()
    assert server.endpoint.startswith("http://127.0.0.1:")
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    server.stop()  # idempotent
