"""Single-file adapters (kohya, GGUF) from the Hub, through the real client against the local server
(tests/support/hubserver.py): a repo with one adapter file is read from it; with several, one is named
``org/name:file`` or ``org/name@revision:file``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adapterops as ao
from adapterops.io.refs import parse_hub_file
from tests.support.factories import make_adapter, tiny_llama
from tests.support.hubserver import FakeHub
from tests.test_gguf import base_dir
from tests.test_kohya import CONV, LINEAR, _unet, write_kohya


@pytest.fixture(scope="module")
def unet_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return dict(_unet().state_dict())


def _same(a: ao.Adapter, b: ao.Adapter) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for name in a.modules:
        torch.testing.assert_close(
            a.modules[name].delta(torch.float64), b.modules[name].delta(torch.float64), rtol=0, atol=0
        )


@pytest.mark.hub
def test_a_repo_with_one_kohya_file_is_read_from_it(
    fake_hub: FakeHub, tmp_path: Path, unet_weights: dict
) -> None:
    path = write_kohya(tmp_path / "style.safetensors", unet_weights, LINEAR + CONV)
    sha = fake_hub.add_repo(
        "org/kohya-style", {"style.safetensors": path.read_bytes(), "README.md": b"# style"}
    )
    adapter = ao.load_adapter("org/kohya-style")
    _same(adapter, ao.load_adapter(path))
    assert (adapter.source.repo_id, adapter.source.revision) == ("org/kohya-style", sha)
    assert adapter.config["format"] == "kohya"


@pytest.mark.hub
def test_several_files_are_refused_listing_them_and_one_is_named(
    fake_hub: FakeHub, tmp_path: Path, unet_weights: dict
) -> None:
    a = write_kohya(tmp_path / "a.safetensors", unet_weights, LINEAR, seed=1)
    b = write_kohya(tmp_path / "b.safetensors", unet_weights, CONV, seed=2)
    old = fake_hub.add_repo("org/pack", {"a.safetensors": a.read_bytes(), "v2/b.safetensors": b.read_bytes()})
    with pytest.raises(ao.AdapterOpsError) as excinfo:
        ao.load_adapter("org/pack")
    message = str(excinfo.value)
    assert "\n" not in message and "a.safetensors, v2/b.safetensors" in message
    assert "org/pack:a.safetensors" in message
    _same(ao.load_adapter("org/pack:v2/b.safetensors"), ao.load_adapter(b))
    fake_hub.add_repo("org/pack", {"a.safetensors": b.read_bytes()})  # a new commit changes a.safetensors
    _same(ao.load_adapter(f"org/pack@{old}:a.safetensors"), ao.load_adapter(a))
    _same(ao.load_adapter("org/pack:a.safetensors"), ao.load_adapter(b))
    with pytest.raises(ao.NotFoundError, match="has no file 'c.safetensors'"):
        ao.load_adapter("org/pack:c.safetensors")


@pytest.mark.hub
def test_a_repo_with_one_gguf_file_is_read_from_it(fake_hub: FakeHub, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=2, r=4, lora_alpha=8)
    gguf = ao.convert(adapter, tmp_path / "a.gguf", to="gguf", base=base_dir(tiny_llama, tmp_path / "base"))
    fake_hub.add_repo("org/gguf-lora", {"lora-f32.gguf": gguf.read_bytes()})
    _same(ao.load_adapter("org/gguf-lora"), ao.load_adapter(gguf))


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("org/name:lora.safetensors", ("org/name", None, "lora.safetensors")),
        ("org/name@v1.0:dir/lora.gguf", ("org/name", "v1.0", "dir/lora.gguf")),
        ("org/name", None),
        ("org/name:../x.safetensors", None),
        ("./org/name:x.safetensors", None),
    ],
)
def test_parse_hub_file(spec: str, parsed: tuple[str, str | None, str] | None) -> None:
    assert parse_hub_file(spec) == parsed
