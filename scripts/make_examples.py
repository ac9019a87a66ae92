"""Rebuild the tiny example adapters bundled in recipes/inputs/ (PEFT-made, seeded, a few KB each).

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
    for seed, (name, kwargs) in enumerate(EXAMPLES.items(), start=1):
        model = get_peft_model(base(), LoraConfig(init_lora_weights=False, **kwargs))
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if "lora_" in pname:
                    param.copy_(0.1 * torch.randn_like(param))
        model.peft_config["default"].base_model_name_or_path = "tiny-llama-64"
        model.save_pretrained(ROOT / name, save_embedding_layers=False)
        print(f"wrote {ROOT / name}")


if __name__ == "__main__":
    main()
