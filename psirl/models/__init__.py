"""Causal LMs, critics and log-probabilities (see DESIGN.md, layer ``models``).

Public names: ``load_policy``, ``save_policy``, ``CheckpointError``, ``token_logprobs``,
``ValueModel``, ``apply_lora``, ``make_tiny_model``, ``make_char_tokenizer``.
"""

from .loading import CheckpointError, load_policy, save_policy
from .logprobs import token_logprobs
from .lora import apply_lora
from .tiny import make_char_tokenizer, make_tiny_model
from .value import ValueModel

__all__ = [
    "CheckpointError",
    "ValueModel",
    "apply_lora",
    "load_policy",
    "make_char_tokenizer",
    "make_tiny_model",
    "save_policy",
    "token_logprobs",
]
