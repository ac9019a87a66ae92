"""A small Hugging Face Hub look-alike for tests: huggingface_hub's real client code talks to it over HTTP.

Start a :class:`FakeHub` (it binds 127.0.0.1 on a free port, standard library only), fill it with
:meth:`FakeHub.add_repo`, and point the client at it with :func:`fake_hub_env` (pytest ``monkeypatch``) or
:func:`use_endpoint` (plain context manager)::

    @pytest.fixture
    def hub(tmp_path, monkeypatch):
        with FakeHub(tmp_path / "hub") as hub:
            fake_hub_env(monkeypatch, hub, tmp_path / "hf-cache")
            yield hub

    def test_download(hub):
        sha = hub.add_repo("org/adapter", {"adapter_config.json": b"{}"})
        folder = huggingface_hub.snapshot_download("org/adapter")
        assert folder.endswith(sha)

The same fixture ships here as ``fake_hub`` (client cache under ``tmp_path / "hf-cache"``); tests/conftest.py
registers it for every test with ``from tests.support.hubserver import fake_hub  # noqa: F401``.

What the server implements (the URL shapes, headers and JSON fields of huggingface_hub 2.4.0; a
``datasets/`` or ``spaces/`` prefix, or ``/api/datasets/``, ``/api/spaces/``, selects the repo type):

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1 of a
  regular file, sha256 of an LFS file), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``,
  ``Content-Disposition``, ``Range`` requests (206). Files are served directly (no redirect to a CDN) and
  never with ``X-Xet-Hash``, so downloads take the plain HTTP path.
* ``GET /api/models/{repo_id}[/revision/{revision}]`` (model_info / repo_info; ``?blobs=1`` adds size, blobId,
  lfs to ``siblings``), ``GET .../tree/{revision}[/{path}]`` (list_repo_tree, used by snapshot_download),
  ``POST .../paths-info/{revision}``, ``GET .../refs``, ``GET .../commits/{revision}``.
* Writes (an ``Authorization`` header is required; any ``Bearer`` token is accepted unless
  ``FakeHub(tokens=...)`` restricts them): ``POST /api/repos/create`` (409 with the repo ``url`` when it
  exists, so ``exist_ok=True`` works; a new repo gets an initial commit with the Hub's default
  ``.gitattributes``, like the real Hub), ``DELETE /api/repos/delete``, ``POST .../preupload/{revision}``
  (``uploadMode`` "lfs" for files >= ``lfs_threshold`` (10 MiB), binary samples (NUL byte) or names matching
  the default ``.gitattributes`` patterns (``*.safetensors``, ``*.bin``, ...), else "regular"; ``oid`` of the
  file already at that path), ``POST .../commit/{revision}`` (NDJSON: header / file / lfsFile / deletedFile /
  deletedFolder; ``parentCommit`` checked (412); ``?create_pr=1`` opens ``refs/pr/N``),
  ``POST /{repo_id}.git/info/lfs/objects/batch`` (basic transfer: the upload href is
  ``{endpoint}/_fakehub/lfs/{oid}`` on this server, PUT there, then POST ``.../verify``), ``POST/DELETE
  .../branch/{name}``, ``POST .../tag/{revision}``, ``DELETE .../tag/{tag}``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``.
* Errors: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (and
  ``X-Repo-Commit`` on EntryNotFound, as the client caches non-existence), which ``hf_raise_for_status`` turns
  into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``. Private repos
  answer RepoNotFound without a token.

Xet: with the ``hf_xet`` package installed (it is, here), huggingface_hub 2.4.0 uploads LFS content through
the Xet protocol (``_commit_api._upload_files`` and ``upload_folder``'s pipelined path check only
``is_xet_available()``; the server has no say, and no LFS fallback happens if the Xet token call fails).
:func:`fake_hub_env` / :func:`use_endpoint` therefore set ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``
(and ``HF_HUB_DISABLE_XET=1`` in the environment, for subprocesses): the client then uses the classic
preupload + LFS batch + commit flow. Downloads need nothing: without ``X-Xet-Hash`` they use plain HTTP.

Where the client captures the endpoint (all patched by :func:`fake_hub_env` / :func:`use_endpoint`):
``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (read by ``hf_hub_url``),
``constants.HF_URL_HOSTS``, ``utils._http._HUB_ORIGINS`` (frozen at import), the module-level
``hf_api.api = HfApi()`` behind ``huggingface_hub.create_repo``/``upload_folder``/... (its ``endpoint`` was
fixed at import), and ``utils._git_credential.ENDPOINT``. The cache: ``constants.HF_HUB_CACHE`` /
``HUGGINGFACE_HUB_CACHE`` / ``HF_ASSETS_CACHE`` and ``utils._cache_manager.HF_HUB_CACHE``. Offline mode is
``constants.HF_HUB_OFFLINE`` (also frozen at import: setting the env var later has no effect in-process; use
:func:`set_offline`). Tokens: ``HF_TOKEN``/``HUGGING_FACE_HUB_TOKEN``/``HF_OIDC_RESOURCE`` are unset and
``constants.HF_TOKEN_PATH`` points into the temporary folder, so no developer token leaks into a test.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import socket
import socketserver
import threading
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "DEFAULT_GITATTRIBUTES",
    "FakeHub",
    "RecordedRequest",
    "fake_hub",
    "fake_hub_env",
    "set_offline",
    "use_endpoint",
]

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PREFIX_TO_TYPE = {"datasets": "dataset", "spaces": "space"}
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SUBROUTES = {
    "revision",
    "tree",
    "paths-info",
    "refs",
    "commits",
    "commit",
    "preupload",
    "branch",
    "tag",
    "resolve",
    "settings",
    "discussions",
    "lfs-files",
    "super-squash",
    "xet-read-token",
    "xet-write-token",
    "auth-check",
}
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_LFS_BATCH_SUFFIX = ".git/info/lfs/objects/batch"

# The ``.gitattributes`` the real Hub puts in the first commit of a new repo (abridged).
_LFS_PATTERNS = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "saved_model/**/*",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()


def _now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")


@dataclass(frozen=True)
class _Entry:
    """One file of a commit. ``git_oid`` is the git blob id (of the LFS pointer for LFS files)."""

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: Mapping[str, _Entry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit]
    branches: dict[str, str]
    tags: dict[str, str]
    pulls: dict[int, str]

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, ``refs/heads|tags/...``, ``refs/pr/N``, full or (>= 7 chars) short sha."""
        if revision in self.commits:
            return revision
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return self.branches[revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in self.tags:
            return self.tags[revision[10:]]
        match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if match and int(match[1]) in self.pulls:
            return self.pulls[int(match[1])]
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            found = [oid for oid in self.commits if oid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered (``authorization`` is the raw header, e.g. ``"Bearer hf_x"``)."""

    method: str
    path: str
    status: int
    authorization: str | None


class _HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra: dict[str, Any] = {}


def _repo_not_found(repo_id: str) -> _HubError:
    return _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(revision: str) -> _HubError:
    return _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class FakeHub:
    """An in-process Hub server. Repo metadata lives in memory, file contents under ``root/blobs``.

    Attributes useful in assertions: ``endpoint``, ``requests`` (every answered request),
    ``last_authorization`` (the last non-empty ``Authorization`` header), ``last_token``, ``lfs_uploads``
    (sha256 of every object received through the LFS upload URL), ``errors`` (tracebacks of 500 answers).
    """

    username = "fake-user"

    def __init__(self, root: Path, *, tokens: set[str] | None = None, lfs_threshold: int = 10 * 1024 * 1024):
        self.root = Path(root)
        self.tokens = set(tokens) if tokens is not None else None
        self.lfs_threshold = lfs_threshold
        self.endpoint = ""
        self.requests: list[RecordedRequest] = []
        self.last_authorization: str | None = None
        self.lfs_uploads: list[str] = []
        self.errors: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def last_token(self) -> str | None:
        """The token of the last ``Authorization: Bearer <token>`` header seen, or None."""
        auth = self.last_authorization
        if auth is None:
            return None
        return auth[7:] if auth.lower().startswith("bearer ") else auth

    # ----------------------------------------------------------------- test helpers
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path,
        revision: str = "main",
        repo_type: str = "model",
        *,
        message: str | None = None,
        private: bool = False,
    ) -> str:
        """Commit ``files`` (a ``{path: bytes}`` mapping, or a folder to copy) as the whole tree of branch
        ``revision`` (created from ``main``'s head if new; the repo is created if needed). Returns the commit sha.
        """
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if _SHA1.match(revision) or revision.startswith("refs/"):
            raise ValueError(f"revision must be a branch name, got {revision!r}")
        if isinstance(files, (str, Path)):
            folder = Path(files)
            contents = {
                p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file() and ".git" not in p.relative_to(folder).parts
            }
        else:
            contents = dict(files)
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = _Repo(repo_type, repo_id, private, _now(), {}, {}, {}, {})
                self._repos[(repo_type, repo_id)] = repo
            entries = {path: self._store(path, data) for path, data in contents.items()}
            parent = repo.branches.get(revision, repo.branches.get("main"))
            oid = self._commit(repo, parent, entries, message or f"Add {len(entries)} files to {revision}")
            repo.branches[revision] = oid
            return oid

    def create_branch(
        self, repo_id: str, branch: str, revision: str = "main", repo_type: str = "model"
    ) -> str:
        """Point a new (or existing) branch at ``revision``; returns its commit sha."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            repo.branches[branch] = oid
            return oid

    def create_tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        """Tag ``revision``; returns the tagged commit sha."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            repo.tags[tag] = oid
            return oid

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def resolve(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """The commit sha ``revision`` points at, or None (repo or revision unknown)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            return repo.resolve(revision) if repo is not None else None

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The full content of a revision, read from the server's store (e.g. to check what a push sent)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            entries = dict(repo.commits[oid].files)
        return {path: self._blob_path(e.sha256).read_bytes() for path, e in entries.items()}

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        """Whether ``path`` is stored as an LFS file at ``revision``."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            return repo.commits[oid].files[path].lfs

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas from ``revision`` back to the first commit."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = repo.resolve(revision)
            out = []
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ----------------------------------------------------------------- storage
    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self._blob_path(sha)
        if not target.exists():
            tmp = target.with_name(f"{sha}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return sha

    def _blob_size(self, sha256: str) -> int | None:
        path = self._blob_path(sha256)
        return path.stat().st_size if _SHA256.match(sha256) and path.is_file() else None

    def wants_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """The preupload decision: big, binary, or named like an LFS pattern of the default .gitattributes."""
        if size >= self.lfs_threshold or b"\0" in sample[:512]:
            return True
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in _LFS_PATTERNS)

    def _store(self, path: str, data: bytes, lfs: bool | None = None) -> _Entry:
        sha = self._put_blob(data)
        if lfs is None:
            lfs = self.wants_lfs(path, len(data), data[:512])
        git_oid = _git_oid(_lfs_pointer(sha, len(data))) if lfs else _git_oid(data)
        return _Entry(path=path, size=len(data), sha256=sha, git_oid=git_oid, lfs=lfs)

    def _lfs_entry(self, path: str, sha256: str) -> _Entry | None:
        size = self._blob_size(sha256)
        if size is None:
            return None
        return _Entry(path, size, sha256, _git_oid(_lfs_pointer(sha256, size)), True)

    def _commit(
        self, repo: _Repo, parent: str | None, files: Mapping[str, _Entry], title: str, description: str = ""
    ) -> str:
        seed = json.dumps([parent, sorted((p, e.git_oid) for p, e in files.items()), title, uuid.uuid4().hex])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        message = f"{title}\n\n{description}" if description else title
        repo.commits[oid] = _Commit(oid, parent, title, message, _now(), dict(files))
        return oid

    # ----------------------------------------------------------------- JSON shapes
    def _repo_url(self, repo: _Repo) -> str:
        return self.repo_url(repo.repo_id, repo.repo_type)

    def _info_json(self, repo: _Repo, oid: str, blobs: bool) -> dict[str, Any]:
        commit = repo.commits[oid]
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": hashlib.md5(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo.repo_type == "model":
            info.update(modelId=repo.repo_id, spaces=[])
        return info

    def _last_commit(self, repo: _Repo, oid: str, path: str) -> dict[str, str]:
        """The newest commit (from ``oid`` back) that changed ``path`` (or anything under it)."""

        def state(commit: _Commit) -> list[tuple[str, str]]:
            return sorted(
                (p, e.git_oid)
                for p, e in commit.files.items()
                if p == path or p.startswith(path.rstrip("/") + "/")
            )

        commit = repo.commits[oid]
        while commit.parent is not None and state(repo.commits[commit.parent]) == state(commit):
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def _file_json(self, repo: _Repo, oid: str, entry: _Entry, expand: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            item["lastCommit"] = self._last_commit(repo, oid, entry.path)
        return item

    def _dir_json(self, repo: _Repo, oid: str, path: str, expand: bool) -> dict[str, Any]:
        files = repo.commits[oid].files
        inner = sorted((p, e.git_oid) for p, e in files.items() if p.startswith(path + "/"))
        item: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(inner).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            item["lastCommit"] = self._last_commit(repo, oid, path)
        return item


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang without a network.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake the handler threads blocked on idle keep-alive connections, so they end."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle keep-alive connections end after this (stop() ends them at once)
    server: _Server
    _status = 0
    _auth: str | None = None
    _body = b""

    # ----------------------------------------------------------------- plumbing
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def send_response(self, code: int, message: str | None = None) -> None:
        if not self._status:  # record before the client can see the answer, so tests never race the log
            with self.hub._lock:
                self.hub.requests.append(RecordedRequest(self.command, self.path, code, self._auth))
        self._status = code
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", f"fakehub-{uuid.uuid4().hex[:12]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self) -> None:
        self._status = 0
        self._auth = self.headers.get("Authorization") or None
        if self._auth:
            self.hub.last_authorization = self._auth
        try:
            self._body = self._read_body() if self.command in ("POST", "PUT", "DELETE") else b""
            self._route()
        except _HubError as err:
            headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message, **err.extra}, err.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            if not self._status:
                self._json(
                    {"error": "fake hub internal error"}, 500, {"X-Error-Message": "fake hub internal error"}
                )
            self.close_connection = True

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            return False
        return self.hub.tokens is None or auth[7:].strip() in self.hub.tokens

    def _check_token(self, required: bool) -> None:
        """Any present token must be valid (401 otherwise); writes need one."""
        if self.headers.get("Authorization") and not self._token_ok():
            raise _HubError(401, "Invalid credentials in Authorization header")
        if required and not self._token_ok():
            raise _HubError(401, "Invalid username or password.")

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._token_ok()):
            raise _repo_not_found(repo_id)
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _revision_not_found(revision)
        return oid

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def _flag(self, name: str) -> bool:
        return (self._query().get(name) or ["false"])[-1].lower() in ("1", "true", "yes")

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"{}")
        except ValueError:
            raise _HubError(400, "Invalid JSON body") from None

    # ----------------------------------------------------------------- routing
    def _route(self) -> None:
        segs = urlsplit(self.path).path.split("/")[1:]
        method = self.command
        self._check_token(required=False)
        if segs[:1] == ["api"]:
            return self._route_api(segs[1:], method)
        if segs[:2] == ["_fakehub", "lfs"] and len(segs) >= 3:
            return self._route_lfs_object(unquote(segs[2]), segs[3:], method)
        repo_type = "model"
        if segs and segs[0] in _PREFIX_TO_TYPE:
            repo_type, segs = _PREFIX_TO_TYPE[segs[0]], segs[1:]
        raw = "/".join(segs)
        if raw.endswith(_LFS_BATCH_SUFFIX) and method == "POST":
            return self._lfs_batch(repo_type, unquote(raw[: -len(_LFS_BATCH_SUFFIX)]))
        for i in (2, 1):
            if len(segs) >= i + 3 and segs[i] == "resolve" and method in ("GET", "HEAD"):
                repo_id = unquote("/".join(segs[:i]))
                return self._resolve_file(
                    repo_type, repo_id, unquote(segs[i + 1]), unquote("/".join(segs[i + 2 :]))
                )
        raise _HubError(404, f"Not found: {urlsplit(self.path).path}")

    def _route_api(self, segs: list[str], method: str) -> None:
        if segs == ["whoami-v2"] and method == "GET":
            self._check_token(required=True)
            name = self.hub.username
            return self._json(
                {"type": "user", "id": name, "name": name, "fullname": name, "orgs": [], "auth": {}}
            )
        if segs == ["validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if not segs or segs[0] not in _API_TYPES:
            raise _HubError(404, f"Not found: /api/{'/'.join(segs)}")
        repo_type, rest = _API_TYPES[segs[0]], segs[1:]
        with self.hub._lock:
            split = next(
                (k for k in (2, 1) if self.hub.repo_exists(unquote("/".join(rest[:k])), repo_type)), None
            )
        if split is None:
            split = 2 if len(rest) == 2 or (len(rest) > 2 and rest[2] in _SUBROUTES) else 1
        repo_id, rest = unquote("/".join(rest[:split])), [unquote(s) for s in rest[split:]]
        op = rest[0] if rest else ""
        with self.hub._lock:
            if method == "GET" and (not rest or (op == "revision" and len(rest) >= 2)):
                repo = self._repo(repo_type, repo_id)
                oid = self._resolve(repo, "/".join(rest[1:]) if rest else "main")
                return self._json(self.hub._info_json(repo, oid, blobs=self._flag("blobs")))
            if method == "GET" and op == "tree" and len(rest) >= 2:
                return self._tree(self._repo(repo_type, repo_id), rest[1], "/".join(rest[2:]).strip("/"))
            if method == "POST" and op == "paths-info" and len(rest) == 2:
                return self._paths_info(self._repo(repo_type, repo_id), rest[1])
            if method == "GET" and op == "refs" and len(rest) == 1:
                return self._refs(self._repo(repo_type, repo_id))
            if method == "GET" and op == "commits" and len(rest) == 2:
                return self._commits(self._repo(repo_type, repo_id), rest[1])
            if method == "POST" and op == "preupload" and len(rest) == 2:
                self._check_token(required=True)
                return self._preupload(self._repo(repo_type, repo_id), rest[1])
            if method == "POST" and op == "commit" and len(rest) == 2:
                self._check_token(required=True)
                return self._commit(self._repo(repo_type, repo_id), rest[1])
            if op == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
                self._check_token(required=True)
                return self._branch(self._repo(repo_type, repo_id), rest[1], method)
            if op == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
                self._check_token(required=True)
                return self._tag(self._repo(repo_type, repo_id), rest[1], method)
        raise _HubError(404, f"Not found: {urlsplit(self.path).path} ({method})")

    # ----------------------------------------------------------------- downloads
    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            oid = self._resolve(repo, revision)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        name = path.rsplit("/", 1)[-1]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{_header_safe(name)}\";",
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        self._send_blob(entry.sha256, entry.size, headers)

    def _send_blob(self, sha256: str, size: int, headers: dict[str, str]) -> None:
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and self.command == "GET" and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), int(match[2]) if match[2] else size - 1
            else:
                start = max(size - int(match[2]), 0)
            end = min(end, size - 1)
            if start > end or start >= size:
                raise _HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with self.hub._blob_path(sha256).open("rb") as fh:
            fh.seek(start)
            remaining = length
            while remaining:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _tree(self, repo: _Repo, revision: str, base: str) -> None:
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        recursive, expand = self._flag("recursive"), self._flag("expand")
        prefix = base + "/" if base else ""
        under = [p for p in files if p.startswith(prefix)]
        if base and not under:
            raise _HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": oid})
        dirs: set[str] = set()
        items = []
        for path in under:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                items.append(self.hub._file_json(repo, oid, files[path], expand))
        items += [self.hub._dir_json(repo, oid, d, expand) for d in dirs]
        self._json(sorted(items, key=lambda item: (item["type"] != "directory", item["path"])))

    def _paths_info(self, repo: _Repo, revision: str) -> None:
        oid = self._resolve(repo, revision)
        if "json" in self.headers.get("Content-Type", ""):
            body = self._json_body()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(self._body.decode())
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        files = repo.commits[oid].files
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(self.hub._file_json(repo, oid, files[path], expand))
            elif any(p.startswith(path + "/") for p in files):
                out.append(self.hub._dir_json(repo, oid, path, expand))
        self._json(out)

    def _refs(self, repo: _Repo) -> None:
        payload: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()
            ],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in repo.tags.items()],
        }
        if self._flag("include_prs"):
            payload["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                for n, o in repo.pulls.items()
            ]
        self._json(payload)

    def _commits(self, repo: _Repo, revision: str) -> None:
        oid: str | None = self._resolve(repo, revision)
        out = []
        while oid is not None:
            commit = repo.commits[oid]
            out.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.hub.username}],
                }
            )
            oid = commit.parent
        self._json(out)

    # ----------------------------------------------------------------- repos
    def _repo_name(self, body: dict[str, Any]) -> tuple[str, str]:
        name, org = body.get("name"), body.get("organization")
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME.match(name) or "--" in name or ".." in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        return repo_type, f"{org or self.hub.username}/{name}"

    def _create_repo(self) -> None:
        self._check_token(required=True)
        body = self._json_body()
        repo_type, repo_id = self._repo_name(body)
        url = self.hub.repo_url(repo_id, repo_type)
        with self.hub._lock:
            if self.hub.repo_exists(repo_id, repo_type):
                err = _HubError(409, f"You already created this {repo_type} repo")
                err.extra["url"] = url
                raise err
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = _Repo(repo_type, repo_id, private, _now(), {}, {}, {}, {})
            entry = self.hub._store(".gitattributes", DEFAULT_GITATTRIBUTES, lfs=False)
            repo.branches["main"] = self.hub._commit(repo, None, {".gitattributes": entry}, "initial commit")
            self.hub._repos[(repo_type, repo_id)] = repo
        self._json({"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        self._check_token(required=True)
        repo_type, repo_id = self._repo_name(self._json_body())
        with self.hub._lock:
            self._repo(repo_type, repo_id)
            del self.hub._repos[(repo_type, repo_id)]
        self._json({})

    def _branch(self, repo: _Repo, branch: str, method: str) -> None:
        if method == "DELETE":
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            if branch == "main":
                raise _HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return self._json({})
        if branch.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", branch):
            raise _HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        start = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, start)
        self._json({})

    def _tag(self, repo: _Repo, name: str, method: str) -> None:
        if method == "DELETE":
            if name not in repo.tags:
                raise _revision_not_found(name)
            del repo.tags[name]
            return self._json({})
        oid = self._resolve(repo, name)  # POST /tag/{revision} {"tag": ...}
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not tag:
            raise _HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise _HubError(409, "Tag already exists")
        repo.tags[tag] = oid
        self._json({})

    # ----------------------------------------------------------------- uploads
    def _preupload(self, repo: _Repo, revision: str) -> None:
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        out = []
        for item in self._json_body().get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            mode = "lfs" if self.hub.wants_lfs(path, int(item.get("size") or 0), sample) else "regular"
            info: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in files:
                info["oid"] = files[path].sha256 if files[path].lfs else files[path].git_oid
            out.append(info)
        self._json({"files": out, "commitOid": oid})

    def _commit(self, repo: _Repo, revision: str) -> None:
        try:
            lines = [json.loads(line) for line in self._body.decode().splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, "Invalid NDJSON commit payload") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not isinstance(header, dict) or not header.get("summary"):
            raise _HubError(400, "Missing commit header with a summary")
        pr_num: int | None = None
        branch = ""
        if self._flag("create_pr"):
            head = self._resolve(repo, revision)
            pr_num = max(repo.pulls, default=0) + 1
        else:
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
            if pr_match and int(pr_match[1]) in repo.pulls:
                pr_num = int(pr_match[1])
                head = repo.pulls[pr_num]
            elif branch in repo.branches:
                head = repo.branches[branch]
            else:
                raise _revision_not_found(revision)
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                encoding = value.get("encoding") or "base64"
                content = value.get("content") or ""
                data = base64.b64decode(content) if encoding == "base64" else str(content).encode()
                files[value["path"]] = self.hub._store(value["path"], data, lfs=False)
            elif key == "lfsFile":
                entry = self.hub._lfs_entry(value["path"], value.get("oid", ""))
                if entry is None or ("size" in value and value["size"] != entry.size):
                    raise _HubError(
                        422,
                        f"LFS object {value.get('oid')} for {value['path']} was not uploaded (or wrong size)",
                    )
                files[value["path"]] = entry
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].strip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for path in doomed:
                    del files[path]
            elif key != "header":
                raise _HubError(400, f"Unknown commit operation: {key}")
        oid = self.hub._commit(repo, head, files, header["summary"], header.get("description") or "")
        payload: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.hub._repo_url(repo)}/commit/{oid}",
            "hookOutput": "",
        }
        if pr_num is not None:
            repo.pulls[pr_num] = oid
            payload["pullRequestUrl"] = f"{self.hub._repo_url(repo)}/discussions/{pr_num}"
        else:
            repo.branches[branch] = oid
        self._json(payload)

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        operation = body.get("operation")
        self._check_token(required=operation == "upload")
        with self.hub._lock:
            self._repo(repo_type, repo_id)
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not isinstance(oid, str) or not _SHA256.match(oid) or not isinstance(size, int):
                item["error"] = {"code": 422, "message": "Invalid oid or size"}
                item["oid"], item["size"] = str(oid), size if isinstance(size, int) else 0
            elif operation == "download":
                if self.hub._blob_size(oid) is None:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
                else:
                    item["actions"] = {"download": {"href": f"{self.hub.endpoint}/_fakehub/lfs/{oid}"}}
            elif self.hub._blob_size(oid) != size:  # upload, unless already stored
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/_fakehub/lfs/{oid}"},
                    "verify": {"href": f"{self.hub.endpoint}/_fakehub/lfs/{oid}/verify"},
                }
            objects.append(item)
        body_out = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        self._send(200, body_out, content_type="application/vnd.git-lfs+json")

    def _route_lfs_object(self, oid: str, rest: list[str], method: str) -> None:
        if not _SHA256.match(oid):
            raise _HubError(400, f"Invalid LFS oid: {oid}")
        if method == "PUT" and not rest:
            actual = hashlib.sha256(self._body).hexdigest()
            if actual != oid:
                raise _HubError(400, f"sha256 mismatch: the URL says {oid}, the body hashes to {actual}")
            self.hub._put_blob(self._body)
            with self.hub._lock:
                self.hub.lfs_uploads.append(oid)
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(self._body).hexdigest()}"'}, "text/plain")
        if method == "POST" and rest == ["verify"]:
            body = self._json_body()
            if self.hub._blob_size(oid) is None or body.get("size") != self.hub._blob_size(oid):
                raise _HubError(404, f"LFS object {oid} not found (or wrong size)")
            return self._json({"success": True})
        if method in ("GET", "HEAD") and not rest:
            size = self.hub._blob_size(oid)
            if size is None:
                raise _HubError(404, f"LFS object {oid} not found")
            return self._send_blob(oid, size, {"ETag": f'"{oid}"'})
        raise _HubError(405, f"{method} not allowed here")


# --------------------------------------------------------------------------- pointing the client at it
def _client_patches(
    endpoint: str, cache_dir: Path, *, offline: bool
) -> tuple[list[tuple[object, str, object]], dict[str, str | None]]:
    """(object, attribute, value) patches and environment changes that aim huggingface_hub at ``endpoint``."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._cache_assets as cache_assets
    import huggingface_hub.utils._cache_manager as cache_manager
    import huggingface_hub.utils._http as hf_http

    endpoint = endpoint.rstrip("/")
    cache_dir = Path(cache_dir)
    hub_cache, assets_cache = str(cache_dir / "hub"), str(cache_dir / "assets")
    token_path = str(cache_dir / "token")
    host = urlsplit(endpoint).hostname or ""
    attrs: list[tuple[object, str, object]] = [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host.lower()}),
        (constants, "HF_HUB_CACHE", hub_cache),
        (constants, "HUGGINGFACE_HUB_CACHE", hub_cache),
        (constants, "HF_ASSETS_CACHE", assets_cache),
        (constants, "HUGGINGFACE_ASSETS_CACHE", assets_cache),
        (constants, "HF_HUB_OFFLINE", offline),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_TOKEN_PATH", token_path),
        (constants, "HF_STORED_TOKENS_PATH", str(cache_dir / "stored_tokens")),
        (hf_http, "_HUB_ORIGINS", hf_http._HUB_ORIGINS | {hf_http._url_origin(endpoint)}),
        (hf_api.api, "endpoint", endpoint),
        (cache_manager, "HF_HUB_CACHE", hub_cache),
        (cache_assets, "HF_ASSETS_CACHE", assets_cache),
    ]
    try:
        import huggingface_hub.utils._git_credential as git_credential

        attrs.append((git_credential, "ENDPOINT", endpoint))
    except ImportError:  # pragma: no cover - module layout of other versions
        pass
    env: dict[str, str | None] = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1" if offline else None,
        "TRANSFORMERS_OFFLINE": None,
        "HF_TOKEN": None,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_OIDC_RESOURCE": None,
        "HUGGINGFACE_CO_STAGING": None,
    }
    return attrs, env


def fake_hub_env(
    monkeypatch: pytest.MonkeyPatch,
    hub: FakeHub | str,
    cache_dir: Path | str | None = None,
    *,
    offline: bool = False,
) -> Path:
    """Aim huggingface_hub (already imported or not) at ``hub`` for the rest of the test; undone by monkeypatch.

    Also: an empty Hub cache under ``cache_dir`` (default ``hub.root / "client-cache"``), classic LFS uploads
    (Xet disabled), no token from the environment or the developer's token file, ``HF_HUB_OFFLINE`` unset
    (or set with ``offline=True``). The environment variables are set too, for subprocesses. Returns
    ``cache_dir``; the Hub cache proper (``HF_HUB_CACHE``) is ``cache_dir / "hub"``.
    """
    if cache_dir is None:
        if not isinstance(hub, FakeHub):
            raise ValueError("cache_dir is required when hub is an endpoint string")
        cache_dir = hub.root / "client-cache"
    endpoint = hub.endpoint if isinstance(hub, FakeHub) else hub
    if not endpoint:
        raise ValueError("the FakeHub is not started")
    cache_dir = Path(cache_dir)
    attrs, env = _client_patches(endpoint, cache_dir, offline=offline)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for obj, attr, value in attrs:
        monkeypatch.setattr(obj, attr, value)
    return cache_dir


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Switch huggingface_hub's offline mode in-process (``constants.HF_HUB_OFFLINE``) and in the environment."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@contextmanager
def use_endpoint(endpoint: str, cache_dir: Path | str, *, offline: bool = False) -> Iterator[Path]:
    """Same as :func:`fake_hub_env` without pytest: patches on entry, restores everything on exit."""
    attrs, env = _client_patches(endpoint, Path(cache_dir), offline=offline)
    saved_attrs = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in attrs]
    saved_env = {name: os.environ.get(name) for name in env}
    try:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for obj, attr, value in attrs:
            setattr(obj, attr, value)
        yield Path(cache_dir)
    finally:
        for obj, attr, value in reversed(saved_attrs):
            setattr(obj, attr, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started :class:`FakeHub` with huggingface_hub aimed at it and a fresh cache under ``tmp_path``."""
    with FakeHub(tmp_path / "fake-hub") as hub:
        fake_hub_env(monkeypatch, hub, tmp_path / "hf-cache")
        yield hub
