"""Load and save causal-LM policies from local folders, safetensors only.

A checkpoint stored as a pickle (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``)
is refused: unpickling runs arbitrary code from the file, so psirl never calls ``torch.load`` on a
model it did not write. Convert such a folder once, in a trusted environment, with
``AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`` (transformers 5 writes
safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A model folder that cannot be loaded safely: missing, incomplete, or pickle-only."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32" | "bfloat16" | "float16" (or a torch.dtype among those) to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")


def check_safetensors_folder(path: str | Path) -> Path:
    """Return ``Path(path)`` if it is a folder with ``config.json`` and ``*.safetensors`` weights.

    Raises ``CheckpointError`` naming the folder and the offending or missing file otherwise; a
    folder whose only weights are pickle files is refused with the file named and the reason.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: model folder does not exist")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: expected a model folder (config.json + *.safetensors), got a file"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: missing; not a transformers model folder")
    if any(folder.glob("*.safetensors")):
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: refusing to load a pickle checkpoint (unpickling can run "
            "arbitrary code from the file); psirl loads safetensors only. Convert it once in a "
            "trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
        )
    raise CheckpointError(f"{folder}: no *.safetensors weight file found")


def load_policy(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
):
    """Load ``(model, tokenizer)`` from a local folder holding safetensors weights, or a hub id.

    model: ``AutoModelForCausalLM`` in eval mode on ``device`` with parameters in ``dtype``
    ("float32" | "bfloat16" | "float16"); tokenizer: ``AutoTokenizer``. If the tokenizer has no
    pad token, the EOS token is used as pad (the id is also written to ``model.config`` and
    ``model.generation_config``); padded positions are always masked, so this is harmless.
    A local folder is read with ``local_files_only=True``; ``path`` "org/name" that is not a local
    path is a hub id, loaded through transformers' download and cache (safetensors only) when the
    network allows, else a CheckpointError saying so. ``trust_remote_code`` is never set.
    Raises ``CheckpointError`` for a missing folder / config or pickle-only weights.
    """
    torch_dtype = resolve_dtype(dtype)
    if is_hub_id(path):
        model, tokenizer = _load_hub(str(path), torch_dtype)
    else:
        folder = check_safetensors_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, use_safetensors=True, local_files_only=True,
            output_loading_info=True,
        )
        _check_all_weights_loaded(folder, info)
    ensure_pad_token(model, tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def _check_all_weights_loaded(folder: Path, info: dict) -> None:
    """Refuse a folder whose weight files lack tensors of the model (transformers would leave
    them randomly initialised with only a log line) or hold tensors of the wrong shape."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"{folder}: the weight files have no tensor for {shown} (they would be left "
            "randomly initialised); the checkpoint is incomplete or for another architecture"
        )
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key, got, want = (list(mismatched[0]) + [None, None])[:3]
        raise CheckpointError(f"{folder}: tensor {key} has shape {got} in the weight files, "
                              f"the model expects {want}")


def is_hub_id(path: str | Path) -> bool:
    """True for "org/name" that is not a local path (a hub model id)."""
    text = str(path)
    return (
        not Path(text).exists()
        and text.count("/") == 1
        and not text.startswith((".", "/", "~"))
        and all(part and " " not in part for part in text.split("/"))
    )


def _load_hub(model_id: str, dtype: torch.dtype):
    """(model, tokenizer) of a hub id via transformers' own download and cache (safetensors)."""
    import os

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, use_safetensors=True)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        hint = (" HF_HUB_OFFLINE is set, so nothing is downloaded (HF_HUB_OFFLINE=0 allows it)"
                if offline
                else " the hub could not be reached or has no such model")
        raise CheckpointError(
            f"{model_id}: no such local folder, and as a hub id it could not be loaded:{hint} "
            f"({str(error).splitlines()[0]}). Offline, give a local folder (psirl import "
            "converts GGUF files and other folders)"
        ) from None
    return model, tokenizer


def ensure_pad_token(model: PreTrainedModel, tokenizer) -> None:
    """Give ``tokenizer`` a pad token (its EOS, or a new "<pad>" if it has none) and tell the model."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise CheckpointError(
                f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: tokenizer has neither a pad "
                "nor an EOS token; set tokenizer.pad_token before training"
            )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_policy(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to ``out_dir``; return it as a Path.

    A PEFT-wrapped model is merged into its base weights first when ``merge_lora`` (default), so
    the folder loads with plain ``AutoModelForCausalLM.from_pretrained``; the trainer's model is
    left unmerged (the merge happens on a copy). With ``merge_lora=False`` only the adapter is
    saved (PEFT's adapter_model.safetensors + adapter_config.json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft_model(model) and merge_lora:
        from .lora import merged_copy

        model = merged_copy(model)
    model.save_pretrained(out)  # transformers 5 and PEFT write safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional
        return False
    return isinstance(model, PeftModel)
