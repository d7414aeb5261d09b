"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``.

Each model's fields are its table in ``pd.proxy.fields`` (see ``TableModel``): the implemented ones are
declared here, strictly typed (a JSON ``true`` is never a number, ``5.0`` is not an integer) and
range-checked. A field's ``description``, where it has one, is what the error for any bad value of it
says the field must be (``pd.proxy.schemas.errors``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from pd.proxy import fields
from pd.proxy.schemas.table import JSON_TYPES, REFUSED, UNICODE, WRONG_TYPE, TableModel
from pd.types import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
)

_DEFAULT = SamplingParams()


def _valid_unicode(value: str) -> str:
    """``value`` if it is valid Unicode text; JSON's \\ud800 escapes can smuggle in lone surrogates, which
    neither the tokenizer nor protobuf can encode."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError(UNICODE, "is not valid Unicode text (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _in_range(lo: float, hi: float, lo_open: bool = False) -> FieldInfo:
    """A finite number in [lo, hi], or (lo, hi] when ``lo_open``."""
    if lo_open:
        return Field(gt=lo, le=hi, allow_inf_nan=False, description=f"a finite number in ({lo}, {hi}]")
    return Field(ge=lo, le=hi, allow_inf_nan=False, description=f"a finite number in [{lo}, {hi}]")


# A union below picks its member by the value's JSON type, named by a tag ("JSON string"). Tags show in
# error locations, and pd.proxy.schemas.errors drops them from paths: a tag has a space, never in a field name.
STRING, ARRAY = "JSON string", "JSON array"


def _json_type(value: Any) -> str | None:
    name = JSON_TYPES.get(type(value))
    return name and f"JSON {name}"


def _unbatch(value: Any) -> Any:
    """A batch of one prompt (``["text"]``, ``[[1, 2]]``) is that prompt."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        return value[0]
    return value


Prompt = Annotated[
    Annotated[Text, Field(min_length=1), Tag(STRING)] | Annotated[list[int], Field(min_length=1), Tag(ARRAY)],
    Discriminator(_json_type),
    BeforeValidator(_unbatch),
    Field(description="a non-empty string, a non-empty list of token ids, or a list of one of those"),
]

Stop = Annotated[
    list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_STRING_LEN)]],
    BeforeValidator(lambda value: [value] if isinstance(value, str) else value),  # one string
    Field(
        max_length=MAX_STOP_STRINGS,
        description=f"up to {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_STRING_LEN} chars",
    ),
]

PositiveInt = Annotated[int, Field(ge=1)]


class StreamOptions(TableModel):
    table = fields.STREAM_OPTIONS
    where = "stream_options"

    include_usage: bool = False


class TextPart(TableModel):
    """``{"type": "text", "text": ...}``, the one kind of content part served."""

    table = fields.TEXT_PART
    where = "a text part"

    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        """A part of another type is refused as such, before its other keys are looked at."""
        if isinstance(data, dict) and data.get("type") != "text":
            raise PydanticCustomError(REFUSED, "is not supported by this server (only text parts are)")
        return data


Content = Annotated[
    Annotated[Text, Tag(STRING)] | Annotated[list[TextPart], Tag(ARRAY)],
    Discriminator(
        _json_type,
        custom_error_type=WRONG_TYPE,
        custom_error_message="must be a string or an array of text parts",
    ),
]


class ChatMessage(TableModel):
    table = fields.MESSAGE
    where = "a message"

    role: Text
    content: Content

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Shared(TableModel):
    """The implemented fields both endpoints have."""

    model: Text | None = None
    temperature: Annotated[float, _in_range(0, 2)] = _DEFAULT.temperature
    top_p: Annotated[float, _in_range(0, 1, lo_open=True)] = _DEFAULT.top_p
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    stop: Stop = Field(default_factory=list)
    seed: Annotated[int | None, Field(ge=0, lt=2**63, description="an integer in [0, 2**63)")] = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES, description=f"an integer in [1, {MAX_CHOICES}]")] = 1
    # pd's extras (vLLM's names)
    top_k: int = _DEFAULT.top_k
    min_p: Annotated[float, _in_range(0, 1)] = _DEFAULT.min_p
    ignore_eos: bool = False
    stop_token_ids: Annotated[
        list[Annotated[int, Field(ge=0)]],
        Field(default_factory=list, description="a list of non-negative integers"),
    ]
    return_token_ids: bool = False
    return_phases: bool = False  # "pd_phases" (seconds per latency phase) on the last chunk / the response
    presence_penalty: Annotated[float, _in_range(-2, 2)] = _DEFAULT.presence_penalty
    frequency_penalty: Annotated[float, _in_range(-2, 2)] = _DEFAULT.frequency_penalty
    repetition_penalty: Annotated[float, _in_range(0, 2, lo_open=True)] = _DEFAULT.repetition_penalty
    logit_bias: Annotated[
        dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(allow_inf_nan=False)]],
        Field(
            max_length=MAX_LOGIT_BIAS,
            description=f"an object of up to {MAX_LOGIT_BIAS} token ids (as strings) to finite biases",
        ),
    ] = Field(default_factory=dict)
    min_tokens: Annotated[int, Field(ge=0)] = 0


class CompletionRequest(_Shared):
    table = fields.COMPLETIONS
    where = "/v1/completions"

    prompt: Prompt
    max_tokens: PositiveInt = 16  # OpenAI's default
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None  # alternatives per token
    echo: bool = False
    best_of: int | None = None  # only n (checked in pd.proxy.protocol): every sampled choice is returned


class ChatCompletionRequest(_Shared):
    table = fields.CHAT
    where = "/v1/chat/completions"

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None  # None: the rest of the context
    max_completion_tokens: PositiveInt | None = None  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None  # needs logprobs
