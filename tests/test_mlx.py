"""mlx-lm adapters: ``convert --to mlx`` and reading them back.

Judged by mlx-lm 0.32.2 itself (CPU build of mlx 0.32.4): ``mlx_lm.utils.load_model`` loads the
tiny transformers base, ``load_adapters`` loads our directory (it refuses any tensor whose name or
shape is not one of the LoRA layers it built from ``adapter_config.json``), and each LoRA / DoRA
layer's own ``fuse()`` gives the merged weight, which must equal PEFT's ``merge_and_unload``
weight. A float64 reference of mlx-lm's rule, written from ``tuner/lora.py`` and ``tuner/dora.py``,

    W' = W + scale * lora_b.T @ lora_a.T                      (LoRALinear.fuse)
    W' = m / ||W + scale * lora_b.T @ lora_a.T||_row * (...)   (DoRALinear.fuse, norm over axis 1)
    E' = E + scale * lora_a @ lora_b                           (LoRAEmbedding.fuse)

applied to the tensors mlx-lm loaded, must equal PEFT's float64 merge to 1e-12.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterops as ao
from adapterops.cli import cli
from adapterops.errors import AdapterFormatError, UnsupportedAdapterError
from tests.support.factories import (
    make_adapter,
    peft_merged_state_dict,
    save_base_checkpoint,
    tiny_gpt2,
    tiny_llama,
)

mx = pytest.importorskip("mlx.core")  # a test extra (mlx[cpu] on Linux): installed where the suite runs
tuner = pytest.importorskip("mlx_lm.tuner.utils")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mlx_model(base: Path, adapter: Path) -> Any:
    """The tiny base loaded by mlx-lm, with our adapter loaded by mlx-lm's own loader."""
    from mlx_lm.utils import load_model

    model, _ = load_model(base)
    return tuner.load_adapters(model, str(adapter))


def lora_layers(model: Any) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "fuse")}


def f64(a: Any) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def reference(layer: Any) -> np.ndarray:
    """mlx-lm's fuse rule in float64, on the tensors mlx-lm loaded into ``layer``."""
    a, b, s = f64(layer.lora_a), f64(layer.lora_b), float(layer.scale)
    if hasattr(layer, "embedding"):
        return f64(layer.embedding.weight) + s * a @ b
    w = f64(layer.linear.weight) + s * b.T @ a.T
    if hasattr(layer, "m"):
        w = (f64(layer.m) / np.linalg.norm(w, axis=1))[:, None] * w
    return w


def check_against_peft(
    tmp_path: Path,
    peft_dir: Path,
    out: Path,
    expect: set[str],
    f32_tol: float,
    folded: frozenset[str] = frozenset(),
) -> None:
    """mlx-lm's loaded layers equal PEFT's merge: to 1e-12 in float64 (a folded module: one float32
    rounding of lora_b, 2^-23 of its largest update entry) and to ``f32_tol`` through mlx-lm's fuse."""
    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    model = mlx_model(base, out)
    layers = lora_layers(model)
    assert set(layers) == expect  # exactly the adapter's modules became LoRA layers
    merged = peft_merged_state_dict(tiny_llama, peft_dir)
    merged_base = {k: v.double() for k, v in tiny_llama().state_dict().items()}
    for name, layer in layers.items():
        want = merged[f"{name}.weight"].numpy()
        base = merged_base[f"{name}.weight"].numpy()
        tol = 2**-23 * np.abs(want - base).max() if name in folded else 1e-12 * np.abs(want).max()
        np.testing.assert_allclose(reference(layer), want, rtol=0, atol=tol)
        fused = f64(layer.fuse().weight)  # mlx-lm's own fuse, in float32
        np.testing.assert_allclose(fused, want, rtol=0, atol=f32_tol * np.abs(want).max())


def test_mlx_lm_loads_and_fuses_what_peft_merges(tmp_path: Path) -> None:
    peft_dir = make_adapter(tiny_llama, tmp_path / "peft", seed=1, r=4, lora_alpha=8, target_modules=ALL)
    out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["scale"] == 2.0  # the absolute scale, not lora_alpha
    expect = {f"model.layers.{i}.{p}.{n}" for i in range(2) for p, n in _paths(ALL)}
    check_against_peft(tmp_path, peft_dir, out, expect, 1e-6)


def _paths(names: list[str]) -> list[tuple[str, str]]:
    return [
        ("self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp", n) for n in names
    ]


def test_mixed_ranks_and_scales_are_padded_and_folded(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama,
        tmp_path / "peft",
        seed=2,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.v_proj": 2},
        alpha_pattern={"model.layers.0.mlp.down_proj": 3},
    )
    out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    tensors = load_file(out / "adapters.safetensors")
    assert tensors["model.layers.1.self_attn.v_proj.lora_a"].shape == (32, 4)  # padded from rank 2
    assert not tensors["model.layers.1.self_attn.v_proj.lora_a"][:, 2:].any()
    assert tensors["model.layers.0.mlp.down_proj.lora_b"].dtype == torch.float32
    expect = {
        f"model.layers.{i}.{p}.{n}" for i in range(2) for p, n in _paths(["q_proj", "v_proj", "down_proj"])
    }
    check_against_peft(tmp_path, peft_dir, out, expect, 1e-6, frozenset({"model.layers.0.mlp.down_proj"}))
    # the folded module: lora_a as is, scale * lora_b correctly rounded to float32 (2^-24 relative)
    back = ao.load_adapter(out).modules["model.layers.0.mlp.down_proj"]
    peft = ao.load_adapter(peft_dir).modules["model.layers.0.mlp.down_proj"]
    assert torch.equal(back.A, peft.A) and back.scale == 2.0 and peft.scale == 0.75
    want = peft.B.double() * peft.scale
    torch.testing.assert_close(back.B.double() * back.scale, want, rtol=2**-24, atol=0)


def test_dora_is_mlx_lm_dora(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama,
        tmp_path / "peft",
        seed=3,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        use_dora=True,
    )
    out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    expect = {f"model.layers.{i}.{p}.{n}" for i in range(2) for p, n in _paths(["q_proj", "up_proj"])}
    check_against_peft(tmp_path, peft_dir, out, expect, 1e-5)


def test_embedding_lora_is_mlx_lm_lora_embedding(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama,
        tmp_path / "peft",
        seed=4,
        r=4,
        lora_alpha=4,
        target_modules=["embed_tokens", "q_proj"],
        save_embedding_layers=False,
    )
    out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    assert load_file(out / "adapters.safetensors")["model.embed_tokens.lora_a"].shape == (128, 4)
    expect = {"model.embed_tokens"} | {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    check_against_peft(tmp_path, peft_dir, out, expect, 1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_round_trips_are_bit_exact(tmp_path: Path, dora: bool) -> None:
    peft_dir = make_adapter(
        tiny_llama, tmp_path / "peft", seed=5, r=4, lora_alpha=16, target_modules=ALL, use_dora=dora
    )
    mlx_dir = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    back = ao.convert(str(mlx_dir), tmp_path / "back", to="peft")
    a, b = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config = json.loads((back / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 16, dora)
    assert (
        config["base_model_name_or_path"]
        == json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    again = ao.convert(str(back), tmp_path / "again", to="mlx")
    x, y = load_file(mlx_dir / "adapters.safetensors"), load_file(again / "adapters.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bfloat16_factors_keep_their_dtype(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama,
        tmp_path / "peft",
        seed=6,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        save_dtype=torch.bfloat16,
    )
    out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    tensors = load_file(out / "adapters.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    peft = load_file(peft_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.lora_a"], peft[key].T)


def test_a_verb_on_an_mlx_input_writes_mlx(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama, tmp_path / "peft", seed=7, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    mlx_dir = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    scaled = ao.scale(str(mlx_dir), 0.5)
    written = ao.save_adapter(scaled, tmp_path / "half")
    assert (written / "adapters.safetensors").is_file()
    assert json.loads((written / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 1.0


def test_cli_convert(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_llama, tmp_path / "peft", seed=8, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    result = CliRunner().invoke(cli, ["convert", str(peft_dir), "--to", "mlx", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "mlx, 2 modules" in result.output
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "m")])
    assert result.exit_code == 0 and "mlx" in result.output


# ----------------------------------------------------------------------------------------------- refusals


def mlx_dir(tmp_path: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    save_file(tensors, d / "adapters.safetensors")
    full = {"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": {"rank": 2, "scale": 1.0}}
    full.update(config)
    (d / "adapter_config.json").write_text(json.dumps(full))
    return d


PAIR = {
    "model.layers.0.self_attn.q_proj.lora_a": torch.ones(8, 2),
    "model.layers.0.self_attn.q_proj.lora_b": torch.ones(2, 8),
}


@pytest.mark.parametrize(
    ("tensors", "config", "error", "message"),
    [
        (
            {
                "model.layers.0.mlp.switch_mlp.up_proj.lora_a": torch.ones(4, 2, 8),
                "model.layers.0.mlp.switch_mlp.up_proj.lora_b": torch.ones(4, 8, 2),
            },
            {},
            UnsupportedAdapterError,
            "SwitchLinear",
        ),
        (PAIR, {"fine_tune_type": "full"}, UnsupportedAdapterError, "fine_tune_type is full"),
        (PAIR, {"lora_parameters": {"rank": 2, "alpha": 16}}, AdapterFormatError, "no scale"),
        (PAIR, {"lora_parameters": {"rank": 4, "scale": 1.0}}, AdapterFormatError, "rank 2 but"),
        (
            PAIR,
            {"lora_parameters": {"rank": 2, "scale": 1.0, "keys": ["mlp.up_proj"]}},
            AdapterFormatError,
            "keys",
        ),
        (PAIR, {"fine_tune_type": "dora"}, AdapterFormatError, "has no m"),
        (
            {**PAIR, "lm_head.lora_a": torch.ones(8, 2), "lm_head.lora_b": torch.ones(2, 8)},
            {},
            AdapterFormatError,
            "outside the model's layers",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj.lora_a": torch.full((8, 2), float("nan")),
                "model.layers.0.self_attn.q_proj.lora_b": torch.ones(2, 8),
            },
            {},
            AdapterFormatError,
            "NaN",
        ),
    ],
)
def test_what_mlx_lm_would_not_load_is_refused(
    tmp_path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        ao.load_adapter(mlx_dir(tmp_path, tensors, **config))


def test_a_hand_written_mlx_lm_file_is_read(tmp_path: Path) -> None:
    """mlx-lm's own layout (relative keys, num_layers): dW = scale * lora_b.T @ lora_a.T by hand."""
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (in 3, r 2)
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # (r 2, out 2)
    d = mlx_dir(
        tmp_path,
        {"model.layers.5.mlp.up_proj.lora_a": a, "model.layers.5.mlp.up_proj.lora_b": b},
        lora_parameters={"rank": 2, "scale": 0.5, "dropout": 0.0, "keys": ["mlp.up_proj"]},
        model="org/base",
    )
    adapter = ao.load_adapter(d)
    module = adapter.modules["model.layers.5.mlp.up_proj"]
    want = torch.tensor([[0.5, 0.0, 0.0], [0.5, 3.0, 0.0]])  # 0.5 * (a @ b).T
    assert torch.equal(module.delta(), want)
    assert adapter.base_model == "org/base"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_bias": True}, "lora_B bias"),
        ({"target_modules": ["q_proj", "k_proj"], "use_dora": True, "rank_pattern": {}}, None),
    ],
)
def test_what_mlx_lm_cannot_hold_is_refused_on_writing(
    tmp_path: Path, kwargs: dict[str, Any], message: str | None
) -> None:
    if message is None:  # a DoRA-with-LoRA mix needs a combination; build it from two adapters
        a = make_adapter(
            tiny_llama, tmp_path / "a", seed=9, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True
        )
        b = make_adapter(tiny_llama, tmp_path / "b", seed=9, r=2, lora_alpha=2, target_modules=["k_proj"])
        adapter = ao.load_adapter(a)
        mixed = type(adapter)(modules={**adapter.modules, **ao.load_adapter(b).modules})
        with pytest.raises(UnsupportedAdapterError, match="mixes DoRA and LoRA"):
            ao.save_adapter(mixed, tmp_path / "out", format="mlx")
        return
    peft_dir = make_adapter(
        tiny_llama, tmp_path / "p", seed=9, r=2, lora_alpha=2, target_modules=["q_proj"], **kwargs
    )
    with pytest.raises(UnsupportedAdapterError, match=message):
        ao.convert(str(peft_dir), tmp_path / "out", to="mlx")
    assert not (tmp_path / "out").exists()


def test_conv1d_is_refused_on_writing(tmp_path: Path) -> None:
    peft_dir = make_adapter(
        tiny_gpt2, tmp_path / "p", seed=9, r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True
    )
    with pytest.raises(UnsupportedAdapterError, match="Conv1D"):
        ao.convert(str(peft_dir), tmp_path / "out", to="mlx")


@pytest.mark.parametrize("damage", ["truncated", "config"])
def test_a_damaged_mlx_adapter_is_one_error_line(tmp_path: Path, damage: str) -> None:
    """A cut-short adapters.safetensors, or an adapter_config.json that is not JSON: exit 2, nothing written."""
    peft_dir = make_adapter(tiny_llama, tmp_path / "peft", seed=10, r=4, lora_alpha=8, target_modules=ALL)
    bad = ao.convert(str(peft_dir), tmp_path / "bad", to="mlx")
    if damage == "truncated":
        data = (bad / "adapters.safetensors").read_bytes()
        (bad / "adapters.safetensors").write_bytes(data[: len(data) // 3])
    else:
        (bad / "adapter_config.json").write_text('{"fine_tune_type": "lora", ')
    result = CliRunner().invoke(cli, ["resize", str(bad), "--rank", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "bad" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_an_adapter_mlx_lm_saved_reads_as_what_mlx_lm_fuses(tmp_path: Path, fine_tune_type: str) -> None:
    """An adapter saved the way mlx_lm.lora saves one (trainable parameters of the last num_layers
    layers, no keys: every Linear / Embedding there), read by adapterops and written as PEFT: PEFT's
    merge equals mlx-lm's own fuse of the adapter it saved."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.float32)
    model, _ = load_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    tuner.linear_to_lora_layers(model, 1, params, use_dora=fine_tune_type == "dora")
    mx.random.seed(11)
    for _, layer in lora_layers(model).items():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
        if hasattr(layer, "m"):
            layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    saved = tmp_path / "mlx"
    saved.mkdir()
    mx.save_safetensors(str(saved / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {
        "fine_tune_type": fine_tune_type,
        "num_layers": 1,
        "lora_parameters": params,
        "model": str(base),
    }
    (saved / "adapter_config.json").write_text(json.dumps(config))

    adapter = ao.load_adapter(saved)
    assert set(adapter.modules) == set(lora_layers(model))  # layer 1 only: its 7 linears, no embedding
    assert all(n.startswith("model.layers.1.") for n in adapter.modules)
    peft_dir = ao.convert(str(saved), tmp_path / "peft", to="peft")
    merged = peft_merged_state_dict(tiny_llama, peft_dir)
    for name, layer in lora_layers(model).items():
        want = merged[f"{name}.weight"].numpy()
        np.testing.assert_allclose(reference(layer), want, rtol=0, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(f64(layer.fuse().weight), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_an_mlx_adapter_loads_from_the_hub(tmp_path: Path, fake_snapshots: Any) -> None:
    peft_dir = make_adapter(
        tiny_llama, tmp_path / "peft", seed=12, r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    mlx_out = ao.convert(str(peft_dir), tmp_path / "mlx", to="mlx")
    sha = fake_snapshots.add("org/mlx-style", mlx_out)
    adapter = ao.load_adapter("org/mlx-style")
    assert adapter.config["format"] == "mlx" and adapter.source.revision == sha
    local = ao.load_adapter(mlx_out)
    assert all(torch.equal(adapter.modules[n].A, m.A) for n, m in local.modules.items())


def test_cli_reports_the_folding_error_the_written_file_has(tmp_path: Path) -> None:
    """alpha 5 on r 4 folded into the file's scale 2: a 5/8 ratio needs one float32 rounding of lora_b;
    the error convert prints is the one measured on the written file against PEFT's float64 update."""
    peft_dir = make_adapter(
        tiny_llama,
        tmp_path / "peft",
        seed=4,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj"],
        alpha_pattern={"model.layers.0.self_attn.o_proj": 5},
    )
    result = CliRunner().invoke(
        cli, ["convert", str(peft_dir), "--to", "mlx", "-o", str(tmp_path / "m"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    name = "model.layers.0.self_attn.o_proj"
    assert summary["folded"] == [name]
    written, peft = ao.load_adapter(tmp_path / "m").modules[name], ao.load_adapter(peft_dir).modules[name]
    want = peft.B.double() @ peft.A.double() * peft.scale
    got = written.B.double() @ written.A.double() * written.scale
    measured = float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))
    assert 0 < measured < 2**-23
    assert summary["max_rel_error"] == pytest.approx(measured, rel=1e-6)
