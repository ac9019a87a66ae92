"""Everything that touches disk or network: one module per format, output directories, Hub resolution.

    refs.py              a local directory or Hub id -> a local folder
    peft.py              PEFT adapter directory <-> Adapter (tensors, keys, layouts)
    gguf.py              llama.cpp GGUF LoRA file <-> Adapter (tensor names, alpha, q/k permutation)
    kohya.py             kohya LoRA / LoCon single files (SD, SDXL, Flux; names through a base) <-> Adapter
    diffusers.py         diffusers pipeline LoRA files (pytorch_lora_weights.safetensors) <-> Adapter
    lycoris.py           LyCORIS single files (LoCon + Tucker, LoHa, LoKr, DoRA) -> exact LoRA Adapter, LoCon out
    mlx.py               mlx-lm adapter directory <-> Adapter (transposed factors, one rank and scale)
    peft_config.py       adapter_config.json semantics (ranks, alphas, refused variants)
    safetensors_file.py  the safetensors byte format: headers, pread reads, ordered writer
    checkpoint.py        checkpoints (directories or one file): shards, key matching, layouts, base weights
    atomic.py            whole-or-nothing output directories

A new adapter format is one module here plus an entry in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapterops.adapter import Adapter, Source
from adapterops.errors import InvalidInputError
from adapterops.io import diffusers, gguf, kohya, lycoris, mlx, peft
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.peft_config import CONFIG_NAME
from adapterops.io.refs import SINGLE_FILE_SUFFIXES, hub_files, parse_hub_file, resolve, resolve_hub_file
from adapterops.io.sniff import unsupported_file_error

__all__ = ["FORMATS", "AdapterFormat", "load_adapter", "save_adapter"]


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter file format: how to recognize it, read it and write it.

    ``detect(path)`` says whether a local path holds this format; ``hub_files`` are the patterns
    to download for a Hub id; ``read(path, source)`` returns an ``Adapter``; ``write(adapter, path,
    force=, dtype=)`` writes one atomically (GGUF takes ``base=`` too). ``single_file``: the format is
    one file (read from a file path, written to one), not a directory; None: either (read from the
    file or its folder; a ``.safetensors`` output path is written as the file, another as a folder).
    """

    name: str
    detect: Callable[[Path], bool]
    hub_files: tuple[str, ...]
    read: Callable[[Path, Source], Adapter]
    write: Callable[..., Path]
    single_file: bool | None = False

    def writes_file(self, path: str | Path) -> bool:
        """Whether writing at ``path`` makes one file (else a directory)."""
        if self.single_file is None:
            return Path(path).suffix.lower() == ".safetensors"
        return self.single_file


# one entry per format, tried in order (LyCORIS before kohya: it claims the kohya-keyed files with
# LyCORIS-only tensors); PEFT's reader explains what a path lacks
FORMATS: dict[str, AdapterFormat] = {
    "lycoris": AdapterFormat("lycoris", lycoris.detect, (), lycoris.read_adapter, lycoris.save_adapter, True),
    "kohya": AdapterFormat("kohya", kohya.detect, (), kohya.read_adapter, kohya.save_adapter, True),
    # before peft: both directories hold an adapter_config.json
    "mlx": AdapterFormat(
        "mlx", mlx.detect, (mlx.CONFIG_NAME, mlx.WEIGHTS_NAME), mlx.read_adapter, mlx.save_adapter
    ),
    "peft": AdapterFormat(
        "peft",
        lambda path: (path / CONFIG_NAME).is_file(),
        (CONFIG_NAME, peft.SAFETENSORS_NAME, peft.BIN_NAME),
        peft.read_adapter,
        peft.save_adapter,
    ),
    "diffusers": AdapterFormat(
        "diffusers",
        diffusers.detect,
        (diffusers.WEIGHTS_NAME,),
        diffusers.read_adapter,
        diffusers.save_adapter,
        None,
    ),
    "gguf": AdapterFormat("gguf", gguf.is_gguf_adapter, (), gguf.read_adapter, gguf.save_adapter, True),
}


def load_adapter(ref: str | Path, base: str | Path | Checkpoint | Mapping[str, Any] | None = None) -> Adapter:
    """Load an adapter from a local path or a Hub id (``org/name`` or ``org/name@rev``).

    A Hub repo with no adapter directory (no adapter_config.json) but one ``.safetensors`` or
    ``.gguf`` file is read from that file; where it holds several, name one: ``org/name:file`` or
    ``org/name@rev:file`` (see ``io.refs``).

    The format is detected (``FORMATS``: PEFT adapter directories, kohya and LyCORIS ``.safetensors`` files,
    diffusers LoRA files or their folders, GGUF LoRA files, mlx-lm adapter directories). Tensors keep their stored dtype (LyCORIS LoHa / LoKr / Tucker modules
    are converted to exact LoRA factors: docs/formats.md). ``base`` maps a kohya or LyCORIS file's flattened names
    back to module names through the base's own weight names (``kohya.read_base``: a diffusers
    folder, a model folder, an original-layout single ``.safetensors`` file, a Hub id, a
    ``Checkpoint`` or a state dict); other formats name their modules themselves and ignore it.

    Raises:
        NotFoundError: a missing path, repo or revision.
        AdapterFormatError: files adapterops cannot read exactly.

    Example:
        >>> load_adapter("org/style@v2").source.revision   # the commit the revision resolved to
    """
    local = Path(ref).expanduser()
    if not local.exists() and parse_hub_file(str(ref)) is not None:  # org/name[@rev]:file
        file = resolve_hub_file(str(ref))
        return _read_file(
            file.path, Source(path=str(ref), repo_id=file.repo_id, revision=file.revision), base
        )
    if local.is_file():
        return _read_file(local, Source(path=str(ref)), base)
    patterns = list(dict.fromkeys(p for f in FORMATS.values() for p in f.hub_files))
    resolved = resolve(ref, allow_patterns=patterns)
    source = Source(path=str(ref), repo_id=resolved.repo_id, revision=resolved.revision)
    fmt = next((f for f in FORMATS.values() if f.detect(resolved.path)), None)
    if fmt is None and resolved.repo_id is not None and resolved.revision is not None:
        # no adapter directory in the repo: it may hold one single-file adapter (kohya, GGUF)
        name = _one_adapter_file(str(ref), resolved.repo_id, resolved.revision)
        if name is not None:
            file = resolve_hub_file(f"{resolved.repo_id}@{resolved.revision}:{name}")
            return _read_file(file.path, replace(source, path=f"{resolved.repo_id}:{name}"), base)
    return (fmt or FORMATS["peft"]).read(resolved.path, source)


def _read_file(path: Path, source: Source, base: Any) -> Adapter:
    """A single-file adapter in the format it is in; ``base`` names a kohya file's modules."""
    for named in (lycoris, kohya):  # ``base`` maps kohya's flattened names back to module names
        if named.detect(path):
            return named.read_adapter(path, source, base=base)
    for fmt in FORMATS.values():
        if fmt.single_file is not False and fmt.detect(path):
            return fmt.read(path, source)
    raise unsupported_file_error(path, "adapter")


def _one_adapter_file(ref: str, repo_id: str, revision: str) -> str | None:
    """The repo's one single-file adapter candidate (a .safetensors or .gguf file), None when it has
    none; several are refused with a line listing them and saying how to name one."""
    candidates = [n for n in hub_files(repo_id, revision, ref) if n.lower().endswith(SINGLE_FILE_SUFFIXES)]
    if len(candidates) > 1:
        listed = ", ".join(candidates[:8]) + (
            f" and {len(candidates) - 8} more" if len(candidates) > 8 else ""
        )
        raise InvalidInputError(
            f"{ref}: the Hub repo {repo_id} holds no adapter directory and {len(candidates)} adapter files "
            f"({listed}); name one as {repo_id}:{candidates[0]} (or {repo_id}@<revision>:<file>)"
        )
    return candidates[0] if candidates else None


def save_adapter(adapter: Adapter, path: str | Path, *, format: str | None = None, **options: Any) -> Path:
    """Write ``adapter`` at ``path`` in ``format``, atomically.

    The default format is the one the adapter was read in (``adapter.config["format"]``; a
    combination keeps its first input's), else ``peft``.

    ``options`` go to the format's writer: for PEFT, ``force`` (replace an existing ``path``) and
    ``dtype`` (storage dtype of the factors, a torch dtype or its name; default: keep them). GGUF
    also needs ``base`` (the base model's directory or Hub id, for its config.json).

    Example:
        >>> save_adapter(combine(["./a", "./b"]), "./mix", dtype="bfloat16")
    """
    if format is None:
        format = str(adapter.config.get("format", "peft"))
    if format not in FORMATS:
        raise InvalidInputError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    suffix = Path(path).suffix
    if FORMATS[format].single_file is False and suffix in (".safetensors", ".gguf"):
        # a directory under a file's name would hide what was written
        raise InvalidInputError(
            f"{path}: the result is a {format} adapter, which is a directory, not a {suffix} file; name the "
            f"output without {suffix}, or convert it --to kohya or gguf"
        )
    return FORMATS[format].write(adapter, path, **options)
