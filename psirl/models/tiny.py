"""Tiny causal language models with a character-level tokenizer, for tests and the demo.

Nothing here downloads anything: the tokenizer and the model are built from scratch and saved with
``save_pretrained`` so that plain ``AutoTokenizer.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)`` load them (no custom code, no ``trust_remote_code``).

Tokenizer design. The tokenizer is a byte-level BPE **with no merges**: every UTF-8 byte is one
token, so every ASCII character is exactly one token ("12+34=" -> 6 tokens). This shape is forced
by transformers 5: for ``model_type == "qwen2"`` ``AutoTokenizer`` always rebuilds the tokenizer as
``Qwen2Tokenizer`` (byte-level BPE from ``vocab`` + ``merges``, see
``transformers/models/auto/tokenization_auto.py``, ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``),
whatever ``tokenizer_class`` says. A WordLevel tokenizer would silently lose spaces and newlines
there. We therefore build exactly the pipeline ``Qwen2Tokenizer`` rebuilds (NFC normaliser, Qwen2
split regex, ByteLevel pre-tokenizer and decoder, BPE without merges), so both architectures
tokenise identically whichever class ``AutoTokenizer`` picks.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3

# Printable ASCII without the rarely useful whitespace (\t \r \x0b \x0c), plus "\n": digits,
# letters, space and every punctuation mark used by arithmetic / countdown tasks (+ - * / = ( )).
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

# Same split regex as transformers' Qwen2Tokenizer (models/qwen2/tokenization_qwen2.py). With no
# merges it does not change the token ids; it is copied so the two pipelines are byte-identical.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A plain chat template over characters of the default alphabet, e.g.
#   [{"role": "user", "content": "1+2="}] -> "user: 1+2=\nassistant: "
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by the ByteLevel pre-tokenizer."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def char_vocab(alphabet: str | None = None) -> dict[str, int]:
    """Token -> id map: the 4 special tokens (ids 0..3), then one token per byte of the alphabet.

    ``alphabet=None`` means every one of the 256 bytes (nothing is ever dropped; ASCII characters
    are one token each, other characters one token per UTF-8 byte). A restricted alphabet gives a
    smaller vocabulary; characters outside it are dropped by the tokenizer (this is what
    ``Qwen2Tokenizer`` does with unknown bytes, and we mirror it so both architectures agree).
    """
    byte_map = _byte_to_unicode()
    if alphabet is None:
        # printable ASCII first so that small ids are the familiar characters
        order = list(DEFAULT_ALPHABET.encode()) + [b for b in range(256)]
    else:
        if not alphabet:
            raise ValueError("alphabet: must be a non-empty string or None")
        order = list(alphabet.encode("utf-8"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in order:
        vocab.setdefault(byte_map[b], len(vocab))
    return vocab


def make_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` (pad ``<pad>``=0, bos ``<s>``=1, eos ``</s>``=2).

    No special tokens are added when encoding (like Qwen2): ``tok("12+3")["input_ids"]`` has 4 ids.
    Decoding with ``skip_special_tokens=True`` drops pad/bos/eos. It carries ``CHAT_TEMPLATE``.
    Padding side is left (what batched generation wants).
    """
    vocab = char_vocab(alphabet)
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[],
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    alphabet: str | None = None,
    *,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
) -> Path:
    """Build, randomly initialise and save a tiny causal LM plus its character tokenizer.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer
    files into ``out_dir`` and returns it as a ``Path``. Loads back with plain
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` / ``AutoTokenizer.from_pretrained(out_dir)``.

    arch: "qwen2" (Qwen2ForCausalLM) or "llama" (LlamaForCausalLM).
    intermediate_size: defaults to ``4 * hidden_size``. num_kv_heads: defaults to ``num_heads // 2``
    when that divides evenly (grouped-query attention, as in real Qwen2/Llama 3), else num_heads.
    seed: weights depend only on the seed and the sizes (the global RNG state is left untouched).
    """
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch: expected 'qwen2' or 'llama', got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    if num_kv_heads is None:
        num_kv_heads = num_heads // 2 if num_heads % 2 == 0 and num_heads >= 2 else num_heads
    tokenizer = make_char_tokenizer(alphabet)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
