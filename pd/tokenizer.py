"""Tokenization for serving: `tokenizer.json` through the `tokenizers` library, the chat template rendered
as transformers renders it (sandboxed jinja2), and incremental detokenization with stop strings.

transformers is the reference (a test dependency only): `Tokenizer` encodes, decodes and renders chat
templates as `transformers.AutoTokenizer` does for the same files.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, processors

CHAT_ROLES = ("system", "user", "assistant", "tool")
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_content(value: Any, key: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: {key} is {value!r}, expected a string or an AddedToken dict")


def _pick_chat_template(value: Any) -> str | None:
    """chat_template from tokenizer_config.json: a string, or a list of {name, template} (the 'default' one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"tokenizer_config.json: chat_template list has no 'default' template (names: {sorted(map(str, named))})"
        )
    raise ValueError(
        f"tokenizer_config.json: chat_template is a {type(value).__name__}, expected a string or a list"
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> tuple[jinja2.Template, bool]:
    """The template in the environment transformers renders chat templates in (same options, globals and
    filters), sandboxed because templates come with downloaded models; and whether it reads ``tools``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        return env.from_string(source), reads_tools
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages as the template sees them: a non-empty list of {role, content} with a role in
    CHAT_ROLES and string content. Keys with None values are dropped, as transformers does.

    Tool use, in OpenAI's shapes: an assistant message may carry ``tool_calls`` (a list of {id, type:
    "function", function: {name, arguments: JSON text}}), and then its content may be null (it becomes "",
    which DeepSeek's and Kimi's templates render as they render a null); an empty list is dropped. A
    "tool" message answers one call: ``tool_call_id`` is a string."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{role, content}} objects, got {messages!r:.100}"
        )
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be an object with role and content, got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}, expected one of {', '.join(CHAT_ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
            _validate_tool_calls(calls, f"messages[{i}].tool_calls")
            if calls and content is None:
                content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise ValueError(f"messages[{i}].tool_call_id must be a string (the id of the call it answers)")
        kept = {k: v for k, v in message.items() if v is not None and not (k == "tool_calls" and not v)}
        plain.append({**kept, "content": content})
    return plain


def _validate_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not (
            isinstance(call, Mapping)
            and isinstance(call.get("id"), str)
            and call.get("type") == "function"
            and isinstance(function, Mapping)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise ValueError(
                f'{where}[{j}] must be {{id: string, type: "function", function: {{name: string, '
                f"arguments: string}}}}, got {call!r:.200}"
            )


@dataclass(frozen=True)
class TokenizerFiles:
    """The contents of a model directory's tokenizer files."""

    tokenizer_json: str
    tokenizer_config: dict
    generation_config: dict
    chat_template: str | None = None  # chat_template.jinja, which wins over the config's template

    @classmethod
    def read(cls, path: str | Path) -> TokenizerFiles:
        """Reads tokenizer.json, tokenizer_config.json (chat_template, bos/eos/unk/pad tokens, add_bos_token,
        add_eos_token), chat_template.jinja and generation_config.json (eos_token_id) from ``path``."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: a model directory needs a tokenizer.json")
        template_file = path / "chat_template.jinja"
        return cls(
            tokenizer_json=tokenizer_file.read_text(encoding="utf-8"),
            tokenizer_config=_read_json(path / "tokenizer_config.json"),
            generation_config=_read_json(path / "generation_config.json"),
            chat_template=template_file.read_text(encoding="utf-8") if template_file.is_file() else None,
        )


class Tokenizer:
    """A model's tokenizer, loaded from its directory with `Tokenizer.from_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        named_tokens: Mapping[str, str],
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """backend: the tokenizers.Tokenizer (its post-processor decides what encode adds);
        named_tokens: {"bos_token": "<s>", "eos_token": ...} as the chat template sees them;
        eos_token_ids: ids that end generation besides eos_token's."""
        self._backend = backend
        self._named_tokens = dict(named_tokens)
        named_ids: dict[str, int] = {}
        for key, content in self._named_tokens.items():
            token_id = backend.token_to_id(content)
            if token_id is None:
                raise ValueError(f"{key} {content!r} is not in the tokenizer's vocabulary")
            named_ids[key] = token_id
        self._bos_token_id = named_ids.get("bos_token")
        eos = named_ids.get("eos_token")
        eos_ids = set(eos_token_ids) | ({eos} if eos is not None else set())
        self._eos_token_ids = frozenset(eos_ids)
        self._added_ids = frozenset(backend.get_added_tokens_decoder())
        self._special_token_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        self._chat_template_source = chat_template
        self._chat_template: jinja2.Template | None = None
        self._template_reads_tools = False  # tools given to a template that never reads them are refused
        if chat_template is not None:
            self._chat_template, self._template_reads_tools = _compile_chat_template(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads a model directory's tokenizer files (see ``TokenizerFiles.read``)."""
        return cls.from_files(TokenizerFiles.read(path))

    @classmethod
    def from_files(cls, files: TokenizerFiles) -> Tokenizer:
        """Builds the tokenizer from file contents (what a worker sends the proxy). tokenizer_class is not
        read (tokenizer.json is used as written) and neither is clean_up_tokenization_spaces (transformers 5
        ignores it for BPE tokenizers too)."""
        backend = tokenizers.Tokenizer.from_str(files.tokenizer_json)
        config = files.tokenizer_config
        named = {
            key: _token_content(config[key], key) for key in _NAMED_TOKENS if config.get(key) is not None
        }
        if backend.post_processor is None:
            # tokenizer.json's post-processor decides what encode adds (transformers 5 keeps it, whatever
            # add_bos_token says); without one, add_bos_token/add_eos_token do, as transformers' Llama-family
            # tokenizers have it.
            backend.post_processor = _bos_eos_processor(
                backend,
                named.get("bos_token") if config.get("add_bos_token") else None,
                named.get("eos_token") if config.get("add_eos_token") else None,
            )
        chat_template = files.chat_template or _pick_chat_template(config.get("chat_template"))
        generation_eos = files.generation_config.get("eos_token_id")
        if generation_eos is None:
            eos_ids: list[int] = []
        elif isinstance(generation_eos, int):
            eos_ids = [generation_eos]
        elif isinstance(generation_eos, list) and all(isinstance(i, int) for i in generation_eos):
            eos_ids = generation_eos
        else:
            raise ValueError(
                f"generation_config.json: eos_token_id is {generation_eos!r}, expected an int or a list of ints"
            )
        return cls(backend, named_tokens=named, chat_template=chat_template, eos_token_ids=eos_ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (transformers' len(tokenizer));
        the model's vocab_size may be larger (padded embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end generation: eos_token's and generation_config.json's eos_token_id."""
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops."""
        return self._special_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template_source

    @property
    def template_reads_tools(self) -> bool:
        """Whether the chat template renders ``tools`` (apply_chat_template refuses tools otherwise)."""
        return self._template_reads_tools

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (as loaded, post-processor included): what other libraries
        (the grammar backend) build their own copy of this tokenizer from."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds what the model's files say (e.g. a leading BOS).

        Goes through ``encode_batch``, which releases the GIL (``encode`` holds it: a megabyte of text
        would stall every other thread of the process for a second), so callers may run it in a thread."""
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary decode to nothing. Incomplete UTF-8 becomes U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (logprobs show them): a byte-level BPE piece mapped back to its
        bytes; an added token, or any token of another kind of tokenizer, as its decoded UTF-8 text."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if isinstance(self._backend.decoder, decoders.ByteLevel) and token_id not in self._added_ids:
            table = _byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self._backend.decode([token_id], skip_special_tokens=False).encode()

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` if it is a single token of the vocabulary (e.g. an added marker token)."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages` ([{role: system|user|assistant|tool, content: str}, ...], see
        _validate_messages for tool calls and tool answers) and `tools` (OpenAI tool objects, passed to the
        template as ``tools``), as transformers' apply_chat_template(..., tokenize=False) renders it.
        Raises ValueError for a model without a chat template, malformed messages, tools given to a
        template that never reads them (they would silently not reach the model), or a conversation the
        template rejects. The text usually starts with BOS already: tokenize it with encode_chat (no
        second BOS)."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json has no chat_template)")
        plain = _validate_messages(messages)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise ValueError(f"tools must be a list of tool objects, got {tools!r:.100}")
            if tools and not self._template_reads_tools:
                raise ValueError(
                    "this model's chat template does not use 'tools': it cannot show them to the model"
                )
        try:
            return self._chat_template.render(
                messages=plain,
                tools=None if tools is None else [dict(t) for t in tools],
                add_generation_prompt=add_generation_prompt,
                **self._named_tokens,
            )
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception, undefined values, sandbox
            # violations; TypeError: the template's operations on the request's values (tojson of a missing
            # tool field, a string plus a number)
            raise ValueError(f"chat template rejected the messages: {e}") from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the chat prompt, as transformers' apply_chat_template(..., tokenize=True): the
        template's text encoded without adding special tokens (the template writes them)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False
        )


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + i): b for i, b in enumerate(others)})
    return table


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """A post-processor adding `bos` before and `eos` after each sequence (either may be None), the one
    transformers builds from add_bos_token/add_eos_token."""
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    for token, token_id in special:
        if token_id is None:
            raise ValueError(f"special token {token!r} from tokenizer_config.json is not in tokenizer.json")

    def sequence(piece: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"${piece}:{type_id}")
        parts += [f"{eos}:{type_id}"] if eos else []
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}", special_tokens=special
    )
