"""What a single adapter file is, told from its name and its header alone (no tensor is read).

adapterops reads PEFT adapter directories, kohya ``.safetensors`` files (``io.kohya``) and GGUF
LoRA files (``io.gguf``), detected before this is asked; users hand it diffusers, LyCORIS, MLX files
and GGUF models too. ``unsupported_file_error`` turns such a path into one error line that says
what the file is and what to do, instead of a generic "not a directory".
"""

from __future__ import annotations

from pathlib import Path

from adapterops.errors import AdapterOpsError, NotFoundError, UnsupportedAdapterError
from adapterops.io.safetensors_file import read_header

# (what the file is, a test on its tensor names); the first match wins
_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a LyCORIS file (LoHa/LoKr)", (".hada_w1_a", ".lokr_w1")),
    ("a kohya LoRA file (lora_unet_* / lora_te* keys)", ("lora_unet_", "lora_te")),
    ("a PEFT adapter's weights file", ("base_model.model.",)),
    ("a diffusers LoRA file", ("unet.", "text_encoder.", "transformer.")),
    ("an MLX LoRA adapter file", (".lora_a", ".lora_b")),
)


def describe_file(path: Path) -> str:
    """A short description of an adapter file: its format, or 'a file'."""
    if path.suffix.lower() == ".gguf":
        return "a GGUF file that is not a LoRA adapter (general.type is not adapter)"
    if path.suffix.lower() != ".safetensors":
        return "a file"
    try:
        names = [e.name for e in read_header(path).entries]
    except AdapterOpsError:
        return "a file that is not valid safetensors"
    for kind, markers in _KINDS:
        if any(marker in name for name in names for marker in markers):
            return kind
    return "a safetensors file"


def unsupported_file_error(path: Path, what: str) -> AdapterOpsError:
    """The error for a single file where a directory was expected, saying what the file is."""
    kind = describe_file(path)
    if kind == "a PEFT adapter's weights file":
        return NotFoundError(
            f"{path} is {kind}; pass the {what} directory that holds it with its adapter_config.json"
        )
    if kind in ("a file", "a safetensors file", "a file that is not valid safetensors"):
        return NotFoundError(f"{path} is {kind}; pass the {what} directory that contains it")
    if path.suffix.lower() == ".gguf":
        return UnsupportedAdapterError(
            f"{path} is {kind} (a model, or unreadable); adapterops reads GGUF LoRA adapters "
            "(llama.cpp's convert_lora_to_gguf.py output) and PEFT adapter directories"
        )
    return UnsupportedAdapterError(
        f"{path} is {kind}; adapterops reads PEFT adapter directories (the folder PeftModel.save_pretrained "
        "writes) and does not read this format yet: convert it to a PEFT adapter first"
    )
