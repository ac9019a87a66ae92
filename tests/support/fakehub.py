"""Fakes at adapterops's own Hub boundary: no HTTP, no server, nothing of the client below the calls it makes.

adapterops imports ``snapshot_download`` and ``HfApi`` from the ``huggingface_hub`` module inside the
functions that use them, so patching those attributes on the module object is enough:

* :class:`FakeSnapshots` (fixture ``fake_snapshots``) replaces ``huggingface_hub.snapshot_download``: repos
  are local folders, and a call answers with a cache-like snapshot folder named after a fake commit sha
  (``<cache>/models--org--name/snapshots/<sha>``) holding the files that match ``allow_patterns`` and not
  ``ignore_patterns``. An unknown repo or revision raises the client's ``RepositoryNotFoundError`` /
  ``RevisionNotFoundError``; offline (``constants.HF_HUB_OFFLINE``) a snapshot served before comes back
  again and anything else raises ``LocalEntryNotFoundError``; :meth:`FakeSnapshots.fail_with` raises any
  error.
* :class:`FakeHfApi` (fixture ``fake_hf_api``) replaces ``huggingface_hub.HfApi``. Every instance records
  into the one fake: the ``token=`` it was built with, each create_repo / create_branch / preupload_lfs_files
  / create_commit call and the bytes of the files it carried. It keeps repos, branches and a content store,
  so a call in the wrong order fails like the Hub would, and content the Hub already has is not transferred
  again (``uploads``), as with the real client. :meth:`FakeHfApi.fail` makes a call raise 401, 403, a 500
  whose body echoes the token, the client's connection error or a plain ``OSError``.

HTTP errors are the client's own: :func:`http_error` builds a response object of the HTTP library the
installed huggingface_hub uses (httpx2, httpx or requests) and lets ``hf_raise_for_status`` pick the class.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest

# the real ones, for modules that copied the patched attribute while a fake was installed (transformers does,
# when a test first imports it): once the test is over those copies behave like the real client again
_REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download
_REAL_HF_API = huggingface_hub.HfApi

__all__ = [
    "ApiCall",
    "FakeHfApi",
    "FakeSnapshots",
    "connection_error",
    "fake_hf_api",
    "fake_snapshots",
    "http_error",
    "set_offline",
]

ENDPOINT = "https://huggingface.co"


def _http_lib() -> Any:
    """The HTTP library the installed huggingface_hub raises with (its errors import ``Response`` from it)."""
    from huggingface_hub import errors

    return sys.modules[errors.Response.__module__.split(".")[0]]


def http_error(
    status: int,
    url: str = f"{ENDPOINT}/api/repos/create",
    *,
    method: str = "POST",
    error_code: str | None = None,
    error: str | None = None,
) -> Exception:
    """The exception huggingface_hub raises for this answer (``hf_raise_for_status`` on a real response).

    ``error_code`` is the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``GatedRepo``, ...);
    ``error`` goes in ``X-Error-Message`` and the JSON body's ``error``; the client quotes it in its message.
    """
    from huggingface_hub.utils import HfHubHTTPError, hf_raise_for_status

    lib = _http_lib()
    headers = {"Content-Type": "application/json", "X-Request-Id": "fake-request"}
    if error_code:
        headers["X-Error-Code"] = error_code
    if error:
        headers["X-Error-Message"] = error
    body = json.dumps({"error": error or f"HTTP {status}"}).encode()
    if lib.__name__ == "requests":
        response = lib.Response()
        response.status_code, response._content, response.url = status, body, url
        response.headers.update(headers)
        response.request = lib.Request(method, url).prepare()
    else:  # httpx and its forks
        response = lib.Response(status, headers=headers, content=body, request=lib.Request(method, url))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as exc:
        return exc
    raise AssertionError(f"hf_raise_for_status let HTTP {status} through")


def connection_error() -> Exception:
    """What the client raises when the Hub cannot be reached (httpx2/httpx ``ConnectError``, or requests')."""
    lib = _http_lib()
    error_class = getattr(lib, "ConnectError", None) or lib.ConnectionError
    return error_class("[Errno 111] Connection refused")


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """huggingface_hub's offline switch: ``constants.HF_HUB_OFFLINE`` (frozen at import) and the variable."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _matches(path: str, patterns: Sequence[str] | None) -> bool:
    # huggingface_hub's filter_repo_objects: fnmatch on the repo path, "dir/" meaning everything under it
    return any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns or ())


# --------------------------------------------------------------------------- snapshot_download
@dataclass(frozen=True)
class SnapshotCall:
    repo_id: str
    revision: str | None
    allow_patterns: list[str] | None
    ignore_patterns: list[str] | None


class FakeSnapshots:
    """Stands in for ``huggingface_hub.snapshot_download``; :meth:`install` patches it for one test."""

    def __init__(self, cache: Path) -> None:
        self.cache = Path(cache)
        self.calls: list[SnapshotCall] = []
        self._refs: dict[str, dict[str, str]] = {}  # repo_id -> {branch, tag or sha: sha}
        self._trees: dict[str, Path] = {}  # sha -> folder served at that commit
        self._served: dict[tuple[str, str], Path] = {}  # (repo_id, revision asked) -> snapshot folder
        self._failure: BaseException | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeSnapshots:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self)
        return self

    def add(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Make ``folder`` the tree of branch ``revision`` (a new commit); returns the commit sha."""
        sha = hashlib.sha1(f"{repo_id}\0{revision}\0{len(self._trees)}".encode()).hexdigest()
        self._trees[sha] = Path(folder)
        self._refs.setdefault(repo_id, {}).update({revision: sha, sha: sha})
        return sha

    def tag(self, repo_id: str, tag: str, sha: str) -> None:
        self._refs[repo_id][tag] = sha

    def fail_with(self, error: BaseException | None) -> None:
        """Every later call raises ``error`` (None: answer normally again)."""
        self._failure = error

    def __call__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        allow_patterns: Sequence[str] | None = None,
        ignore_patterns: Sequence[str] | None = None,
        **_: Any,
    ) -> str:
        from huggingface_hub import errors

        if huggingface_hub.snapshot_download is not self:  # a stale copy, after its test
            return _REAL_SNAPSHOT_DOWNLOAD(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                **_,
            )
        self.calls.append(
            SnapshotCall(
                repo_id,
                revision,
                None if allow_patterns is None else list(allow_patterns),
                None if ignore_patterns is None else list(ignore_patterns),
            )
        )
        if self._failure is not None:
            raise self._failure
        asked = revision or "main"
        if hf_constants.HF_HUB_OFFLINE:
            if (repo_id, asked) in self._served:
                return str(self._served[repo_id, asked])
            raise errors.LocalEntryNotFoundError(
                "Cannot find an appropriate cached snapshot folder for the specified revision on the local "
                "disk and outgoing traffic has been disabled."
            )
        url = f"{ENDPOINT}/api/models/{repo_id}/revision/{asked}"
        if repo_id not in self._refs:
            raise http_error(401, url, method="GET", error_code="RepoNotFound", error="Repository not found")
        sha = self._refs[repo_id].get(asked)
        if sha is None:
            raise http_error(
                404, url, method="GET", error_code="RevisionNotFound", error=f"Invalid rev id: {asked}"
            )
        source = self._trees[sha]
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
        for path in sorted(source.rglob("*")):
            name = path.relative_to(source).as_posix()
            if (
                path.is_file()
                and _matches(name, allow_patterns or ["*"])
                and not _matches(name, ignore_patterns)
            ):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        self._served[repo_id, asked] = self._served[repo_id, sha] = snapshot
        return str(snapshot)


# --------------------------------------------------------------------------- HfApi
@dataclass(frozen=True)
class ApiCall:
    """One HfApi call: ``token`` is what ``HfApi(token=...)`` got; ``files``: path_in_repo -> bytes sent."""

    name: str
    repo_id: str
    token: Any
    kwargs: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    sources: tuple[str, ...] = ()  # what each operation read from: a path, a file object's name, or "<bytes>"
    bars_off: bool = False  # the client's progress bars were disabled during the call


def _content(operation: Any) -> tuple[bytes, str]:
    source = operation.path_or_fileobj
    if isinstance(source, bytes):
        return source, "<bytes>"
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes(), str(source)
    position = source.tell()  # a file object: read it and leave it where it was, as the client does
    data = source.read()
    source.seek(position)
    return data, str(getattr(source, "name", "<fileobj>"))


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: :meth:`install` puts a class there whose instances record
    here."""

    def __init__(self) -> None:
        self.calls: list[ApiCall] = []
        self.tokens: list[Any] = []  # the token= of every HfApi(...) built
        self.sent_tokens: list[str | None] = []  # the token each call would have sent (token=, else HF_TOKEN)
        self.uploads: list[str] = []  # path_in_repo of each content actually transferred (not already stored)
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo_id -> branch -> files
        self.private: dict[str, bool] = {}
        self._store: set[str] = set()  # sha256 of every content the "Hub" holds
        self._failures: dict[str, list[Any]] = {}  # call name -> [kind, calls left (None: all)]
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHfApi:
        fake = self

        class HfApi(_FakeClient):  # a class, as code that imports it may use it in annotations
            def __new__(cls, *args: Any, **kwargs: Any) -> Any:
                if huggingface_hub.HfApi is not cls:  # a stale copy, after its test
                    return _REAL_HF_API(*args, **kwargs)
                return super().__new__(cls)

            def __init__(self, endpoint: str | None = None, token: Any = None, **_: Any) -> None:
                with fake._lock:
                    fake.tokens.append(token)
                super().__init__(fake, token)

        monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
        return self

    # ----------------------------------------------------------------- switches and queries
    def fail(self, on: str, kind: str | BaseException, times: int | None = None) -> None:
        """Make call ``on`` raise: "401", "403", "500-echo" (a 500 whose body echoes the token sent),
        "connect" (the client's connection error), "oserror", or the given exception; ``times`` calls, or all.
        """
        self._failures[on] = [kind, times]

    def named(self, name: str) -> list[ApiCall]:
        return [c for c in self.calls if c.name == name]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id][revision])

    # ----------------------------------------------------------------- plumbing
    def _call(
        self, name: str, repo_id: str, token: Any, kwargs: dict[str, Any], operations: Sequence[Any] = ()
    ):
        from huggingface_hub.utils import are_progress_bars_disabled

        sent = token if isinstance(token, str) else None if token is False else os.environ.get("HF_TOKEN")
        contents = [(op.path_in_repo, *_content(op)) for op in operations]
        call = ApiCall(
            name,
            repo_id,
            token,
            kwargs,
            {path: data for path, data, _ in contents},
            tuple(source for _, _, source in contents),
            are_progress_bars_disabled(),
        )
        with self._lock:
            self.calls.append(call)
            self.sent_tokens.append(sent)
            failure = self._failures.get(name)
            if failure is not None and failure[1] is not None:
                failure[1] -= 1
                if failure[1] < 0:
                    failure = None
        if failure is not None:
            raise self._error(failure[0], name, repo_id, sent)
        return call

    def _error(self, kind: str | BaseException, name: str, repo_id: str, token: str | None) -> BaseException:
        if isinstance(kind, BaseException):
            return kind
        route = {"create_branch": "branch", "preupload_lfs_files": "preupload", "create_commit": "commit"}
        url = (
            f"{ENDPOINT}/api/models/{repo_id}/{route[name]}/main"
            if name in route
            else f"{ENDPOINT}/api/repos/create"
        )
        if kind in ("401", "403"):
            return http_error(int(kind), url, error="Invalid username or password.")
        if kind == "500-echo":
            return http_error(500, url, error=f"internal error; request had Authorization: Bearer {token}")
        if kind == "connect":
            return connection_error()
        if kind == "oserror":
            return OSError(101, "Network is unreachable")
        raise ValueError(f"unknown failure kind {kind!r}")

    def _branch(self, repo_id: str, revision: str | None) -> dict[str, bytes]:
        if repo_id not in self.repos:
            raise http_error(404, f"{ENDPOINT}/api/models/{repo_id}", error_code="RepoNotFound")
        branch = self.repos[repo_id].get(revision or "main")
        if branch is None:
            raise http_error(404, f"{ENDPOINT}/api/models/{repo_id}", error_code="RevisionNotFound")
        return branch


class _FakeClient:
    def __init__(self, fake: FakeHfApi, token: Any) -> None:
        self.fake, self.token = fake, token

    def create_repo(
        self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **kwargs: Any
    ):
        fake = self.fake
        fake._call("create_repo", repo_id, self.token, {"private": private, "exist_ok": exist_ok, **kwargs})
        with fake._lock:
            if repo_id in fake.repos and not exist_ok:
                raise http_error(409, error="You already created this model repo")
            if repo_id not in fake.repos:
                fake.repos[repo_id] = {"main": {}}
                fake.private[repo_id] = bool(private)
        return SimpleNamespace(repo_id=repo_id, url=f"{ENDPOINT}/{repo_id}")

    def create_branch(
        self, repo_id: str, *, branch: str, revision: str | None = None, exist_ok: bool = False, **kw
    ):
        fake = self.fake
        fake._call("create_branch", repo_id, self.token, {"branch": branch, "exist_ok": exist_ok, **kw})
        with fake._lock:
            start = fake._branch(repo_id, revision)
            if branch in fake.repos[repo_id] and not exist_ok:
                raise http_error(409, error="Reference already exists")
            fake.repos[repo_id].setdefault(branch, dict(start))

    def preupload_lfs_files(
        self, repo_id: str, additions: Sequence[Any], *, revision: str | None = None, **kw
    ):
        fake = self.fake
        call = fake._call(
            "preupload_lfs_files", repo_id, self.token, {"revision": revision, **kw}, list(additions)
        )
        with fake._lock:
            fake._branch(repo_id, revision)
            for path, data in call.files.items():
                digest = hashlib.sha256(data).hexdigest()
                if digest not in fake._store:
                    fake._store.add(digest)
                    fake.uploads.append(path)

    def create_commit(
        self,
        repo_id: str,
        operations: Sequence[Any],
        *,
        commit_message: str,
        revision: str | None = None,
        **kw,
    ):
        fake = self.fake
        args = {"commit_message": commit_message, "revision": revision, **kw}
        call = fake._call("create_commit", repo_id, self.token, args, list(operations))
        with fake._lock:
            branch = fake._branch(repo_id, revision)
            missing = [p for p, d in call.files.items() if hashlib.sha256(d).hexdigest() not in fake._store]
            args["not_preuploaded"] = missing  # the real client would upload these inside create_commit
            for data in call.files.values():
                fake._store.add(hashlib.sha256(data).hexdigest())
            branch.update(call.files)
            oid = hashlib.sha1(
                repr(sorted(branch.items())).encode() + str(len(fake.calls)).encode()
            ).hexdigest()
        return SimpleNamespace(oid=oid, commit_url=f"{ENDPOINT}/{repo_id}/commit/{oid}")


# --------------------------------------------------------------------------- fixtures
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    set_offline(monkeypatch, False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSnapshots]:
    """``huggingface_hub.snapshot_download`` replaced by a :class:`FakeSnapshots` caching in ``tmp_path``."""
    _isolate(monkeypatch)
    yield FakeSnapshots(tmp_path / "hf-cache" / "hub").install(monkeypatch)


@pytest.fixture
def fake_hf_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHfApi]:
    """``huggingface_hub.HfApi`` replaced by a recording :class:`FakeHfApi`; no token from the environment."""
    _isolate(monkeypatch)
    yield FakeHfApi().install(monkeypatch)
