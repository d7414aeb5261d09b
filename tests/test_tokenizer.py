"""pd.tokenizer against transformers' AutoTokenizer on the tiny model's files, and the incremental
detokenizer against Tokenizer.decode of the whole output."""

import json
import random

import pytest
import tokenizers

from pd.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from pd.tiny_model import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN
from pd.tokenizer import Tokenizer
from tests.support.checkpoints import copy_checkpoint

transformers = pytest.importorskip("transformers")

# Characters the tokenizer saw in training (merged into tokens) and ones it never saw (left as byte tokens,
# so that tokens end inside characters), of 1 to 4 UTF-8 bytes.
_PIECES = (
    "hello", " world", " the", " model", "café", " naïve", " Zürich", " 中文", "你好", "模型", "こんにちは", " 🚀",
    "👍🏽", "👩‍💻", "🇫🇷", " 42", "\n", ".", ",", "!", "ß", "Ж", "ℵ", "𝔘", "नमस्ते", "مرحبا", "🦀", "\t", "  ",
    "<｜User｜>", "<｜end▁of▁sentence｜>", "a<b", "{'x': 1}",
)  # fmt: skip


def _random_text(rng: random.Random, n_pieces: int) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(n_pieces))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


def _detokenize(tok, ids, **kwargs):
    det = IncrementalDetokenizer(tok, **kwargs)
    deltas = [det.add(i) for i in ids]
    deltas.append(det.flush())
    return det, deltas


# ------------------------------------------------------------------------------------------ Tokenizer


def test_encode_decode_equal_transformers(tok, hf):
    rng = random.Random(0)
    texts = [
        "",
        " ",
        "Hello world",
        "café 中文 🚀 👩‍💻 naïve",
        f"{USER_TOKEN}hi{ASSISTANT_TOKEN}yo{EOS_TOKEN}",
    ]
    texts += [_random_text(rng, rng.randint(1, 30)) for _ in range(200)]
    for text in texts:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    for _ in range(100):  # arbitrary id sequences, special ids and broken UTF-8 included
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_properties(tok, hf):
    assert tok.vocab_size == len(hf) == 1024
    assert tok.bos_token_id == hf.bos_token_id == 0
    assert tok.eos_token_ids == {hf.eos_token_id} == {1}
    assert tok.encode("hi")[0] == tok.bos_token_id
    # Ids beyond the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing.
    assert tok.decode([tok.vocab_size + 5, *tok.encode("hi", add_special_tokens=False)]) == "hi"


def _copy_with_config(src, dst, *, post_processor=True, **changes):
    """A copy of model directory `src` with tokenizer_config.json changed (None: key removed) and, with
    post_processor=False, no post-processor in tokenizer.json."""

    def edit(config):
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value

    def drop_post_processor(tokenizer):
        tokenizer["post_processor"] = None

    return copy_checkpoint(
        src, dst, tokenizer_config=edit, tokenizer=None if post_processor else drop_post_processor
    )


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"add_bos_token": False},
        {"add_bos_token": None, "add_eos_token": None},
        {"add_eos_token": True},
        {"add_bos_token": False, "add_eos_token": True},
        {"bos_token": BOS_TOKEN},  # a plain string instead of an AddedToken dict
    ],
)
def test_bos_eos_handling(tmp_path, tiny_model_dir, changes, post_processor):
    d = _copy_with_config(tiny_model_dir, tmp_path / "m", post_processor=post_processor, **changes)
    tok = Tokenizer.from_dir(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for text in ("", "Hello world", "中文 🚀"):
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == hf.encode(text, add_special_tokens=False)
        if post_processor:
            # tokenizer.json's post-processor (BOS) decides, as in transformers 5.
            assert tok.encode(text) == hf.encode(text) == [tok.bos_token_id, *plain]
        else:
            # Without one, add_bos_token/add_eos_token do (transformers 5's generic tokenizer adds nothing;
            # its Llama-family tokenizers follow the flags).
            bos = [tok.bos_token_id] if config.get("add_bos_token") else []
            eos = [1] if config.get("add_eos_token") else []
            assert tok.encode(text) == [*bos, *plain, *eos]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 中文 🚀"}],
    [
        {"role": "system", "content": "One."},
        {"role": "system", "content": "Two."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "tail", "name": None}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tok, hf, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(hf_ids)
    assert text.startswith(BOS_TOKEN)
    assert text.endswith(ASSISTANT_TOKEN) == add_generation_prompt or messages[-1]["role"] == "assistant"


def test_chat_template_from_list_and_from_jinja_file(tmp_path, tiny_model_dir, tok):
    messages = CONVERSATIONS[2]
    listed = _copy_with_config(
        tiny_model_dir,
        tmp_path / "listed",
        chat_template=[
            {"name": "other", "template": "x"},
            {"name": "default", "template": tok.chat_template},
        ],
    )
    assert Tokenizer.from_dir(listed).apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert Tokenizer.from_dir(listed).apply_chat_template(
        messages
    ) == transformers.AutoTokenizer.from_pretrained(listed).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )

    jinja = copy_checkpoint(tiny_model_dir, tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}"
    )
    expected = transformers.AutoTokenizer.from_pretrained(jinja).apply_chat_template(messages, tokenize=False)
    assert (
        Tokenizer.from_dir(jinja).apply_chat_template(messages)
        == expected
        == '[system]"One."[system]"Two."[user]"Q1"[assistant]"A1"[user]"Q2"'
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ("hello", "non-empty"),
        ([["user", "hi"]], r"messages\[0\] must be an object"),
        ([{"role": "function", "content": "x"}], r"messages\[0\].role is 'function'"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\].tool_call_id must be a string"),
        ([{"content": "x"}], r"messages\[0\].role is None"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": None}],
            r"messages\[1\].content must be a string",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            r"messages\[0\].content must be a string, got list",
        ),
        ([{"role": "user"}], r"messages\[0\].content must be a string, got NoneType"),
    ],
)
def test_bad_messages_raise_value_error(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_errors_become_value_errors(tmp_path, tiny_model_dir):
    rejecting = _copy_with_config(
        tiny_model_dir,
        tmp_path / "rejecting",
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
    )
    tok = Tokenizer.from_dir(rejecting)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])

    escaping = _copy_with_config(
        tiny_model_dir, tmp_path / "escaping", chat_template="{{ messages.__class__.__mro__ }}"
    )
    with pytest.raises(ValueError, match="chat template rejected"):
        Tokenizer.from_dir(escaping).apply_chat_template([{"role": "user", "content": "x"}])

    broken = _copy_with_config(tiny_model_dir, tmp_path / "broken", chat_template="{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        Tokenizer.from_dir(broken)

    none = _copy_with_config(tiny_model_dir, tmp_path / "none", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(none).apply_chat_template([{"role": "user", "content": "x"}])


def test_eos_ids_from_generation_config(tmp_path, tiny_model_dir):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert Tokenizer.from_dir(d).eos_token_ids == {1, 7}
    (d / "generation_config.json").unlink()
    assert Tokenizer.from_dir(d).eos_token_ids == {1}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_dir(d)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


# ----------------------------------------------------------------------------- IncrementalDetokenizer


def test_detokenizer_sequences_split_characters(tok):
    """The texts below do produce tokens that end inside a character, so the next tests test something."""
    rng = random.Random(1)
    splits = 0
    for _ in range(50):
        ids = tok.encode(_random_text(rng, 20), add_special_tokens=False)
        splits += sum(tok.decode(ids[:k]).endswith(REPLACEMENT_CHAR) for k in range(1, len(ids)))
    assert splits > 50


def test_detokenizer_valid_text_never_emits_broken_characters(tok):
    rng = random.Random(2)
    for _ in range(300):
        text = _random_text(rng, rng.randint(1, 40))
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            _, deltas = _detokenize(tok, ids, skip_special_tokens=skip)
            assert not any(REPLACEMENT_CHAR in d for d in deltas), text
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        prompt = tok.encode(_random_text(rng, 5))
        _, deltas = _detokenize(tok, ids, prompt_ids=prompt)
        assert "".join(deltas) == tok.decode(ids)


def test_detokenizer_arbitrary_ids_concatenate_to_decode(tok):
    rng = random.Random(3)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        for skip in (True, False):
            _, deltas = _detokenize(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


class _CountingTokenizer:
    """Wraps a Tokenizer, recording the longest id list decoded."""

    def __init__(self, tok):
        self._tok = tok
        self.special_token_ids = tok.special_token_ids
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the others for code points from 256."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@pytest.fixture(scope="module")
def byte_ids(tiny_model_dir):
    """byte -> id of the token for that single byte (every byte-level BPE vocabulary has all 256)."""
    backend = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ids = {b: backend.token_to_id(c) for b, c in _bytes_to_unicode().items()}
    assert None not in ids.values()
    return ids


def _single_byte_ids(byte_ids, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte."""
    return [byte_ids[b] for b in text.encode()]


def test_detokenizer_window_stays_bounded(tok, byte_ids):
    # Valid text where every token ends inside a character (one token per byte of 4-byte characters with
    # no clean boundary only every 4 tokens), garbage bytes that never complete (a lead byte repeated:
    # the text ends in U+FFFD after every token), and long ordinary text.
    cases = [
        _single_byte_ids(byte_ids, "𝔘🦀" * 300),
        [byte_ids[0xE4]] * 1000,
        tok.encode("hello world " * 300, add_special_tokens=False),
    ]
    for ids in cases:
        counting = _CountingTokenizer(tok)
        det = IncrementalDetokenizer(counting)
        text = "".join(det.add(i) for i in ids) + det.flush()
        assert text == tok.decode(ids)
        bound = 2 * IncrementalDetokenizer.CONTEXT_TOKENS + IncrementalDetokenizer.MAX_OPEN_TOKENS + 1
        assert counting.longest <= bound


def test_detokenizer_forced_window_restart_keeps_text_exact(tok, byte_ids):
    # With no patience for open windows, every token that ends inside a character restarts the window.
    rng = random.Random(4)
    for _ in range(100):
        text = _random_text(rng, rng.randint(1, 30))
        for ids in (tok.encode(text, add_special_tokens=False), _single_byte_ids(byte_ids, text)):
            det = IncrementalDetokenizer(tok)
            det.MAX_OPEN_TOKENS = 0
            deltas = [det.add(i) for i in ids] + [det.flush()]
            assert not any(REPLACEMENT_CHAR in d for d in deltas)
            assert "".join(deltas) == tok.decode(ids)


def test_detokenizer_keeps_context_for_decoders_that_strip_a_leading_space():
    # SentencePiece-style: decode drops the first token's leading space, so the window must keep context.
    words = ["▁hello", "▁world", "▁again", "ing", "▁x", "s"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=None)
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    tok = Tokenizer(backend, named_tokens={})
    rng = random.Random(6)
    for _ in range(100):
        ids = [rng.randrange(len(words)) for _ in range(rng.randint(1, 40))]
        _, deltas = _detokenize(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        # After a prompt, the output's first space is the output's: the text as decoded with the prompt.
        prompt = [rng.randrange(len(words)) for _ in range(rng.randint(1, 8))]
        _, deltas = _detokenize(tok, ids, prompt_ids=prompt)
        assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def _expected_with_stop(tok, ids, stop) -> tuple[str, bool]:
    """Generation stops at the first token after which the text contains a stop string; the text is cut
    before the earliest occurrence present then."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            return text[: min(cuts)], True
    return tok.decode(ids), False


@pytest.mark.parametrize(
    "text, stop",
    [
        ("Hello world, the model", ["world"]),  # mid-text
        ("Hello world", ["Hello"]),  # at the start: nothing emitted
        ("Hello world", ["xyz"]),  # absent
        ("Hello world", ["wor", "llo", "d"]),  # several: the first to appear wins
        ("Hello world", ["o w", "lo"]),  # several complete together: the earliest occurrence wins
        ("ab ab abcd", ["abcd", " ab "]),  # a shorter one completes first
        ("Hello world", ["lo w"]),  # spans a token boundary
        ("the model answers", ["model answers", "model x"]),  # a held prefix of one, the other matches
        ("the model again", ["model x"]),  # held back, then released: not a stop after all
        ("café 中文 🚀 done", ["中文"]),  # multi-byte stop split across byte tokens
        ("café 中文 🚀 done", ["🚀"]),
        ("abc", ["abcd"]),  # a prefix of the stop at the end: flushed
        ("aaab", ["aab"]),  # overlapping candidates
    ],
)
def test_stop_strings(tok, byte_ids, text, stop):
    for ids in (tok.encode(text, add_special_tokens=False), _single_byte_ids(byte_ids, text)):
        det, deltas = _detokenize(tok, ids, stop=stop)
        expected, stopped = _expected_with_stop(tok, ids, stop)
        assert "".join(deltas) == expected
        assert det.stopped == stopped
        assert (det.stop_string is not None) == stopped
        if stopped:
            assert text[len(expected) :].startswith(det.stop_string)
            assert det.add(ids[0]) == "" and det.flush() == ""
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_stop_strings_random(tok):
    rng = random.Random(5)
    for _ in range(300):
        text = _random_text(rng, rng.randint(1, 25))
        ids = tok.encode(text, add_special_tokens=False)
        stop = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.7 and len(text) > 1:
                start = rng.randrange(len(text))
                stop.append(text[start : start + rng.randint(1, 6)])
            else:
                stop.append(_random_text(rng, 1))
        _, deltas = _detokenize(tok, ids, stop=stop)
        assert "".join(deltas) == _expected_with_stop(tok, ids, stop)[0], (text, stop)
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_stop_string_validation(tok):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, stop=["ok", ""])
