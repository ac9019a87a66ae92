"""Benchmark: `adapterops to-lora` of an r=16 all-linear DoRA on the generated 1.1B checkpoint.

Uses the checkpoint and adapter of bench_merge.py (run that first, or pass --workdir with them).
The DoRA adapter is made from the r=16 LoRA with `to-dora`, then its magnitudes are perturbed by
5% per row (seeded), as training moves them away from the base norms. Then `to-lora` runs at
several ranks and energy targets; each run is a fresh process (wall time, peak RSS) and reports
the mean and worst per-module relative error ||dW_eff - BA||_F / ||dW_eff||_F.

    python bench/bench_dora.py --workdir /tmp/bench-merge [--layers 22]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=open(sys.argv[0] + ".out", "w"))
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def make_dora(workdir: Path, layers: int) -> Path:
    base, lora, dora = workdir / f"base-{layers}", workdir / f"adapter-{layers}", workdir / f"dora-{layers}"
    if (dora / "adapter_config.json").exists():
        return dora
    subprocess.run(
        [
            sys.executable,
            "-m",
            "adapterops",
            "to-dora",
            str(lora),
            "--base",
            str(base),
            "-o",
            str(dora),
            "-q",
            "--force",
        ],
        check=True,
    )
    tensors = load_file(dora / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if key.endswith("lora_magnitude_vector"):
            tensors[key] = value * (1 + 0.05 * torch.randn(value.shape, generator=gen))
    save_file(tensors, dora / "adapter_model.safetensors")
    return dora


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument(
        "--targets",
        nargs="*",
        default=["--rank 8", "--rank 16", "--rank 32", "--rank 64", "--energy 0.9", "--energy 0.99"],
    )
    args = parser.parse_args()
    dora = make_dora(args.workdir, args.layers)
    base = args.workdir / f"base-{args.layers}"
    print("| target | wall time | peak RSS | ranks | mean rel. error | worst rel. error | solvers |")
    print("|---|---|---|---|---|---|---|")
    for target in args.targets:
        out = args.workdir / "to-lora-out"
        marker = args.workdir / "measure"
        cmd = [
            sys.executable,
            "-m",
            "adapterops",
            "to-lora",
            str(dora),
            "--base",
            str(base),
            *target.split(),
            "-o",
            str(out),
            "--force",
            "--json",
        ]
        result = subprocess.run(
            [sys.executable, "-c", MEASURE.replace("sys.argv[0]", repr(str(marker))), *cmd],
            check=True,
            capture_output=True,
            text=True,
        )
        wall, rss = (float(x) for x in result.stdout.split())
        payload = json.loads((Path(str(marker) + ".out")).read_text())
        errors = [m["rel_error"] for m in payload["per_module"]]
        ranks = sorted({m["rank_out"] for m in payload["per_module"]})
        solvers = sorted({m["solver"] for m in payload["per_module"]})
        print(
            f"| `{target}` | {wall:.1f} s | {rss:.0f} MiB | {ranks[0]}-{ranks[-1]} | "
            f"{sum(errors) / len(errors):.4f} | {max(errors):.4f} | {', '.join(solvers)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
