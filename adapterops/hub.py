"""Publishing to the Hub: a model card that records how an output was made, and the upload.

Uploads go through huggingface_hub (create_repo, preupload of large files, create_commit), so its
token resolution (``token=``, HF_TOKEN, the login cache), endpoint and offline settings apply.
The token is never printed or written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from adapterops.card import lineage_section, render_card, with_lineage
from adapterops.errors import HubError, InvalidInputError, NotFoundError
from adapterops.io.peft import read_tensors
from adapterops.io.peft_config import CONFIG_NAME
from adapterops.io.refs import hub_message, is_network_error
from adapterops.provenance import RECORD_KEY, RECORD_NAME


class OutputKind(str, Enum):
    ADAPTER = "adapter"
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class LocalOutput:
    """What a local directory holds: a PEFT adapter or a transformers checkpoint, and its lineage."""

    path: Path
    kind: OutputKind
    base_model: str | None
    provenance: Mapping[str, Any]


def inspect_output(path: str | Path) -> LocalOutput:
    """Recognize an adapterops output (or any adapter / checkpoint) and read its lineage record."""
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such directory; pass an adapter or checkpoint directory to push")
    if (root / CONFIG_NAME).is_file():
        config = json.loads((root / CONFIG_NAME).read_text())
        _, metadata, _ = read_tensors(root)
        provenance = json.loads(metadata[RECORD_KEY]) if RECORD_KEY in metadata else {}
        return LocalOutput(root, OutputKind.ADAPTER, config.get("base_model_name_or_path"), provenance)
    if (root / "config.json").is_file() and any(root.glob("*.safetensors")):
        record = json.loads((root / RECORD_NAME).read_text()) if (root / RECORD_NAME).is_file() else {}
        history = record.get("history") or [{}]
        base = history[0].get("base") or {}
        return LocalOutput(root, OutputKind.CHECKPOINT, base.get("repo_id"), record)
    raise InvalidInputError(
        f"{root}: neither a PEFT adapter (adapter_config.json) nor a safetensors checkpoint (config.json and "
        "*.safetensors); nothing to push"
    )


def model_card(output: LocalOutput, repo_id: str | None = None, *, replace_card: bool = False) -> str:
    """The card a push uploads.

    A README.md already in the directory is kept: its adapterops lineage section is replaced (or
    added, when the output has a record). Without one, or with ``replace_card``, a new card is
    rendered (``card.render_card``), titled with the repo id.
    """
    readme = output.path / "README.md"
    if readme.is_file() and not replace_card:
        text = readme.read_text()
        return with_lineage(text, lineage_section(output.provenance)) if output.provenance else text
    title = repo_id or output.path.name
    return render_card(output.kind.value, title, output.provenance, base_model=output.base_model)


class ShardUploader:
    """Uploads files as they are finished (a merge's shards) so the upload overlaps the work.

    ``submit(path)`` pre-uploads one file in a background thread; ``push_to_hub(...,
    uploader=...)`` then commits everything, reusing what was already sent.
    """

    def __init__(
        self, repo_id: str, *, private: bool = False, revision: str | None = None, token: str | None = None
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.repo_id, self.private, self.revision, self.token = repo_id, private, revision, token
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-upload")
        self.sent: dict[str, Any] = {}  # file name -> CommitOperationAdd, already pre-uploaded
        self.futures: list[Any] = []
        self.handles: list[Any] = []
        self._prepared = False

    def submit(self, path: Path) -> None:
        # opened now: the handle stays valid when the merge renames its temporary folder
        handle = Path(path).open("rb")  # noqa: SIM115  (closed by close(), after the commit)
        self.handles.append(handle)
        self.futures.append(self.pool.submit(self._upload, Path(path).name, handle))

    def _upload(self, name: str, handle: Any) -> None:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=self.token)
        with _hub_errors(self.repo_id, self.token):
            if not self._prepared:
                _prepare(api, self.repo_id, self.private, self.revision)
                self._prepared = True
            operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=handle)
            api.preupload_lfs_files(self.repo_id, [operation], revision=self.revision)
        self.sent[name] = operation

    def wait(self) -> None:
        try:
            for future in self.futures:
                future.result()
        finally:
            self.pool.shutdown()

    def close(self) -> None:
        """Stop pending uploads and close the files (after the commit, or when the merge failed)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        for handle in self.handles:
            handle.close()


def _prepare(api: Any, repo_id: str, private: bool, revision: str | None) -> None:
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def push_to_hub(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    progress: Any = None,
    uploader: ShardUploader | None = None,
    replace_card: bool = False,
) -> str:
    """Upload an adapter or checkpoint directory with its model card; returns the commit URL.

    The directory's README.md is kept with its lineage section brought up to date (a new card is
    written where there is none, or with ``replace_card``). Large files are pre-uploaded one by one
    before the commit, so a retry after a failure only sends what the Hub does not already have.
    Files an ``uploader`` already sent are not sent again.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    output = inspect_output(path)
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    card = model_card(output, repo_id, replace_card=replace_card).encode()
    files = sorted(p for p in output.path.rglob("*") if p.is_file() and not _hidden(p, output.path))
    sent = {}
    if uploader is not None:
        try:
            uploader.wait()
        except BaseException:
            uploader.close()
            raise
        sent = uploader.sent
    operations = [
        sent.get(p.relative_to(output.path).as_posix())
        or CommitOperationAdd(path_in_repo=p.relative_to(output.path).as_posix(), path_or_fileobj=str(p))
        for p in files
        if p.relative_to(output.path).as_posix() != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        return _commit(
            api, repo_id, operations, sent, output, private, revision, commit_message, progress, token
        )
    finally:
        if uploader is not None:
            uploader.close()


def _commit(
    api: Any,
    repo_id: str,
    operations: list[Any],
    sent: Mapping[str, Any],
    output: LocalOutput,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    progress: Any,
    token: str | None,
) -> str:
    with _hub_errors(repo_id, token):
        _prepare(api, repo_id, private, revision)
        for operation in operations:  # one by one: progress, and resumable on retry
            if operation.path_in_repo not in sent:
                api.preupload_lfs_files(repo_id, [operation], revision=revision)
            if progress:
                progress(operation.path_in_repo)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {output.kind.value} made with adapterops",
            revision=revision,
        )
    return str(info.commit_url)


@contextmanager
def _hub_errors(repo_id: str, token: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line HubErrors; the client's progress bars off meanwhile."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import utils as hub_utils

    quiet = not hub_utils.are_progress_bars_disabled()
    if quiet:  # adapterops draws its own progress; the client's bars would interleave with it
        hub_utils.disable_progress_bars()
    try:
        yield
    except hub_errors.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"the Hub refused the upload to {repo_id} (HTTP {status}): log in with `hf auth login`, set HF_TOKEN "
                "or pass --token, with write access to that namespace"
            ) from None
        raise HubError(f"the Hub refused the upload to {repo_id}: {hub_message(exc, token)}") from None
    except hub_errors.OfflineModeIsEnabled:
        raise HubError(
            f"could not reach the Hub to push {repo_id} (offline mode); unset HF_HUB_OFFLINE"
        ) from None
    except Exception as exc:
        if not is_network_error(exc):
            raise
        raise HubError(
            f"could not reach the Hub to push {repo_id} ({type(exc).__name__}); check the network"
        ) from None
    finally:
        if quiet:
            hub_utils.enable_progress_bars()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
