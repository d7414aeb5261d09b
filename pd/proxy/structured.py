"""Structured output on the proxy: the grammar a request asks for, and its check before dispatch.

A request asks for at most one of ``response_format`` (``json_object``, or ``json_schema`` with its
``strict``) and pd's vLLM-named extras ``guided_json`` (a schema), ``guided_regex`` and ``guided_choice``.
``grammar_for_response_format`` turns that into a ``GrammarSpec``, which travels in
``SamplingParams.grammar`` to both ranks; admission then checks it compiles (``check_grammar``, off the
event loop), so a schema the grammar library rejects is a 400 naming the problem before any rank hears of
the request.

Another part of the proxy that must force the output's shape (e.g. a forced tool call) puts its own spec in
``ParsedRequest.sampling.grammar`` and names its field in ``ParsedRequest.grammar_param``: admission checks
it the same way.
"""

from __future__ import annotations

import asyncio

from pd.grammar.spec import GrammarError, GrammarSpec
from pd.proxy.schemas.requests import ChatCompletionRequest, CompletionRequest

GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


class GrammarRequestError(ValueError):
    """A request's grammar refused (the proxy answers 400); ``param`` names the field it came from."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def grammar_for_response_format(req: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    """The grammar a validated request body asks for: None for none (``response_format`` absent or
    ``{"type": "text"}``, no ``guided_*`` field). Raises GrammarRequestError when it asks for two, or for a
    ``guided_json`` string that is not JSON. Cheap: the spec is checked against the grammar library later
    (``check_grammar``)."""
    asked = grammar_fields(req)
    if len(asked) > 1:
        raise GrammarRequestError(
            f"'{asked[1]}' cannot be combined with '{asked[0]}': ask for one grammar", asked[1]
        )
    rf = req.response_format
    try:
        if rf is not None and rf.type == "json_object":
            return GrammarSpec.json_object()
        if rf is not None and rf.json_schema is not None:
            return GrammarSpec.json_schema(rf.json_schema.json_schema, strict=rf.json_schema.strict)
        if req.guided_json is not None:
            return GrammarSpec.json_schema(req.guided_json)
        if req.guided_regex is not None:
            return GrammarSpec.regex(req.guided_regex)
        if req.guided_choice is not None:
            return GrammarSpec.choice(req.guided_choice)
    except GrammarError as e:
        raise GrammarRequestError(f"'{asked[0]}': {e}", asked[0]) from None
    return None


def grammar_fields(req: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """The fields of ``req`` that ask for a grammar, in GRAMMAR_FIELDS order."""
    rf = req.response_format
    return [
        name
        for name in GRAMMAR_FIELDS
        if getattr(req, name) is not None
        and not (name == "response_format" and rf is not None and rf.type == "text")
    ]


async def check_grammar(spec: GrammarSpec, param: str | None) -> None:
    """Raises GrammarRequestError naming ``param`` (the field the grammar came from) and the problem when the
    grammar library rejects ``spec``. Compiles in a thread: a huge schema takes up to a second."""
    from pd.grammar.text import validate  # the grammar library, loaded on the first request that needs it

    try:
        await asyncio.to_thread(validate, spec)
    except GrammarError as e:
        raise GrammarRequestError(f"'{param}': {e}" if param else str(e), param) from None
