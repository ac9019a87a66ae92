"""Benchmark: the merge stream against the disk and `cp -r`, on bench_merge.py's generated checkpoint.

    python bench/bench_pipeline.py --workdir /tmp/bench-merge --out-dir /dev/shm/bench-pipeline \\
        [--device cpu|cuda] [--workers N] [--layers 22] [--repeat 3] [--verbs merge,unmerge,verify]

Per round, alternating: the checkpoint's bytes read with ``os.pread`` into one reusable buffer
after ``posix_fadvise(DONTNEED)`` (the disk's read rate, cold where the kernel drops the pages),
``cp -r`` of the checkpoint into ``--out-dir``, then each verb into ``--out-dir`` (unmerge takes the
merge's output back out; verify checks that output). Each verb and ``cp`` runs in a fresh process:
its wall time (Python start and imports included), the time the verb itself reports (``--json``),
and the process's peak RSS. Printed: medians of ``--repeat`` rounds, as GB/s of the checkpoint's
size and as ratios to ``cp -r`` and to the read. Nothing is recorded; docs/benchmarks.md holds
numbers measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import make_adapter, make_checkpoint, size_of

# wall time, the child's peak RSS (MiB) and its stdout
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
out = subprocess.run(sys.argv[1:], check=True, stdout=subprocess.PIPE, text=True).stdout
wall = time.perf_counter() - start
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, out]))
"""


def measure(cmd: list[str]) -> tuple[float, float, str]:
    done = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True)
    wall, rss, out = json.loads(done.stdout)
    return float(wall), float(rss), out


def read_rate(base: Path) -> float:
    """Seconds to pread every shard's bytes into one 64 MiB buffer, the page cache dropped first."""
    buffer = bytearray(1 << 26)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in sorted(base.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
        finally:
            os.close(fd)
    return time.perf_counter() - start


def verb_command(verb: str, base: Path, adapter: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    merged = out_dir / "merged"
    head = [sys.executable, "-m", "adapterops", verb]
    if verb == "verify":
        return [*head, str(base), str(adapter), str(merged), "--json"]
    source, output = (base, merged) if verb == "merge" else (merged, out_dir / "unmerged")
    shutil.rmtree(output, ignore_errors=True)
    cmd = [*head, str(source), str(adapter), "-o", str(output), "--device", args.device, "--json"]
    return [*cmd, "--workers", str(args.workers)] if args.workers != 1 else cmd


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/bench-merge"), help="checkpoint and adapter"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="outputs (default WORKDIR/out); /dev/shm/..."
    )
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--verbs", default="merge,unmerge,verify")
    args = parser.parse_args()
    verbs = [v for v in args.verbs.split(",") if v]
    base, adapter = args.workdir / f"base-{args.layers}", args.workdir / f"adapter-{args.layers}"
    out_dir = args.out_dir or args.workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (base / "config.json").exists():
        make_checkpoint(base, args.layers)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(adapter, base, args.layers)
    size = size_of(base)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; checkpoint "
        f"{size / 1e9:.2f} GB ({args.layers} layers); device {args.device}, workers {args.workers}; "
        f"outputs in {out_dir}"
    )
    reads: list[float] = []
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ["cp -r", *verbs]}
    for _ in range(args.repeat):
        reads.append(read_rate(base))
        copy = out_dir / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        wall, rss, _ = measure(["cp", "-r", str(base), str(copy)])
        runs["cp -r"].append((wall, wall, rss))
        shutil.rmtree(copy, ignore_errors=True)
        for verb in verbs:
            wall, rss, out = measure(verb_command(verb, base, adapter, out_dir, args))
            own = json.loads(out).get("seconds", wall) if out.strip().startswith("{") else wall
            runs[verb].append((wall, float(own), rss))
    read = statistics.median(reads)
    cp = statistics.median(w for w, _, _ in runs["cp -r"])
    print(f"{'read (pread, cold-ish)':24s} {read:6.2f} s  {size / read / 1e9:5.2f} GB/s")
    for name, rows in runs.items():
        wall = statistics.median(w for w, _, _ in rows)
        own = statistics.median(o for _, o, _ in rows)
        rss = max(r for _, _, r in rows)
        print(
            f"{name:24s} {wall:6.2f} s  {size / wall / 1e9:5.2f} GB/s  x{wall / cp:4.2f} cp  x{wall / read:4.2f} read"
            f"  (own {own:5.2f} s)  peak RSS {rss:6.0f} MiB = {100 * rss * 2**20 / size:4.1f}% of the checkpoint"
        )
    shutil.rmtree(out_dir / "merged", ignore_errors=True)
    shutil.rmtree(out_dir / "unmerged", ignore_errors=True)


if __name__ == "__main__":
    main()
