"""pd.proxy.tools: tool calls parsed from fixed model outputs in each format, streamed deltas that add up to
the same calls for every way of splitting the output, tools/tool_choice validation, the grammar that
forces a call (checked with llguidance on a toy vocabulary), and chat templates rendering tools, tool
calls and tool answers (pd.tokenizer, against transformers)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from pd.proxy.tool_choice import ToolChoice, ToolRequestError, tool_call_grammar, validate_tools
from pd.proxy.tools import (
    TOOL_PARSERS,
    ToolCall,
    detect_tool_parser,
    make_tool_parser,
)
from pd.tokenizer import Tokenizer
from tests.support.checkpoints import copy_checkpoint

# DeepSeek's markers (full-width bars U+FF5C, U+2581 for spaces) and Kimi-K2's.
CALLS, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
K_SECTION, K_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
K_CALL, K_ARGS, K_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

WEATHER = '{"city": "Paris", "unit": "celsius"}'
TRICKY = '{"q": "a ``` b\\n", "n": [1, 2], "s": "<｜tool"}'  # fence-like and marker-like text inside JSON


def v3_call(name: str, args: str) -> str:
    return f"{CALL}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{CALL}{name}{SEP}{args}{CALL_END}"


def kimi_call(name: str, index: int, args: str) -> str:
    return f"{K_CALL}functions.{name}:{index}{K_ARGS}{args}{K_CALL_END}"


def tc(i: int, name: str, args: str) -> ToolCall:
    return ToolCall(f"id{i}", name, args)


def ktc(i: int, name: str, args: str) -> ToolCall:
    return ToolCall(f"functions.{name}:{i}", name, args)


# (parser, output text, expected content, expected calls). ids: "id" + index for DeepSeek (id_prefix="id").
# fmt: off
CASES = [
    # DeepSeek-V3 / R1: type, tool_sep, name, fenced JSON; calls separated by a newline.
    ("deepseek_v3", "No tools needed.", "No tools needed.", []),
    ("deepseek_v3", f"{CALLS}{v3_call('get_weather', WEATHER)}{CALLS_END}", "", [tc(0, "get_weather", WEATHER)]),
    ("deepseek_v3", f"Let me check.\n\n{CALLS}{v3_call('get_weather', WEATHER)}\n{v3_call('get_time', '{}')}\n"
                    f"{v3_call('search', TRICKY)}{CALLS_END}",
     "Let me check.\n\n", [tc(0, "get_weather", WEATHER), tc(1, "get_time", "{}"), tc(2, "search", TRICKY)]),
    ("deepseek_v3", f"{CALLS}{CALL}function{SEP}f\n```json\n  {{\"a\": 1}}  \n\n```  {CALL_END}{CALLS_END} after",
     " after", [tc(0, "f", '{"a": 1}')]),  # whitespace around arguments and fence; text after the section
    ("deepseek_v3", f"{CALLS}{v3_call('f', '{}')} stray {v3_call('g', '{}')}{CALLS_END}",
     " stray ", [tc(0, "f", "{}"), tc(1, "g", "{}")]),  # non-whitespace between calls is content
    ("deepseek_v3", f"{CALLS}{CALL}function{SEP}bad name\n```json\n{{}}\n```{CALL_END}{v3_call('g', '{}')}",
     f"{CALL}function{SEP}bad name\n```json\n{{}}\n```{CALL_END}", [tc(0, "g", "{}")]),  # malformed: content
    ("deepseek_v3", f"{CALLS}{CALL}f{SEP}{{}}{CALL_END}{CALLS_END}",  # V3.1's form is malformed for V3
     f"{CALL}f{SEP}{{}}{CALL_END}", []),
    ("deepseek_v3", f"{CALLS}{v3_call('f', '{}')}\n{CALL}function{SEP}g\n```json\n{{\"x\": [1,",
     "", [tc(0, "f", "{}"), tc(1, "g", '{"x": [1,')]),  # cut off in the arguments: kept as they are
    ("deepseek_v3", f"{CALLS}{v3_call('f', '{}')}\n{CALL}function{SEP}ge", f"{CALL}function{SEP}ge",
     [tc(0, "f", "{}")]),  # cut off in the header: content
    ("deepseek_v3", f"a {CALLS}{CALL}function{SEP}f\n```json\n{{}}\n``{CALLS_END}b",
     "a b", [tc(0, "f", "{}\n``")]),  # the section ends the call; a broken fence stays in the arguments
    ("deepseek_v3", "<｜tool▁calls", "<｜tool▁calls", []),  # a partial marker at the end is content
    # DeepSeek-V3.1: no type, no fence, calls back to back.
    ("deepseek_v31", f"Sure.{CALLS}{v31_call('get_weather', WEATHER)}{v31_call('search', TRICKY)}{CALLS_END}",
     "Sure.", [tc(0, "get_weather", WEATHER), tc(1, "search", TRICKY)]),
    ("deepseek_v31", f"{CALLS}{v31_call('f', ' {} ')}{CALL}{CALL_END}{CALLS_END}",
     f"{CALL}{CALL_END}", [tc(0, "f", "{}")]),
    ("deepseek_v31", f"{CALLS}{v31_call('f', '{}```')}", "", [tc(0, "f", "{}```")]),  # no fence to strip
    # Kimi-K2: the id is functions.NAME:IDX.
    ("kimi_k2", f"{K_SECTION}{kimi_call('get_weather', 0, WEATHER)}{K_SECTION_END}", "", [ktc(0, "get_weather", WEATHER)]),
    ("kimi_k2", f"I'll look.{K_SECTION}{kimi_call('get_weather', 0, WEATHER)}{kimi_call('get_weather', 1, TRICKY)}"
                f"{kimi_call('get_time', 2, '{}')}{K_SECTION_END}",
     "I'll look.", [ktc(0, "get_weather", WEATHER), ktc(1, "get_weather", TRICKY), ktc(2, "get_time", "{}")]),
    ("kimi_k2", f"{K_SECTION}\n{K_CALL} functions.f:0 {K_ARGS} {{}} {K_CALL_END}\n{K_SECTION_END}", "",
     [ToolCall("functions.f:0", "f", "{}")]),
    ("kimi_k2", f"{K_SECTION}{K_CALL}{K_ARGS}{{}}{K_CALL_END}{kimi_call('g', 1, '{}')}",
     f"{K_CALL}{K_ARGS}{{}}{K_CALL_END}", [ktc(1, "g", "{}")]),  # no name: content
    ("kimi_k2", f"{K_SECTION}{kimi_call('f', 0, '{}')}{K_CALL}functions.g:1{K_ARGS}{{\"a\"",
     "", [ktc(0, "f", "{}"), ktc(1, "g", '{"a"')]),
    ("kimi_k2", f"<|tool_calls_section_begin|x{K_CALL_END}", f"<|tool_calls_section_begin|x{K_CALL_END}", []),
]
# fmt: on


def reassemble(deltas: list[dict]) -> tuple[str, list[ToolCall]]:
    """Content and calls from OpenAI-style deltas, checking their shapes: each call's header first
    (index, id, type, name), then argument pieces; no empty delta."""
    content, calls = "", []
    for delta in deltas:
        if "content" in delta:
            assert set(delta) == {"content"} and delta["content"]
            content += delta["content"]
            continue
        assert set(delta) == {"tool_calls"} and len(delta["tool_calls"]) == 1
        item = delta["tool_calls"][0]
        if "id" in item:
            assert item["index"] == len(calls) and item["type"] == "function"
            assert set(item) == {"index", "id", "type", "function"} and set(item["function"]) == {"name"}
            calls.append([item["id"], item["function"]["name"], ""])
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
            assert item["index"] == len(calls) - 1 and item["function"]["arguments"]
            calls[-1][2] += item["function"]["arguments"]
    return content, [ToolCall(*c) for c in calls]


def stream_pieces(parser_name: str, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    stream = make_tool_parser(parser_name).stream("id")
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.finish()
    result = reassemble(deltas)
    assert result == (stream.content, stream.calls)
    return result


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parse(name, text, content, calls):
    assert make_tool_parser(name).parse(text, id_prefix="id") == (content, calls)


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_stream_every_split_and_random_splits(name, text, content, calls):
    assert stream_pieces(name, [text]) == (content, calls)
    for i in range(len(text) + 1):
        assert stream_pieces(name, [text[:i], text[i:]]) == (content, calls), i
    rng = random.Random(len(text))
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream_pieces(name, pieces) == (content, calls), pieces
    assert stream_pieces(name, list(text)) == (content, calls)


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_stream_random_texts(name):
    """Texts of markers, pieces of markers, whitespace, fences and JSON bits, streamed in random pieces,
    give what parse gives."""
    parser = make_tool_parser(name)
    m = parser.markers
    atoms = [
        *m.all(),
        "function",
        "functions.f:0",
        "get_weather",
        '{"a": 1}',
        "{}",
        " ",
        "\n",
        "```",
        "``",
        "`",
    ]
    atoms += [marker[: len(marker) // 2] for marker in m.all()] + ["<", "abc", ":", "."]
    rng = random.Random(name)
    for _ in range(1500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream_pieces(name, pieces) == parser.parse(text, id_prefix="id"), pieces


def test_stream_order_and_holding_back():
    """Content streams at once; a partial marker waits; the header delta comes once the header is complete,
    then arguments come as they are generated (their trailing whitespace and fence held back)."""
    stream = make_tool_parser("deepseek_v3").stream("id")
    assert stream.feed("Hi <｜tool▁") == [{"content": "Hi "}]
    assert stream.feed("calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n``") == []
    head = {"tool_calls": [{"index": 0, "id": "id0", "type": "function", "function": {"name": "f"}}]}
    assert stream.feed('`json\n{"a": ') == [
        head,
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
    ]
    assert stream.feed("1}\n``") == [{"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}]
    assert stream.feed("`<｜tool▁call▁end｜><｜tool▁calls▁end｜>") == []
    assert stream.finish() == []
    assert stream.calls == [ToolCall("id0", "f", '{"a": 1}')] and stream.content == "Hi "


def test_random_ids_are_unique_per_request():
    parser = make_tool_parser("deepseek_v31")
    text = f"{CALLS}{v31_call('f', '{}')}{v31_call('f', '{}')}{CALLS_END}"
    ids = [c.id for _ in range(3) for c in parser.parse(text)[1]]
    assert len(set(ids)) == 6 and all(i.startswith("call_") for i in ids)


def test_response_shapes():
    call = ToolCall("call_1", "f", '{"a": 1}')
    assert call.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": 1}'},
    }


def test_parser_registry_and_detection():
    assert set(TOOL_PARSERS) == {"deepseek_v3", "deepseek_v31", "kimi_k2"}
    with pytest.raises(ValueError, match="unknown tool parser 'qwen'"):
        make_tool_parser("qwen")
    assert detect_tool_parser(DEEPSEEK_TEMPLATE) == "deepseek_v3"
    assert detect_tool_parser(DEEPSEEK_TEMPLATE.replace("```json", "")) == "deepseek_v31"
    assert detect_tool_parser(KIMI_TEMPLATE) == "kimi_k2"
    assert detect_tool_parser("{{ messages }}") is None and detect_tool_parser(None) is None


# ------------------------------------------------------------------------------ tools and tool_choice


def fn(name: str, **extra) -> dict:
    return {"type": "function", "function": {"name": name, **extra}}


TOOLS = [
    fn("get_weather", description="Weather in a city", parameters={
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    fn("get_time"),
]  # fmt: skip


def test_validate_tools_accepts():
    assert validate_tools(None, None) == ([], ToolChoice("none"))
    assert validate_tools(TOOLS, None) == (TOOLS, ToolChoice("auto"))
    assert validate_tools([], "auto")[1] == ToolChoice("none")
    for mode in ("none", "auto", "required"):
        assert validate_tools(TOOLS, mode)[1] == ToolChoice(mode)
    named = {"type": "function", "function": {"name": "get_time"}}
    assert validate_tools(TOOLS, named)[1] == ToolChoice("required", "get_time")
    assert validate_tools([fn("f", strict=True, parameters={}, description=None)], None)[1].mode == "auto"


@pytest.mark.parametrize(
    "tools, choice, message, param",
    [
        ({"type": "function"}, None, "'tools' must be an array, got dict", "tools"),
        (["f"], None, "'tools\\[0\\]' must be an object, got str", "tools[0]"),
        ([{"type": "code", "function": {"name": "f"}}], None, "'tools\\[0\\].type' must be \"function\"", "tools[0].type"),
        ([{"type": "function"}], None, "'tools\\[0\\].function' must be an object", "tools[0].function"),
        ([fn("f"), {"type": "function", "function": {"name": "g"}, "extra": 1}], None,
         "unknown field 'tools\\[1\\].extra'", "tools[1].extra"),
        ([fn("f", params={})], None, "unknown field 'tools\\[0\\].function.params'", "tools[0].function.params"),
        ([fn("a b")], None, "'tools\\[0\\].function.name' must be 1 to 64 letters", "tools[0].function.name"),
        ([fn("x" * 65)], None, "'tools\\[0\\].function.name' must be 1 to 64", "tools[0].function.name"),
        ([fn("f"), fn("f")], None, "function 'f' is defined twice", "tools[1].function.name"),
        ([fn("f", parameters=[])], None, "'tools\\[0\\].function.parameters' must be of type object", "tools[0].function.parameters"),
        ([fn("f", description=3)], None, "'tools\\[0\\].function.description' must be of type string", "tools[0].function.description"),
        (TOOLS, "always", "'tool_choice' must be \"none\", \"auto\", \"required\" or", "tool_choice"),
        (TOOLS, {"type": "function", "name": "f"}, "'tool_choice' must be", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "get_time", "x": 1}}, "'tool_choice' must be", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "x"}},
         "'tool_choice' names function 'x' that is not in 'tools'", "tool_choice"),
        (None, "required", "'tool_choice' is \"required\" but 'tools' is empty", "tool_choice"),
        ([], {"type": "function", "function": {"name": "f"}}, "names function 'f' that is not in 'tools'", "tool_choice"),
    ],
)  # fmt: skip
def test_validate_tools_errors(tools, choice, message, param):
    with pytest.raises(ToolRequestError, match=message) as e:
        validate_tools(tools, choice)
    assert isinstance(e.value, ValueError) and e.value.param == param


# ------------------------------------------------------------------------------ forcing grammar


def toy_vocabulary(markers: list[str]) -> BackendTokenizer:
    """A byte-level vocabulary (no merges) with `markers` as added tokens and <eos>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = BackendTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    tok.add_tokens([AddedToken(m, special=False) for m in markers])
    return tok


# parser, a forced output it accepts: (calls) -> text
RENDER = {
    "deepseek_v3": lambda calls: CALLS + "\n".join(v3_call(n, a) for n, a in calls) + CALLS_END,
    "deepseek_v31": lambda calls: CALLS + "".join(v31_call(n, a) for n, a in calls) + CALLS_END,
    "kimi_k2": lambda calls: K_SECTION + "".join(kimi_call(n, i, a) for i, (n, a) in enumerate(calls)) + K_SECTION_END,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_grammar_forces_calls(name):
    llguidance = pytest.importorskip("llguidance")
    parser = make_tool_parser(name)
    markers = [m for m in parser.markers.all() if m.startswith("<")]  # "```json" is text in every vocabulary
    backend = toy_vocabulary(markers)
    vocabulary = llguidance.LLTokenizer(backend.to_str(), eos_token=backend.token_to_id("<eos>"))

    def accepts(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(vocabulary, llguidance.grammar_from("lark", grammar), log_level=0)
        ok = matcher.consume_tokens(vocabulary.tokenize_str(text, parse_special=True))
        return ok and not matcher.is_error() and matcher.is_accepting()

    render = RENDER[name]
    weather, time = ("get_weather", '{"city":"Paris"}'), ("get_time", "{}")  # compact: no free whitespace
    free = tool_call_grammar(parser, TOOLS, token_markers=markers)
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", free), vocabulary) == ""
    assert accepts(free, render([weather]))
    assert accepts(free, render([weather, time, weather]))
    content, calls = parser.parse(render([weather, time]), id_prefix="id")
    assert content == "" and [(c.name, c.arguments) for c in calls] == [weather, time]
    assert not accepts(free, render([("get_wind", "{}")]))  # not a tool
    assert not accepts(free, render([("get_weather", '{"city": 3}')]))  # against its schema
    assert not accepts(free, render([("get_weather", "{}")]))  # a required property missing
    assert not accepts(free, "Sure. " + render([weather]))  # content first
    assert not accepts(free, render([("get_weather", '{"city": "Paris"}')]))  # a blank the model could repeat
    single = tool_call_grammar(parser, TOOLS, parallel=False, token_markers=markers)
    assert accepts(single, render([time])) and not accepts(single, render([time, time]))
    named = tool_call_grammar(parser, TOOLS, name="get_time", token_markers=markers)
    assert accepts(named, render([time]))
    assert not accepts(named, render([weather])) and not accepts(named, render([time, time]))
    # Written as text, a marker that is a token in the vocabulary does not match that token.
    assert not accepts(tool_call_grammar(parser, TOOLS), render([time]))
    with pytest.raises(ValueError, match="'nope' is not in tools"):
        tool_call_grammar(parser, TOOLS, name="nope")


# ------------------------------------------------------------------------------ chat templates with tools

# Short templates of our own in the two families' shapes, using the real markers.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m.role == 'system' %}{{ m.content }}{% endfor %}"
    "{% if tools %}{{ '\\n\\n## Tools' }}{% for t in tools %}{{ '\\n### ' + t.function.name }}\n"
    "{% if t.function.parameters %}{{ t.function.parameters | tojson }}{% endif %}{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content }}"
    "{% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<｜tool▁call▁begin｜>{{ c.type }}<｜tool▁sep｜>{{ c.function.name }}\n```json\n{{ c.function.arguments }}"
    "\n```<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}<｜end▁of▁sentence｜>"
    "{% elif m.role == 'tool' %}<｜tool▁output▁begin｜>{{ m.content }}<｜tool▁output▁end｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
KIMI_TEMPLATE = (
    "{% if tools %}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}"
    "<|im_end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_assistant|>assistant<|im_middle|>{{ m.content }}"
    "{% if m.tool_calls %}<|tool_calls_section_begin|>{% for c in m.tool_calls %}<|tool_call_begin|>{{ c.id }}"
    "<|tool_call_argument_begin|>{{ c.function.arguments }}<|tool_call_end|>{% endfor %}"
    "<|tool_calls_section_end|>{% endif %}"
    "{% elif m.role == 'tool' %}<|im_system|>{{ m.name or 'tool' }}<|im_middle|>## Return of {{ m.tool_call_id }}"
    "\n{{ m.content }}"
    "{% else %}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>{{ m.content }}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)

ARGS = '{"city": "Paris"}'
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
        {"id": "functions.get_time:1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "sunny"},
    {"role": "tool", "tool_call_id": "functions.get_time:1", "content": "noon"},
]  # fmt: skip
PARAMS = json.dumps(TOOLS[0]["function"]["parameters"])
EXPECTED = {
    "deepseek": (
        "<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n### get_weather\n" + PARAMS + "\n### get_time\n"
        "<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜>" + v3_call("get_weather", ARGS) + "\n"
        + v3_call("get_time", "{}") + "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁output▁begin｜>noon<｜tool▁output▁end｜>"
        "<｜Assistant｜>"
    ),
    "kimi": (
        "<|im_system|>tool_declare<|im_middle|>" + json.dumps(TOOLS, separators=(",", ":")) + "<|im_end|>"
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>" + K_SECTION + kimi_call("get_weather", 0, ARGS)
        + kimi_call("get_time", 1, "{}") + K_SECTION_END + "<|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_time:1\nnoon<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    ),
}  # fmt: skip
TEMPLATES = {"deepseek": (DEEPSEEK_TEMPLATE, "deepseek_v3"), "kimi": (KIMI_TEMPLATE, "kimi_k2")}


def with_template(src, dst, template: str):
    d = copy_checkpoint(src, dst)
    (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    return d


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_chat_template_renders_tools_calls_and_answers(tmp_path, tiny_model_dir, family):
    template, parser_name = TEMPLATES[family]
    d = with_template(tiny_model_dir, tmp_path / family, template)
    tok = Tokenizer.from_dir(d)
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS)
    assert text == EXPECTED[family]
    assert tok.encode_chat(TOOL_CONVERSATION, tools=TOOLS) == tok.encode(text, add_special_tokens=False)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert text == hf.apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    # No tools: the template's tools block is left out, as transformers does.
    plain = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(plain) == hf.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True
    )
    assert "Tools" not in tok.apply_chat_template(
        plain, tools=[]
    ) and "tool_declare" not in tok.apply_chat_template(plain)
    # The calls the template writes parse back into the same calls (an empty content included).
    start = text.index(K_SECTION if family == "kimi" else CALLS)
    end = text.index(K_SECTION_END if family == "kimi" else CALLS_END)
    content, calls = make_tool_parser(parser_name).parse(text[start:end], id_prefix="functions.")
    names = [c["function"]["name"] for c in TOOL_CONVERSATION[2]["tool_calls"]]
    assert content == "" and [(c.name, c.arguments) for c in calls] == [(names[0], ARGS), (names[1], "{}")]
    if family == "kimi":
        assert [c.id for c in calls] == [c["id"] for c in TOOL_CONVERSATION[2]["tool_calls"]]


def test_chat_template_refuses_tools_it_cannot_show(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)  # the tiny model's template never reads `tools`
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="does not use 'tools'"):
        tok.apply_chat_template(messages, tools=TOOLS)
    assert tok.apply_chat_template(messages, tools=[]) == tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match="tools must be a list of tool objects"):
        tok.apply_chat_template(messages, tools=["f"])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "tool", "content": "x"}], r"messages\[0\].tool_call_id must be a string"),
        ([{"role": "tool", "content": None, "tool_call_id": "a"}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": "x", "tool_calls": []}], r"messages\[0\].tool_calls: only assistant"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], r"messages\[0\].content must be a string"),
        ([{"role": "assistant", "content": "", "tool_calls": {"id": "a"}}], r"messages\[0\].tool_calls must be a list"),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]}],
         r"messages\[0\].tool_calls\[0\] must be \{id: string"),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]}],
         r"messages\[0\].tool_calls\[0\] must be"),
        ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}],
         r"messages\[0\].tool_calls\[0\] must be"),
    ],
)  # fmt: skip
def test_bad_tool_messages(tmp_path, tiny_model_dir, messages, match):
    tok = Tokenizer.from_dir(with_template(tiny_model_dir, tmp_path / "k", KIMI_TEMPLATE))
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_empty_tool_calls_are_dropped(tmp_path, tiny_model_dir):
    tok = Tokenizer.from_dir(with_template(tiny_model_dir, tmp_path / "d", DEEPSEEK_TEMPLATE))
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template([plain[0], {**plain[1], "tool_calls": []}]) == tok.apply_chat_template(
        plain
    )
