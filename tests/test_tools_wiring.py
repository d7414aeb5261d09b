"""Tool calls wired into chat completions (--tool-call-parser): a decode rank's chunks (token ids and the
text pd's engine makes of them) through the proxy's output chain (pd.proxy.chat_output) give the calls
and content that parsing the whole output gives, in every format, with marker tokens plain or special, after
a reasoning block; and through the HTTP layer, driven by the openai client against a stub engine, the
response and the streamed deltas are OpenAI's shapes and say the same; the refusals name their field.
(test_tools_serve.py drives a real pd-serve.)"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

pytest.importorskip("pydantic")
pytest.importorskip("starlette")
from starlette.testclient import TestClient

from pd.detokenizer import IncrementalDetokenizer
from pd.proxy.chat_output import chat_output
from pd.proxy.config import ProxyConfig
from pd.proxy.dispatch import Chunk
from pd.proxy.http import build_app
from pd.proxy.reasoning import REASONING_PARSERS
from pd.proxy.router import ModelInfo
from pd.proxy.tool_choice import ToolChoice, forced_call_grammar, tool_call_grammar
from pd.proxy.tools import TOOL_PARSERS, make_tool_parser
from pd.tokenizer import Tokenizer
from tests.test_tools import (
    CALLS,
    CALLS_END,
    CASES,
    DEEPSEEK_TEMPLATE,
    K_SECTION,
    K_SECTION_END,
    KIMI_TEMPLATE,
    TOOL_CONVERSATION,
    TOOLS,
    TRICKY,
    WEATHER,
    kimi_call,
    v3_call,
)

openai = pytest.importorskip("openai")
R1 = REASONING_PARSERS["deepseek-r1"]
TEMPLATE_OF = {"deepseek_v3": DEEPSEEK_TEMPLATE, "deepseek_v31": DEEPSEEK_TEMPLATE, "kimi_k2": KIMI_TEMPLATE}


def tokenizer(tiny_model_dir, parser: str, special_markers: bool) -> Tokenizer:
    """The tiny model's tokenizer with ``parser``'s chat template; with ``special_markers`` its markers are
    added as special tokens (as Kimi-K2's are: decode(skip_special_tokens=True) drops them)."""
    backend = BackendTokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    if special_markers:
        markers = [m for m in make_tool_parser(parser).markers.all() if m.startswith("<")]
        backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in markers])
    named = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
    return Tokenizer(backend, named_tokens=named, chat_template=TEMPLATE_OF[parser])


def decode_chunks(tok: Tokenizer, prompt: Sequence[int], ids: list[int], rng: random.Random):
    """What a decode rank streams for the output ``ids``: (text, ids) in random-size groups, the text as
    pd's engine makes it (IncrementalDetokenizer, special tokens skipped)."""
    detok, chunks, i = IncrementalDetokenizer(tok, prompt), [], 0
    while i < len(ids):
        group = ids[i : i + rng.randint(1, 6)]
        i += len(group)
        text = "".join(detok.add(t) for t in group) + (detok.flush() if i == len(ids) else "")
        chunks.append((text, group))
    return chunks


def reassemble(pieces) -> tuple[str | None, str, list[tuple[str, str, str]]]:
    """(reasoning, content, [(id, name, arguments)]) from pieces, checking the items' shapes: a call's
    first item has index (the next one), id, type, name and arguments; later ones an argument piece."""
    reasoning, content, calls = "", "", []
    for piece in pieces:
        reasoning += piece.reasoning
        content += piece.content
        for item in piece.tool_calls:
            if "id" in item:
                assert item["index"] == len(calls) and item["type"] == "function"
                assert set(item["function"]) == {"name", "arguments"}
                calls.append([item["id"], item["function"]["name"], item["function"]["arguments"]])
            else:
                assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
                assert item["index"] == len(calls) - 1 and item["function"]["arguments"]
                calls[item["index"]][2] += item["function"]["arguments"]
    return reasoning or None, content, [tuple(c) for c in calls]


@pytest.mark.parametrize("special", [False, True], ids=["plain-markers", "special-markers"])
@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_decode_chunks_give_the_whole_parse(tiny_model_dir, special, name, text, content, calls):
    """Every fixture of test_tools.py, tokenized and streamed as a decode rank would, in random chunks:
    the pieces add up to the fixture's content and calls (ids aside: DeepSeek's are random), also after a
    reasoning block; the finish reason is tool_calls exactly when a stopped output has calls."""
    tok = tokenizer(tiny_model_dir, name, special)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text  # the token stream stands for the text
    eos = [min(tok.eos_token_ids)]
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
    rng = random.Random(text)
    for reasoning in (None, "<think>\nweather: a tool.\n</think>\n\n"):
        # The whole-text oracle: split the reasoning off, parse the rest.
        expected_content = make_tool_parser(name).parse(R1.split((reasoning or "") + text, False)[1])[0]
        assert reasoning or expected_content == content
        out_ids = (tok.encode(reasoning, add_special_tokens=False) if reasoning else []) + ids + eos
        for _ in range(5):
            output = chat_output("deepseek-r1" if reasoning else None, name, tok, prompt, True)
            assert output is not None
            chunks = decode_chunks(tok, prompt, out_ids, rng)
            pieces = [output.feed(t, g, i == len(chunks) - 1) for i, (t, g) in enumerate(chunks)]
            got_reasoning, got_content, got_calls = reassemble(pieces)
            assert got_reasoning == ("weather: a tool." if reasoning else None)
            assert got_content == expected_content
            assert [(n, a) for _, n, a in got_calls] == [(c.name, c.arguments) for c in calls]
            assert [(c.id, c.name, c.arguments) for c in output.calls] == got_calls
            ids_ = [i for i, _, _ in got_calls]
            if name == "kimi_k2":
                assert ids_ == [c.id for c in calls]
            else:
                assert len(set(ids_)) == len(ids_) and all(i.startswith("call_") for i in ids_)
            assert output.finish_reason("stop") == ("tool_calls" if calls else "stop")
            assert output.finish_reason("length") == "length"


def test_special_markers_are_lost_without_the_proxys_detokenization(tiny_model_dir):
    """The premise of ChatOutput's own detokenization: the decode rank's text has no special markers."""
    tok = tokenizer(tiny_model_dir, "kimi_k2", special_markers=True)
    text = f"I'll look.{K_SECTION}{kimi_call('get_weather', 0, WEATHER)}{K_SECTION_END}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == "I'll look.functions.get_weather:0" + WEATHER
    output = chat_output(None, "kimi_k2", tok, [], True)
    assert output is not None
    piece = output.feed(tok.decode(ids), ids, final=True)
    assert piece.content == "I'll look." and [c.name for c in output.calls] == ["get_weather"]


def test_no_parsers_no_output_chain(tiny_model_dir):
    tok = tokenizer(tiny_model_dir, "deepseek_v3", False)
    assert chat_output(None, "deepseek_v3", tok, [], parse_tools=False) is None
    assert chat_output(None, None, tok, [], parse_tools=False) is None
    with pytest.raises(ValueError, match="tool-call parser"):
        chat_output(None, None, tok, [], parse_tools=True)


# ------------------------------------------------------------------------------ HTTP, stub engine


class StubEngine:
    """Plays the proxy's router (one model, ``m``) and dispatcher: each request's decode stream is
    ``output`` (text, tokenized) followed by EOS, in random chunks as pd's engine makes them, finished
    by ``finish``. ``jobs`` holds every admitted request."""

    def __init__(self, tok: Tokenizer, output: str, finish: str = "stop") -> None:
        self.tok, self.finish, self.jobs = tok, finish, []
        self.ids = tok.encode(output, add_special_tokens=False) + (
            [min(tok.eos_token_ids)] * (finish == "stop")
        )

    def models(self) -> list[str]:
        return ["m"]

    async def model_info(self, name: str) -> ModelInfo:
        return ModelInfo("m", 4096, self.tok.vocab_size, self.tok)

    async def run(self, job):
        self.jobs.append(job)
        chunks = decode_chunks(self.tok, job.prompt_ids, self.ids, random.Random(len(self.jobs)))
        for i, (text, group) in enumerate(chunks):
            last = i == len(chunks) - 1
            yield Chunk(7, text, tuple(group), self.finish if last else None, done=last)


def client(stub: StubEngine, **cfg) -> openai.OpenAI:
    app = build_app(ProxyConfig(bootstrap="127.0.0.1:1", **cfg))
    proxy = app.state.proxy
    proxy.admission.router = stub
    proxy.dispatcher = stub
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=TestClient(app)
    )


ASK = [{"role": "user", "content": "Weather in Paris?"}]
DEEPSEEK_OUTPUT = (
    "<think>\nParis: a tool.\n</think>\n\nLet me check.\n"
    f"{CALLS}{v3_call('get_weather', WEATHER)}\n{v3_call('get_time', TRICKY)}{CALLS_END}"
)
KIMI_OUTPUT = f"I'll look.{K_SECTION}{kimi_call('get_weather', 0, WEATHER)}{kimi_call('get_time', 1, '{}')}{K_SECTION_END}"


def streamed(c: openai.OpenAI, **kw):
    """(role, reasoning, content, [(id, name, arguments)], finish_reason) of a streamed request, checking
    each call's first delta (id, type, name, arguments a string) and that later ones carry only pieces."""
    role, reasoning, content, calls, finish = None, "", "", [], None
    for chunk in c.chat.completions.create(stream=True, **kw):
        (choice,) = chunk.choices
        delta = choice.delta
        role = role or delta.role
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for item in delta.tool_calls or ():
            if item.id is not None:
                assert item.index == len(calls) and item.type == "function"
                assert item.function.name and isinstance(item.function.arguments, str)
                calls.append([item.id, item.function.name, item.function.arguments])
            else:
                assert item.type is None and item.function.name is None and item.index == len(calls) - 1
                calls[item.index][2] += item.function.arguments
        finish = choice.finish_reason or finish
    return role, reasoning or None, content, [tuple(x) for x in calls], finish


@pytest.mark.parametrize("parser, output", [("deepseek_v3", DEEPSEEK_OUTPUT), ("kimi_k2", KIMI_OUTPUT)])
def test_tool_calls_whole_and_streamed(tiny_model_dir, parser, output):
    tok = tokenizer(tiny_model_dir, parser, special_markers=parser == "kimi_k2")
    stub = StubEngine(tok, output)
    c = client(
        stub, tool_call_parser=parser, reasoning_parser="deepseek-r1" if parser == "deepseek_v3" else None
    )
    kw = dict(model="m", messages=ASK, tools=TOOLS)
    if parser == "deepseek_v3":
        reasoning, content = "Paris: a tool.", "Let me check.\n"
        expected = [("get_weather", WEATHER), ("get_time", TRICKY)]
    else:
        reasoning, content = None, "I'll look."
        expected = [("get_weather", WEATHER), ("get_time", "{}")]
    r = c.chat.completions.create(**kw)
    (choice,) = r.choices
    message = choice.message
    assert choice.finish_reason == "tool_calls" and message.content == content
    assert (message.model_extra or {}).get("reasoning_content") == reasoning
    assert [(t.type, t.function.name, t.function.arguments) for t in message.tool_calls] == [
        ("function", *e) for e in expected
    ]
    whole_ids = [t.id for t in message.tool_calls]
    assert len(set(whole_ids)) == len(whole_ids)
    role, s_reasoning, s_content, s_calls, finish = streamed(c, **kw)
    assert (role, s_reasoning, s_content, finish) == ("assistant", reasoning, content, "tool_calls")
    assert [(n, a) for _, n, a in s_calls] == expected
    if parser == "kimi_k2":  # the model's ids, kept
        assert whole_ids == [i for i, _, _ in s_calls] == ["functions.get_weather:0", "functions.get_time:1"]
    else:  # fresh ones per request
        assert all(i.startswith("call_") for i in whole_ids) and not set(whole_ids) & {
            i for i, _, _ in s_calls
        }
    # The tools reached the chat template.
    assert stub.jobs[0].prompt_ids == tok.encode_chat(ASK, tools=TOOLS) == stub.jobs[1].prompt_ids


def test_a_call_cut_off_keeps_length_and_its_partial_arguments(tiny_model_dir):
    tok = tokenizer(tiny_model_dir, "deepseek_v3", False)
    c = client(
        StubEngine(tok, f'{CALLS}{CALL_HEAD}{{"city": "Par', finish="length"), tool_call_parser="deepseek_v3"
    )
    r = c.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.message.content is None
    assert [(t.function.name, t.function.arguments) for t in choice.message.tool_calls] == [
        ("get_weather", '{"city": "Par')
    ]


CALL_HEAD = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"


def test_tool_choice_none_and_no_tools_parse_nothing(tiny_model_dir):
    tok = tokenizer(tiny_model_dir, "deepseek_v3", False)
    text = DEEPSEEK_OUTPUT.split("</think>\n\n")[1]
    c = client(StubEngine(tok, text), tool_call_parser="deepseek_v3")
    for kw in (dict(tools=TOOLS, tool_choice="none"), {}):
        for stream in (False, True):
            if stream:
                _, _, content, calls, finish = streamed(c, model="m", messages=ASK, **kw)
            else:
                choice = c.chat.completions.create(model="m", messages=ASK, **kw).choices[0]
                content, calls, finish = (
                    choice.message.content,
                    choice.message.tool_calls or [],
                    choice.finish_reason,
                )
            assert (content, calls, finish) == (text, [], "stop")


def test_tool_messages_are_rendered(tiny_model_dir):
    """A conversation with an assistant's tool calls (content null) and the tools' answers reaches the
    template as the template's own rendering of it. (A message's ``name`` is refused: without it.)"""
    conversation = [{k: v for k, v in m.items() if k != "name"} for m in TOOL_CONVERSATION]
    tok = tokenizer(tiny_model_dir, "kimi_k2", special_markers=True)
    stub = StubEngine(tok, "Sunny, noon.")
    c = client(stub, tool_call_parser="kimi_k2")
    r = c.chat.completions.create(model="m", messages=conversation, tools=TOOLS)
    assert r.choices[0].message.content == "Sunny, noon." and r.choices[0].message.tool_calls is None
    assert stub.jobs[0].prompt_ids == tok.encode_chat(conversation, tools=TOOLS)
    assert "## Return of functions.get_weather:0\nsunny" in tok.decode(stub.jobs[0].prompt_ids, False)


@pytest.mark.parametrize(
    "cfg, template_tools, extra, param, words",
    [
        ({}, True, dict(tools=TOOLS), "tools", "no tool-call parser"),
        ({"tool_call_parser": "deepseek_v3"}, False, dict(tools=TOOLS), "tools", "does not render tools"),
        ({"tool_call_parser": "deepseek_v3"}, True,
         dict(tools=TOOLS, tool_choice="required", extra_body={"guided_regex": "a+"}), "tool_choice",
         "cannot be combined with 'guided_regex'"),
        ({"tool_call_parser": "deepseek_v3"}, True, dict(tools=[{"type": "function", "function": {"name": "a.b"}}]),
         "tools[0].function.name", "1 to 64 letters"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(tiny_model_dir, cfg, template_tools, extra, param, words):
    tok = tokenizer(tiny_model_dir, "deepseek_v3", False)
    if not template_tools:
        tok = Tokenizer.from_dir(tiny_model_dir)  # its template never reads tools
    stub = StubEngine(tok, "x")
    with pytest.raises(openai.BadRequestError) as e:
        client(stub, **cfg).chat.completions.create(model="m", messages=ASK, **extra)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    assert stub.jobs == []  # refused before any rank hears of it


@pytest.mark.parametrize("special", [False, True], ids=["plain-markers", "special-markers"])
def test_forced_call_grammar(tiny_model_dir, special):
    """ "required" and a named function get tool_call_grammar's grammar, the markers that are tokens of the
    vocabulary written as tokens; "none" and "auto" get none."""
    tok = tokenizer(tiny_model_dir, "kimi_k2", special)
    parser = make_tool_parser("kimi_k2")
    tokens = [m for m in parser.markers.all() if special]  # Kimi-K2's markers are all "<|...|>"
    assert forced_call_grammar(parser, TOOLS, ToolChoice("auto"), tok.token_to_id) is None
    assert forced_call_grammar(parser, TOOLS, ToolChoice("none"), tok.token_to_id) is None
    for name in (None, "get_time"):
        expected = tool_call_grammar(parser, TOOLS, name=name, token_markers=tokens)
        assert forced_call_grammar(parser, TOOLS, ToolChoice("required", name), tok.token_to_id) == expected
    assert "<|tool_call_begin|>" in expected and ('"<|tool_call_begin|>"' in expected) != special


def test_parsers_are_the_flags_choices():
    from pd.launch import proxy

    actions = {a.dest: a for a in proxy.build_parser()._actions}
    assert sorted(actions["tool_call_parser"].choices) == sorted(TOOL_PARSERS)
    args = proxy.parse(["--bootstrap", "b:1", "--tool-call-parser", "kimi_k2"])
    assert proxy.proxy_config(args).tool_call_parser == "kimi_k2"
