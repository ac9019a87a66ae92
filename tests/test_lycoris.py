"""LyCORIS files (LoCon + Tucker, LoHa, LoKr, DoRA), judged by the lycoris-lora package itself and PEFT.

Every file here is trained-shape output of lycoris-lora (``create_lycoris`` on a tiny diffusers UNet,
its modules' own parameters set to seeded random values, saved under kohya's ``lora_unet_`` prefix
as LyCORIS's kohya network does). The reference update of each module is what that module's
forward pass applies: ``get_weight(shape) * scalar`` (LoHa, LoKr) or ``make_weight() * scale``
(LoCon), and for DoRA ``apply_weight_decompose(W + that) - W``, all in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lycoris  # a test extra (lycoris-lora): always installed where the suite runs
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from adapterops.adapter import LoraModule
from adapterops.cli import cli
from adapterops.errors import AdapterOpsError, RankCapWarning
from adapterops.io import load_adapter, save_adapter
from adapterops.merging import merge
from tests.support.diffusion import tiny_flux, tiny_unet
from tests.support.factories import peft_deltas


def _unet() -> torch.nn.Module:
    return tiny_unet(0)


@contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unet")
    _unet().save_pretrained(path)
    return path


class Made:
    """A LyCORIS file written by lycoris-lora, with its modules' float64 reference updates."""

    def __init__(self, path: Path, network: Any, names: dict[str, str], keys: list[str]) -> None:
        self.path, self.network, self.names, self.keys = path, network, names, keys

    def reference(self) -> dict[str, torch.Tensor]:
        """{diffusers module name: float64 weight delta} as each LyCORIS module's forward applies it."""
        out = {}
        with torch.no_grad():
            for lora in self.network.loras:
                W = lora.org_module[0].weight.double()
                if type(lora).__name__ == "LoConModule":
                    diff = lora.make_weight() * lora.scale
                else:
                    diff = lora.get_weight(lora.shape) * lora.scalar
                if lora.wd:
                    diff = lora.apply_weight_decompose(W + diff) - W
                out[self.names[lora.lora_name]] = diff.reshape(W.shape)
        return out


def make(
    path: Path,
    algo: str,
    *,
    dtype: torch.dtype = torch.float32,
    linear_only: bool = False,
    seed: int = 1,
    **kwargs: Any,
) -> Made:
    """``create_lycoris(unet, algo=algo, **kwargs)`` with seeded random parameters, saved at ``path``
    in ``dtype``; the network's modules then hold exactly the saved values, in float64."""
    unet = _unet().double()
    names = {f"lycoris_{n}".replace(".", "_"): n for n, _ in unet.named_modules()}
    with _quiet():
        network = lycoris.create_lycoris(unet, 1.0, algo=algo, **kwargs)
        network.apply_to()
    network.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    state = network.state_dict()
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        noise = torch.randn(value.shape, generator=g, dtype=torch.float64)
        state[key] = value * (1 + 0.2 * noise.abs()) if key.endswith(".dora_scale") else noise
        state[key] = state[key].to(dtype).double()
    if linear_only:
        convs = {k for k, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
        state = {k: v for k, v in state.items() if names[k.split(".")[0]] not in convs}
        network.loras = [m for m in network.loras if names[m.lora_name] not in convs]
    network.load_state_dict(state, strict=False)
    tensors = {"lora_unet_" + k.removeprefix("lycoris_"): v.to(dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": algo})
    return Made(path, network, names, sorted(tensors))


def _ours(module: LoraModule, W: torch.Tensor) -> torch.Tensor:
    """Our module's update in float64: s B A, or for DoRA m * V / ||V||_row - W with V = W + s B A."""
    delta = module.delta(torch.float64)
    if module.magnitude is None:
        return delta
    V = W.double() + delta
    norms = V.reshape(V.shape[0], -1).norm(dim=1)
    return V * (module.magnitude.double() / norms).reshape(-1, *(1 for _ in V.shape[1:])) - W.double()


def _base(unet_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(unet_dir / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        return {k.removesuffix(".weight"): f.get_tensor(k) for k in f.keys() if k.endswith(".weight")}


def _compare(made: Made, adapter: Any, unet_dir: Path, tol: float) -> None:
    reference, base = made.reference(), _base(unet_dir)
    assert set(adapter.modules) == set(reference)
    for name, ref in reference.items():
        ours = _ours(adapter.modules[name], base[name]).reshape(ref.shape)
        assert ref.abs().max() > 0, name
        assert float((ours - ref).norm() / ref.norm()) <= tol, name


def _has(made: Made, *parts: str) -> None:
    for part in parts:
        assert any(k.endswith("." + part) for k in made.keys), (part, made.keys[:8])


# ------------------------------------------------------------------------------------- the algorithms

CASES = {
    # name: (algo, create_lycoris options, parts the file must hold)
    "loha": ("loha", {"linear_dim": 2, "linear_alpha": 3}, ("hada_w1_a", "hada_w2_b")),
    "loha_tucker": ("loha", {"linear_dim": 2, "linear_alpha": 3, "use_tucker": True}, ("hada_t1", "hada_t2")),
    "lokr_whole": ("lokr", {"linear_dim": 2, "linear_alpha": 3}, ("lokr_w1", "lokr_w2", "lokr_w2_a")),
    "lokr_factored": (
        "lokr",
        {"linear_dim": 1, "linear_alpha": 3, "decompose_both": True, "factor": 4},
        ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a"),
    ),
    "lokr_tucker": ("lokr", {"linear_dim": 1, "linear_alpha": 3, "use_tucker": True}, ("lokr_t2",)),
    "locon_tucker_dora": (
        "lora",
        {"linear_dim": 2, "linear_alpha": 3, "use_tucker": True, "dora_wd": True},
        ("lora_mid.weight", "dora_scale"),
    ),
    "loha_dora": ("loha", {"linear_dim": 2, "linear_alpha": 1, "dora_wd": True}, ("dora_scale",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_module_is_the_update_lycoris_applies(tmp_path: Path, unet_dir: Path, case: str) -> None:
    algo, options, parts = CASES[case]
    made = make(tmp_path / f"{case}.safetensors", algo, **options)
    _has(made, *parts)
    adapter = load_adapter(made.path, base=unet_dir)
    assert adapter.config["format"] == "lycoris"
    assert not adapter.report  # every rank fits its layer here: nothing capped
    _compare(made, adapter, unet_dir, 1e-12)


def test_bfloat16_loha_is_exact_in_float32(tmp_path: Path, unet_dir: Path) -> None:
    made = make(tmp_path / "bf16.safetensors", "loha", dtype=torch.bfloat16, linear_dim=2, linear_alpha=3)
    adapter = load_adapter(made.path, base=unet_dir)
    assert {m.A.dtype for m in adapter.modules.values()} == {torch.float32}
    _compare(made, adapter, unet_dir, 1e-15)


def test_rank_over_the_layers_full_rank_is_capped_and_reported(tmp_path: Path, unet_dir: Path) -> None:
    made = make(tmp_path / "loha4.safetensors", "loha", linear_dim=4, linear_alpha=3)
    with pytest.warns(RankCapWarning, match="full rank"):
        adapter = load_adapter(made.path, base=unet_dir)
    capped = {r.name: r for r in adapter.report}
    assert capped and all(r.rank_in == 16 and r.rank_out < 16 and r.note for r in capped.values())
    for name, r in capped.items():
        m = adapter.modules[name]
        assert m.rank == r.rank_out == min(m.out_features, m.in_features)
    _compare(made, adapter, unet_dir, 1e-12)


def test_scale_is_applied_once_as_the_forward_pass_does(tmp_path: Path, unet_dir: Path) -> None:
    """LyCORIS 4.1.3's get_diff_weight (its merge helper) multiplies LoHa and LoKr by alpha / r a second
    time; the forward pass (and adapterops) apply it once. Checked on a Linear through forward itself."""
    made = make(tmp_path / "loha.safetensors", "loha", linear_only=True, linear_dim=2, linear_alpha=3)
    adapter = load_adapter(made.path)  # linear modules only: names from kohya's vocabulary, no base
    lora = made.network.loras[0]
    name = made.names[lora.lora_name]
    x = torch.randn(3, lora.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        applied = lora(x) - lora.org_forward(x)
        twice = lora.get_diff_weight()[0]
    ours = adapter.modules[name].delta(torch.float64)
    assert torch.allclose(applied, x @ ours.T, rtol=1e-12, atol=1e-12)
    assert lora.scale == 1.5 and torch.allclose(twice, 1.5 * ours, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------- PEFT and writing


def test_converted_peft_adapter_gives_the_same_updates_in_peft(tmp_path: Path, unet_dir: Path) -> None:
    for case in ("loha_tucker", "locon_tucker_dora"):
        algo, options, _ = CASES[case]
        made = make(tmp_path / f"{case}.safetensors", algo, **options)
        save_adapter(load_adapter(made.path, base=unet_dir), tmp_path / case, format="peft")
        deltas, reference = peft_deltas(_unet, tmp_path / case), made.reference()
        assert set(deltas) == set(reference)
        for name, ref in reference.items():
            assert float((deltas[name] - ref).norm() / ref.norm()) <= 1e-10, (case, name)


def test_written_locon_dora_is_read_by_lycoris_and_round_trips(tmp_path: Path, unet_dir: Path) -> None:
    made = make(tmp_path / "loha.safetensors", "loha", linear_dim=2, linear_alpha=3, dora_wd=True)
    adapter = load_adapter(made.path, base=unet_dir)
    out = save_adapter(adapter, tmp_path / "locon.safetensors")  # the format read: lycoris (LoCon keys)
    with safe_open(str(out), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    assert any(k.endswith(".dora_scale") for k in written)
    assert not any(".hada_" in k for k in written) and "ss_network_args" not in metadata
    # lycoris-lora itself loads what was written (its loader looks for its own "lycoris_" prefix), and
    # applies the same updates
    unet = _unet().double()
    weights = {k.replace("lora_unet_", "lycoris_", 1): v.double() for k, v in written.items()}
    with _quiet():
        network, _ = lycoris.create_lycoris_from_weights(1.0, str(out), unet, weights)
    for lora in network.loras:  # it builds float32 modules; hold the written values exactly
        lora.to(torch.float64)
        own = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".")[0] == lora.lora_name}
        lora.load_state_dict(own, strict=False)
    assert {type(m).__name__ for m in network.loras} == {"LoConModule"}
    assert len(network.loras) == len(adapter.modules)
    _compare(Made(out, network, made.names, sorted(written)), adapter, unet_dir, 1e-12)
    # and adapterops reads it back to the same modules
    back = load_adapter(out, base=unet_dir)
    for name, m in adapter.modules.items():
        assert torch.equal(back.modules[name].delta(torch.float64), m.delta(torch.float64))
        assert torch.equal(back.modules[name].magnitude, m.magnitude)


def test_cli_convert_to_peft(tmp_path: Path) -> None:
    options = {"linear_dim": 1, "linear_alpha": 3, "decompose_both": True, "factor": 4}
    made = make(tmp_path / "lokr.safetensors", "lokr", linear_only=True, **options)
    result = CliRunner().invoke(
        cli, ["convert", str(made.path), "--to", "peft", "-o", str(tmp_path / "peft")]
    )
    assert result.exit_code == 0, result.output
    deltas, reference = peft_deltas(_unet, tmp_path / "peft"), made.reference()
    assert set(deltas) == set(reference)
    for name, ref in reference.items():
        assert float((deltas[name] - ref).norm() / ref.norm()) <= 1e-10, name


def test_merge_into_the_unet_adds_what_lycoris_applies(tmp_path: Path, unet_dir: Path) -> None:
    """adapterops merges into model.safetensors checkpoints: the UNet's weights are saved as one."""
    made = make(tmp_path / "lokr.safetensors", "lokr", linear_dim=2, linear_alpha=3)
    (tmp_path / "ckpt").mkdir()
    save_file(_unet().state_dict(), str(tmp_path / "ckpt" / "model.safetensors"))
    merge(tmp_path / "ckpt", [load_adapter(made.path, base=unet_dir)], out=tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        merged = {k.removesuffix(".weight"): f.get_tensor(k) for k in f.keys() if k.endswith(".weight")}
    base = _base(unet_dir)
    for name, ref in made.reference().items():
        expected = (base[name].double() + ref).float()  # the float32 base, rounded once
        assert torch.allclose(merged[name], expected, rtol=2**-23, atol=0), name


# ------------------------------------------------------------------------------------- refused


def _refused(path: Path, *words: str, base: Path | None = None) -> None:
    with pytest.raises(AdapterOpsError) as excinfo:
        load_adapter(path, base=base)
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_files_are_refused_with_one_line(tmp_path: Path, unet_dir: Path) -> None:
    made = make(tmp_path / "loha.safetensors", "loha", linear_only=True, linear_dim=2, linear_alpha=3)
    with safe_open(str(made.path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

    def variant(name: str, changed: dict[str, torch.Tensor | None]) -> Path:
        out = {**tensors, **{k: v for k, v in changed.items() if v is not None}}
        out = {k: v for k, v in out.items() if changed.get(k, 0) is not None}
        save_file(out, str(tmp_path / name))
        return tmp_path / name

    _refused(
        variant("oft.safetensors", {f"{key}.oft_blocks": torch.zeros(2, 4, 4)}), "oft_blocks", "not read"
    )
    _refused(variant("mixed.safetensors", {f"{key}.lokr_w1": torch.ones(2, 2)}), key, "LoHa and LoKr")
    _refused(variant("shape.safetensors", {f"{key}.hada_w1_b": torch.ones(3, 8)}), key, "hada_w1_b (3, 8)")
    nan = tensors[f"{key}.hada_w2_a"].clone()
    nan[0, 0] = float("nan")
    _refused(variant("nan.safetensors", {f"{key}.hada_w2_a": nan}), key, "NaN")
    _refused(variant("missing.safetensors", {f"{key}.hada_w2_b": None}), key, "hada_w2_b")
    _refused(variant("t1.safetensors", {f"{key}.lokr_t1": torch.ones(1, 1, 1, 1)}), key)
    column = torch.ones(1, tensors[f"{key}.hada_w1_b"].shape[1])
    _refused(variant("column.safetensors", {f"{key}.dora_scale": column}), key, "wd_on_out=False")
    _refused(
        variant(
            "base.safetensors", {f"{key}.hada_w1_a": torch.ones(5, 2), f"{key}.hada_w2_a": torch.ones(5, 2)}
        ),
        key,
        "base",
        base=unet_dir,
    )

    # a real column-norm DoRA file (wd_on_output=False): adapterops's DoRA normalizes rows
    column_file = make(
        tmp_path / "col.safetensors", "loha", linear_only=True, dora_wd=True, wd_on_output=False
    )
    _refused(column_file.path, "wd_on_out=False", "rows")

    # LoHa on a conv layer stores the kernel flattened: without the base it is refused, with it read
    conv = make(tmp_path / "conv.safetensors", "loha", linear_dim=2, linear_alpha=3)
    _refused(conv.path, "base=")
    assert load_adapter(conv.path, base=unet_dir).modules["conv_in"].kernel_size == (3, 3)


def test_plain_lora_files_stay_kohya(tmp_path: Path) -> None:
    made = make(tmp_path / "locon.safetensors", "lora", linear_only=True, linear_dim=2, linear_alpha=3)
    assert load_adapter(made.path).config["format"] == "kohya"
    options = {"linear_only": True, "linear_dim": 2, "linear_alpha": 3, "dora_wd": True}
    dora = make(tmp_path / "dora.safetensors", "lora", **options)
    adapter = load_adapter(dora.path)
    assert adapter.config["format"] == "lycoris" and adapter.is_dora
    # a LoCon + DoRA file is written back bit for bit
    out = save_adapter(adapter, tmp_path / "again.safetensors")
    with safe_open(str(dora.path), framework="pt") as f, safe_open(str(out), framework="pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for key in f.keys():
            a, b = f.get_tensor(key), g.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a, b), key
        assert (g.metadata() or {}).get("ss_network_args") == "lora"


def test_alpha_zero_means_rank_and_text_encoder_names(tmp_path: Path) -> None:
    """LyCORIS reads alpha 0 (or none) as alpha = r, scale 1; lora_te1_ keys name the first text encoder."""
    made = make(tmp_path / "loha.safetensors", "loha", linear_only=True, linear_dim=2, linear_alpha=3)
    with safe_open(str(made.path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    renamed = {k.replace(unet_key, te_key): v for k, v in tensors.items()}
    renamed[f"{te_key}.alpha"] = torch.tensor(0.0)
    save_file(renamed, str(tmp_path / "te.safetensors"))
    adapter = load_adapter(tmp_path / "te.safetensors")
    te = adapter.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert te.scale == 1.0
    unet_module = load_adapter(made.path).modules[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ]
    assert torch.equal(te.delta(torch.float64) * 1.5, unet_module.delta(torch.float64))


def test_a_flux_loha_with_dora_splits_by_the_diffusers_base_rows_exactly(tmp_path: Path) -> None:
    """LyCORIS names go through kohya's naming: a LoHa + DoRA on BFL's fused qkv, read against a
    diffusers Flux transformer, becomes to_q/to_k/to_v whose updates and magnitudes are the rows of
    the fused module's (read without a base, in BFL's names): rows are independent in W + dW and in
    DoRA's row norm."""
    flux = tiny_flux(0)
    flux.save_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(4)
    out, inp, r = 3 * 8, 8, 2
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {
            f"{key}.hada_w1_a": torch.randn(out, r, generator=g),
            f"{key}.hada_w1_b": torch.randn(r, inp, generator=g),
            f"{key}.hada_w2_a": torch.randn(out, r, generator=g),
            f"{key}.hada_w2_b": torch.randn(r, inp, generator=g),
            f"{key}.alpha": torch.tensor(1.0),
            f"{key}.dora_scale": torch.rand(out, 1, generator=g) + 0.5,
        },
        str(tmp_path / "loha.safetensors"),
    )
    whole = load_adapter(tmp_path / "loha.safetensors").modules["double_blocks.0.img_attn.qkv"]
    split = load_adapter(tmp_path / "loha.safetensors", base=tmp_path / "transformer").modules
    dw, magnitude = whole.delta(torch.float64), whole.magnitude
    assert magnitude is not None
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        part = split[f"transformer_blocks.0.attn.{name}"]
        rows = slice(8 * i, 8 * (i + 1))
        assert torch.equal(part.delta(torch.float64), dw[rows])
        assert part.magnitude is not None and torch.equal(part.magnitude, magnitude[rows])
