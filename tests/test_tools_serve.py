"""Tools through a real pd-serve (--tool-call-parser deepseek_v3 and --reasoning-parser deepseek-r1) with the
official openai client, on the tiny model given a chat template that renders tools: the prompt is what
transformers renders, the answer is transformers' greedy output split and parsed as the proxy's parsers
split and parse a whole text, streamed or not. The random tiny model rarely writes a call: the calls
themselves are covered by test_tools_wiring.py's stub engine. (The 400 for tools sent to a server with no
tool-call parser: test_serve.py's UNSUPPORTED_FIELDS.)"""

from __future__ import annotations

import json

import pytest

from pd.proxy.reasoning import REASONING_PARSERS
from pd.proxy.tools import make_tool_parser
from pd.tokenizer import Tokenizer
from tests.support.clients import openai_client
from tests.support.cluster import pd_serve
from tests.support.oracle import hf_greedy
from tests.test_tools import DEEPSEEK_TEMPLATE, TOOL_CONVERSATION, TOOLS, with_template
from tests.test_tools_wiring import streamed

openai = pytest.importorskip("openai")

MODEL = "tiny-tools"
MAX_TOKENS = 12
# A tool message's "name" is refused (OpenAI's tool messages have none).
CONVERSATION = [{k: v for k, v in m.items() if k != "name"} for m in TOOL_CONVERSATION]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return with_template(tiny_model_dir, tmp_path_factory.mktemp("tools") / "m", DEEPSEEK_TEMPLATE)


@pytest.fixture(scope="module")
def deployment(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools-serve") / "pd-serve.log"
    flags = ("--model-name", MODEL, "--tool-call-parser", "deepseek_v3", "--reasoning-parser", "deepseek-r1")
    with pd_serve(model_dir, log, *flags) as url:
        yield url


@pytest.mark.parametrize("messages", [CONVERSATION[:2], CONVERSATION], ids=["ask", "tool-answers"])
def test_tools_request_equals_transformers_whole_and_streamed(deployment, model_dir, hf_model, messages):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = hf_tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    prompt = hf_tok(text, add_special_tokens=False)["input_ids"]
    out = Tokenizer.from_dir(model_dir).decode(hf_greedy(hf_model(model_dir), prompt, MAX_TOKENS))
    reasoning, rest = REASONING_PARSERS["deepseek-r1"].split(out, starts_in_reasoning=False)
    content, calls = make_tool_parser("deepseek_v3").parse(rest)
    expected_calls = [(c.name, c.arguments) for c in calls]
    finish = "tool_calls" if calls else "length"

    c = openai_client(deployment)
    kw = dict(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = c.chat.completions.create(**kw)
    assert r.usage.prompt_tokens == len(prompt)  # the tools and the tool messages were rendered
    (choice,) = r.choices
    message = choice.message
    assert message.role == "assistant" and choice.finish_reason == finish
    assert message.content == (None if calls and not content else content)
    assert (message.model_extra or {}).get("reasoning_content") == reasoning
    assert [(t.function.name, t.function.arguments) for t in message.tool_calls or ()] == expected_calls
    role, s_reasoning, s_content, s_calls, s_finish = streamed(c, **kw)
    assert (role, s_reasoning, s_content, s_finish) == ("assistant", reasoning, content, finish)
    assert [(n, a) for _, n, a in s_calls] == expected_calls


# Schemas a random model must finish: an enum and an object without properties.
FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}},
]  # fmt: skip


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_yields_calls_that_fit_the_schema(deployment, choice):
    """The random tiny model, forced by the grammar, writes only calls of declared tools whose arguments
    validate against their parameters (jsonschema), whole and streamed, greedy and seeded."""
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}
    c = openai_client(deployment)
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        kw = dict(
            model=MODEL, messages=CONVERSATION[:2], tools=FORCED_TOOLS, tool_choice=choice, max_tokens=200
        )
        kw["parallel_tool_calls"] = (
            False  # one call: with several allowed a random model may call until the end
        )
        r = c.chat.completions.create(**kw, **sampling)
        (out,) = r.choices
        assert out.finish_reason == "tool_calls", out
        calls = [(t.function.name, t.function.arguments) for t in out.message.tool_calls or ()]
        _, _, _, s_calls, s_finish = streamed(c, **kw, **sampling)
        assert s_finish == "tool_calls" and [(n, a) for _, n, a in s_calls] == calls
        assert len(calls) == 1
        for name, arguments in calls:
            if isinstance(choice, dict):
                assert name == "get_time"
            jsonschema.validate(json.loads(arguments), schemas[name])


def test_forced_tools_refuse_a_second_grammar(deployment):
    c = openai_client(deployment)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL,
            messages=CONVERSATION[:2],
            tools=FORCED_TOOLS,
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    assert e.value.body["param"] == "tool_choice" and "cannot be combined" in e.value.body["message"]
