"""The fake Hub (tests/hubserver.py) against huggingface_hub's real client code."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.hubserver import FakeHub, fake_hub_env, set_offline, use_endpoint

# huggingface_hub's LFS upload passes a file object as `data=`; httpx2 warns about it, not our business
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

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


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHub(tmp_path / "hub") as server:
        fake_hub_env(monkeypatch, server, tmp_path / "hf-cache")
        yield server


@pytest.fixture
def two_revisions(hub: FakeHub) -> tuple[str, str]:
    sha1 = hub.add_repo(REPO, V1)
    sha2 = hub.add_repo(REPO, V2, revision="dev")
    hub.create_tag(REPO, "v1.0", revision=sha1)
    return sha1, sha2


def _read_tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_add_repo_returns_distinct_commit_shas(hub: FakeHub, two_revisions: tuple[str, str]) -> None:
    sha1, sha2 = two_revisions
    assert len(sha1) == 40 and int(sha1, 16) >= 0
    assert sha1 != sha2
    assert hub.resolve(REPO, "main") == sha1
    assert hub.resolve(REPO, "dev") == sha2
    assert hub.resolve(REPO, "v1.0") == sha1
    assert hub.resolve(REPO, "nope") is None


def test_hf_hub_download_each_revision(hub: FakeHub, two_revisions: tuple[str, str]) -> None:
    sha1, sha2 = two_revisions
    for revision, files in ((None, V1), ("main", V1), (sha1, V1), ("v1.0", V1), ("dev", V2), (sha2, V2)):
        for name, content in files.items():
            path = hf_hub_download(REPO, name, revision=revision)
            assert Path(path).read_bytes() == content, (revision, name)
    # the client stored the files under the commit the server resolved the revision to
    assert f"/snapshots/{sha2}/" in hf_hub_download(REPO, "README.md", revision="dev")
    assert hub.last_authorization is None  # no token anywhere: none was sent


def test_snapshot_download_with_and_without_revision(hub: FakeHub, two_revisions: tuple[str, str]) -> None:
    sha1, sha2 = two_revisions
    main = snapshot_download(REPO)
    assert Path(main).name == sha1
    assert _read_tree(main) == V1
    dev = snapshot_download(REPO, revision="dev")
    assert Path(dev).name == sha2
    assert _read_tree(dev) == V2
    assert _read_tree(snapshot_download(REPO, revision=sha1)) == V1


def test_snapshot_download_allow_patterns(
    hub: FakeHub, two_revisions: tuple[str, str], tmp_path: Path
) -> None:
    sha1, _ = two_revisions
    folder = snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"], cache_dir=tmp_path / "other")
    assert Path(folder).name == sha1
    assert set(_read_tree(folder)) == {"adapter_config.json", "adapter_model.safetensors"}
    sub = snapshot_download(REPO, allow_patterns=["extra/*"], cache_dir=tmp_path / "other2")
    assert _read_tree(sub) == {"extra/notes.txt": b"first revision"}


def test_model_info_sha_and_siblings(hub: FakeHub, two_revisions: tuple[str, str]) -> None:
    sha1, sha2 = two_revisions
    api = HfApi()
    assert api.model_info(REPO).sha == sha1
    assert api.model_info(REPO, revision="main").sha == sha1
    assert api.model_info(REPO, revision="dev").sha == sha2
    assert api.model_info(REPO, revision=sha1).sha == sha1
    info = api.model_info(REPO, revision="dev", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(V2)
    weights = siblings["adapter_model.safetensors"]
    assert weights.lfs is not None and weights.lfs.size == len(V2["adapter_model.safetensors"])
    assert siblings["README.md"].lfs is None and siblings["README.md"].size == len(V2["README.md"])
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": sha1, "dev": sha2}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": sha1}


def test_missing_repo_file_and_revision_raise_the_right_errors(
    hub: FakeHub, two_revisions: tuple[str, str]
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "adapter_config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/missing")

    with pytest.raises(EntryNotFoundError) as missing_file:
        hf_hub_download(REPO, "no_such_file.bin")
    # online and answered by the server, not "could not reach the Hub, not in the cache"
    assert isinstance(missing_file.value, RemoteEntryNotFoundError)
    assert not isinstance(missing_file.value, LocalEntryNotFoundError)

    for call in (
        lambda: hf_hub_download(REPO, "adapter_config.json", revision="no-such-branch"),
        lambda: snapshot_download(REPO, revision="no-such-branch"),
        lambda: HfApi().model_info(REPO, revision="no-such-branch"),
    ):
        with pytest.raises(RevisionNotFoundError) as missing_revision:
            call()
        assert not isinstance(missing_revision.value, RepositoryNotFoundError)


def test_private_repo_needs_a_token(hub: FakeHub) -> None:
    sha = hub.add_repo("org/private", {"a.txt": b"secret"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/private")
    assert HfApi(token="hf_reader").model_info("org/private").sha == sha
    assert hub.last_token == "hf_reader"
    assert Path(hf_hub_download("org/private", "a.txt", token="hf_reader")).read_bytes() == b"secret"


def test_create_repo_and_upload_folder_with_lfs_roundtrip(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.endpoint, token="x")
    url = api.create_repo("org/pushed")
    assert url.repo_id == "org/pushed"
    assert hub.last_authorization == "Bearer x"
    assert api.create_repo("org/pushed", exist_ok=True).repo_id == "org/pushed"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/pushed")
    assert conflict.value.response.status_code == 409

    folder = tmp_path / "to-push"
    (folder / "sub").mkdir(parents=True)
    big = os.urandom(10 * 1024 * 1024 + 123)  # > 10 MiB: the server asks for LFS
    files = {
        "big.bin": big,
        "adapter_config.json": b'{"r": 16}',
        "README.md": b"---\nlicense: mit\n---\n# pushed\n",
        "sub/notes.txt": b"small regular file",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)

    commit = api.upload_folder(folder_path=folder, repo_id="org/pushed", commit_message="push it")
    big_oid = hashlib.sha256(big).hexdigest()
    assert hub.lfs_uploads == [big_oid]  # only the big file went through the LFS upload URL
    assert hub.is_lfs("org/pushed", "big.bin")
    assert not hub.is_lfs("org/pushed", "sub/notes.txt")
    assert commit.oid == hub.resolve("org/pushed") == api.model_info("org/pushed").sha
    writes = [
        r for r in hub.requests if "/preupload/" in r.path or "/commit/" in r.path or "lfs/objects" in r.path
    ]
    assert writes and all(r.authorization == "Bearer x" for r in writes)
    assert not hub.errors

    stored = hub.files("org/pushed")
    assert {k: v for k, v in stored.items() if k != ".gitattributes"} == files
    downloaded = _read_tree(snapshot_download("org/pushed"))
    assert downloaded == stored
    assert Path(hf_hub_download("org/pushed", "big.bin")).read_bytes() == big

    # a second upload of unchanged content is a no-op on the client side: no new commit, no new LFS upload
    again = api.upload_folder(folder_path=folder, repo_id="org/pushed")
    assert again.oid == commit.oid
    assert hub.lfs_uploads == [big_oid]


def test_module_level_functions_and_commit_api(hub: FakeHub) -> None:
    # huggingface_hub.create_repo & co. are bound to an HfApi created at import time: patched too
    huggingface_hub.create_repo("org/funcs", token="y")
    assert hub.repo_exists("org/funcs")
    first = huggingface_hub.upload_file(
        path_or_fileobj=b"hello", path_in_repo="dir/hello.txt", repo_id="org/funcs", token="y"
    )
    api = HfApi(token="y")
    api.create_branch("org/funcs", branch="feature")
    api.create_tag("org/funcs", tag="v0", revision=first.oid)
    assert hub.resolve("org/funcs", "feature") == first.oid == hub.resolve("org/funcs", "v0")
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(
            path_or_fileobj=b"x",
            path_in_repo="x.txt",
            repo_id="org/funcs",
            parent_commit=hub.commits("org/funcs")[-1],  # the initial commit: stale
        )
    assert stale.value.response.status_code == 412
    deleted = api.delete_file("dir/hello.txt", repo_id="org/funcs")
    assert "dir/hello.txt" not in hub.files("org/funcs", deleted.oid)
    assert hub.files("org/funcs", "feature")["dir/hello.txt"] == b"hello"
    assert api.list_repo_files("org/funcs", revision="feature") == [".gitattributes", "dir/hello.txt"]


def test_writes_need_a_token(hub: FakeHub) -> None:
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token=False).create_repo("org/anonymous")
    assert denied.value.response.status_code == 401
    assert not hub.repo_exists("org/anonymous")


def test_offline_with_a_warm_cache(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hub.add_repo(REPO, V1)
    online_file = hf_hub_download(REPO, "adapter_config.json")
    online_snapshot = snapshot_download(REPO)
    seen = len(hub.requests)

    set_offline(monkeypatch)
    assert huggingface_hub.is_offline_mode()
    offline_file = hf_hub_download(REPO, "adapter_config.json")
    assert offline_file == online_file
    assert Path(offline_file).read_bytes() == V1["adapter_config.json"]
    assert snapshot_download(REPO) == online_snapshot
    assert Path(online_snapshot).name == sha
    assert len(hub.requests) == seen  # nothing went to the server
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/never-downloaded", "adapter_config.json")


def test_env_patch_covers_captured_endpoints(hub: FakeHub, tmp_path: Path) -> None:
    assert hub.endpoint == hf_constants.ENDPOINT
    assert huggingface_hub.hf_api.api.endpoint == hub.endpoint
    assert huggingface_hub.hf_hub_url(REPO, "a.txt").startswith(hub.endpoint + "/")
    assert str(tmp_path / "hf-cache" / "hub") == hf_constants.HF_HUB_CACHE
    assert hf_constants.HF_HUB_OFFLINE is False
    assert os.environ["HF_ENDPOINT"] == hub.endpoint


def test_use_endpoint_restores_the_client(tmp_path: Path) -> None:
    before = (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, huggingface_hub.hf_api.api.endpoint)
    env_before = os.environ.get("HF_ENDPOINT")
    with FakeHub(tmp_path / "hub") as server, use_endpoint(server.endpoint, tmp_path / "cache"):
        server.add_repo("org/ctx", {"f.txt": b"ctx"})
        assert Path(hf_hub_download("org/ctx", "f.txt")).read_bytes() == b"ctx"
        assert str(tmp_path / "cache") in hf_hub_download("org/ctx", "f.txt")
    after = (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, huggingface_hub.hf_api.api.endpoint)
    assert after == before
    assert os.environ.get("HF_ENDPOINT") == env_before


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


def test_the_shipped_fixture(fake_hub: FakeHub, tmp_path: Path) -> None:
    # `fake_hub` comes from tests/hubserver.py, registered by tests/conftest.py
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "w.safetensors").write_bytes(b"\x00weights")
    (folder / "sub" / "cfg.json").write_bytes(b"{}")
    sha = fake_hub.add_repo("org/fixture", folder)  # a folder is copied as the tree
    assert fake_hub.is_lfs("org/fixture", "w.safetensors") and not fake_hub.is_lfs(
        "org/fixture", "sub/cfg.json"
    )
    snapshot = snapshot_download("org/fixture")
    assert snapshot == str(tmp_path / "hf-cache" / "hub" / "models--org--fixture" / "snapshots" / sha)
    assert _read_tree(snapshot) == {"w.safetensors": b"\x00weights", "sub/cfg.json": b"{}"}
