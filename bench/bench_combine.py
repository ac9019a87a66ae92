"""Benchmark: `adapterops combine --method svd` vs PEFT's add_weighted_adapter(combination_type="svd").

Two synthetic PEFT adapters with Llama-3.1-8B module shapes (hidden 4096, intermediate 14336,
8 KV heads of 128, 7 targets per layer, r=16, float32 factors) are written to disk. Then:

1. adapterops: the whole 32-layer adapter (224 modules), `adapterops combine a b --weights 0.7 0.3
   --method svd --rank 16`, run as a subprocess: wall time including Python start, load and save;
   peak RSS of that process.
2. In process, on layer 0 (7 modules, 2 adapters): ``combine_module(..., Method.SVD, rank 16)`` against a
   bare low-rank reference that does only what any factor SVD must (``bare_reference``: float64 QR of
   the stacked weighted B's and of the stacked A's transposed, SVD of the small core, and, as a
   second reference, forming the rank-16 factors in the storage dtype): the overhead of ours.
3. PEFT: one decoder layer of the same shapes (PEFT would need the whole 8B base model in memory
   for all 32 layers), `add_weighted_adapter([...], [0.7, 0.3], combination_type="svd", svd_rank=16)`,
   timed per layer; its result compared module by module with adapterops' output.

    python bench/bench_combine.py --workdir /tmp/bench-combine [--layers 32] [--peft-layers 1]

Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterops.adapter import LoraModule

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
RANK = 16


def write_adapter(path: Path, layers: int, seed: int) -> None:
    """A PEFT adapter directory with random factors (B nonzero, as after training)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": sorted({m.split(".")[-1] for m in SHAPES}),
        "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def run_adapterops(a: Path, b: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of the CLI as a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "adapterops",
        "combine",
        str(a),
        str(b),
        "--weights",
        "0.7",
        "0.3",
        "--method",
        "svd",
        "--rank",
        str(RANK),
        "-o",
        str(out),
        "--force",
        "--json",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    # the largest peak of any child so far: call this first, before other children run
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bare_reference(
    terms: list[tuple[float, LoraModule]], rank: int, factors: bool
) -> tuple[torch.Tensor, ...]:
    """The least a factor SVD of sum_i w_i s_i B_i A_i does, in our dtype policy (float64 compute):
    QR of [w_i s_i B_i], QR of [A_i]^T, SVD of the core Rb Ra^T; with ``factors``, also the rank-k
    factors B = Qb U_k sqrt(S_k), A = sqrt(S_k) Vh_k Qa^T rounded to the storage dtype."""
    B = torch.cat([(w * m.scale) * m.B.double() for w, m in terms], dim=1)
    A = torch.cat([m.A.double() for _, m in terms], dim=0)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    if not factors:
        return U, S, Vh
    root = S[:rank].sqrt()
    dtype = terms[0][1].A.dtype
    return (Qb @ (U[:, :rank] * root)).to(dtype), ((root[:, None] * Vh[:rank]) @ Qa.T).to(dtype)


def run_overhead(a: Path, b: Path, repeats: int = 5) -> list[tuple[str, float, float, float]]:
    """Per module of layer 0: (name, ours, bare QR+SVD, bare + factors), best of ``repeats`` seconds."""
    import adapterops as ao
    from adapterops.ops.combine import combine_module
    from adapterops.ops.lowrank import RankPolicy
    from adapterops.options import Method

    in_a, in_b = ao.load_adapter(a), ao.load_adapter(b)
    policy = RankPolicy(rank=RANK)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows = []
    for name in sorted(n for n in in_a.modules if ".layers.0." in n):
        terms = [(0.7, in_a.modules[name]), (0.3, in_b.modules[name])]
        ours = functools.partial(combine_module, terms, Method.SVD, policy)
        bare = functools.partial(bare_reference, terms, RANK, factors=False)
        full = functools.partial(bare_reference, terms, RANK, factors=True)
        rows.append((name, best(ours), best(bare), best(full)))
    return rows


def one_layer_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        return LlamaForCausalLM(config)


def run_peft(a: Path, b: Path, layers: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds per layer for PEFT's svd combination, and its dW per module (layer 0)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = get_peft_model(
        one_layer_model(),
        LoraConfig(r=RANK, lora_alpha=32, target_modules=list({m.split(".")[-1] for m in SHAPES})),
        adapter_name="a",
    )
    model.add_adapter(
        "b", LoraConfig(r=RANK, lora_alpha=32, target_modules=list({m.split(".")[-1] for m in SHAPES}))
    )
    for name, path in (("a", a), ("b", b)):
        tensors = {
            k: v for k, v in load_file(path / "adapter_model.safetensors").items() if ".layers.0." in k
        }
        set_peft_model_state_dict(model, tensors, adapter_name=name)
    times = []
    for i in range(layers):
        start = time.perf_counter()
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], f"mix{i}", combination_type="svd", svd_rank=RANK)
        times.append(time.perf_counter() - start)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix0" in module.lora_A:
            deltas[name.removeprefix("model.")] = module.get_delta_weight("mix0").detach()
    return sum(times) / len(times), deltas


def compare(a: Path, b: Path, ours_dir: Path, peft_deltas: dict[str, torch.Tensor]) -> dict[str, float]:
    """Worst relative Frobenius differences on layer 0: ours vs PEFT, and each vs a float64 reference
    (the best rank-16 approximation of the exact weighted sum, by dense float64 SVD)."""
    import adapterops as ao

    ours, in_a, in_b = ao.load_adapter(ours_dir), ao.load_adapter(a), ao.load_adapter(b)
    worst = {"ours_vs_peft": 0.0, "ours_vs_float64": 0.0, "peft_vs_float64": 0.0}

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))

    for name, theirs in peft_deltas.items():
        key = f"model.{name}"
        exact = 0.7 * in_a.modules[key].delta(torch.float64) + 0.3 * in_b.modules[key].delta(torch.float64)
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        reference = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        mine = ours.modules[key].delta(torch.float64)
        worst["ours_vs_peft"] = max(worst["ours_vs_peft"], rel(mine, theirs.double()))
        worst["ours_vs_float64"] = max(worst["ours_vs_float64"], rel(mine, reference))
        worst["peft_vs_float64"] = max(worst["peft_vs_float64"], rel(theirs.double(), reference))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-combine"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--peft-layers", type=int, default=1, help="layers to time PEFT on (0 to skip)")
    args = parser.parse_args()
    a, b, out = args.workdir / "a", args.workdir / "b", args.workdir / "mix"
    for path, seed in ((a, 1), (b, 2)):
        if not (path / "adapter_model.safetensors").exists():
            write_adapter(path, args.layers, seed)
    size = (a / "adapter_model.safetensors").stat().st_size / 2**20
    wall, rss = run_adapterops(a, b, out)
    runs = [wall] + [run_adapterops(a, b, out)[0] for _ in range(2)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"adapter size: {size:.0f} MiB each, {args.layers * len(SHAPES)} modules")
    print(
        f"adapterops combine --method svd (whole adapter, fresh process): best {min(runs):.2f} s of "
        f"{', '.join(f'{r:.2f}' for r in runs)}; peak RSS {rss:.0f} MiB"
    )
    rows = run_overhead(a, b)
    ours, bare, with_factors = (sum(r[i] for r in rows) for i in (1, 2, 3))
    for name, mine, qr_svd, full in rows:
        print(
            f"  {name}: ours {mine * 1e3:.1f} ms, bare {qr_svd * 1e3:.1f} ms, bare + factors {full * 1e3:.1f} ms"
        )
    print(
        f"layer 0 in process, {torch.get_num_threads()} threads: ours {ours * 1e3:.1f} ms = "
        f"{ours / bare:.2f}x bare QR+SVD ({bare * 1e3:.1f} ms), {ours / with_factors:.2f}x bare + factors "
        f"({with_factors * 1e3:.1f} ms)"
    )
    if args.peft_layers:
        per_layer, deltas = run_peft(a, b, args.peft_layers)
        print(
            f"PEFT add_weighted_adapter svd: {per_layer:.1f} s per layer "
            f"(x{args.layers} = {per_layer * args.layers:.0f} s for the adapter)"
        )
        for label, value in compare(a, b, out, deltas).items():
            print(f"layer 0, worst relative Frobenius difference {label}: {value:.2e}")


if __name__ == "__main__":
    main()
