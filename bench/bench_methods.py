"""Benchmark: `adapterops combine --method ties|dare_ties` vs PEFT's
add_weighted_adapter(combination_type="ties_svd" / "dare_ties_svd").

Three synthetic PEFT adapters with Llama-3.1-8B module shapes (hidden 4096, intermediate 14336,
32 heads, 8 KV heads of 128, 7 targets per layer, r=16, lora_alpha 32, float32 or bfloat16
factors) are written to disk, as bench/bench_combine.py does. Then, each contender in a fresh
process (its peak RSS is the process's own ru_maxrss, from wait4):

1. adapterops: `adapterops combine a b c --weights 0.5 0.3 0.2 --method M --density D --rank 16
   --json` over the whole adapter (--layers layers); time per layer = the modules' reported seconds
   / layers, and the whole process's wall time.
2. adapterops `--space core` (core-space TIES/DARE), when `adapterops combine --help` lists
   --space; else skipped with a message.
3. PEFT: one decoder layer of the same shapes (PEFT needs the base model in memory), built as in
   bench_combine.py, `add_weighted_adapter([...], [0.5, 0.3, 0.2], combination_type="ties_svd" or
   "dare_ties_svd", svd_rank=16, density=D)`, timed; its RSS before the call and its peak.

Accuracy, on one module of layer 0 (--module): the float64 merged update from the papers' formulas
(DARE: adapterops' masks as docs/math.md defines them; PEFT's come from its global RNG and cannot be
reproduced), and its best rank-16 approximation by a dense float64 SVD. Reported per result:
its relative Frobenius error against the merged update (the optimum is the reference's own) and its
distance to the reference's rank-16 approximation. PEFT's svd path is compared with the reference
built from s_i B_i A_i and with the one built from s_i^2 B_i A_i (older PEFT applied each adapter's
scale twice there); the closer one is named.

    python bench/bench_methods.py --workdir /tmp/bench-methods [--layers 4] [--densities 0.2 0.5]
    python bench/bench_methods.py --small --layers 1     # smoke run with reduced dimensions

Prints a markdown table for docs/benchmarks.md and writes results.json to the workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_combine  # the 8B shapes and the one-layer PEFT set-up this script extends
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = [0.5, 0.3, 0.2]
ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    rank: int

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (out, in), as in bench_combine.SHAPES."""
        kv = self.kv_heads * (self.hidden // self.heads)
        h, i = self.hidden, self.intermediate
        return {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }


LLAMA_8B = Dims(bench_combine.HIDDEN, bench_combine.INTERMEDIATE, 32, 8, bench_combine.RANK)
SMALL = Dims(256, 512, 4, 2, 16)
assert LLAMA_8B.shapes == bench_combine.SHAPES


def write_adapter(path: Path, dims: Dims, layers: int, seed: int, dtype: torch.dtype) -> None:
    """A PEFT adapter directory with random factors (B nonzero, as after training)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (out, inp) in dims.shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            A = torch.randn(dims.rank, inp, generator=gen) / inp**0.5
            tensors[f"{key}.lora_A.weight"] = A.to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, dims.rank, generator=gen) * 0.01).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": dims.rank,
        "lora_alpha": ALPHA,
        "target_modules": TARGETS,
        "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------ fresh processes


@dataclass
class Run:
    contender: str
    method: str
    density: float
    ok: bool
    seconds_per_layer: float | None = None
    wall: float | None = None
    peak_rss_mib: float | None = None
    rss_before_mib: float | None = None
    error_vs_merged: float | None = None
    vs_reference_rank_k: float | None = None
    reported_error: float | None = None
    note: str = ""


def in_fresh_process(cmd: list[str]) -> tuple[int, float, float, str, str]:
    """(exit code, wall seconds, peak RSS MiB, stdout, stderr) of ``cmd`` as a child of its own."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, usage.ru_maxrss / 1024, out.read().decode(), err.read().decode()


def has_space_option() -> bool:
    """Whether this adapterops' combine has --space (core-space TIES/DARE)."""
    code, _, _, out, _ = in_fresh_process([sys.executable, "-m", "adapterops", "combine", "--help"])
    return code == 0 and "--space" in out


def run_adapterops(
    inputs: list[Path], out: Path, method: str, density: float, args: argparse.Namespace, space: str | None
) -> Run:
    rank, layers, key = args.rank, args.layers, f"model.layers.0.{args.module}"
    cmd = [sys.executable, "-m", "adapterops", "combine", *map(str, inputs), "--weights", *map(str, WEIGHTS)]
    cmd += ["--method", method, "--density", str(density), "--rank", str(rank), "-o", str(out), "--force"]
    cmd += ["--json", *(["--space", space] if space else [])]
    name = "adapterops" + (f" --space {space}" if space else "")
    code, wall, rss, stdout, stderr = in_fresh_process(cmd)
    if code != 0:
        return Run(name, method, density, False, note=(stderr.strip().splitlines() or ["?"])[-1])
    per_module = json.loads(stdout)["per_module"]
    seconds = sum(m["seconds"] for m in per_module) / layers
    reported = next(m["rel_error"] for m in per_module if m["name"] == key)
    return Run(name, method, density, True, seconds, wall, rss, reported_error=reported)


def run_peft(inputs: list[Path], method: str, density: float, rank: int, args: argparse.Namespace) -> Run:
    delta = args.workdir / f"peft-{method}-{density}.pt"
    cmd = [sys.executable, __file__, "--peft-worker", method, str(density), str(rank), str(delta)]
    cmd += ["--workdir", str(args.workdir), "--dtype", args.dtype, "--module", args.module]
    cmd += ["--small"] if args.small else []
    code, wall, rss, stdout, stderr = in_fresh_process(cmd)
    name = "PEFT " + ("ties_svd" if method == "ties" else "dare_ties_svd")
    if code != 0:
        return Run(name, method, density, False, note=(stderr.strip().splitlines() or ["?"])[-1])
    timing = json.loads(stdout.strip().splitlines()[-1])
    return Run(name, method, density, True, timing["seconds"], wall, rss, timing["rss_before_mib"])


def current_rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peft_worker(args: argparse.Namespace) -> None:
    """In a fresh process: one 8B-shaped layer, three adapters, PEFT's svd combination timed; the
    accuracy module's delta saved; one JSON line on stdout."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    method, density, rank, delta_path = args.peft_worker
    dims, dtype = (SMALL if args.small else LLAMA_8B), DTYPES[args.dtype]
    config = LlamaConfig(
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=1,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=dims.rank, lora_alpha=ALPHA, target_modules=TARGETS)
    names = [f"in{i}" for i in range(len(WEIGHTS))]
    model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora)
    for name, path in zip(names, inputs_of(args.workdir), strict=True):
        tensors = {
            k: v for k, v in load_file(path / "adapter_model.safetensors").items() if ".layers.0." in k
        }
        set_peft_model_state_dict(model, tensors, adapter_name=name)
    torch.manual_seed(0)
    before = current_rss_mib()
    start = time.perf_counter()
    model.add_weighted_adapter(
        names, WEIGHTS, "mix", combination_type=f"{method}_svd", svd_rank=int(rank), density=float(density)
    )
    seconds = time.perf_counter() - start
    module = model.base_model.model.model.layers[0].get_submodule(args.module)
    torch.save(module.get_delta_weight("mix").detach().double(), delta_path)
    print(json.dumps({"seconds": seconds, "rss_before_mib": before}))


# -------------------------------------------------------------------------------------- accuracy


def block_seed(seed: int, name: str, index: int, block: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{index}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dare_mask(name: str, index: int, shape: tuple[int, int], density: float) -> torch.Tensor:
    """adapterops' DARE mask (docs/math.md): grid blocks of max(1, 65536 // in) rows, seed 0."""
    out, inp = shape
    grid = max(1, 65536 // inp)
    blocks = []
    for b, b0 in enumerate(range(0, out, grid)):
        gen = torch.Generator().manual_seed(block_seed(0, name, index, b))
        blocks.append(torch.rand((min(grid, out - b0), inp), generator=gen, dtype=torch.float32))
    return torch.cat(blocks) < density


def reference_merge(method: str, name: str, deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) or DARE-TIES (Yu et al. 2024) of float64 updates, from the formulas."""
    parts = []
    for i, d in enumerate(deltas):
        if method == "ties":
            k = int(density * d.numel())
            threshold = d.abs().reshape(-1).kthvalue(d.numel() - k + 1).values
            parts.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
        else:
            parts.append(torch.where(dare_mask(name, i, tuple(d.shape), density), d / density, 0.0))
    t = torch.stack(parts)
    w = torch.tensor(WEIGHTS, dtype=torch.float64).reshape(-1, 1, 1)
    gamma = torch.where(t.sum(0) >= 0, 1.0, -1.0).double()
    agree = t.sign() == gamma
    return torch.where(agree, w * t, 0.0).sum(0) / agree.sum(0).clamp(min=1)


def accuracy(args: argparse.Namespace, runs: list[Run], outputs: dict[int, Path], rank: int) -> None:
    """Fill in each run's errors on layer 0's --module against the float64 references."""
    import adapterops as ao

    key = f"model.layers.0.{args.module}"
    scale = ALPHA / (SMALL if args.small else LLAMA_8B).rank
    inputs = [ao.load_adapter(p).modules[key] for p in inputs_of(args.workdir)]
    once = [m.delta(torch.float64) for m in inputs]
    assert all(m.scale == scale for m in inputs)
    cache: dict[tuple[str, float, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def reference(method: str, density: float, power: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (method, density, power) not in cache:
            merged = reference_merge(method, key, [d * scale ** (power - 1) for d in once], density)
            U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
            cache[(method, density, power)] = merged, (U[:, :rank] * S[:rank]) @ Vh[:rank]
        return cache[(method, density, power)]

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))

    for index, run in enumerate(runs):
        if not run.ok:
            continue
        if run.contender.startswith("PEFT"):
            got = torch.load(args.workdir / f"peft-{run.method}-{run.density}.pt")
            if run.method == "dare_ties":
                merged, best = reference(run.method, run.density, 1)
                run.note = f"masks differ (PEFT's global RNG); norm ratio to the reference rank-{rank} " + (
                    f"{float(torch.linalg.matrix_norm(got) / torch.linalg.matrix_norm(best)):.3f}"
                )
                continue
            fits = {power: reference(run.method, run.density, power) for power in (1, 2)}
            power = min(fits, key=lambda p: rel(got, fits[p][1]))
            run.note = "matches s_i B_i A_i" if power == 1 else "matches s_i^2 B_i A_i (scale applied twice)"
        else:
            got = ao.load_adapter(outputs[index]).modules[key].delta(torch.float64)
            power = 1
            if "core" in run.contender:
                run.note = "a different method (core space): distances to dense TIES are not errors"
        merged, best = reference(run.method, run.density, power)
        run.error_vs_merged, run.vs_reference_rank_k = rel(got, merged), rel(got, best)
        run.note = (
            run.note + "; " if run.note else ""
        ) + f"optimal rank-{rank} error {rel(best, merged):.4g}"


# ------------------------------------------------------------------------------------------- main

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inputs_of(workdir: Path) -> list[Path]:
    return [workdir / f"in{i}" for i in range(len(WEIGHTS))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-methods"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--methods", nargs="+", default=["ties", "dare_ties"], choices=["ties", "dare_ties"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the adapters' factors")
    parser.add_argument("--rank", type=int, default=16, help="output rank, both tools")
    parser.add_argument(
        "--module", default="self_attn.q_proj", help="layer 0 module for the accuracy figures"
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--small", action="store_true", help="reduced dimensions, for a smoke run")
    parser.add_argument("--peft-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_worker:
        peft_worker(args)
        return
    dims = SMALL if args.small else LLAMA_8B
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = {"dims": asdict(dims), "layers": args.layers, "dtype": args.dtype}
    stamp_file = args.workdir / "inputs.json"
    if not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp:
        for seed, path in enumerate(inputs_of(args.workdir), start=1):
            write_adapter(path, dims, args.layers, seed, DTYPES[args.dtype])
        stamp_file.write_text(json.dumps(stamp))
    for path in inputs_of(args.workdir):  # warm the page cache
        (path / "adapter_model.safetensors").read_bytes()

    spaces: list[str | None] = [None]
    if has_space_option():
        spaces.append("core")
    else:
        print("core-space TIES skipped: this adapterops' combine has no --space option", file=sys.stderr)
    runs: list[Run] = []
    outputs: dict[int, Path] = {}
    for method in args.methods:
        for density in args.densities:
            for space in spaces:
                out = args.workdir / f"out-{method}-{density}-{space or 'dense'}"
                outputs[len(runs)] = out
                runs.append(run_adapterops(inputs_of(args.workdir), out, method, density, args, space))
                print(runs[-1], file=sys.stderr)
            if not args.skip_peft:
                runs.append(run_peft(inputs_of(args.workdir), method, density, args.rank, args))
                print(runs[-1], file=sys.stderr)
    accuracy(args, runs, outputs, args.rank)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    shapes = ", ".join(f"{m.split('.')[-1]} {o}x{i}" for m, (o, i) in dims.shapes.items())
    print(
        f"inputs: 3 adapters, {args.layers} layers of {shapes}; r={dims.rank}, {args.dtype} factors; rank {args.rank} out"
    )
    print(f"accuracy module: layer 0 {args.module}\n")
    print(
        "| contender | method | density | s / layer | wall | peak RSS | RSS before | err vs merged | vs ref rank-k | reported | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(x: float | None, spec: str) -> str:
        return "" if x is None else format(x, spec)

    for r in runs:
        cells = [
            r.contender,
            r.method,
            f"{r.density:g}",
            fmt(r.seconds_per_layer, ".2f") if r.ok else "failed",
            fmt(r.wall, ".1f"),
            fmt(r.peak_rss_mib, ".0f"),
            fmt(r.rss_before_mib, ".0f"),
            fmt(r.error_vs_merged, ".4g"),
            fmt(r.vs_reference_rank_k, ".2e"),
            fmt(r.reported_error, ".4g"),
            r.note,
        ]
        print("| " + " | ".join(cells) + " |")
    (args.workdir / "results.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
