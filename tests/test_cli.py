"""The command line through click's CliRunner: outputs, exit codes and the exact error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops.cli import cli
from tests.conftest import Zoo
from tests.support.factories import peft_deltas


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_combine_with_space_separated_and_negative_weights(zoo: Zoo, tmp_path: Path) -> None:
    a, b = zoo["llama_a"], zoo["llama_b"]
    code, out, err = run("combine", a, b, "--weights", "0.5", "-0.4", "-o", tmp_path / "mix")
    assert (code, err) == (0, "")
    assert out.startswith(f"wrote {tmp_path / 'mix'}: ")
    got = peft_deltas(zoo.factory("llama_a"), tmp_path / "mix")
    ref_a, ref_b = peft_deltas(zoo.factory("llama_a"), a), peft_deltas(zoo.factory("llama_b"), b)
    for name, delta in got.items():
        want = 0.5 * ref_a.get(name, 0) - 0.4 * ref_b.get(name, 0)
        assert float((delta - want).abs().max()) <= 1e-5 * float(want.abs().max())
    record = ao.load_adapter(tmp_path / "mix").provenance
    assert record["command"] == f"adapterops combine {a} {b} --weights 0.5 -0.4 -o {tmp_path / 'mix'}"
    assert record["weights"] == [0.5, -0.4]


def test_json_summary_has_a_line_per_module(zoo: Zoo, tmp_path: Path) -> None:
    code, out, _ = run(
        "combine",
        zoo["gpt2_a"],
        zoo["gpt2_b"],
        "-w",
        "1,1",
        "--method",
        "svd",
        "--rank",
        "2",
        "-o",
        tmp_path / "mix",
        "--json",
    )
    assert code == 0
    payload = json.loads(out)
    assert payload["output"] == str(tmp_path / "mix")
    assert payload["modules"] == len(payload["per_module"]) == len(ao.load_adapter(tmp_path / "mix").modules)
    assert payload["rank_max"] == 2
    assert 0 < payload["energy_kept_min"] <= payload["energy_kept_mean"] < 1


def test_negate_scale_resize_info(zoo: Zoo, tmp_path: Path) -> None:
    assert run("negate", zoo["gpt2_a"], "-o", tmp_path / "neg", "-q") == (0, "", "")
    neg = ao.load_adapter(tmp_path / "neg")
    src = ao.load_adapter(zoo["gpt2_a"])
    for name, m in src.modules.items():
        assert torch.equal(neg.modules[name].B, -m.B)
    assert run("scale", zoo["gpt2_a"], "--by", "0.5", "-o", tmp_path / "half", "-q")[0] == 0
    half = ao.load_adapter(tmp_path / "half")
    assert all(half.modules[n].scale == 0.5 * m.scale for n, m in src.modules.items())
    code, out, _ = run("resize", zoo["llama_b"], "--energy", "0.9", "-o", tmp_path / "small", "-v")
    assert code == 0
    assert out.count("energy kept") == len(ao.load_adapter(zoo["llama_b"]).modules) + 1
    code, out, _ = run("info", tmp_path / "small", "--json")
    info = json.loads(out)
    assert info["modules_count"] == len(ao.load_adapter(zoo["llama_b"]).modules)
    assert info["provenance"]["operation"] == "resize"
    code, out, _ = run("info", zoo["llama_a"])
    assert code == 0 and "model.layers.1.self_attn.v_proj" in out and "stored whole" not in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["combine", "{a}", "{b}", "--weights", "1", "-o", "{out}"],
            2,
            "error: got 1 weights for 2 adapters; give one weight per adapter\n",
        ),
        (
            ["combine", "{a}", "{gpt2}", "-o", "{out}"],
            2,
            "error: inputs were trained on different base models ({a} -> tiny-llama, {gpt2} -> tiny-gpt2); "
            "pass --allow-different-bases if they share the same architecture\n",
        ),
        (
            ["combine", "{a}", "{dora}", "-o", "{out}"],
            2,
            "error: {dora}: DoRA adapter (lora_magnitude_vector): its update depends on the base weights, so factor "
            "arithmetic alone would be wrong; pass the base checkpoint (--base)\n",
        ),
        (
            ["resize", "{a}", "--budget-params", "20M", "--rank", "40", "-o", "{out}"],
            2,
            "error: --budget-params chooses every module's rank over the whole adapter: drop --rank (only "
            "--max-rank K combines with a budget)\n",
        ),
        (["negate", "{missing}", "-o", "{out}"], 3, "error: {missing}: no such adapter directory\n"),
        (
            ["negate", "{a}", "-o", "{exists}"],
            4,
            "error: {exists} already exists; choose another output path or pass --force to replace it\n",
        ),
    ],
)
def test_bad_input_gives_one_line_a_code_and_no_output(zoo: Zoo, tmp_path: Path, args, code, message) -> None:
    (tmp_path / "exists").mkdir()
    names = {
        "a": zoo["llama_a"],
        "b": zoo["llama_b"],
        "gpt2": zoo["gpt2_a"],
        "dora": zoo["llama_dora"],
        "out": tmp_path / "out",
        "missing": tmp_path / "missing",
        "exists": tmp_path / "exists",
    }
    got_code, out, err = run(*[a.format(**names) for a in args])
    assert (got_code, out, err) == (code, "", message.format(**names))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_force_replaces_and_different_bases_can_be_allowed(zoo: Zoo, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    code, _, err = run(
        "combine",
        zoo["llama_a"],
        zoo["gpt2_a"],
        "--allow-different-bases",
        "-o",
        tmp_path / "out",
        "--force",
        "-q",
    )
    assert code == 0
    assert err.startswith("warning: inputs were trained on different base models")
    assert len(ao.load_adapter(tmp_path / "out").modules) == 6 + 4


def test_usage_errors_come_from_click(zoo: Zoo, tmp_path: Path) -> None:
    code, _, err = run("resize", zoo["llama_a"], "-o", tmp_path / "x")
    assert code == 2 and "resize needs a target: give --rank K, --energy F or --sv-ratio R" in err
    code, _, err = run("combine", zoo["llama_a"], "--method", "knots", "-o", tmp_path / "x")
    assert code == 2 and "'knots' is not one of 'exact', 'cat', 'svd', 'linear', 'ties'" in err


def test_linear_warns_that_it_approximates(zoo: Zoo, tmp_path: Path) -> None:
    code, _, err = run(
        "combine",
        zoo["gpt2_a"],
        zoo["gpt2_a"],
        "-w",
        "0.5",
        "0.5",
        "--method",
        "linear",
        "-o",
        tmp_path / "lin",
        "-q",
    )
    assert code == 0
    assert err.startswith("warning: method linear is PEFT's approximation, not the weighted sum")


def test_version_and_module_entry_point() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "adapterops", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"adapterops, version {ao.__version__}"


def test_merge_verify_unmerge_from_the_command_line(zoo: Zoo, tmp_path: Path) -> None:
    from tests.support.factories import save_base_checkpoint, tiny_llama

    base = save_base_checkpoint(tiny_llama, tmp_path / "base", dtype=torch.bfloat16, max_shard_size="20KB")
    a, b = zoo["llama_a"], zoo["llama_b"]
    code, out, _ = run(
        "merge", base, a, b, "--weights", "0.7", "-0.3", "-o", tmp_path / "m", "--dry-run", "--json"
    )
    plan = json.loads(out)
    assert code == 0 and not (tmp_path / "m").exists()
    assert plan["tensors_updated"] == len(set(ao.load_adapter(a).modules) | set(ao.load_adapter(b).modules))
    code, out, err = run("merge", base, a, b, "--weights", "0.7", "-0.3", "-o", tmp_path / "m")
    assert (code, err) == (0, "") and out.startswith(
        f"wrote {tmp_path / 'm'}: {plan['tensors_updated']} tensors updated"
    )
    code, out, _ = run("verify", base, a, b, tmp_path / "m", "-w", "0.7", "-0.3", "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] and report["max_ulp"] <= 0.5
    code, out, _ = run("verify", base, a, tmp_path / "m")  # wrong adapters: fails, says so
    assert code == 1 and "FAILED" in out and "changed untouched" in out
    code, _, _ = run("unmerge", tmp_path / "m", a, b, "-w", "0.7,-0.3", "-o", tmp_path / "back", "-q")
    assert code == 0 and (tmp_path / "back" / "model.safetensors.index.json").is_file()
    code, out, err = run("merge", base, zoo["gpt2_a"], "-o", tmp_path / "bad")
    assert code == 2 and out == "" and err.startswith("error: module transformer.h.0.attn.c_attn: no tensor")
    assert not (tmp_path / "bad").exists()


def test_cli_reference_is_up_to_date() -> None:
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "cli_reference.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(
    zoo: Zoo, tmp_path: Path, monkeypatch
) -> None:
    import adapterops.verbs

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapterops.verbs, "negate", broken)
    code, out, err = run("negate", zoo["llama_a"], "-o", tmp_path / "out")
    assert (code, out) == (1, "")
    assert (
        err
        == "error: unexpected RuntimeError: boom (set ADAPTEROPS_DEBUG=1 for the traceback, and please report it)\n"
    )
    monkeypatch.setenv("ADAPTEROPS_DEBUG", "1")
    result = CliRunner().invoke(cli, ["negate", str(zoo["llama_a"]), "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, RuntimeError)
