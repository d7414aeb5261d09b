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
NonNegativeInt = Annotated[int, Field(ge=0)]


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


class FunctionCall(TableModel):
    """A tool call's ``{"name", "arguments"}`` (arguments: JSON text, as the model wrote it)."""

    table = fields.FUNCTION_CALL
    where = "a tool call's function"

    name: Text
    arguments: Text


class MessageToolCall(TableModel):
    """One of an assistant message's ``tool_calls``, as an earlier response returned it."""

    table = fields.TOOL_CALL
    where = "a tool call"

    id: Text
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(TableModel):
    table = fields.MESSAGE
    where = "a message"

    role: Text
    content: Content | None = None  # null only in an assistant message with tool_calls
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: Text | None = None  # tool messages: the id of the call answered

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> ChatMessage:
        """Content is required but in an assistant message with calls; tool_calls belong to assistant
        messages, tool_call_id to (and is required in) tool messages. Other rules of roles: the chat
        template's (pd.tokenizer)."""

        def refuse(field: str, why: str) -> PydanticCustomError:
            return PydanticCustomError(REFUSED, why, {"field": field})

        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise refuse("content", "is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls is not None and self.role != "assistant":
            raise refuse("tool_calls", "is a field of assistant messages only")
        if (self.tool_call_id is None) == (self.role == "tool"):
            why = (
                "is required in a tool message" if self.role == "tool" else "is a field of tool messages only"
            )
            raise refuse("tool_call_id", why)
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined; "" for none)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: role, content (a string), and the tool fields it has. OpenAI's
        "developer" role (its newer models' name for the system prompt) is "system", the role templates know."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class JsonSchemaFormat(TableModel):
    """``response_format.json_schema``: the schema the output must validate against."""

    table = fields.JSON_SCHEMA_FORMAT
    where = "response_format.json_schema"

    name: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="1 to 64 letters, digits, '_' or '-'")
    ]
    # "schema" is a BaseModel attribute: the field has another name and "schema" as its JSON name.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool = False


class ResponseFormat(TableModel):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": ...}`` (the last type only)."""

    table = fields.RESPONSE_FORMAT
    where = "response_format"

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                REFUSED, 'is required with type "json_schema"', {"field": "json_schema"}
            )
        if self.type != "json_schema" and self.json_schema is not None:
            message = 'is only allowed with type "json_schema"'
            raise PydanticCustomError(REFUSED, message, {"field": "json_schema"})
        return self


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
    # structured output (pd.proxy.structured); at most one of them
    response_format: ResponseFormat | None = None
    guided_json: Annotated[
        dict[str, Any] | Text | None, Field(description="a JSON schema: an object, or one as JSON text")
    ] = None
    guided_regex: Annotated[
        Text | None, Field(min_length=1, description="a non-empty regular expression")
    ] = None
    guided_choice: Annotated[
        list[Annotated[Text, Field(min_length=1)]] | None,
        Field(min_length=1, description="a non-empty list of non-empty strings"),
    ] = None


class CompletionRequest(_Shared):
    table = fields.COMPLETIONS
    where = "/v1/completions"

    prompt: Prompt
    max_tokens: NonNegativeInt = 16  # OpenAI's default; 0 only with echo (the prompt alone)
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
    # Checked by pd.proxy.tool_choice.validate_tools (its messages name the place in them).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = (
        True  # false: at most one call (with tool_choice required or a named function)
    )
