"""pydantic models of the OpenAI request and response bodies pd serves.

``requests``: the request bodies, whose fields are the tables of ``pd.proxy.fields`` (``table``); ``errors``:
a validation error as a message and ``param`` naming the field; ``responses``: the response bodies and
stream chunks. ``pd.proxy.protocol`` parses requests and builds responses with them.
"""

from pd.proxy.schemas.errors import describe
from pd.proxy.schemas.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FunctionCall,
    MessageToolCall,
    StreamOptions,
    TextPart,
)
from pd.proxy.schemas.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaFunction,
    DeltaToolCall,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
    TopLogprob,
    Usage,
)
from pd.proxy.schemas.table import TableModel

__all__ = [
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DeltaFunction",
    "DeltaToolCall",
    "FunctionCall",
    "MessageToolCall",
    "StreamOptions",
    "TableModel",
    "TextPart",
    "TokenLogprob",
    "ToolCall",
    "ToolCallFunction",
    "TopLogprob",
    "Usage",
    "describe",
]
