"""push_to_hub: files, card, order of calls, resumed uploads, token handling and failures against a recording
HfApi (tests/support/fakehub.py); a real adapter push and a merge --push over HTTP (marker ``hub``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub.utils import are_progress_bars_disabled

import adapterops as ao
from adapterops.cli import cli
from adapterops.hub import ShardUploader
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama
from tests.support.fakehub import FakeHfApi, set_offline
from tests.support.hubserver import FakeHub

ADAPTER = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def sharded_base(tmp_path: Path) -> tuple[Path, list[str]]:
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.bfloat16, max_shard_size="20KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 2
    return base, shards


def test_push_an_adapter_with_its_lineage_card(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    a, b = ao.load_adapter(zoo["llama_a"]), ao.load_adapter(zoo["llama_b"])
    ao.save_adapter(ao.combine([a, b], [0.7, 0.3], method="svd", rank=4), tmp_path / "mix")
    monkeypatch.setenv("HF_TOKEN", "secret-token-123")
    bars_before, seen = are_progress_bars_disabled(), []
    url = ao.push_to_hub(tmp_path / "mix", "me/mix", private=True, progress=seen.append)
    assert url.startswith("https://huggingface.co/me/mix/commit/")
    files = fake_hf_api.files("me/mix")
    local = {p.name: p.read_bytes() for p in (tmp_path / "mix").iterdir()}
    assert set(files) == set(local) == ADAPTER
    assert files["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert files["adapter_config.json"] == local["adapter_config.json"]
    card = ModelCard(files["README.md"].decode())  # the generated card replaces the saved README
    assert card.data.library_name == "peft"
    assert set(card.data.tags) >= {"adapterops", "lora"}
    text = card.text
    assert a.source.sha256 in text and b.source.sha256 in text
    assert "- method: `svd`" in text and "- weights: `[0.7, 0.3]`" in text and "- rank: `4`" in text
    # the repo first (private, fine if it exists), then each file pre-uploaded on its own, then one commit
    calls = fake_hf_api.calls
    assert [c.name for c in calls] == ["create_repo", *["preupload_lfs_files"] * 3, "create_commit"]
    assert (calls[0].kwargs["private"], calls[0].kwargs["exist_ok"]) == (True, True)
    assert [list(c.files) for c in calls[1:4]] == [
        ["adapter_config.json"],
        ["adapter_model.safetensors"],
        ["README.md"],
    ]
    commit = calls[-1]
    assert commit.kwargs["commit_message"] == "Upload adapter made with adapterops"
    assert commit.kwargs["revision"] is None and commit.kwargs["not_preuploaded"] == []
    assert seen == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    # the token: left to the client's resolution (HF_TOKEN here), written nowhere
    assert set(fake_hf_api.tokens) == {None} and set(fake_hf_api.sent_tokens) == {"secret-token-123"}
    assert all("secret-token-123" not in v.decode(errors="ignore") for v in files.values())
    # the client's progress bars were off during the calls, and are as they were after
    assert all(c.bars_off for c in calls) and are_progress_bars_disabled() == bars_before


def test_push_a_merged_checkpoint_to_a_branch(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    base, _ = sharded_base(tmp_path)
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged")
    monkeypatch.setenv("HF_TOKEN", "t")
    args = ["push", str(tmp_path / "merged"), "me/merged", "--revision", "v1", "--commit-message", "v1 merge"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert (payload["repo_id"], payload["revision"]) == ("me/merged", "v1")
    assert payload["commit_url"].startswith("https://huggingface.co/me/merged/commit/")
    files = fake_hf_api.files("me/merged", revision="v1")
    assert set(files) >= {p.name for p in (tmp_path / "merged").iterdir()}
    assert fake_hf_api.files("me/merged") == {}  # main untouched
    (branch,) = fake_hf_api.named("create_branch")
    assert (branch.kwargs["branch"], branch.kwargs["exist_ok"]) == ("v1", True)
    writes = fake_hf_api.named("preupload_lfs_files") + fake_hf_api.named("create_commit")
    assert {c.kwargs["revision"] for c in writes} == {"v1"}
    assert fake_hf_api.named("create_commit")[0].kwargs["commit_message"] == "v1 merge"
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "merge" in card.data.tags
    assert ao.load_adapter(zoo["llama_a"]).source.sha256 in card.text
    assert json.loads(files["adapterops_merge.json"])["merged"][0]["sha256"] in card.text


def test_hidden_files_stay_home(fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path) -> None:
    folder = shutil.copytree(zoo["llama_a"], tmp_path / "a")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("x")
    (folder / ".notes").write_text("private")
    ao.push_to_hub(folder, "me/a", token="tok")
    assert set(fake_hf_api.files("me/a")) == ADAPTER
    # PEFT's own README (no adapterops record) is kept as its author wrote it
    assert fake_hf_api.files("me/a")["README.md"] == (folder / "README.md").read_bytes()
    ao.push_to_hub(folder, "me/a", token="tok", replace_card=True)
    assert fake_hf_api.files("me/a")["README.md"].decode().count("# me/a\n") == 1
    assert set(fake_hf_api.tokens) == {"tok"}


def test_a_push_keeps_the_authors_readme_and_updates_only_the_lineage(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path
) -> None:
    ao.save_adapter(ao.negate(zoo["llama_a"]), tmp_path / "anti")
    readme = tmp_path / "anti" / "README.md"
    readme.write_text("# Anti style\n\nWhat I wrote about it.\n\n" + readme.read_text().split("---\n", 2)[2])
    ao.push_to_hub(tmp_path / "anti", "me/anti", token="tok")
    pushed = fake_hf_api.files("me/anti")["README.md"].decode()
    assert pushed.startswith("# Anti style\n\nWhat I wrote about it.\n")
    assert pushed.count("## Lineage") == 1 and "- operation: `negate`" in pushed


def test_a_resumed_push_sends_only_what_the_hub_lacks(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path
) -> None:
    fake_hf_api.fail("create_commit", "oserror", times=1)
    with pytest.raises(ao.HubError, match=r"could not reach the Hub to push me/a \(OSError\)"):
        ao.push_to_hub(zoo["llama_a"], "me/a", token="tok")
    # everything went up before the commit failed: a retry has nothing left to send
    assert sorted(fake_hf_api.uploads) == sorted(ADAPTER)
    assert "me/a" in ao.push_to_hub(zoo["llama_a"], "me/a", token="tok")
    assert sorted(fake_hf_api.uploads) == sorted(ADAPTER)
    assert len(fake_hf_api.named("create_commit")) == 2 and set(fake_hf_api.files("me/a")) == ADAPTER


def test_merge_push_pre_uploads_each_shard_once_while_merging(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    base, shards = sharded_base(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "t")
    args = ["merge", str(base), str(zoo["llama_a"]), "-o", str(tmp_path / "merged"), "--push", "me/m", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    preuploads = fake_hf_api.named("preupload_lfs_files")
    during = [Path(c.sources[0]).name for c in preuploads if ".merged.tmp-" in c.sources[0]]
    assert sorted(during) == shards  # every shard went up from the temporary directory, mid-merge
    sent = [name for c in preuploads for name in c.files if name.endswith(".safetensors")]
    assert sorted(sent) == shards  # and push_to_hub did not send them again
    assert fake_hf_api.calls[0].name == "create_repo"
    (commit,) = fake_hf_api.named("create_commit")
    assert commit.kwargs["not_preuploaded"] == []
    files = fake_hf_api.files("me/m")
    assert set(files) == {p.name for p in (tmp_path / "merged").iterdir()} | {"README.md"}
    for name in shards:
        assert files[name] == (tmp_path / "merged" / name).read_bytes()


def test_shard_uploader_hands_its_files_to_the_commit(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path
) -> None:
    base, shards = sharded_base(tmp_path)
    uploader = ShardUploader("me/s", private=True, revision="dev", token="tok")
    for name in shards:
        uploader.submit(base / name)
    ao.push_to_hub(base, "me/s", revision="dev", token="tok", uploader=uploader)
    assert all(handle.closed for handle in uploader.handles) and len(uploader.handles) == len(shards)
    assert sorted(uploader.sent) == shards
    names = [c.name for c in fake_hf_api.calls]
    assert names[:2] == ["create_repo", "create_branch"] and names.count("create_branch") == 2
    preuploaded = [n for c in fake_hf_api.named("preupload_lfs_files") for n in c.files]
    assert sorted(preuploaded) == sorted({p.name for p in base.iterdir()} | {"README.md"})  # each once
    assert set(fake_hf_api.tokens) == {"tok"}
    assert set(fake_hf_api.files("me/s", "dev")) >= set(shards)


def test_a_failed_shard_upload_fails_the_push_and_closes_the_files(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path
) -> None:
    base, shards = sharded_base(tmp_path)
    fake_hf_api.fail("preupload_lfs_files", "403")
    uploader = ShardUploader("me/s", token="tok")
    uploader.submit(base / shards[0])
    with pytest.raises(ao.HubError, match=r"the Hub refused the upload to me/s \(HTTP 403\): log in"):
        ao.push_to_hub(base, "me/s", token="tok", uploader=uploader)
    assert uploader.handles[0].closed and uploader.sent == {}
    assert fake_hf_api.named("create_commit") == []


@pytest.mark.parametrize("status", ["401", "403"])
def test_refused_pushes_are_one_clear_line(
    fake_hf_api: FakeHfApi, zoo: Zoo, monkeypatch, status: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", "bad-secret")
    fake_hf_api.fail("create_repo", status)
    result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x"])
    assert result.exit_code == 5
    assert result.stderr.startswith(f"error: the Hub refused the upload to me/x (HTTP {status}): log in")
    assert result.stderr.count("\n") == 1
    assert "bad-secret" not in result.stderr + result.stdout
    assert fake_hf_api.sent_tokens == ["bad-secret"]  # it was sent, just never shown
    assert [c.name for c in fake_hf_api.calls] == ["create_repo"]


def test_offline_and_not_an_output(fake_hf_api: FakeHfApi, tmp_path: Path, zoo: Zoo, monkeypatch) -> None:
    set_offline(monkeypatch)
    result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x", "--token", "good"])
    assert (result.exit_code, result.stderr) == (
        5,
        "error: cannot push me/x: HF_HUB_OFFLINE is set; unset it to upload\n",
    )
    result = CliRunner().invoke(cli, ["push", str(tmp_path), "me/x"])
    assert result.exit_code == 2 and "neither a PEFT adapter" in result.stderr
    assert fake_hf_api.calls == []


def test_an_error_echoing_the_token_does_not_print_it(fake_hf_api: FakeHfApi, zoo: Zoo) -> None:
    fake_hf_api.fail("create_commit", "500-echo")
    result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x", "--token", "hf_secret_cli"])
    assert result.exit_code == 5 and result.stderr.startswith("error: the Hub refused the upload to me/x: ")
    assert "hf_secret_cli" not in result.stderr + result.stdout and "Bearer ***" in result.stderr
    with pytest.raises(ao.HubError) as caught:
        ao.push_to_hub(zoo["llama_a"], "me/x", token="hf_secret_api")
    assert "hf_secret_api" not in str(caught.value) and "Bearer ***" in str(caught.value)
    assert caught.value.__suppress_context__  # the client's error (with the token) stays out of tracebacks


def test_an_error_echoing_the_environment_token_does_not_print_it(
    fake_hf_api: FakeHfApi, zoo: Zoo, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_env")
    fake_hf_api.fail("create_commit", "500-echo")
    result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x"])
    assert result.exit_code == 5 and "hf_secret_env" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "kind",
    [
        "oserror",
        pytest.param("connect"),
    ],
)
def test_an_unreachable_hub_is_one_clear_line(fake_hf_api: FakeHfApi, zoo: Zoo, kind: str) -> None:
    fake_hf_api.fail("create_repo", kind)
    result = CliRunner().invoke(cli, ["push", str(zoo["llama_a"]), "me/x", "--token", "t"])
    assert result.exit_code == 5
    assert result.stderr.startswith("error: could not reach the Hub to push me/x (")
    assert result.stderr.endswith("); check the network\n")


def test_writing_verbs_push_with_a_flag(
    fake_hf_api: FakeHfApi, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
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
    ]
    result = CliRunner().invoke(cli, [*args, "--push", "me/mix", "--private", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "me/mix" in json.loads(result.stdout)["pushed"]
    pushed = fake_hf_api.files("me/mix")
    assert (
        pushed["adapter_model.safetensors"] == (tmp_path / "mix" / "adapter_model.safetensors").read_bytes()
    )
    assert "adapterops combine" in pushed["README.md"].decode()  # the command is in the card
    assert fake_hf_api.named("create_repo")[0].kwargs["private"] is True


@pytest.mark.hub
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_an_adapter_over_http(fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch) -> None:
    ao.save_adapter(ao.load_adapter(zoo["llama_a"]), tmp_path / "a")
    monkeypatch.setenv("HF_TOKEN", "secret-token-123")
    url = ao.push_to_hub(tmp_path / "a", "me/a", private=True)
    assert url == f"{fake_hub.endpoint}/me/a/commit/{fake_hub.resolve('me/a')}"
    files = fake_hub.files("me/a")
    local = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert files["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert files["adapter_config.json"] == local["adapter_config.json"]
    assert fake_hub.is_lfs("me/a", "adapter_model.safetensors")
    assert fake_hub.lfs_uploads  # the weights went through the LFS upload
    assert ModelCard(files["README.md"].decode()).data.library_name == "peft"
    assert fake_hub.last_token == "secret-token-123"
    assert all("secret-token-123" not in v.decode(errors="ignore") for v in files.values())
    # pushing the same files again succeeds and adds no empty commit
    before = fake_hub.commits("me/a")
    ao.push_to_hub(tmp_path / "a", "me/a")
    assert fake_hub.commits("me/a") == before


@pytest.mark.hub
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_merge_push_uploads_shards_while_merging(
    fake_hub: FakeHub, zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    """Each shard is pre-uploaded from the temporary directory as soon as it is written, then one
    commit lands; an interrupted push resumes without re-sending what the Hub has."""
    from huggingface_hub import HfApi

    base, shards = sharded_base(tmp_path)
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
    args = [
        "merge",
        str(base),
        str(zoo["llama_a"]),
        "-o",
        str(tmp_path / "merged"),
        "--push",
        "me/merged",
        "-q",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    during = [Path(p).name for p in sent if ".merged.tmp-" in p]
    assert sorted(during) == shards  # every shard went up from the temporary directory, mid-merge
    files = fake_hub.files("me/merged")
    for name in shards:
        assert files[name] == (tmp_path / "merged" / name).read_bytes()
    uploads = len(fake_hub.lfs_uploads)
    ao.push_to_hub(tmp_path / "merged", "me/merged")  # nothing changed: nothing re-sent
    assert len(fake_hub.lfs_uploads) == uploads
