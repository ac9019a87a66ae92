"""Check adapterops' GGUF LoRA files in llama.cpp itself, one tiny model per architecture.

For llama, qwen2, qwen3, gemma, gemma2 and gemma3 (text): a seeded 2-layer transformers model (float32,
with a 128-piece sentencepiece tokenizer trained here) is converted with llama.cpp's own
``convert_hf_to_gguf.py --outtype f32``; a PEFT LoRA on every linear layer is converted with
``adapterops convert --to gguf``; llama.cpp (llama-cpp-python) runs the base with the adapter, and
its logits are compared with PEFT's (unmerged, float64). Each architecture is run twice: plain
(one alpha, nothing folded) and with an alpha_pattern (a folded lora_b). Controls: the base alone
against transformers (llama.cpp's float32 arithmetic), the adapter's effect (PEFT minus base), and
the decisive one: PEFT's ``merge_and_unload`` model converted by llama.cpp and run without an
adapter, which the base + GGUF adapter run must match to float32 rounding.

    pip install llama-cpp-python==0.3.36         # builds llama.cpp from source (minutes)
    pip download llama-cpp-python==0.3.36 --no-deps && tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/check_gguf_llama_cpp.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp

Gemma 2/3 get ``query_pre_attn_scalar = head_dim``, the query scale llama.cpp uses for them. Exits 1
when the adapter run differs from the merged run by more than 1e-3 of the adapter's effect, or from
PEFT by more than 1e-2 of it. Measured with llama-cpp-python 0.3.36 (CPU): adapter vs merged
<= 2e-5 (effects ~0.2-0.5), adapter vs PEFT <= 2.2e-3 of the effect, as the base alone.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import adapterops as ao
from tests.support.factories import base_logits, make_adapter, peft_logits, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 5, 9, 17, 33, 60, 100, 127]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def tiny_causal_lm(model_type: str) -> Any:
    """The 2-layer model of tests/test_gguf.py's tiny_causal_lm (tiny_llama for llama)."""
    if model_type == "llama":
        return tiny_llama()
    from transformers import AutoConfig, AutoModelForCausalLM

    # llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim) (llama-model.cpp, f_attention_scale, but for
    # the 27B sizes); transformers by query_pre_attn_scalar^-1/2, 256 by default: make them agree
    extra = {"query_pre_attn_scalar": 8} if model_type in ("gemma2", "gemma3_text") else {}
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tokenizer_model(work: Path) -> Path:
    """A 128-piece sentencepiece BPE model (convert_hf_to_gguf.py needs a vocabulary)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "lora",
        "adapter",
        "merge",
        "rank",
        "scale",
        "tensor",
        "model",
        "layer",
        "head",
        "token",
    ]
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(work / "tok"),
        vocab_size=128,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return work / "tok.model"


def llama_cpp_logits(model: Path, lora: Path | None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=32,
        n_batch=32,
        logits_all=True,
        verbose=False,
        n_threads=1,
    )
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)


def to_gguf(model: Any, model_type: str, where: Path, llama_cpp_dir: Path, tok: Path) -> Path:
    """``model`` saved by transformers (float32) and converted by llama.cpp's convert_hf_to_gguf.py."""
    model.config.architectures = [ARCHITECTURES[model_type]]
    model.save_pretrained(where)
    (where / "tokenizer.model").write_bytes(tok.read_bytes())
    out = where.with_suffix(".gguf")
    subprocess.run(
        [
            sys.executable,
            str(llama_cpp_dir / "convert_hf_to_gguf.py"),
            str(where),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def merged_model(factory: Any, peft_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(factory(), str(peft_dir)).merge_and_unload()


def check(
    model_type: str, llama_cpp_dir: Path, tok: Path, work: Path
) -> list[tuple[str, float, float, float, float]]:
    factory = partial(tiny_causal_lm, model_type)
    base = work / model_type / "base"
    base_gguf = to_gguf(factory(), model_type, base, llama_cpp_dir, tok)
    inputs = torch.tensor([TOKENS])
    hf_base = base_logits(factory, inputs)[0].numpy()
    base_err = float(np.abs(llama_cpp_logits(base_gguf, None) - hf_base).max())
    rows = []
    for label, extra in (("plain", {}), ("folded", {"alpha_pattern": {"o_proj": 5}})):
        peft_dir = make_adapter(
            factory, work / model_type / label, seed=3, target_modules=ALL, r=4, lora_alpha=8, **extra
        )
        adapter = ao.convert(peft_dir, work / model_type / f"{label}.gguf", to="gguf", base=base)
        want = peft_logits(factory, peft_dir, inputs)[0].numpy()
        got = llama_cpp_logits(base_gguf, adapter)
        err = float(np.abs(got - want).max())
        # control: PEFT's merged model converted by llama.cpp and run without an adapter
        merged = to_gguf(
            merged_model(factory, peft_dir),
            model_type,
            work / model_type / f"{label}-merged",
            llama_cpp_dir,
            tok,
        )
        vs_merged = float(np.abs(got - llama_cpp_logits(merged, None)).max())
        rows.append((f"{model_type} {label}", base_err, float(np.abs(want - hf_base).max()), err, vs_merged))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)"
    )
    parser.add_argument("--only", nargs="*", default=list(ARCHITECTURES), help="model types to check")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # transformers' deprecation notices on these toy models
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = tokenizer_model(work)
        print(
            f"{'model':<20} {'base vs HF':>11} {'LoRA effect':>12} {'LoRA vs PEFT':>13} {'/ effect':>9} "
            f"{'LoRA vs merged':>15}"
        )
        for model_type in args.only:
            for name, base_err, effect, err, vs_merged in check(model_type, args.llama_cpp, tok, work):
                ratio = err / effect
                failed |= ratio > 1e-2 or vs_merged > 1e-3 * effect
                print(
                    f"{name:<20} {base_err:11.2e} {effect:12.2e} {err:13.2e} {ratio:9.2e} {vs_merged:15.2e}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
