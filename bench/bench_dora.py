"""Benchmark: `adapterops to-lora` of an r=16 all-linear DoRA on the generated 1.1B checkpoint.

Uses the checkpoint and adapter of bench_merge.py (run that first, or pass --workdir with them).
The DoRA adapter is made from the r=16 LoRA with `to-dora`, then its magnitudes are perturbed by
5% per row (seeded), as training moves them away from the base norms. Then `to-lora` runs at
several ranks and energy targets; each run is a fresh process (wall time, peak RSS) and reports
the mean and worst per-module relative error ||dW_eff - BA||_F / ||dW_eff||_F.

    python bench/bench_dora.py --workdir /tmp/bench-merge [--layers 22]

``--in-process LAYER[,LAYER...]`` instead times, module by module of those layers and in one process,
the DoRA -> LoRA solver at ``--rank`` (default 16) against the previous one, which formed the dense
float64 dW_eff and ran the range finder on it (``best_low_rank`` on the formed matrix), and prints
both errors; with ``--optimal`` also the optimal rank-k error from a float64 dense SVD (slow).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
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


def in_process(workdir: Path, layers: int, which: list[int], rank: int, optimal: bool) -> None:
    """Old (formed dW_eff) vs new (``effective_operator``) solver per module, same process."""
    import time

    import adapterops as ao
    from adapterops.ops.dora import effective_delta, sum_as_lora
    from adapterops.ops.lowrank import RankPolicy, best_low_rank
    from adapterops.verbs import as_base

    dora, base = ao.load_adapter(make_dora(workdir, layers)), as_base(workdir / f"base-{layers}")
    policy = RankPolicy(rank=rank)

    def formed(W: torch.Tensor, module: ao.LoraModule) -> float:
        total = torch.zeros_like(W).add_(effective_delta(W, module))
        return best_low_rank(total, policy, default=module.rank).rel_error

    def best(fn: Callable[[], object]) -> tuple[float, object]:
        times, out = [], None
        for _ in range(3):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    totals = [0.0, 0.0]
    print("| module | shape | old | new | ratio | old error | new error | optimal |")
    print("|---|---|---|---|---|---|---|---|")
    for name in sorted(n for n in dora.modules if any(f".layers.{i}." in n for i in which)):
        module = base.resolve(dora.modules[name])
        W = base.weight(module, dora.describe())
        t_old, e_old = best(lambda: formed(W, module))  # noqa: B023 (called at once)
        t_new, out = best(lambda: sum_as_lora(W, [(1.0, module)], policy))  # noqa: B023
        e_new = out[1].rel_error  # type: ignore[index]
        totals[0] += t_old
        totals[1] += t_new
        best_error = ""
        if optimal:
            S = torch.linalg.svdvals(effective_delta(W, module))
            best_error = f"{float((S[rank:] ** 2).sum() / (S**2).sum()) ** 0.5:.12f}"
        print(
            f"| {name} | {tuple(W.shape)} | {t_old * 1e3:.0f} ms | {t_new * 1e3:.0f} ms | {t_old / t_new:.2f} "
            f"| {e_old:.12f} | {e_new:.12f} | {best_error} |",
            flush=True,
        )
    print(f"total: old {totals[0]:.2f} s, new {totals[1]:.2f} s, ratio {totals[0] / totals[1]:.2f}")


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
    parser.add_argument("--in-process", help="layers to time module by module, old vs new solver (e.g. 0,7)")
    parser.add_argument("--rank", type=int, default=16, help="rank for --in-process")
    parser.add_argument("--optimal", action="store_true", help="with --in-process: the optimal error too")
    args = parser.parse_args()
    if args.in_process:
        which = [int(x) for x in args.in_process.split(",")]
        return in_process(args.workdir, args.layers, which, args.rank, args.optimal)
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
