"""Structured outputs end to end: pd-serve (a prefill and a decode process, the KV and the first token
between them over Mooncake) on the tiny model with random weights, driven by the official openai client.
Oracles: jsonschema validates every JSON output against its schema, json parses json_object outputs,
``re`` matches regex outputs; the proxy's 400s name the field and the library's words for the problem;
the ranks' page gauges go back to zero after a constrained stream is cut."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from pd.tokenizer import Tokenizer
from tests.support.clients import async_openai_client, openai_client, strict_json
from tests.support.cluster import MODEL_NAME, pd_serve, proxy_metric, wait_pages_idle
from tests.support.schemas import SCHEMAS

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MAX_TOKENS = 160  # every schema here finishes well within it on the tiny model (asserted: "stop")
# A JSON number has no length limit, and digits are among the tiny model's favourite tokens: the schema with
# an unbounded "number" may run to max_tokens (its outputs are still a valid prefix), so it is left out here.
E2E_SCHEMAS = {name: schema for name, schema in SCHEMAS.items() if name != "array_of_objects"}
SEEDS = (None, 1, 2)  # None: greedy
PROMPT = "Describe the mill as JSON."


@pytest.fixture(scope="module")
def deployment(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "pd-serve.log"
    with pd_serve(
        tiny_model_dir, log, "--chunk-size", "16", "--page-size", "4", "--model-name", MODEL_NAME
    ) as url:
        yield url


def sampling(seed: int | None) -> dict:
    return {"temperature": 0.0} if seed is None else {"temperature": 1.0, "seed": seed}


async def create(client, chat: bool, stream: bool = False, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one request, streamed or not."""
    if not chat and "response_format" in kw:  # not a completions parameter of the client: sent as is
        kw["extra_body"] = {**kw.get("extra_body", {}), "response_format": kw.pop("response_format")}
    common = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "stream": stream, **kw}
    if chat:
        r = await client.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], **common)
    else:
        r = await client.completions.create(prompt=PROMPT, **common)
    if not stream:
        c = r.choices[0]
        return (c.message.content if chat else c.text), c.finish_reason
    text, finish = "", None
    async for chunk in r:
        for c in chunk.choices:
            text += (c.delta.content or "") if chat else c.text
            finish = c.finish_reason or finish
    return text, finish


def run_all(url: str, calls: list[dict]) -> list[tuple[str, str]]:
    async def go() -> list[tuple[str, str]]:
        async with async_openai_client(url) as client:
            return await asyncio.gather(*(create(client, **c) for c in calls))

    return asyncio.run(go())


def test_json_schema_outputs_validate_on_both_endpoints(deployment) -> None:
    """Every schema, both endpoints, greedy and seeded, strict and not: each output validates."""
    calls, schemas = [], []
    for name, schema in E2E_SCHEMAS.items():
        for chat in (False, True):
            for seed in SEEDS:
                rf = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": seed != 2},
                }
                calls.append({"chat": chat, "response_format": rf, **sampling(seed)})
                schemas.append(schema)
    for (text, finish), schema, call in zip(run_all(deployment, calls), schemas, calls):
        assert finish == "stop", (call, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def closing_bias(tiny_model_dir) -> dict[str, float]:
    """A logit_bias toward the tokens that close a JSON string, array or object. json_object allows any
    object, so its strings are unbounded: a model with random weights ends one only by chance, and this one
    (greedy) never does. Nudged like this it behaves as a trained model would."""
    tok = Tokenizer.from_dir(tiny_model_dir)
    closing = [t for t in range(tok.vocab_size) if any(c in tok.decode([t]) for c in '"]}')]
    assert 0 < len(closing) <= 300
    return {str(t): 8.0 for t in closing}


def test_json_object_and_guided_fields_streamed_and_not(deployment, closing_bias) -> None:
    regex = r"[a-c]{2,5}-[0-9]{1,3}"
    choices = ["yes", "no", "maybe so"]
    kinds = {
        "object": {"response_format": {"type": "json_object"}, "logit_bias": closing_bias},
        "guided_json": {"extra_body": {"guided_json": json.dumps(SCHEMAS["enums"])}},
        "guided_regex": {"extra_body": {"guided_regex": regex}},
        "guided_choice": {"extra_body": {"guided_choice": choices}},
    }
    calls, names = [], []
    for name, kw in kinds.items():
        for chat in (False, True):
            for stream in (False, True):
                for seed in SEEDS[:2]:
                    calls.append({"chat": chat, "stream": stream, **kw, **sampling(seed)})
                    names.append(name)
    for (text, finish), name, call in zip(run_all(deployment, calls), names, calls):
        assert finish == "stop", (call, text)
        if name == "object":
            assert isinstance(json.loads(text), dict)
        elif name == "guided_json":
            jsonschema.validate(json.loads(text), SCHEMAS["enums"])
        elif name == "guided_regex":
            assert re.fullmatch(regex, text), text
        else:
            assert text in choices


def test_bad_grammars_get_400_naming_the_problem(deployment) -> None:
    c = openai_client(deployment)
    messages = [{"role": "user", "content": "hi"}]

    def refused(**kw) -> dict:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, **kw)
        return e.value.body

    def schema(s: dict, strict: bool | None = None) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": strict}}

    err = refused(response_format=schema({"type": "nonsense"}))
    assert err["param"] == "response_format" and "nonsense" in err["message"]
    err = refused(response_format=schema({"type": "array", "uniqueItems": True}, strict=True))
    assert err["param"] == "response_format" and "uniqueItems" in err["message"]
    err = refused(response_format=schema({"type": "string", "minLength": 5, "maxLength": 2}))
    assert "minLength" in err["message"]
    err = refused(extra_body={"guided_regex": "a(b"})
    assert err["param"] == "guided_regex" and "unclosed group" in err["message"]
    err = refused(response_format={"type": "json_object"}, extra_body={"guided_choice": ["a"]})
    assert err["param"] == "guided_choice" and "response_format" in err["message"]
    # Not strict: a keyword the library does not implement is ignored, and the output is still an array.
    r = c.completions.create(
        model=MODEL_NAME,
        prompt="hi",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={
            "response_format": schema({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True})
        },
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), list)


def test_cutting_a_constrained_stream_frees_every_page(deployment) -> None:
    """A grammar that allows EOS only after 1500 letters, cut after a few events: both ranks free the pages
    (and the requests' matchers with them)."""
    body = {
        "model": MODEL_NAME,
        "prompt": "a long story " * 10,
        "max_tokens": 1000,
        "stream": True,
        "guided_regex": "[a-z]{1500}",
    }
    aborts = proxy_metric(deployment, "pd_proxy_aborts_total")
    for _ in range(2):
        with httpx.stream("POST", f"{deployment}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 30
    while proxy_metric(deployment, "pd_proxy_aborts_total") < aborts + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy_metric(deployment, "pd_proxy_aborts_total") == aborts + 2, "both streams were cut mid-way"
    pages = wait_pages_idle(deployment)
    assert {role for role, _, _ in pages} == {"prefill", "decode"}
    assert all(v == 0 for v in pages.values()), pages


def tokens_and_alternatives(choice: dict, chat: bool) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(token, logprob, its alternatives) of each token in one choice (or chunk) of either endpoint."""
    lp = choice.get("logprobs")
    if not lp:
        return []
    if chat:
        return [
            (t["token"], t["logprob"], [(a["token"], a["logprob"]) for a in t["top_logprobs"]])
            for t in lp["content"]
        ]
    return [
        (t, p, list(top.items())) for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])
    ]


def test_alternatives_a_grammar_forbids_are_left_out_of_top_logprobs(deployment) -> None:
    """A choice between two words asked for 5 alternatives a token: where the grammar allows fewer tokens, the
    forbidden ones (logprob -inf) are left out instead of breaking the JSON (a 500 before), on both endpoints,
    streamed and not; every alternative is finite and the greedy token is the first."""
    tokens = []
    for chat in (False, True):
        for stream in (False, True):
            body = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "stream": stream}
            body |= {"guided_choice": ["yes", "no"]}
            if chat:
                body |= {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 5}
            else:
                body |= {"prompt": "hi", "logprobs": 5}
            path = "chat/completions" if chat else "completions"
            r = httpx.post(f"{deployment}/v1/{path}", json=body, timeout=60)
            assert r.status_code == 200, r.text
            events = [strict_json(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            for event in events if stream else [strict_json(r.text)]:
                for choice in event["choices"]:
                    tokens += tokens_and_alternatives(choice, chat)
    assert len(tokens) >= 4  # each request emitted "yes" or "no", one token or more
    for token, logprob, alternatives in tokens:
        assert 1 <= len(alternatives) <= 5 and alternatives[0][0] == token
        assert all(-1e9 < p <= 0 for _, p in alternatives) and -1e9 < logprob <= 0
    assert any(len(alts) < 5 for _, _, alts in tokens), "the grammar allowed fewer than 5 tokens somewhere"
