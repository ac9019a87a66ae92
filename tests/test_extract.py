"""``extract``: the LoRA of FINETUNED - BASE, judged by PEFT and by float64 SVDs written here.

Each fine-tune is a tiny real model (``tests/support/factories.py``) with known changes: low-rank
updates of chosen weights (so the exact rank is known), full-rank updates (so truncation has an
optimal error to compare with), and changed norms, biases and embeddings. The judge is PEFT itself:
``PeftModel.from_pretrained`` on the base, ``merge_and_unload``, compared with the fine-tune's stored
tensors, and its logits.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterops as ao
from adapterops.adapter import Solver
from adapterops.ops import extract as ops_extract
from adapterops.ops.extract import factor_difference, spectrum
from adapterops.ops.lowrank import RankPolicy
from tests.support.factories import (
    peft_logits,
    peft_merged_state_dict,
    save_base_checkpoint,
    tiny_conv,
    tiny_gpt2,
    tiny_llama,
)
from tests.support.fakehub import FakeSnapshots
from tests.test_cli import run

Factory = Callable[[], nn.Module]
IDS = torch.tensor([[1, 5, 9, 33, 64, 127, 2]])


def finetune(
    factory: Factory, change: Callable[[nn.Module, torch.Generator], None], seed: int = 7
) -> Factory:
    """``factory``'s model with ``change`` applied to it (seeded, no_grad): a fine-tune of it."""

    def make() -> nn.Module:
        model = factory()
        with torch.no_grad():
            change(model, torch.Generator().manual_seed(seed))
        return model

    make.__name__ = getattr(factory, "__name__", "model")  # plain models' config.json names it
    return make


def low_rank(pattern: str, rank: int, size: float = 0.05) -> Callable[[nn.Module, torch.Generator], None]:
    """Adds a rank-``rank`` update (``rank`` 0: full rank, decaying spectrum) to each 2-D parameter whose
    name matches ``pattern``."""

    def change(model: nn.Module, gen: torch.Generator) -> None:
        for name, p in model.named_parameters():
            if p.dim() == 2 and re.search(pattern, name):
                rows, cols = p.shape
                r = rank or min(rows, cols)
                decay = torch.tensor([0.7**i for i in range(r)], dtype=torch.float64)
                update = (torch.randn(rows, r, generator=gen, dtype=torch.float64) * decay) @ torch.randn(
                    r, cols, generator=gen, dtype=torch.float64
                )
                p.add_((size * update / update.norm() * p.norm()).to(p.dtype))

    return change


def shift(pattern: str, by: float = 0.1) -> Callable[[nn.Module, torch.Generator], None]:
    """Adds random values to each 1-D parameter (norm weights, biases) whose name matches ``pattern``."""

    def change(model: nn.Module, gen: torch.Generator) -> None:
        for name, p in model.named_parameters():
            if p.dim() == 1 and re.search(pattern, name):
                p.add_(by * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))

    return change


def both(
    *changes: Callable[[nn.Module, torch.Generator], None],
) -> Callable[[nn.Module, torch.Generator], None]:
    def change(model: nn.Module, gen: torch.Generator) -> None:
        for c in changes:
            c(model, gen)

    return change


def stored(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) checkpoint directory, as float64."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(path).items()})
    return out


def pair(
    tmp: Path, base: Factory, ft: Factory, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> tuple[Path, Path]:
    return (
        save_base_checkpoint(ft, tmp / "ft", dtype=dtype, **kwargs),
        save_base_checkpoint(base, tmp / "base", dtype=dtype, **kwargs),
    )


def check_against_peft(
    base_factory: Factory,
    adapter: ao.Adapter,
    out: Path,
    ft_dir: Path,
    base_dir: Path,
    *,
    slack: float = 1e-9,
) -> dict[str, torch.Tensor]:
    """Save ``adapter``; PEFT merges it into the base: every LoRA module's relative error against the
    fine-tune is the reported one, tensors left out are the base's, every other tensor is the
    fine-tune's own (bias changes to float32 rounding). Returns PEFT's merged state dict."""
    ao.save_adapter(adapter, out)
    merged = peft_merged_state_dict(base_factory, out)
    ft, base = stored(ft_dir), stored(base_dir)
    reports = {r.name: r for r in adapter.report}
    skipped = set((adapter.provenance or {}).get("skipped") or {})
    for key, want in ft.items():
        got = merged[key]
        module = key.removesuffix(".weight")
        if module in reports and key.endswith(".weight"):
            change = float((want - base[key]).norm())
            measured = float((got - want).norm()) / change
            assert measured == pytest.approx(reports[module].rel_error, abs=slack, rel=1e-6), key
        elif key in skipped:
            assert torch.equal(got, base[key]), key
        else:  # saved whole (exact), unchanged, or a bias change stored in float32 (lora_bias)
            change = float((want - base[key]).abs().max())
            assert float((got - want).abs().max()) <= 2**-24 * change + 1e-12 * float(want.abs().max()), key
    return merged


# ------------------------------------------------------------------------------------- exact ranks


def test_a_fine_tune_of_known_rank_is_reproduced_through_peft(tmp_path: Path) -> None:
    """Rank-2 updates on every linear layer, the embedding and the head, a changed norm: rank 2 holds
    them; PEFT's merge is the fine-tune to float32 rounding (of the stored weights), and so are its logits."""
    ft_factory = finetune(
        tiny_llama, both(low_rank(r"proj|embed_tokens|lm_head", 2), shift(r"layers\.1\..*norm"))
    )
    ft_dir, base_dir = pair(tmp_path, tiny_llama, ft_factory)
    adapter = ao.extract(ft_dir, base_dir, rank=2)

    assert {r.rank_out for r in adapter.report} == {2}
    assert all(r.rel_error < 1e-6 and r.solver is Solver.DENSE for r in adapter.report)
    assert len(adapter.report) == 2 * 7 + 2
    record = adapter.provenance
    assert record is not None
    assert record["modules_to_save"] == [
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]
    assert record["unchanged"] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.norm",
    ]
    assert record["layers"].endswith("(LlamaForCausalLM)") and record["rank"] == 2

    check_against_peft(tiny_llama, adapter, tmp_path / "out", ft_dir, base_dir, slack=1e-7)
    with torch.no_grad():
        want = ft_factory().double()(input_ids=IDS).logits
    got = peft_logits(tiny_llama, tmp_path / "out", IDS)  # the unmerged PEFT model
    assert float((got - want).abs().max()) < 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["lora_alpha"] == config["r"] == 2
    assert "model.embed_tokens" in config["target_modules"]


def test_embedding_lora_uses_peft_embedding_layout(tmp_path: Path) -> None:
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank("embed_tokens", 3)))
    adapter = ao.extract(ft_dir, base_dir, rank=3)
    (module,) = adapter.modules.values()
    assert module.kind is ao.ModuleKind.EMBEDDING and module.A.shape == (3, 128) and module.B.shape == (32, 3)
    ao.save_adapter(adapter, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors").keys()
    assert sorted(keys) == [
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    ]
    check_against_peft(tiny_llama, adapter, tmp_path / "out2", ft_dir, base_dir, slack=1e-7)


# ------------------------------------------------------------------------------- truncation errors


@pytest.mark.parametrize(
    "target",
    [{"rank": 3}, {"rank": 20}, {"energy": 0.9}, {"sv_ratio": 2.0}, {"energy": 0.99, "max_rank": 2}],
)
def test_truncation_error_is_the_optimal_tail(tmp_path: Path, target: dict[str, Any]) -> None:
    """Full-rank updates: each module's reported error is the Eckart-Young tail of a float64 SVD
    of W_ft - W_base computed here, and PEFT's merge has exactly that error."""
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank(r"layers\.0\.", 0)))
    adapter = ao.extract(ft_dir, base_dir, **target)
    ft, base = stored(ft_dir), stored(base_dir)
    assert len(adapter.report) == 7
    for report in adapter.report:
        S = torch.linalg.svdvals(ft[f"{report.name}.weight"] - base[f"{report.name}.weight"])
        k = report.rank_out
        if "max_rank" in target:  # energy 0.99 needs more than 2 everywhere: the cap holds, and says so
            assert (
                k == 2 and report.note is not None and report.note.startswith("max_rank 2 kept: energy 0.99")
            )
        elif "rank" in target:  # k_proj and v_proj (16 x 32) hold 16 at most: all of it, with a note
            assert k == min(target["rank"], S.numel())
            assert (report.note is not None) == (k < target["rank"])
        elif "energy" in target:  # the fewest values reaching the target
            share = torch.cumsum(S**2, 0) / (S**2).sum()
            assert share[k - 1] >= 0.9 > share[k - 2]
        else:
            assert S[0] / S[k - 1] <= 2.0 < S[0] / S[k]
        optimal = float(S[k:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        if k < S.numel():
            assert report.rel_error == pytest.approx(optimal, rel=1e-5)
        else:  # the whole difference, to the float32 rounding of the factors
            assert report.rel_error < 1e-6
        assert report.energy_kept == pytest.approx(1 - optimal**2, rel=1e-9)
    check_against_peft(tiny_llama, adapter, tmp_path / "out", ft_dir, base_dir)


def test_randomized_solver_matches_the_exact_error(tmp_path: Path) -> None:
    """Modules above ``exact_limit`` take the randomized path; their error is the exact SVD's."""
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank(r"layers\.1\.", 0)))
    exact = {r.name: r for r in ao.extract(ft_dir, base_dir, rank=4).report}
    randomized = ao.extract(ft_dir, base_dir, rank=4, exact_limit=8)
    assert {r.solver for r in randomized.report} == {Solver.RANDOMIZED}
    for report in randomized.report:
        assert report.rel_error == pytest.approx(exact[report.name].rel_error, rel=1e-4)
    check_against_peft(tiny_llama, randomized, tmp_path / "out", ft_dir, base_dir)


def test_factor_difference_worked_example_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """diag(3, 2, 1) at rank 2 keeps 3 and 2: energy 13/14, error sqrt(1/14) (the module docstring)."""
    M = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    low = factor_difference(M, RankPolicy(rank=2), exact_limit=8, dtype=torch.float64)
    assert (low.energy_kept, low.rel_error) == (pytest.approx(13 / 14), pytest.approx((1 / 14) ** 0.5))
    assert torch.allclose(low.B @ low.A, torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)))
    # a rank above the matrix's is the whole matrix, not an error
    assert factor_difference(M, RankPolicy(rank=9), exact_limit=8, dtype=torch.float64).A.shape[0] == 3

    gen = torch.Generator().manual_seed(0)
    M = torch.randn(300, 200, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -3, 200, dtype=torch.float64)
    )
    S = torch.linalg.svdvals(M)
    optimal = float(S[10:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
    fast = factor_difference(M, RankPolicy(rank=10), exact_limit=50, dtype=torch.float32)
    assert fast.solver is Solver.RANDOMIZED and fast.rel_error == pytest.approx(optimal, rel=1e-3)
    # a sketch that one more iteration would still improve is replaced by the exact SVD
    monkeypatch.setattr(ops_extract, "REFINE_TOL", -1.0)
    slow = factor_difference(M, RankPolicy(rank=10), exact_limit=50, dtype=torch.float32)
    assert slow.solver is Solver.DENSE and slow.rel_error == pytest.approx(optimal, rel=1e-6)


# ---------------------------------------------------------------------------- layouts and storage


def test_gpt2_conv1d_weights_biases_and_norms(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (in, out): the LoRA is of the transposed difference, with
    fan_in_fan_out; changed biases go into lora_bias and a changed final norm is stored whole."""
    change = both(low_rank(r"c_attn\.weight|c_fc\.weight", 2), shift(r"c_attn\.bias|ln_f"))
    ft_dir, base_dir = pair(tmp_path, tiny_gpt2, finetune(tiny_gpt2, change))
    adapter = ao.extract(ft_dir, base_dir, rank=2)
    assert sorted(adapter.modules) == [
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    ]
    assert all(m.transposed and m.A.shape == (2, 32) for m in adapter.modules.values())
    assert adapter.modules["transformer.h.0.attn.c_attn"].bias is not None
    assert adapter.modules["transformer.h.0.mlp.c_fc"].bias is None  # written as zeros: lora_bias is global
    check_against_peft(tiny_gpt2, adapter, tmp_path / "out", ft_dir, base_dir, slack=1e-7)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["fan_in_fan_out"], config["lora_bias"], config["modules_to_save"]) == (
        True,
        True,
        ["transformer.ln_f"],
    )

    # --biases skip: the bias changes are left out, reported, and warned about
    with pytest.warns(ao.ApproximationWarning, match=r"2 changed tensor\(s\) left out"):
        skipped = ao.extract(ft_dir, base_dir, rank=2, biases="skip")
    assert set(skipped.provenance["skipped"]) == {f"transformer.h.{i}.attn.c_attn.bias" for i in (0, 1)}
    check_against_peft(tiny_gpt2, skipped, tmp_path / "skipped", ft_dir, base_dir, slack=1e-7)


@pytest.mark.slow
def test_sharded_bf16_checkpoints(tmp_path: Path) -> None:
    """bf16 checkpoints in several shards: the difference of the stored bf16 values is what is factored
    (float32 factors), and PEFT's merge on the bf16 base has the reported error."""
    bf16_llama = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731  (the base as stored)
    ft_factory = finetune(bf16_llama, low_rank(r"proj", 0, size=0.2))
    ft_dir, base_dir = pair(tmp_path, bf16_llama, ft_factory, dtype=torch.bfloat16, max_shard_size="20KB")
    assert len(list(ft_dir.glob("*.safetensors"))) > 2
    adapter = ao.extract(ft_dir, base_dir, energy=0.95)
    assert adapter.dtype == torch.float32 and len(adapter.report) == 14
    check_against_peft(bf16_llama, adapter, tmp_path / "out", ft_dir, base_dir)


def test_conv_layers_of_a_non_transformers_model(tmp_path: Path) -> None:
    """A plain torch model (layer types guessed, and said so): Conv2d LoRA, conv bias via lora_bias."""
    change = both(low_rank(r"head\.weight", 2), shift(r"conv1\.bias|head\.bias"))

    def conv_change(model: nn.Module, gen: torch.Generator) -> None:
        change(model, gen)
        conv1 = model.get_submodule("conv1")
        conv1.weight.add_(0.05 * torch.randn(conv1.weight.shape, generator=gen))

    ft_dir, base_dir = pair(tmp_path, tiny_conv, finetune(tiny_conv, conv_change))
    with pytest.warns(UserWarning, match="layer types are guessed"):
        adapter = ao.extract(ft_dir, base_dir, rank=4)
    conv = adapter.modules["conv1"]
    assert conv.kind is ao.ModuleKind.CONV and conv.kernel_size == (3, 3) and conv.rank == 4
    assert adapter.provenance["layers"] == "guessed from tensor names and shapes"
    check_against_peft(tiny_conv, adapter, tmp_path / "out", ft_dir, base_dir)


# ------------------------------------------------------------------------------ embeddings, tying


def test_embeddings_saved_whole_or_skipped(tmp_path: Path) -> None:
    change = both(low_rank(r"embed_tokens|lm_head", 0), low_rank(r"q_proj", 1))
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, change))
    saved = ao.extract(ft_dir, base_dir, rank=1, embeddings="save")
    assert saved.provenance["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert sorted(saved.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    check_against_peft(tiny_llama, saved, tmp_path / "saved", ft_dir, base_dir, slack=1e-7)

    with pytest.warns(ao.ApproximationWarning, match=r"2 changed tensor\(s\) left out"):
        skipped = ao.extract(ft_dir, base_dir, rank=1, embeddings="skip")
    assert sorted(skipped.provenance["skipped"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    check_against_peft(tiny_llama, skipped, tmp_path / "skipped", ft_dir, base_dir, slack=1e-7)


def test_tied_embeddings(tmp_path: Path) -> None:
    """A changed embedding tied to lm_head: a LoRA on it would leave the head behind in PEFT, so it is
    refused; saved whole it is saved for both (ensure_weight_tying), and PEFT reproduces the logits."""
    tied = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    ft_factory = finetune(tied, both(low_rank("embed_tokens", 0), low_rank("v_proj", 1)))
    ft_dir, base_dir = pair(tmp_path, tied, ft_factory)
    with pytest.raises(
        ao.UnsupportedAdapterError, match=r"model.embed_tokens: the weight changed, and lm_head reads"
    ):
        ao.extract(ft_dir, base_dir, rank=2)
    adapter = ao.extract(ft_dir, base_dir, rank=2, embeddings="save")
    assert adapter.config["ensure_weight_tying"] is True
    assert adapter.provenance["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    ao.save_adapter(adapter, tmp_path / "out")
    assert ao.load_adapter(tmp_path / "out").config["ensure_weight_tying"] is True  # kept on reading
    with warnings.catch_warnings():  # PEFT warns about tied layers in an adapter without ensure_weight_tying
        warnings.simplefilter("error")
        got = peft_logits(tied, tmp_path / "out", IDS)
    with torch.no_grad():
        want = ft_factory().double()(input_ids=IDS).logits
    assert float((got - want).abs().max()) < 1e-5


# -------------------------------------------------------------------------------------- refusals


def test_refusals_name_what_and_how_to_fix(tmp_path: Path) -> None:
    llama = save_base_checkpoint(tiny_llama, tmp_path / "llama", dtype=torch.float32)
    gpt2 = save_base_checkpoint(tiny_gpt2, tmp_path / "gpt2", dtype=torch.float32)
    with pytest.raises(
        ao.InvalidInputError,
        match=r"extract needs a target: give rank=K, energy=F or sv_ratio=R; or max_rank=K alone, or a budget",
    ):
        ao.extract(llama, llama)
    with pytest.raises(ao.InvalidInputError, match=r"budget_params chooses every module's rank.*drop rank"):
        ao.extract(llama, llama, budget_params="1M", rank=4)
    with pytest.raises(
        ao.IncompatibleAdaptersError, match=r"are different models \(model_type 'llama' and 'gpt2'"
    ):
        ao.extract(llama, gpt2, rank=4)
    with pytest.raises(ao.InvalidInputError, match=r"no tensor differs; there is nothing to extract"):
        ao.extract(llama, llama, rank=4)

    def bigger_vocab() -> nn.Module:
        model = tiny_llama()
        model.resize_token_embeddings(130)
        return model

    resized = save_base_checkpoint(bigger_vocab, tmp_path / "resized", dtype=torch.float32)
    with pytest.raises(
        ao.IncompatibleAdaptersError, match=r"resized the vocabulary.*resize_token_embeddings\(130\)"
    ):
        ao.extract(resized, llama, rank=4)

    missing = save_base_checkpoint(tiny_llama, tmp_path / "missing", dtype=torch.float32)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ao.IncompatibleAdaptersError, match=r"lacks 1 tensor\(s\) of the base \(e.g. model.norm.weight\)"
    ):
        ao.extract(missing, llama, rank=4)

    untied = save_base_checkpoint(
        lambda: tiny_llama(tie_word_embeddings=True), tmp_path / "tied", dtype=torch.float32
    )
    with pytest.raises(ao.IncompatibleAdaptersError, match=r"tie_word_embeddings"):
        ao.extract(untied, llama, rank=4)

    # a changed wpe (an embedding LoRA) and changed biases: PEFT has no lora_bias on embeddings
    ft_dir, base_dir = pair(
        tmp_path / "gpt2-pair", tiny_gpt2, finetune(tiny_gpt2, both(low_rank("wpe", 1), shift("c_attn.bias")))
    )
    with pytest.raises(ao.UnsupportedAdapterError, match=r"no lora_bias for the embedding transformer.wpe"):
        ao.extract(ft_dir, base_dir, rank=1)
    with pytest.raises(ao.InvalidInputError, match=r"exclude '\(' is not a regular expression"):
        ao.extract(ft_dir, base_dir, rank=1, exclude="(")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_json_verbose_exclude_and_force(tmp_path: Path) -> None:
    ft_dir, base_dir = pair(
        tmp_path, tiny_llama, finetune(tiny_llama, both(low_rank("proj", 1), shift("model.norm")))
    )
    out = tmp_path / "out"
    code, stdout, stderr = run(
        "extract", ft_dir, base_dir, "--rank", "2", "--exclude", "mlp", "-o", out, "--json"
    )
    assert code == 0
    assert "6 changed tensor(s) left out" in stderr
    payload = json.loads(stdout)
    assert payload["modules"] == 8 and payload["rank_max"] == 2
    assert {m["solver"] for m in payload["per_module"]} == {"dense"}
    assert payload["modules_to_save"] == ["model.norm"]
    assert payload["skipped"]["model.layers.0.mlp.up_proj.weight"].endswith("excluded (--exclude)")
    record = ao.load_adapter(out).provenance
    assert record["command"] == f"adapterops extract {ft_dir} {base_dir} --rank 2 --exclude mlp -o {out}"
    assert record["finetuned"]["path"] == str(ft_dir) and record["exclude"] == "mlp"
    assert "- finetuned: `ft`" in (out / "README.md").read_text()

    code, _, stderr = run("extract", ft_dir, base_dir, "--rank", "2", "-o", out)
    assert (code, stderr) == (
        4,
        f"error: {out} already exists; choose another output path or pass --force to replace it\n",
    )
    code, stdout, _ = run("extract", ft_dir, base_dir, "--rank", "2", "-o", out, "--force", "-v")
    assert code == 0
    assert "model.layers.0.mlp.down_proj: rank 32 -> 2, energy kept 100.0000%, relative error" in stdout
    assert "model.norm: stored whole (modules_to_save)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out"]  # nothing half written
    code, _, stderr = run("extract", ft_dir, base_dir, "-o", tmp_path / "x")
    assert (code, stderr) == (
        2,
        "error: extract needs a target: give --rank K, --energy F or --sv-ratio R; or --max-rank K alone, or a "
        "budget over all modules: --budget-params N or --budget-error E\n",
    )


# ------------------------------------------------------------------------------------------ budgets


def optimal_tails(ft: dict[str, torch.Tensor], base: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """Squared Eckart-Young errors at every rank 0..full of one module, from numpy's float64 SVD."""
    S = np.linalg.svd((ft[f"{name}.weight"] - base[f"{name}.weight"]).numpy(), compute_uv=False)
    sq = S**2
    return np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])


def test_budget_params_total_error_is_the_float64_optimum_and_peft_merges_within_it(tmp_path: Path) -> None:
    """Full-rank changes of all 14 linear layers and a norm: the ranks fit 12,000 parameters, the total
    error is the float64 Eckart-Young tail at those ranks, the norm is stored whole (outside the budget),
    and PEFT's merge is that far from the fine-tune."""
    ft_dir, base_dir = pair(
        tmp_path, tiny_llama, finetune(tiny_llama, both(low_rank("proj", 0), shift("model.norm")))
    )
    adapter = ao.extract(ft_dir, base_dir, budget_params="12K")
    ft, base = stored(ft_dir), stored(base_dir)
    budget = (adapter.provenance or {})["budget"]
    params = sum((m.out_features + m.in_features) * m.rank for m in adapter.modules.values())
    assert budget["budget_params"] == 12_000 and budget["params"] == params and 11_500 < params <= 12_000
    assert budget["optimal"] and budget["solver"] in ("greedy", "dp")
    assert (adapter.provenance or {})["modules_to_save"] == ["model.norm"]
    assert len({r.rank_out for r in adapter.report}) > 2  # the ranks differ: a real trade-off
    left = total = 0.0
    for report in adapter.report:
        tails = optimal_tails(ft, base, report.name)
        left, total = left + tails[report.rank_out], total + tails[0]
        assert report.rel_error == pytest.approx((tails[report.rank_out] / tails[0]) ** 0.5, rel=1e-5)
    assert budget["rel_error"] == pytest.approx((left / total) ** 0.5, rel=1e-6)

    merged = check_against_peft(tiny_llama, adapter, tmp_path / "out", ft_dir, base_dir)
    keys = [f"{r.name}.weight" for r in adapter.report]
    merge_error = sum(float((merged[k] - ft[k]).pow(2).sum()) for k in keys) ** 0.5
    change = sum(float((ft[k] - base[k]).pow(2).sum()) for k in keys) ** 0.5
    assert merge_error / change == pytest.approx(budget["rel_error"], rel=1e-5)
    assert ao.load_adapter(tmp_path / "out").provenance["budget"] == budget


def test_budget_allocation_is_brute_force_optimal(tmp_path: Path) -> None:
    """Four modules (q, k, v, o of layer 0): every rank tuple scored with numpy's SVDs of the actual
    differences. budget_params: the least error within the budget; budget_error: the fewest parameters
    reaching the target."""
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank(r"layers\.0\.self_attn", 0)))
    ft, base = stored(ft_dir), stored(base_dir)
    tails = [optimal_tails(ft, base, n) for n in names]
    costs = [sum(ft[f"{n}.weight"].shape) for n in names]
    grid = np.ix_(*(np.arange(1, len(t)) for t in tails))  # ranks >= 1 each
    error = sum(t[g] for t, g in zip(tails, grid, strict=True))
    cost = sum(c * g for c, g in zip(costs, grid, strict=True))
    total = sum(t[0] for t in tails)

    def chosen(adapter: ao.Adapter) -> tuple[float, int]:
        ranks = {r.name: r.rank_out for r in adapter.report}
        return (
            sum(t[ranks[n]] for t, n in zip(tails, names, strict=True)),
            sum(c * ranks[n] for c, n in zip(costs, names, strict=True)),
        )

    for budget in (400, 1000, 2300):
        adapter = ao.extract(ft_dir, base_dir, budget_params=budget)
        got_error, got_cost = chosen(adapter)
        assert got_cost <= budget
        assert got_error == pytest.approx(float(error[cost <= budget].min()), rel=1e-9, abs=1e-12 * total)
    with pytest.raises(ao.InvalidInputError, match=r"budget_params=200 is below the smallest output: 224 "):
        ao.extract(ft_dir, base_dir, budget_params=200)
    for target in (0.6, 0.3, 0.1):
        adapter = ao.extract(ft_dir, base_dir, budget_error=target)
        got_error, got_cost = chosen(adapter)
        assert got_error <= target**2 * total * (1 + 1e-9)
        assert got_cost == int(cost[error <= target**2 * total].min())
        assert (adapter.provenance or {})["budget"]["params"] == got_cost
        assert (adapter.provenance or {})["budget"]["rel_error"] <= target


@pytest.mark.slow
def test_budget_on_randomized_spectra_and_the_spectrum_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above exact_limit the spectrum is the leading values with the exact ||D||^2: its tails match the
    dense ones, and a module whose budget rank reaches the cap says so."""
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(120, 90, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -2, 90, dtype=torch.float64)
    )
    dense = spectrum(M, max_rank=12, exact_limit=100)
    sketched = spectrum(M, max_rank=12, exact_limit=8)
    want = np.concatenate([[0.0], np.cumsum(np.linalg.svd(M.numpy(), compute_uv=False) ** 2)])
    want = float((M**2).sum()) - want[:13]
    assert dense.solver is ao.Solver.DENSE and sketched.solver is ao.Solver.RANDOMIZED
    assert np.allclose(dense.tails, want, rtol=1e-9) and np.allclose(sketched.tails, want, rtol=1e-6)
    assert len(spectrum(M, max_rank=None, exact_limit=100).tails) == 91

    import adapterops.extraction as extraction

    monkeypatch.setattr(extraction, "SPECTRUM_CAP", 2)
    monkeypatch.setattr(ops_extract, "SPECTRUM_CAP", 2)
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank(r"layers\.1\.", 0)))
    adapter = ao.extract(ft_dir, base_dir, budget_params="1M", exact_limit=8)
    assert {r.rank_out for r in adapter.report} == {2}
    assert all(r.note and r.note.startswith("budget rank at the spectrum cap 2") for r in adapter.report)
    check_against_peft(tiny_llama, adapter, tmp_path / "out", ft_dir, base_dir)


def test_cli_budget_params_json(tmp_path: Path) -> None:
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank("proj", 0)))
    out = tmp_path / "out"
    code, stdout, stderr = run("extract", ft_dir, base_dir, "--budget-params", "20K", "-o", out, "--json")
    assert (code, stderr) == (0, "")
    payload = json.loads(stdout)
    budget = payload["budget"]
    assert budget["budget_params"] == 20_000 and 19_000 < budget["params"] <= 20_000 and budget["optimal"]
    assert budget["params"] == sum(
        (m["rank_out"])
        * (
            64
            if "self_attn.q" in m["name"] or "o_proj" in m["name"]
            else 48
            if "self_attn" in m["name"]
            else 96
        )
        for m in payload["per_module"]
    )
    record = ao.load_adapter(out).provenance
    assert record["budget"] == budget and record["summary"].endswith(
        f"budget 20,000 parameters: {budget['params']:,} used, total relative error {budget['rel_error']:.4g} (optimal)"
    )
    code, stdout, _ = run("extract", ft_dir, base_dir, "--budget-error", "0.5", "-o", tmp_path / "e")
    assert code == 0 and "budget relative error 0.5: " in stdout


def test_hub_ids_resolve_like_paths_and_name_the_base(fake_snapshots: FakeSnapshots, tmp_path: Path) -> None:
    ft_dir, base_dir = pair(tmp_path, tiny_llama, finetune(tiny_llama, low_rank("o_proj", 1)))
    base_sha = fake_snapshots.add("org/base", base_dir)
    fake_snapshots.add("me/finetune", ft_dir)
    adapter = ao.extract("me/finetune", "org/base", rank=1)
    assert adapter.config["base_model_name_or_path"] == "org/base"
    record = adapter.provenance
    assert (record["base"]["repo_id"], record["base"]["revision"]) == ("org/base", base_sha)
    assert record["finetuned"]["repo_id"] == "me/finetune"
    assert sorted(adapter.modules) == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    ao.save_adapter(adapter, tmp_path / "out")
    assert "- base: `org/base@" in (tmp_path / "out" / "README.md").read_text()
