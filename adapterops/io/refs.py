"""Resolve adapter and checkpoint references: a local directory, or a Hub id ``org/name[@revision]``.

One file of a Hub repo (a kohya or GGUF adapter, where the repo holds several) is named
``org/name:file`` or ``org/name@revision:file``: ':' cannot occur in a repo id or a revision, so
the file name (which may contain '/', for a file in a folder of the repo) starts after it.

Hub downloads go through huggingface_hub, so its cache, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
behave as everywhere else. Only the files an operation needs are fetched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.errors import AdapterFormatError, HubError, NotFoundError
from adapterops.io.sniff import unsupported_file_error

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_HUB_FILE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?:(?P<file>[\w.+=-]+(?:/[\w.+=-]+)*)$"
)
# single-file adapter formats, by file name: what a repo without adapter_config.json may hold
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class Resolved:
    """A reference made local: ``path`` exists; ``repo_id``/``revision`` are set for Hub ids."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit sha the Hub resolved the requested revision to


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``spec`` cannot be a Hub id.

    A namespace is required: adapters live in user or org repos, and a bare word is far more
    often a mistyped local path than a legacy un-namespaced repo.
    """
    match = _HUB_ID.match(spec)
    if match is None or spec.startswith((".", "~")) or ".." in spec:
        return None
    return match["repo"], match["revision"]


def parse_hub_file(spec: str) -> tuple[str, str | None, str] | None:
    """``"org/name@rev:dir/lora.safetensors"`` -> ``("org/name", "rev", "dir/lora.safetensors")``; None
    when ``spec`` names no file of a Hub repo (``..`` and absolute names never do)."""
    match = _HUB_FILE.match(spec)
    if match is None or spec.startswith((".", "~")) or ".." in match["file"].split("/"):
        return None
    return match["repo"], match["revision"], match["file"]


def resolve_hub_file(spec: str, what: str = "adapter") -> Resolved:
    """The one file ``org/name[@rev]:file`` names, downloaded: ``path`` is the local file."""
    parsed = parse_hub_file(spec)
    if parsed is None:
        raise NotFoundError(f"{spec}: not a Hub file reference (org/name[@revision]:file)")
    repo_id, revision, name = parsed
    resolved = _snapshot(repo_id, revision, [name], (), what, spec)
    path = resolved.path / name
    if not path.is_file():
        raise NotFoundError(
            f"{spec}: the Hub repo {repo_id} has no file {name!r} at {resolved.revision}; check the name "
            "(list the repo's files with `hf download --dry-run` or on its page)"
        )
    return Resolved(path=inside(resolved.path, path), repo_id=repo_id, revision=resolved.revision)


def hub_files(repo_id: str, revision: str, spec: str) -> list[str]:
    """The file names of a Hub repo at ``revision`` (a commit), from its repo info."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, revision, "adapter", spec):
        info = HfApi().model_info(repo_id, revision=revision)
    return sorted(s.rfilename for s in info.siblings or [])


def resolve(
    spec: str | Path,
    allow_patterns: Sequence[str],
    what: str = "adapter",
    ignore_patterns: Sequence[str] = (),
) -> Resolved:
    """A local directory as it is, or a Hub snapshot of the files matching ``allow_patterns``."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise unsupported_file_error(local, what)
        return Resolved(path=local)
    hub = parse_hub_id(str(spec))
    if hub is None or _looks_local(local):
        raise NotFoundError(f"{spec}: no such {what} directory")
    repo_id, revision = hub
    return _snapshot(repo_id, revision, allow_patterns, ignore_patterns, what, str(spec))


def inside(root: Path, path: Path) -> Path:
    """``path`` itself, after checking that it does not lead out of ``root`` through symbolic links.

    A Hugging Face cache snapshot (``.../snapshots/<commit>``) links each file into the repo's
    ``blobs`` folder beside it: those links are the cache's own layout and stay allowed.
    """
    try:
        real, base = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        raise AdapterFormatError(f"{path}: cannot be resolved ({exc}); remove the broken link") from None
    allowed = [base]
    if base.parent.name == "snapshots" and (base.parent.parent / "blobs").is_dir():
        allowed.append((base.parent.parent / "blobs").resolve())
    if not any(real.is_relative_to(a) for a in allowed):
        raise AdapterFormatError(
            f"{path}: links to {real}, outside the input directory {root}; adapterops reads nothing "
            "outside its inputs: copy the file in (cp -L) or remove the link"
        )
    return path


def _looks_local(path: Path) -> bool:
    """A path whose first component exists here, or that names a file type, is a local path with a
    typo, not a Hub id: say "no such directory" rather than ask the Hub."""
    return Path(path.parts[0]).exists() or path.suffix.lower() in (".safetensors", ".bin", ".gguf", ".json")


# exceptions from these packages (the HTTP stacks huggingface_hub runs on) mean the network failed
_NETWORK_PACKAGES = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "h2", "ssl", "socket"}


def is_network_error(exc: BaseException) -> bool:
    """An OSError, or an error of the HTTP client (httpx2's ConnectError is no OSError)."""
    return isinstance(exc, OSError) or any(
        klass.__module__.split(".")[0] in _NETWORK_PACKAGES for klass in type(exc).__mro__
    )


def known_tokens(explicit: str | None = None) -> list[str]:
    """Every Hub token this process could send: the explicit one, the environment's, the login cache's."""
    found = [explicit, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        found.append(get_token())
    except Exception:  # no login cache, or an old client: nothing more to hide
        pass
    return sorted({t for t in found if t and len(t) >= 4}, key=len, reverse=True)


def hub_message(exc: BaseException, token: str | None = None) -> str:
    """The client's message as one line, with every token it might echo replaced by ``***``."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    for secret in known_tokens(token):  # before shortening: a cut token would not match any more
        text = text.replace(secret, "***")
    text = re.sub(r"(?i)(bearer\s+)(?!\*\*\*)\S+", r"\1***", text)
    return text if len(text) <= 500 else text[:497] + "..."


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, what: str, spec: str) -> Iterator[None]:
    """The Hub client's errors as adapterops' errors, one line each."""
    from huggingface_hub import errors as hub_errors

    try:
        yield
    except hub_errors.RevisionNotFoundError as exc:
        raise NotFoundError(
            f"{spec}: the Hub repo {repo_id} has no revision {revision!r}; check the branch, tag or commit"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"{spec}: no local {what} directory of that name and no Hub repo {repo_id} "
            "(or it is private: log in with `hf auth login` or set HF_TOKEN)"
        ) from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        raise HubError(
            f"{spec}: no local {what} directory of that name, and the Hub repo {repo_id} is not in the local "
            "cache while the Hub cannot be reached (offline or HF_HUB_OFFLINE=1); fix the path, or connect"
        ) from exc
    except hub_errors.HfHubHTTPError as exc:
        raise HubError(f"{spec}: the Hub refused the download: {hub_message(exc)}") from None
    except Exception as exc:
        if not is_network_error(exc):
            raise
        raise HubError(
            f"{spec}: could not reach the Hub ({hub_message(exc)}); check the network or set HF_HUB_OFFLINE=1"
        ) from None


def _snapshot(
    repo_id: str, revision: str | None, patterns: Sequence[str], ignore: Sequence[str], what: str, spec: str
) -> Resolved:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision, what, spec):
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(patterns),
                ignore_patterns=list(ignore) or None,
            )
        )
    # snapshot folders are named after the commit the revision resolved to
    return Resolved(path=folder, repo_id=repo_id, revision=folder.name)


def base_config(base: str | Path) -> dict[str, Any]:
    """The base model's ``config.json`` (a local directory or Hub id; only that file is fetched),
    checked to be a JSON object."""
    import json

    resolved = resolve(base, allow_patterns=["config.json"], what="base model")
    path = resolved.path / "config.json"
    if not path.is_file():
        raise NotFoundError(f"{base}: no config.json; pass the base model directory (or Hub id) as --base")
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return config
