"""Benchmark: `adapterops merge` vs PEFT's documented merge path vs `cp -r`, on a generated checkpoint.

The checkpoint is Llama-shaped (TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000), bf16, random weights, in 1 GB shards written by transformers'
``save_pretrained``; the adapter is r=16 on all seven linear targets (154 modules), float32.

    python bench/bench_merge.py --workdir /tmp/bench-merge [--layers 22] [--skip-peft]

Each contender runs in a fresh process; wall time and the process's peak RSS are reported, with
the page cache warm for all (the checkpoint is read once before timing).
PEFT's path: AutoModelForCausalLM.from_pretrained, PeftModel.from_pretrained, merge_and_unload,
save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="1GB")
"""

MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
wall = time.perf_counter() - start
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def make_checkpoint(path: Path, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")


def make_adapter(path: Path, base: Path, layers: int) -> None:
    from safetensors.torch import save_file

    shapes = {
        "q_proj": (2048, 2048),
        "k_proj": (256, 2048),
        "v_proj": (256, 2048),
        "o_proj": (2048, 2048),
        "gate_proj": (5632, 2048),
        "up_proj": (5632, 2048),
        "down_proj": (2048, 5632),
    }
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in shapes.items():
            part = "self_attn" if name in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": TARGETS,
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def measure(cmd: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True)
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    for p in path.rglob("*.safetensors"):
        with p.open("rb") as handle:
            while handle.read(1 << 26):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    base, adapter = args.workdir / f"base-{args.layers}", args.workdir / f"adapter-{args.layers}"
    if not (base / "config.json").exists():
        make_checkpoint(base, args.layers)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(adapter, base, args.layers)
    size = size_of(base)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"checkpoint {size / 1e9:.2f} GB ({args.layers} layers), adapter {size_of(adapter) / 1e6:.0f} MB"
    )
    warm(base)
    results: dict[str, list[tuple[float, float]]] = {"cp -r": [], "adapterops merge": [], "peft": []}
    for _ in range(args.repeat):
        for name in results:
            out = args.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            if name == "cp -r":
                cmd = ["cp", "-r", str(base), str(out)]
            elif name == "adapterops merge":
                cmd = [
                    sys.executable,
                    "-m",
                    "adapterops",
                    "merge",
                    str(base),
                    str(adapter),
                    "-o",
                    str(out),
                    "--device",
                    args.device,
                    "-q",
                ]
            elif args.skip_peft:
                continue
            else:
                cmd = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
            results[name].append(measure(cmd))
            time.sleep(1)
    for name, runs in results.items():
        if runs:
            wall = min(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            print(
                f"{name:18s} best {wall:6.2f} s of {[round(r[0], 2) for r in runs]}, peak RSS {rss:7.0f} MiB "
                f"({100 * rss * 2**20 / size:.1f}% of the checkpoint)"
            )


if __name__ == "__main__":
    main()
