"""A small Hugging Face Hub look-alike for end-to-end tests: huggingface_hub's real client talks to it.

It serves what adapterops calls (``snapshot_download``, ``create_repo``, ``create_branch``,
``preupload_lfs_files``, ``create_commit``) and no more; most Hub tests use the fakes of
tests/support/fakehub.py instead. Start a :class:`FakeHub` (it binds 127.0.0.1 on a free port, standard
library only), fill it with :meth:`FakeHub.add_repo`, and point the client at it with :func:`fake_hub_env`;
the ``fake_hub`` fixture (registered by tests/conftest.py) does both::

    def test_download(fake_hub):
        sha = fake_hub.add_repo("org/adapter", {"adapter_config.json": b"{}"})
        assert huggingface_hub.snapshot_download("org/adapter").endswith(sha)

Routes (URL shapes, headers and JSON fields of huggingface_hub 2.4.0; model repos named ``namespace/name``):

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1 of a
  regular file, sha256 of an LFS file), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files. Files are served
  directly (no CDN redirect, no ``X-Xet-Hash``), so downloads take the plain HTTP path.
* ``GET /api/models/{repo_id}[/revision/{revision}]`` (repo_info) and ``GET .../tree/{revision}`` (files only,
  recursive: list_repo_tree as snapshot_download calls it).
* Writes (a ``Bearer`` token is required, any is accepted): ``POST /api/repos/create`` (409 with the repo
  ``url`` when it exists, so ``exist_ok=True`` works; a new repo gets an initial commit with the Hub's default
  ``.gitattributes``), ``POST /api/validate-yaml`` (the client checks a committed README's card data),
  ``POST .../branch/{name}`` (409 when it exists), ``POST .../preupload/{revision}``
  (``uploadMode`` "lfs" for files >= ``lfs_threshold`` (10 MiB), binary samples (NUL byte) or names
  matching the default ``.gitattributes`` patterns, else "regular"; ``oid`` of the file already at that
  path, so the client skips unchanged files), ``POST .../commit/{revision}`` (NDJSON: header / file /
  lfsFile), ``POST /{repo_id}.git/info/lfs/objects/batch`` (basic transfer: upload to ``{endpoint}/_fakehub/lfs/{oid}``,
  then POST ``.../verify``; objects the server has get no actions).
* Errors: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``, which
  ``hf_raise_for_status`` turns into the client's error classes. Private repos answer RepoNotFound without a
  token.

Xet: with ``hf_xet`` installed, huggingface_hub 2.4.0 uploads LFS content through the Xet protocol
whatever the server says, so :func:`fake_hub_env` sets ``constants.HF_HUB_DISABLE_XET = True`` (and
``HF_HUB_DISABLE_XET=1``): the client then uses the classic preupload + LFS batch + commit flow.

Where the client captures the endpoint (all patched by :func:`fake_hub_env`): ``constants.ENDPOINT`` and
``HUGGINGFACE_CO_URL_TEMPLATE`` (read by ``hf_hub_url``), ``constants.HF_URL_HOSTS``,
``utils._http._HUB_ORIGINS`` (frozen at import), the module-level ``hf_api.api`` and
``utils._git_credential.ENDPOINT``. The cache: ``constants.HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` /
``HF_ASSETS_CACHE`` and ``utils._cache_manager.HF_HUB_CACHE``. Offline mode is ``constants.HF_HUB_OFFLINE``
(frozen at import; forced off here). ``HF_TOKEN`` & co. are unset and ``constants.HF_TOKEN_PATH`` points
into the temporary folder, so no developer token leaks into a test.
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
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

__all__ = ["DEFAULT_GITATTRIBUTES", "FakeHub", "RecordedRequest", "fake_hub", "fake_hub_env"]

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LFS_BATCH_SUFFIX = ".git/info/lfs/objects/batch"

# The ``.gitattributes`` the real Hub puts in the first commit of a new repo (abridged).
_LFS_PATTERNS = (
    *("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*"),
    *("*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb"),
    *("*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*"),
    *("*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*"),
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


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


@dataclass(frozen=True)
class _Commit:
    parent: str | None
    files: Mapping[str, _Entry]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a full sha, branch or tag."""
        if revision in self.commits:
            return revision
        return self.branches.get(revision) or self.tags.get(revision)


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


class FakeHub:
    """An in-process Hub server. Repo metadata lives in memory, file contents under ``root/blobs``.

    Attributes useful in assertions: ``endpoint``, ``requests`` (every answered request),
    ``last_authorization`` (the last non-empty ``Authorization`` header), ``last_token``, ``lfs_uploads``
    (sha256 of every object received through the LFS upload URL), ``errors`` (tracebacks of 500 answers).
    """

    def __init__(self, root: Path, *, lfs_threshold: int = 10 * 1024 * 1024):
        self.root = Path(root)
        self.lfs_threshold = lfs_threshold
        self.endpoint = ""
        self.requests: list[RecordedRequest] = []
        self.last_authorization: str | None = None
        self.lfs_uploads: list[str] = []
        self.errors: list[str] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
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
        *,
        private: bool = False,
    ) -> str:
        """Commit ``files`` (a ``{path: bytes}`` mapping, or a folder to copy) as the whole tree of branch
        ``revision`` (created from ``main``'s head if new; the repo too). Returns the commit sha.
        """
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
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, private))
            entries = {path: self._store(path, data) for path, data in contents.items()}
            parent = repo.branches.get(revision, repo.branches.get("main"))
            repo.branches[revision] = self._commit(repo, parent, entries)
            return repo.branches[revision]

    def create_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Tag ``revision``; returns the tagged commit sha."""
        with self._lock:
            repo = self._repos[repo_id]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            repo.tags[tag] = oid
            return oid

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def resolve(self, repo_id: str, revision: str = "main") -> str | None:
        """The commit sha ``revision`` points at, or None (repo or revision unknown)."""
        with self._lock:
            repo = self._repos.get(repo_id)
            return repo.resolve(revision) if repo is not None else None

    def _files_at(self, repo_id: str, revision: str) -> dict[str, _Entry]:
        with self._lock:
            oid = self.resolve(repo_id, revision)
            if oid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            return dict(self._repos[repo_id].commits[oid].files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The full content of a revision, read from the server's store (e.g. to check what a push sent)."""
        return {
            path: self._blob_path(e.sha256).read_bytes()
            for path, e in self._files_at(repo_id, revision).items()
        }

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        """Whether ``path`` is stored as an LFS file at ``revision``."""
        return self._files_at(repo_id, revision)[path].lfs

    def commits(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit shas from ``revision`` back to the first commit."""
        with self._lock:
            repo, out = self._repos[repo_id], []
            oid = repo.resolve(revision)
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out

    # ----------------------------------------------------------------- storage
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

    def _commit(self, repo: _Repo, parent: str | None, files: Mapping[str, _Entry]) -> str:
        seed = json.dumps([parent, sorted((p, e.git_oid) for p, e in files.items()), uuid.uuid4().hex])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = _Commit(parent, dict(files))
        return oid


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

    do_HEAD = do_POST = do_PUT = do_GET

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
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length > 0 else b""
            self._route()
        except _HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message, **err.extra}, err.status, headers)
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            if not self._status:
                self._json({"error": "fake hub internal error"}, 500)
            self.close_connection = True

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        return auth.lower().startswith("bearer ") and bool(auth[7:].strip())

    def _need_token(self) -> None:
        if not self._token_ok():
            raise _HubError(401, "Invalid username or password.")

    def _repo(self, repo_id: str) -> _Repo:
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and not self._token_ok()):
            raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _json_body(self) -> Any:
        return json.loads(self._body or b"{}")

    # ----------------------------------------------------------------- routing
    def _route(self) -> None:
        segs = [unquote(s) for s in urlsplit(self.path).path.split("/")[1:]]
        method = self.command
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            return self._route_repo("/".join(segs[2:4]), segs[4:], method)
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if segs == ["api", "validate-yaml"] and method == "POST":  # the client checks a README's card data
            return self._json({"errors": [], "warnings": []})
        if segs[:2] == ["_fakehub", "lfs"] and len(segs) >= 3:
            return self._lfs_object(segs[2], segs[3:], method)
        raw = "/".join(segs)
        if raw.endswith(_LFS_BATCH_SUFFIX) and method == "POST":
            return self._lfs_batch(raw[: -len(_LFS_BATCH_SUFFIX)])
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file("/".join(segs[:2]), segs[3], "/".join(segs[4:]))
        raise _HubError(404, f"Not found: {urlsplit(self.path).path}")

    def _route_repo(self, repo_id: str, rest: list[str], method: str) -> None:
        op = rest[0] if rest else ""
        with self.hub._lock:
            repo = self._repo(repo_id)
            if method == "GET" and (not rest or (op == "revision" and len(rest) >= 2)):
                return self._info(repo, self._resolve(repo, "/".join(rest[1:]) if rest else "main"))
            if method == "GET" and op == "tree" and len(rest) == 2:
                return self._tree(repo, rest[1])
            if method == "POST" and op in ("preupload", "commit", "branch") and len(rest) == 2:
                self._need_token()
                return {"preupload": self._preupload, "commit": self._commit, "branch": self._branch}[op](
                    repo, rest[1]
                )
        raise _HubError(404, f"Not found: {urlsplit(self.path).path} ({method})")

    # ----------------------------------------------------------------- downloads
    def _info(self, repo: _Repo, oid: str) -> None:
        siblings = [{"rfilename": path} for path in sorted(repo.commits[oid].files)]
        owner = repo.repo_id.split("/")[0]
        payload = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": owner,
            "sha": oid,
            "private": repo.private,
        }
        self._json({**payload, "siblings": siblings, "tags": []})

    def _tree(self, repo: _Repo, revision: str) -> None:
        files = repo.commits[self._resolve(repo, revision)].files
        items = []
        for path in sorted(files):
            entry = files[path]
            item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {
                    "oid": entry.sha256,
                    "size": entry.size,
                    "pointerSize": len(_lfs_pointer(entry.sha256, entry.size)),
                }
            items.append(item)
        self._json(items)

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_id)
            oid = self._resolve(repo, revision)
            entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        self.send_response(200)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.etag}"', "Content-Length": str(entry.size)}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        for name, value in {"Content-Type": "application/octet-stream", **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(self.hub._blob_path(entry.sha256).read_bytes())

    # ----------------------------------------------------------------- writes
    def _create_repo(self) -> None:
        self._need_token()
        body = self._json_body()
        repo_id = f"{body.get('organization') or 'fake-user'}/{body['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub._repos:
                err = _HubError(409, "You already created this model repo")
                err.extra["url"] = url
                raise err
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = _Repo(repo_id, private)
            entry = self.hub._store(".gitattributes", DEFAULT_GITATTRIBUTES, lfs=False)
            repo.branches["main"] = self.hub._commit(repo, None, {".gitattributes": entry})
            self.hub._repos[repo_id] = repo
        self._json({"url": url, "name": repo_id})

    def _branch(self, repo: _Repo, branch: str) -> None:
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        repo.branches[branch] = self._resolve(repo, self._json_body().get("startingPoint") or "main")
        self._json({})

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
                info["oid"] = files[path].etag
            out.append(info)
        self._json({"files": out, "commitOid": oid})

    def _commit(self, repo: _Repo, revision: str) -> None:
        lines = [json.loads(line) for line in self._body.decode().splitlines() if line.strip()]
        head = repo.branches.get(revision)
        if head is None:  # commits go to branches (no pull requests here)
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[head].files)
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                content = value.get("content") or ""
                data = (
                    base64.b64decode(content)
                    if value.get("encoding", "base64") == "base64"
                    else content.encode()
                )
                files[value["path"]] = self.hub._store(value["path"], data, lfs=False)
            elif key == "lfsFile":
                sha, size = value.get("oid", ""), self.hub._blob_size(value.get("oid", ""))
                if size is None or value.get("size", size) != size:
                    raise _HubError(
                        422, f"LFS object {sha} for {value['path']} was not uploaded (or wrong size)"
                    )
                files[value["path"]] = _Entry(
                    value["path"], size, sha, _git_oid(_lfs_pointer(sha, size)), True
                )
            elif key != "header":
                raise _HubError(400, f"Unknown commit operation: {key}")
        oid = repo.branches[revision] = self.hub._commit(repo, head, files)
        url = f"{self.hub.endpoint}/{repo.repo_id}/commit/{oid}"
        self._json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})

    def _lfs_batch(self, repo_id: str) -> None:
        self._need_token()
        body = self._json_body()
        with self.hub._lock:
            self._repo(repo_id)
        if body.get("operation") != "upload":
            raise _HubError(400, "Only uploads go through this server's LFS batch API")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            item: dict[str, Any] = {"oid": oid, "size": size}
            if self.hub._blob_size(oid) != size:  # upload, unless already stored
                href = f"{self.hub.endpoint}/_fakehub/lfs/{oid}"
                item.update(
                    authenticated=True,
                    actions={"upload": {"href": href}, "verify": {"href": f"{href}/verify"}},
                )
            objects.append(item)
        payload = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        self._send(200, payload, content_type="application/vnd.git-lfs+json")

    def _lfs_object(self, oid: str, rest: list[str], method: str) -> None:
        if method == "PUT" and not rest:
            actual = hashlib.sha256(self._body).hexdigest()
            if actual != oid:
                raise _HubError(400, f"sha256 mismatch: the URL says {oid}, the body hashes to {actual}")
            self.hub._put_blob(self._body)
            with self.hub._lock:
                self.hub.lfs_uploads.append(oid)
            return self._send(200, b"", content_type="text/plain")
        if method == "POST" and rest == ["verify"]:
            if self._json_body().get("size") != self.hub._blob_size(oid):
                raise _HubError(404, f"LFS object {oid} not found (or wrong size)")
            return self._json({"success": True})
        raise _HubError(405, f"{method} not allowed here")


# --------------------------------------------------------------------------- pointing the client at it
def fake_hub_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, cache_dir: Path) -> None:
    """Aim huggingface_hub at ``hub`` for the rest of the test (undone by monkeypatch).

    Also: an empty Hub cache under ``cache_dir / "hub"``, classic LFS uploads (Xet disabled), no token from
    the environment or the developer's token file, offline mode off. The environment variables are set too,
    for subprocesses.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._cache_assets as cache_assets
    import huggingface_hub.utils._cache_manager as cache_manager
    import huggingface_hub.utils._http as hf_http

    endpoint, cache_dir = hub.endpoint, Path(cache_dir)
    hub_cache, assets_cache = str(cache_dir / "hub"), str(cache_dir / "assets")
    token_path = str(cache_dir / "token")
    attrs: list[tuple[object, str, object]] = [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"}),
        (constants, "HF_HUB_CACHE", hub_cache),
        (constants, "HUGGINGFACE_HUB_CACHE", hub_cache),
        (constants, "HF_ASSETS_CACHE", assets_cache),
        (constants, "HUGGINGFACE_ASSETS_CACHE", assets_cache),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_TOKEN_PATH", token_path),
        (constants, "HF_STORED_TOKENS_PATH", str(cache_dir / "stored_tokens")),
        (hf_api.api, "endpoint", endpoint),
        (cache_manager, "HF_HUB_CACHE", hub_cache),
        (cache_assets, "HF_ASSETS_CACHE", assets_cache),
    ]
    if hasattr(hf_http, "_HUB_ORIGINS"):  # 2.2+: origins the auth header may follow a redirect to
        attrs.append((hf_http, "_HUB_ORIGINS", hf_http._HUB_ORIGINS | {hf_http._url_origin(endpoint)}))
    with suppress(ImportError):  # module layout of other versions
        import huggingface_hub.utils._git_credential as git_credential

        attrs.append((git_credential, "ENDPOINT", endpoint))
    env: dict[str, str] = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    unset = (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
    )
    for name in (*unset, "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    for obj, attr, value in attrs:
        monkeypatch.setattr(obj, attr, value)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started :class:`FakeHub` with huggingface_hub aimed at it and a fresh cache under ``tmp_path``."""
    with FakeHub(tmp_path / "fake-hub") as hub:
        fake_hub_env(monkeypatch, hub, tmp_path / "hf-cache")
        yield hub
