"""Learned reward: a sequence-classification model scores prompt + completion (RLHF).

    r_i = RM(prompt_i ⊕ completion_i)[label_index]   (the logit at the last non-pad token)

The reward model is the learned proxy of ../shared/reference/003_e8bd019fa090e190.txt: it is
what a policy over-optimises (reward up, true quality an inverted U), so keep a KL penalty and a
held-out / gold evaluation next to it. Loaded from a local folder only, safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psirl.rewards.base import check_batch


class RewardModelReward:
    """RewardFn scoring with ``AutoModelForSequenceClassification`` from a local folder.

    Text per sample: if ``records[i]["prompt"]`` is a conversational message list and the
    tokenizer has a chat template, the template of ``prompt messages + [assistant: completion]``;
    otherwise ``prompts[i] + completions[i]`` (prompts as the policy saw them). Batches are
    right-padded; over-long texts are truncated from the LEFT so the completion's end is kept.
    Scores are float32 logits of column ``label_index`` (num_labels == 1 for a Bradley–Terry RM).

    device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ... or a
    torch.device; dtype: "float32" | "bfloat16" | "float16" or a torch.dtype ("bfloat16"
    halves the model's memory on a GPU; the scores are upcast to float32 either way).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | Any = "auto",
        dtype: str | Any = "float32",
        batch_size: int = 8,
        max_length: int = 2048,
        label_index: int = 0,
        name: str = "reward_model",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from psirl.models.loading import resolve_dtype

        device = _resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: reward model folder not found (local paths only)")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path}: no *.safetensors weights; psirl loads reward models from safetensors "
                f"only (pickle checkpoints can run arbitrary code)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{path}: tokenizer has neither pad_token nor eos_token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=torch_dtype
        ).to(device)
        self.model.eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = self.model.config.num_labels
        if not 0 <= label_index < num_labels:
            raise ValueError(f"label_index: must be in [0, {num_labels}), got {label_index}")
        self.device = device
        self.dtype = torch_dtype
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.name = name

    def text(self, prompt: str, completion: str, record: dict[str, Any]) -> str:
        """The string the reward model reads for one sample (see class docstring)."""
        messages = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(messages, list) and getattr(self.tokenizer, "chat_template", None):
            conversation = [dict(m) for m in messages] + [
                {"role": "assistant", "content": completion}
            ]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return prompt + completion

    def score_texts(self, texts: list[str]) -> list[float]:
        """Reward-model scores of raw texts, ``len(texts)`` floats."""
        import torch

        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits  # [b, num_labels]
                scores.extend(logits[:, self.label_index].float().tolist())
        return scores

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        texts = [self.text(p, c, r) for p, c, r in zip(prompts, completions, records, strict=True)]
        return self.score_texts(texts)


def _resolve_device(device):
    """torch.device of a reward model: "auto" is CUDA when available, else the CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {device!r} requested for the reward model but CUDA is not available")
    return resolved
