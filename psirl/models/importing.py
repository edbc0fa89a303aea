"""`psirl import`: turn a GGUF file, a local transformers folder or a LoRA adapter folder into a
psirl-ready safetensors folder (config.json, model.safetensors, tokenizer with chat template).

GGUF: transformers reads it through the ``gguf`` package (extra ``real``) and dequantises the
weights; it refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is copied into
``from_config(config)`` built without the quantization config (same logits, plain weights).
A folder: loaded with ``AutoModelForCausalLM`` (safetensors; pickle weights only with
``allow_pickle=True``, because unpickling runs code from the file) and saved in ``dtype``.
A PEFT adapter folder (``adapter_config.json``): merged into its base model, so a LoRA run's
``final/`` chains into the next stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from psirl.models.loading import (
    PICKLE_SUFFIXES,
    CheckpointError,
    ensure_pad_token,
    resolve_dtype,
)

IMPORT_RECORD = "psirl_import.json"


class ModelImportError(CheckpointError):
    """A source that cannot be imported: missing, unsupported architecture, or unsafe weights."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def causal_lm_types() -> set[str]:
    """model_type values transformers' AutoModelForCausalLM can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read with the ``gguf`` package)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelImportError(
            f"{path}: reading GGUF needs the gguf package: pip install 'psirl[real]'"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # gguf raises ValueError / struct errors on a corrupt file
        raise ModelImportError(f"{path}: not a readable GGUF file: {error}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelImportError(f"{path}: GGUF metadata has no 'general.architecture'")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _gguf_supported() -> set[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) from a GGUF file, the model a plain (unquantised) transformers model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    supported = _gguf_supported()
    if architecture not in supported:
        raise ModelImportError(
            f"{path}: GGUF architecture {architecture!r} is not supported by transformers' GGUF "
            f"loader; supported: {', '.join(sorted(supported))}"
        )
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type not in causal_lm_types():
        raise ModelImportError(f"{path}: model_type {config.model_type!r} is not a causal LM")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied output head is not a separate tensor in the state dict of a tied model.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelImportError(
            f"{path}: weights do not match the {config.model_type} layout: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, dtype)
    if not (path / "config.json").is_file():
        raise ModelImportError(f"{path / 'config.json'}: missing; not a transformers model folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in causal_lm_types():
        raise ModelImportError(
            f"{path / 'config.json'}: model_type {config.model_type!r} is not a causal LM "
            "architecture transformers can load (AutoModelForCausalLM)"
        )
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors:
        if not pickles:
            raise ModelImportError(f"{path}: no *.safetensors (or other) weight file found")
        if not allow_pickle:
            raise ModelImportError(
                f"{path / pickles[0]}: pickle weights; loading them runs code from the file. "
                "If you trust it, run `psirl import --allow-pickle` once"
            )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=has_safetensors
    )
    return model, tokenizer


def _load_adapter(path: Path, dtype: torch.dtype):
    """Base model + PEFT adapter, merged (the base path is read from adapter_config.json)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelImportError(f"{path}: a LoRA adapter folder; merging it needs peft") from None
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelImportError(
            f"{path / 'adapter_config.json'}: field 'base_model_name_or_path': base model folder "
            f"{base!r} not found; the adapter can only be merged onto its base model"
        )
    model, tokenizer = _load_folder(Path(base), dtype, allow_pickle=False)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return merged, tokenizer


def load_hub(model_id: str, dtype: torch.dtype):
    """(model, tokenizer) from a hub id through transformers' own download and cache."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, use_safetensors=True)
    except OSError as error:
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ModelImportError(
            f"{model_id}: not a local path, and the hub could not provide it{hint}: "
            f"{str(error).splitlines()[0]}. Offline, import a local folder or GGUF file instead"
        ) from None
    return model, tokenizer


def import_model(src: str | Path, out: str | Path, *, dtype: str = "float32",
                 allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert ``src`` (GGUF file, model folder, adapter folder or hub id) to a folder at ``out``.

    The folder holds config.json, safetensors weights in ``dtype``, the tokenizer (with its chat
    template) and psirl_import.json (source, its sha256 for a file, dtype). Returns ``out``.
    Raises ModelImportError (a CheckpointError) naming the source for anything unsupported.
    """
    torch_dtype = resolve_dtype(dtype)
    source = Path(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelImportError(f"{out}: output folder exists and is not empty")
    record: dict[str, str] = {"source": str(src), "dtype": dtype}
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ModelImportError(
                f"{source}: unsupported file type {source.suffix!r}; give a .gguf file or a "
                "transformers model folder"
            )
        model, tokenizer = load_gguf(source, torch_dtype)
        record["sha256"] = _sha256(source)
        record["format"] = "gguf"
    elif source.is_dir():
        model, tokenizer = _load_folder(source, torch_dtype, allow_pickle)
        record["format"] = "adapter" if (source / "adapter_config.json").is_file() else "folder"
    elif str(src).count("/") == 1 and not str(src).startswith((".", "/")):
        model, tokenizer = load_hub(str(src), torch_dtype)
        record["format"] = "hub"
    else:
        raise ModelImportError(f"{source}: no such file or folder")
    ensure_pad_token(model, tokenizer)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
