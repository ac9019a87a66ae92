"""Rebuild the tiny examples bundled in recipes/inputs/: two PEFT-made adapters (seeded, a few KB
each), a DoRA one, and their base checkpoint (bf16, two shards, about 200 KB).

python scripts/make_examples.py      # needs the test extras (peft, transformers)
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "recipes" / "inputs"
EXAMPLES = {
    "style-a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "style-b": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    "style-dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
}


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    base().to(torch.bfloat16).save_pretrained(ROOT / "tiny-llama-64", max_shard_size="150KB")
    print(f"wrote {ROOT / 'tiny-llama-64'}")
    for seed, (name, kwargs) in enumerate(EXAMPLES.items(), start=1):
        if (ROOT / name / "adapter_config.json").exists() and name != "style-dora":
            continue  # keep the published bytes of the original examples
        model = get_peft_model(base(), LoraConfig(init_lora_weights=False, **kwargs))
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if "lora_magnitude_vector" in pname:
                    param.mul_(1 + 0.05 * torch.randn_like(param))
                elif "lora_" in pname:
                    param.copy_(0.1 * torch.randn_like(param))
        model.peft_config["default"].base_model_name_or_path = "tiny-llama-64"
        model.save_pretrained(ROOT / name, save_embedding_layers=False)
        print(f"wrote {ROOT / name}")


if __name__ == "__main__":
    main()
