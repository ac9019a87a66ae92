"""Benchmark: `adapterops extract` vs mergekit's `mergekit-extract-lora`, on a generated fine-tune.

The base is bench_merge.py's checkpoint (TinyLlama-1.1B shape: hidden 2048, intermediate 5632, 22
layers, vocab 32000, bf16, random weights, 1 GB shards). The fine-tune is the base plus, on every
2-D weight (the seven projections, the embedding, lm_head), a perturbation with a realistic
spectrum: U diag(s) Vᵀ with s_i ∝ i^-0.8 over 128 directions, of norm 3 % of the weight's, plus
Gaussian noise of norm 0.3 %, rounded to bf16; and every norm weight shifted slightly. Both tools
extract at the same rank, with LoRA on the embedding and the head (mergekit: ``--embed-lora``) and
the changed norms stored whole (both tools' default).

    python bench/bench_extract.py --workdir /tmp/bench-extract [--layers 22] [--rank 64]
        [--mergekit /work/venv-mergekit/bin/mergekit-extract-lora] [--check 'layers\\.0\\.|embed|lm_head']

Each contender runs in a fresh process (wall time, peak RSS of the process tree), the page cache
warm. Then, for the modules matching ``--check``, each output's error ||D - s B A||_F / ||D||_F is
measured in float64 against D = W_ft - W_base as stored, next to the optimal error at that rank
(the tail of D's singular values, Eckart-Young), and reported as the excess over the optimal.
mergekit is installed in its own virtual environment (see docs/benchmarks.md), so it never changes
the one adapterops runs in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import make_checkpoint, measure, size_of, warm  # a sibling script

DIRECTIONS, DECAY, SIGNAL, NOISE = 128, 0.8, 0.03, 0.003


def make_finetune(base: Path, out: Path) -> None:
    """``base`` plus a perturbation of realistic spectrum on every 2-D weight, shard by shard, in bf16."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(2)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            for key in handle.keys():
                W = handle.get_tensor(key)
                tensors[key] = perturbed(key, W, gen)
        save_file(tensors, str(out / path.name), metadata=metadata)
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)


def perturbed(key: str, W: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if W.dim() == 1:  # norm weights
        return (W.float() + 1e-3 * torch.randn(W.shape, generator=gen)).to(W.dtype)
    rows, cols = W.shape
    k = min(DIRECTIONS, rows, cols)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -DECAY
    U = torch.randn(rows, k, generator=gen) / rows**0.5
    V = torch.randn(k, cols, generator=gen) / cols**0.5
    low = (U * s) @ V
    noise = torch.randn(rows, cols, generator=gen)
    norm = float(W.float().norm())
    update = SIGNAL * norm * low / low.norm() + NOISE * norm * noise / noise.norm()
    return (W.float() + update).to(W.dtype)


def errors(base: Path, finetune: Path, outputs: dict[str, Path], check: str) -> dict[str, list[float]]:
    """For each module matching ``check``: the optimal error at the outputs' rank, then each output's
    excess over it (error / optimal - 1)."""
    import adapterops as ao
    from adapterops.io.checkpoint import open_checkpoint

    ft, bs = open_checkpoint(finetune), open_checkpoint(base)
    adapters = {name: ao.load_adapter(path) for name, path in outputs.items()}
    excess: dict[str, list[float]] = {name: [] for name in outputs}
    for key in bs.tensors:
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or not re.search(check, module):
            continue
        if not all(module in a.modules for a in adapters.values()):
            continue
        D = ft.read(key).double() - bs.read(key).double()
        first = next(iter(adapters.values())).modules[module]
        S = torch.linalg.svdvals(D)
        optimal = float(S[first.rank :].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        line = f"  {module:40s} rank {first.rank:4d}  optimal {optimal:.6f}"
        for name, adapter in adapters.items():
            got = float((adapter.modules[module].delta(torch.float64) - D).norm() / D.norm())
            excess[name].append(got / optimal - 1)
            line += f"  {name} {got:.6f}"
        print(line)
    return excess


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-extract"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--mergekit", default="/work/venv-mergekit/bin/mergekit-extract-lora")
    parser.add_argument("--device", default="cpu", help="adapterops --device (mergekit gets --cuda for cuda)")
    parser.add_argument(
        "--check", default=r"layers\.0\.|embed_tokens|lm_head", help="modules whose error is measured"
    )
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    base, finetune = args.workdir / f"base-{args.layers}", args.workdir / f"finetune-{args.layers}"
    if not (base / "config.json").exists():
        make_checkpoint(base, args.layers)
    if not (finetune / "config.json").exists():
        make_finetune(base, finetune)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; checkpoints "
        f"2 x {size_of(base) / 1e9:.2f} GB ({args.layers} layers), rank {args.rank}"
    )
    warm(base)
    warm(finetune)
    outputs = {"adapterops": args.workdir / "out-adapterops", "mergekit": args.workdir / "out-mergekit"}
    commands = {
        "adapterops": [
            sys.executable, "-m", "adapterops", "extract", str(finetune), str(base), "--rank", str(args.rank),
            "--device", args.device, "-o", str(outputs["adapterops"]), "-q",
        ],
        "mergekit": [
            args.mergekit, "--model", str(finetune), "--base-model", str(base), "--out-path",
            str(outputs["mergekit"]), "--max-rank", str(args.rank), "--embed-lora", "--quiet",
            *(["--cuda"] if args.device.startswith("cuda") else []),
        ],
    }  # fmt: skip
    if not Path(args.mergekit).exists():
        print(f"mergekit not found at {args.mergekit}: only adapterops runs")
        del commands["mergekit"], outputs["mergekit"]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            shutil.rmtree(outputs[name], ignore_errors=True)
            runs[name].append(measure(cmd))
            time.sleep(1)
    for name, results in runs.items():
        wall, rss = min(r[0] for r in results), max(r[1] for r in results)
        print(
            f"{name:12s} best {wall:7.2f} s of {[round(r[0], 2) for r in results]}, peak RSS {rss:7.0f} MiB"
        )
    print(f"error against the optimal rank-{args.rank} error (modules matching {args.check!r}):")
    for name, values in errors(base, finetune, outputs, args.check).items():
        if values:
            print(
                f"{name:12s} excess over optimal: mean {100 * sum(values) / len(values):.4f}%, "
                f"max {100 * max(values):.4f}% over {len(values)} modules"
            )
    print(json.dumps({name: str(path) for name, path in outputs.items()}))


if __name__ == "__main__":
    main()
