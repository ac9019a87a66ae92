"""The merge's stream (``merging.pipeline``) and ``workers``: same bytes, bounded memory, clean failures.

The CPU stream is exercised through the same driver as the CUDA one (a device object swapped in);
the CUDA stream itself is checked bit for bit against the CPU merge where CUDA is present.
"""

from __future__ import annotations

import importlib
import multiprocessing
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from adapterops.io.safetensors_file import ShardWriter, TensorEntry
from adapterops.merging import load_inputs, plan_merge
from adapterops.merging.pipeline import CpuDevice, CudaDevice, SlotPool, Stream, device_for
from tests.conftest import Zoo
from tests.support.factories import save_base_checkpoint, tiny_llama

execute_module = importlib.import_module(
    "adapterops.merging.execute"
)  # the package exports a function of that name
SHARD = "20KB"  # several shards for the tiny model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    return save_base_checkpoint(tiny_llama, root / "llama", dtype=torch.bfloat16, max_shard_size=SHARD)


def under(folder: Path) -> Path:
    """A fresh parent folder: outputs of one name (their cards name them) side by side."""
    folder.mkdir(exist_ok=True)
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_except_timing(a: Path, b: Path) -> None:
    """Every file byte for byte, except the card and record, which name the output folder."""
    left, right = files(a), files(b)
    assert sorted(left) == sorted(right)
    shards = [name for name in left if name.endswith(".safetensors")]
    assert len(shards) > 2  # the point is several shards
    for name in left:
        assert left[name] == right[name], name


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("adapterops-write", "adapterops-read"))]


# -- the stream on its own ----------------------------------------------------------------------------


def entries(n: int, numel: int) -> tuple[TensorEntry, ...]:
    size = numel * 4
    return tuple(TensorEntry(f"t{i}", "F32", (numel,), i * size, (i + 1) * size) for i in range(n))


class SlowWriter(ShardWriter):
    """A ShardWriter whose writes take a while, recording how many computed tensors were in flight."""

    def __init__(self, path: Path, items: tuple[TensorEntry, ...], stream: list[Stream]) -> None:
        super().__init__(path, items, {})
        self.stream = stream

    def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
        time.sleep(0.02)
        super().write(entry, tensor)


def test_writes_overlap_compute_in_order_with_at_most_two_tensors_in_flight(tmp_path) -> None:
    items = entries(8, 1000)
    holder: list[Stream] = []
    values = [torch.full((1000,), float(i)) for i in range(8)]
    with Stream(CpuDevice(), slots=2) as stream:
        writer = stream.begin(SlowWriter(tmp_path / "x.safetensors", items, holder))
        started = time.perf_counter()
        for entry, value in zip(items, values, strict=True):
            stream.write(writer, entry, value)
            value.fill_(-1.0)  # the caller reuses its memory at once (as the kernels' workspace is)
        queued = time.perf_counter() - started
        stream.end(writer)
    # the caller got ahead of the writer, but no more than the two slots allow
    assert queued < 8 * 0.02
    assert stream.pool.peak_bytes == 2 * 4000
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[f"t{i}"], torch.full((1000,), float(i))) for i in range(8))
    assert stream_threads() == []


def test_a_writer_error_reaches_the_caller_even_while_it_waits_for_a_slot(tmp_path) -> None:
    items = entries(6, 10)

    class Failing(ShardWriter):
        def write(self, entry: TensorEntry, tensor: torch.Tensor) -> None:
            if entry.name == "t1":
                raise OSError(28, "No space left on device")
            super().write(entry, tensor)

    with pytest.raises(OSError) as caught, Stream(CpuDevice(), slots=1) as stream:
        writer = stream.begin(Failing(tmp_path / "x.safetensors", items, {}))
        for entry in items:
            stream.write(writer, entry, torch.zeros(10))
        stream.end(writer)
    assert caught.value.errno == 28  # the disk's own error, whether raised at a write or while waiting
    assert stream_threads() == []
    assert writer.handle.closed


def test_the_cuda_stream_is_constructible_without_cuda() -> None:
    device = device_for(torch.device("cuda"))
    assert isinstance(device, CudaDevice)
    assert device.pin == torch.cuda.is_available()
    assert isinstance(device_for(torch.device("cpu")), CpuDevice)


def test_a_slot_pool_rejects_zero_slots() -> None:
    with pytest.raises(ValueError, match="at least one write slot"):
        SlotPool(0)


# -- merges through the stream ------------------------------------------------------------------------


class CountingDevice(CpuDevice):
    """The CPU, through the device seam the CUDA stream uses: every update uploaded, every value downloaded."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads = self.downloads = 0

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        self.uploads += 1
        return host.clone()  # a tensor of its own, as on a GPU

    def download(self, value: torch.Tensor, into: torch.Tensor):  # type: ignore[no-untyped-def]
        self.downloads += 1
        return super().download(value, into)


def test_a_swapped_in_device_gives_the_same_bytes(zoo: Zoo, base, tmp_path, monkeypatch) -> None:
    adapters = [zoo["llama_a"], zoo["llama_b"]]
    ao.merge(base, adapters, [0.7, -0.3], out=under(tmp_path / "plain") / "m", device="cpu")
    counting = CountingDevice()
    monkeypatch.setattr(execute_module, "device_for", lambda _: counting)
    ao.merge(base, adapters, [0.7, -0.3], out=under(tmp_path / "swapped") / "m", device="cpu")
    same_except_timing(under(tmp_path / "plain") / "m", under(tmp_path / "swapped") / "m")
    assert counting.uploads > 0 and counting.downloads >= counting.uploads


@pytest.mark.parametrize("where", ["write", "compute", "interrupt"])
def test_a_failure_anywhere_leaves_no_output_and_no_thread(
    zoo: Zoo, base, tmp_path, monkeypatch, where
) -> None:
    calls = {"n": 0}

    def third(original):  # type: ignore[no-untyped-def]
        def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 3:
                if where == "interrupt":
                    raise KeyboardInterrupt
                raise OSError(5, "Input/output error") if where == "write" else RuntimeError("kernel failed")
            return original(*args, **kwargs)

        return failing

    if where == "write":
        monkeypatch.setattr(ShardWriter, "write", third(ShardWriter.write))
    else:
        monkeypatch.setattr(execute_module, "apply_update", third(execute_module.apply_update))
    expected = {"write": OSError, "compute": RuntimeError, "interrupt": KeyboardInterrupt}[where]
    with pytest.raises(expected):
        ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged", device="cpu")
    assert calls["n"] == 3
    assert sorted(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
    for thread in stream_threads():
        thread.join(timeout=5)
    assert stream_threads() == []


def test_a_non_finite_result_is_refused_with_nothing_written(zoo: Zoo, base, tmp_path, monkeypatch) -> None:
    original = execute_module.apply_update

    def overflowing(update, W, **kwargs):  # type: ignore[no-untyped-def]
        result, norms = original(update, W, **kwargs)
        return result.clone().fill_(float("inf")), norms

    monkeypatch.setattr(execute_module, "apply_update", overflowing)
    with pytest.raises(ao.InvalidInputError, match="would write NaN or Inf"):
        ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged", device="cpu")
    assert sorted(tmp_path.iterdir()) == []
    assert stream_threads() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_stream_writes_the_cpu_merge_bit_for_bit(zoo: Zoo, base, tmp_path) -> None:
    adapters = [zoo["llama_a"], zoo["llama_b"], zoo["llama_emb"]]
    ao.merge(base, adapters, [0.7, 0.3, -1.5], out=under(tmp_path / "cpu") / "m", device="cpu")
    result = ao.merge(base, adapters, [0.7, 0.3, -1.5], out=under(tmp_path / "gpu") / "m", device="cuda")
    assert result.device.startswith("cuda")
    same_except_timing(under(tmp_path / "cpu") / "m", under(tmp_path / "gpu") / "m")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_stream_unmerges_the_cpu_unmerge_bit_for_bit(zoo: Zoo, base, tmp_path) -> None:
    ao.merge(base, [zoo["llama_a"]], out=tmp_path / "merged", device="cpu")
    ao.unmerge(tmp_path / "merged", [zoo["llama_a"]], out=under(tmp_path / "cpu") / "u", device="cpu")
    ao.unmerge(tmp_path / "merged", [zoo["llama_a"]], out=under(tmp_path / "gpu") / "u", device="cuda")
    same_except_timing(under(tmp_path / "cpu") / "u", under(tmp_path / "gpu") / "u")


# -- workers ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("adapters", "weights"), [(["llama_a", "llama_b"], [0.7, -0.3]), (["llama_dora"], [1.0])]
)
def test_workers_write_the_same_bytes_as_one_process(zoo: Zoo, base, tmp_path, adapters, weights) -> None:
    paths = [zoo[a] for a in adapters]
    seen: list[int] = []
    one, two = under(tmp_path / "one"), under(tmp_path / "two")
    ao.merge(base, paths, weights, out=one / "m", device="cpu")
    ao.merge(
        base, paths, weights, out=two / "m", device="cpu", workers=2, progress=lambda n, _: seen.append(n)
    )
    same_except_timing(one / "m", two / "m")  # DoRA: its row norms too
    # every byte of the base's data sections reported, once: file size less the length and the header
    shards = list(base.glob("*.safetensors"))
    assert sum(seen) == sum(
        p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little") for p in shards
    )
    if adapters == ["llama_dora"]:  # and back: the recorded norms, read by processes
        ao.unmerge(one / "m", paths, out=one / "u", device="cpu")
        ao.unmerge(one / "m", paths, out=two / "u", device="cpu", workers=2)
        same_except_timing(one / "u", two / "u")


def test_workers_refuse_a_single_file_and_a_gpu(zoo: Zoo, base, tmp_path) -> None:
    single = save_base_checkpoint(tiny_llama, tmp_path / "single", dtype=torch.bfloat16) / "model.safetensors"
    with pytest.raises(
        ao.InvalidInputError, match=r"one \.safetensors file, one shard: workers > 1"
    ) as caught:
        ao.merge(single, [zoo["llama_a"]], out=tmp_path / "out.safetensors", device="cpu", workers=2)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()
    plan = plan_merge(*load_inputs(base, [zoo["llama_a"]]), None)
    with pytest.raises(ao.InvalidInputError, match=r"parallel CPU processes.*use device=cpu or workers=1"):
        execute_module.check_workers(plan.checkpoint, torch.device("cuda"), 2)
    with pytest.raises(ao.InvalidInputError, match="workers"):
        ao.merge(base, [zoo["llama_a"]], out=tmp_path / "x", workers=0)
    # the command line: one line naming the flag, exit code 2 (bad input)
    args = [
        "merge",
        str(single),
        str(zoo["llama_a"]),
        "-o",
        str(tmp_path / "o.safetensors"),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(cli, [*args, "--workers", "2"])
    assert result.exit_code == 2, result.output
    assert "one shard: --workers > 1 applies to sharded checkpoints; use --workers 1" in result.output
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.slow
def test_an_error_in_a_worker_stops_the_merge_with_nothing_written(zoo: Zoo, base, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    # lora_B entries near float32's largest: their update overflows bfloat16, and the worker that
    # reaches it refuses to write Inf
    huge = tmp_path / "huge"
    shutil.copytree(zoo["llama_a"], huge)
    factors = load_file(huge / "adapter_model.safetensors")
    factors = {k: v.clone().fill_(3e38) if "lora_B" in k else v for k, v in factors.items()}
    save_file(factors, huge / "adapter_model.safetensors")
    out = under(tmp_path / "out")
    with pytest.raises(ao.InvalidInputError, match="would write NaN or Inf") as caught:
        ao.merge(base, [huge], out=out / "merged", device="cpu", workers=2)
    assert "\n" not in str(caught.value)
    assert sorted(out.iterdir()) == []
    assert multiprocessing.active_children() == []
