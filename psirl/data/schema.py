"""Record schemas (pydantic) for the four kinds of training data, and their error messages.

Kinds and fields (extra fields are kept, e.g. ``answer``, ``tests``, ``numbers``):

- ``prompt``:     ``{"prompt": Prompt, "answer"?: str}`` — online RL / evaluation prompts.
- ``sft``:        ``{"prompt": Prompt, "completion": Text}`` or ``{"messages": [..., assistant]}``.
- ``preference``: ``{"prompt": Prompt, "chosen": Text, "rejected": Text}`` — DPO family.
- ``labelled``:   ``{"prompt": Prompt, "completion": Text, "label": bool}`` — KTO.

``Prompt`` and ``Text`` are either a plain non-empty string or a conversational list of
``{"role": str, "content": str}`` messages. The reward sources these records feed (verifiable
answers, preference pairs, labelled samples) are those of
../shared/reference/003_e8bd019fa090e190.txt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    field_validator,
)

from psirl.data.errors import DataError

RecordKind = Literal["prompt", "sft", "preference", "labelled"]
KINDS: tuple[str, ...] = ("prompt", "sft", "preference", "labelled")

# Union tags start with "<" so that error locations can drop them (see _field_path).
_TEXT_TAG = "<text>"
_MESSAGES_TAG = "<messages>"


class Message(BaseModel):
    """One chat message ``{"role": str, "content": str}`` (extra keys such as ``name`` kept)."""

    model_config = ConfigDict(extra="allow")
    role: Annotated[str, Field(min_length=1)]
    content: str


def _text_or_messages(value: Any) -> str | None:
    if isinstance(value, str):
        return _TEXT_TAG
    if isinstance(value, list):
        return _MESSAGES_TAG
    return None


TextOrMessages = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag(_TEXT_TAG)]
    | Annotated[Annotated[list[Message], Field(min_length=1)], Tag(_MESSAGES_TAG)],
    Discriminator(
        _text_or_messages,
        custom_error_type="wrong_type",
        custom_error_message="wrong type: expected a non-empty string or a list of "
        "{role, content} messages",
    ),
]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptRecord(_Record):
    """``{"prompt": str | messages, "answer"?: str}``; a numeric answer is stored as its string."""

    prompt: TextOrMessages
    answer: str | None = None

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_to_text(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("wrong type: expected a string or number, got bool")
        if isinstance(value, int | float):
            return str(value)
        return value


class SFTPairRecord(_Record):
    """``{"prompt": str | messages, "completion": str | messages}``."""

    prompt: TextOrMessages
    completion: TextOrMessages


class SFTMessagesRecord(_Record):
    """``{"messages": [...]}`` whose last message is the assistant turn to learn."""

    messages: Annotated[list[Message], Field(min_length=2)]

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError(
                f"the last message must have role 'assistant' (the completion to learn), "
                f"got role {messages[-1].role!r}"
            )
        return messages


class PreferenceRecord(_Record):
    """``{"prompt", "chosen", "rejected"}``; chosen/rejected are strings or assistant messages."""

    prompt: TextOrMessages
    chosen: TextOrMessages
    rejected: TextOrMessages


class LabelledRecord(_Record):
    """``{"prompt", "completion", "label": bool}`` — one desirable/undesirable sample (KTO)."""

    prompt: TextOrMessages
    completion: TextOrMessages
    label: StrictBool


def _field_path(loc: tuple[Any, ...]) -> str:
    """('messages', 1, 'content') -> 'messages[1].content'; union tags like '<text>' dropped."""
    path = ""
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind.endswith("_type") or kind == "wrong_type":
        got = type(error.get("input")).__name__
        if not message.startswith("wrong type"):
            message = f"wrong type: {message}"
        return f"{message}, got {got}"
    return message


def format_validation_error(where: str, error: ValidationError, max_errors: int = 5) -> str:
    """Turn a pydantic error into ``where: field 'x': problem; field 'y': problem``."""
    parts = []
    for item in error.errors()[:max_errors]:
        path = _field_path(tuple(item["loc"])) or "record"
        parts.append(f"field '{path}': {_describe(item)}")
    return f"{where}: " + "; ".join(parts)


def _model_for(kind: str, raw: dict[str, Any], where: str) -> type[_Record]:
    if kind == "prompt":
        return PromptRecord
    if kind == "preference":
        return PreferenceRecord
    if kind == "labelled":
        return LabelledRecord
    if kind == "sft":
        if "messages" in raw:
            extra = [k for k in ("prompt", "completion") if k in raw]
            if extra:
                raise DataError(
                    f"{where}: field '{extra[0]}': an sft record holds either 'messages' or "
                    f"'prompt' + 'completion', not both"
                )
            return SFTMessagesRecord
        return SFTPairRecord
    raise ValueError(f"unknown record kind {kind!r}; known kinds: {', '.join(KINDS)}")


def validate_record(kind: str, raw: Any, where: str) -> dict[str, Any]:
    """Validate one raw record against the schema of ``kind``; return it as a plain dict.

    ``where`` locates the record in messages (``"data.jsonl:7"``). Extra fields pass through
    unchanged; ``answer`` numbers become strings. Raises DataError naming ``where`` and the field.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: field 'record': wrong type: a record must be a JSON object "
            f"(mapping of field -> value), got {type(raw).__name__}"
        )
    model = _model_for(kind, raw, where)
    try:
        record = model.model_validate(raw)
    except ValidationError as error:
        raise DataError(format_validation_error(where, error)) from None
    return record.model_dump(exclude_unset=True)
