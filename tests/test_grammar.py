"""pd.grammar: `apply_bitmask` against a dense reference, and the llguidance backend on the tiny model's
tokenizer. The backend's main property: a "random model" (uniform among the allowed tokens) still finishes
output that parses and validates against the schema, regex, choice or grammar."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch

from pd.grammar import GrammarError, GrammarSpec, make_grammar_backend
from pd.grammar.mask import ALL_ALLOWED, apply_bitmask, bitmask_words, new_bitmask
from pd.tokenizer import Tokenizer
from tests.support.schemas import SCHEMAS

MAX_STEPS = 400  # tokens a random model may take to finish one output
SEEDS = (0, 1, 2)

# ---------------------------------------------------------------------------------------------------------
# apply_bitmask


def dense_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """apply_bitmask's contract written out token by token."""
    batch, vocab = logits.shape
    words = bitmask.shape[1]
    out = logits.clone()
    for b in range(batch):
        row = [int(w) & 0xFFFFFFFF for w in bitmask[b]]
        unconstrained = all(w == 0xFFFFFFFF for w in row)
        for t in range(vocab):
            allowed = (row[t // 32] >> (t % 32)) & 1 if t < 32 * words else unconstrained
            if not allowed:
                out[b, t] = float("-inf")
    return out


@pytest.mark.parametrize(
    "vocab, words",
    [
        (64, 2),  # exact
        (100, 4),  # padding bits past the vocabulary in the last word
        (100, 3),  # logits wider than the bitmask (padded model vocabulary)
        (70, 5),  # bitmask wider than the logits
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_matches_dense_reference(vocab, words, dtype) -> None:
    gen = torch.Generator().manual_seed(vocab * 31 + words)
    batch = 6
    logits = torch.randn(batch, vocab, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31, (batch, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = ALL_ALLOWED  # no grammar
    bitmask[3] = 0  # nothing allowed
    bitmask[4, 0] = ALL_ALLOWED  # all ones in one word only: still a constrained row
    expected = dense_reference(logits, bitmask)
    out = logits.clone()
    apply_bitmask(out, bitmask)
    assert torch.equal(out, expected)
    assert torch.equal(out[1], logits[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_on_cuda_without_syncs_and_in_a_graph() -> None:
    """On CUDA: no host synchronization (sync debug mode raises on one), and captured in a CUDA graph, the
    replays on new data equal the CPU result. Logits wider than the bitmask, a third of the rows free."""
    batch, words = 16, 4040
    vocab = 32 * words + 40

    def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        bitmask = torch.randint(-(2**31), 2**31, (batch, words), generator=gen, dtype=torch.int64)
        bitmask[::3] = ALL_ALLOWED
        return torch.randn(batch, vocab, generator=gen), bitmask.to(torch.int32)

    def on_cpu(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        apply_bitmask(out, bitmask)
        return out

    logits, bitmask = (t.cuda() for t in data(0))
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_bitmask(logits, bitmask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(logits.cpu(), on_cpu(*data(0)))
    static_logits, static_mask = (t.cuda() for t in data(0))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up before capture
        apply_bitmask(static_logits.clone(), static_mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_bitmask(static_logits, static_mask)
    for seed in (1, 2):
        new_logits, new_mask = data(seed)
        static_logits.copy_(new_logits)
        static_mask.copy_(new_mask)
        graph.replay()
        assert torch.equal(static_logits.cpu(), on_cpu(new_logits, new_mask))


def test_apply_bitmask_checks_its_arguments() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="int32"):
        apply_bitmask(logits, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[B, W\]"):
        apply_bitmask(logits, torch.zeros(3, 2, dtype=torch.int32))
    assert bitmask_words(64) == 2 and bitmask_words(65) == 3
    assert torch.equal(new_bitmask(2, 3), torch.full((2, 3), -1, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------
# GrammarSpec


def test_spec_is_canonical_and_checked() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    text = '{ "type": "object",\n "properties": {"b": {"type": "integer"}, "a": {"type": "string"}} }'
    assert GrammarSpec.json_schema(schema) == GrammarSpec.json_schema(text)
    assert hash(GrammarSpec.json_schema(schema)) == hash(GrammarSpec.json_schema(text))
    assert GrammarSpec.json_schema(schema).value.index('"b"') < GrammarSpec.json_schema(schema).value.index(
        '"a"'
    )
    assert GrammarSpec.json_schema(schema) != GrammarSpec.json_schema(schema, strict=True)
    assert GrammarSpec.choice(["x", "y"]) == GrammarSpec("choice", ("x", "y"))
    bad = [
        (lambda: GrammarSpec.json_schema("{not json"), "not valid JSON"),
        (lambda: GrammarSpec.choice([]), "non-empty"),
        (lambda: GrammarSpec("choice", ("a", 1)), "strings"),  # type: ignore[arg-type]
        (lambda: GrammarSpec("regex", "a", strict=True), "strict"),
        (lambda: GrammarSpec("regex", ""), "empty"),
        (lambda: GrammarSpec("yaml", "x"), "unknown grammar kind"),  # type: ignore[arg-type]
    ]
    for make, message in bad:
        with pytest.raises(GrammarError, match=message):
            make()


# ---------------------------------------------------------------------------------------------------------
# The llguidance backend on the tiny model's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def backend(tokenizer):
    pytest.importorskip("llguidance")
    return make_grammar_backend("llguidance", tokenizer)


def allowed_ids(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def generate(backend, tokenizer, spec: GrammarSpec, seed: int, weigh=None) -> str:
    """A random model: each step picks among the allowed tokens (uniformly, or by ``weigh(ids)``) until it
    picks EOS. Returns the decoded output."""
    rng = np.random.default_rng(seed)
    matcher = backend.matcher(backend.compile(spec))
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        matcher.fill_bitmask(row)
        allowed = allowed_ids(row)
        assert len(allowed) and allowed.max() < backend.vocab_size
        p = None if weigh is None else weigh(allowed) / weigh(allowed).sum()
        token = int(rng.choice(allowed, p=p))
        if token in backend.eos_token_ids:
            assert matcher.eos_allowed and matcher.accept(token) and matcher.finished
            return tokenizer.decode(tokens)
        assert matcher.accept(token), token
        tokens.append(token)
    raise AssertionError(f"no EOS after {MAX_STEPS} tokens: {tokenizer.decode(tokens)!r}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_model_finishes_valid_json(backend, tokenizer, name, seed) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = SCHEMAS[name]
    text = generate(backend, tokenizer, GrammarSpec.json_schema(schema, strict=True), seed)
    jsonschema.validate(json.loads(text), schema)


def test_json_object(backend, tokenizer) -> None:
    spec = GrammarSpec.json_object()
    # Any object is allowed, so its strings are unbounded: this random model favours closing tokens.
    closing = np.array([any(c in tokenizer.decode([t]) for c in '"]}') for t in range(backend.vocab_size)])

    def weigh(ids: np.ndarray) -> np.ndarray:
        return np.where(closing[ids], 30.0, 1.0)

    for seed in range(5):
        assert isinstance(json.loads(generate(backend, tokenizer, spec, seed, weigh)), dict)
    compiled = backend.compile(spec)
    matcher = backend.matcher(compiled)
    compact = '{"a":[1,2.5,{"b":null}],"c":"x y","d":true}'
    assert all(matcher.accept(t) for t in tokenizer.encode(compact, add_special_tokens=False))
    assert matcher.finished and matcher.eos_allowed
    # No free whitespace: a space after ':' is refused, and the matcher stays where it was.
    matcher = backend.matcher(compiled)
    assert all(matcher.accept(t) for t in tokenizer.encode('{"a":', add_special_tokens=False))
    assert not matcher.accept(tokenizer.encode(" 1", add_special_tokens=False)[0])
    assert all(matcher.accept(t) for t in tokenizer.encode("1}", add_special_tokens=False))
    assert matcher.finished and matcher.error is None


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_lark_and_choice(backend, tokenizer, seed) -> None:
    pattern = r"[a-c]{2,5}-[0-9]{1,3}(\.[xyz])?"
    assert re.fullmatch(pattern, generate(backend, tokenizer, GrammarSpec.regex(pattern), seed))
    lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'
    assert re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", generate(backend, tokenizer, GrammarSpec.lark(lark), seed))
    choices = ("yes", "no", "maybe so", 'he said "hi"', "back\\slash", "ünï\n")
    spec = GrammarSpec.choice(choices)
    assert generate(backend, tokenizer, spec, seed) in choices
    choice = choices[seed]
    matcher = backend.matcher(backend.compile(spec))
    assert all(matcher.accept(t) for t in tokenizer.encode(choice, add_special_tokens=False))
    assert matcher.finished


@pytest.mark.parametrize(
    "spec, message",
    [
        (GrammarSpec.json_schema({"type": "nonsense"}), "nonsense"),
        (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}, strict=True), "uniqueItems"),
        (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
        (GrammarSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}), "minLength"),
        (GrammarSpec.json_schema([1, 2]), "json_schema"),  # type: ignore[arg-type]
        (GrammarSpec.regex("a(b"), "unclosed group"),
        (GrammarSpec.lark("start: foo"), "foo"),
    ],
)
def test_bad_specs_raise_grammar_error(backend, spec, message) -> None:
    """The rank's compile and the proxy's tokenizer-free check refuse a spec in the same words."""
    from pd.grammar.text import validate

    with pytest.raises(GrammarError, match=re.escape(message)) as compiled:
        backend.compile(spec)
    with pytest.raises(GrammarError) as checked:
        validate(spec)
    assert str(checked.value) == str(compiled.value)


def test_lenient_schema_compiles_with_warnings(backend) -> None:
    from pd.grammar.text import validate

    spec = GrammarSpec.json_schema({"type": "array", "uniqueItems": True})
    assert any("uniqueItems" in w for w in backend.compile(spec).warnings)
    assert any("uniqueItems" in w for w in validate(spec))
    assert validate(GrammarSpec.json_schema(SCHEMAS["nested"], strict=True)) == ()


def mask_of(matcher, words: int) -> np.ndarray:
    row = np.empty(words, dtype=np.int32)
    matcher.fill_bitmask(row)
    return row


def test_rollback_restores_masks(backend, tokenizer) -> None:
    words = backend.bitmask_words
    spec = GrammarSpec.json_schema(SCHEMAS["nested"], strict=True)
    text = generate(backend, tokenizer, spec, seed=0)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    matcher = backend.matcher(backend.compile(spec))
    masks = [mask_of(matcher, words)]  # masks[i]: after i tokens
    for t in tokens:
        assert matcher.accept(t)
        masks.append(mask_of(matcher, words))
    assert matcher.finished and matcher.num_tokens == len(tokens)
    eos = min(backend.eos_token_ids)
    assert matcher.accept(eos) and matcher.num_tokens == len(tokens) + 1
    matcher.rollback(1)  # the EOS
    assert matcher.finished and np.array_equal(mask_of(matcher, words), masks[-1])
    for k in (1, 3, 7):
        matcher.rollback(k)
        assert matcher.num_tokens == len(tokens) - k
        assert np.array_equal(mask_of(matcher, words), masks[matcher.num_tokens])
        assert all(matcher.accept(t) for t in tokens[matcher.num_tokens :])
    with pytest.raises(ValueError, match="roll back"):
        matcher.rollback(len(tokens) + 1)
    matcher.rollback(len(tokens))
    assert np.array_equal(mask_of(matcher, words), masks[0]) and not matcher.finished
    # A refused token changes nothing.
    assert not matcher.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert np.array_equal(mask_of(matcher, words), masks[0]) and matcher.error is None
    matcher.reset()
    assert matcher.num_tokens == 0


def test_compile_cache(tokenizer) -> None:
    pytest.importorskip("llguidance")
    from pd.grammar.llguidance import LLGuidanceBackend

    backend = LLGuidanceBackend(tokenizer, cache_size=2)
    a = GrammarSpec.json_schema({"type": "integer"})
    compiled = [None] * 4

    def compile_a(i: int) -> None:
        compiled[i] = backend.compile(GrammarSpec.json_schema('{"type": "integer"}'))

    threads = [threading.Thread(target=compile_a, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c is compiled[0] for c in compiled) and backend.compile(a) is compiled[0]
    backend.compile(GrammarSpec.regex("x"))
    assert backend.compile(a) is compiled[0]  # used last: kept
    backend.compile(GrammarSpec.regex("y"))  # evicts regex x
    backend.compile(GrammarSpec.regex("z"))  # evicts a
    assert backend.compile(a) is not compiled[0]


def test_padded_vocab_bitmasks_on_logits(tokenizer) -> None:
    """A model with more logits columns than tokens, a batch of a constrained row and a free row: the
    batched fill and apply_bitmask keep the constrained row in its grammar, and padded ids out of it."""
    pytest.importorskip("llguidance")
    vocab = tokenizer.vocab_size + 6
    backend = make_grammar_backend("llguidance", tokenizer, vocab_size=vocab)
    assert backend.vocab_size == vocab and backend.bitmask_words == bitmask_words(vocab)
    spec = GrammarSpec.json_schema(SCHEMAS["enums"], strict=True)
    matcher = backend.matcher(backend.compile(spec))
    bitmask = new_bitmask(2, backend.bitmask_words)
    gen = torch.Generator().manual_seed(0)
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        backend.fill_bitmasks(bitmask, [(0, matcher)])
        assert torch.equal(bitmask[0], torch.from_numpy(mask_of(matcher, backend.bitmask_words)))
        assert (bitmask[1] == ALL_ALLOWED).all()
        logits = torch.randn(2, vocab + 40, generator=gen)  # wider still than the bitmask
        masked = logits.clone()
        apply_bitmask(masked, bitmask)
        assert torch.equal(masked[1], logits[1])
        assert torch.isinf(masked[0, tokenizer.vocab_size :]).all()
        token = int(masked[0].argmax())
        if token in backend.eos_token_ids:
            break
        assert matcher.accept(token)
        tokens.append(token)
    assert matcher.finished
    assert json.loads(tokenizer.decode(tokens))["color"] in ("red", "green", "blue")


def test_bad_arguments(backend, tokenizer) -> None:
    matcher = backend.matcher(backend.compile(GrammarSpec.json_object()))
    for row in (
        np.empty(backend.bitmask_words, dtype=np.int64),
        np.empty(backend.bitmask_words + 1, dtype=np.int32),
        np.empty((2, backend.bitmask_words), dtype=np.int32)[:, 0],
    ):
        with pytest.raises(ValueError, match="bitmask"):
            matcher.fill_bitmask(row)
    with pytest.raises(ValueError, match="bitmask"):
        backend.fill_bitmasks(np.empty((2, backend.bitmask_words), dtype=np.int32).T.copy().T, [(0, matcher)])
    with pytest.raises(ValueError, match="row 2"):
        backend.fill_bitmasks(np.empty((2, backend.bitmask_words), dtype=np.int32), [(2, matcher)])
    with pytest.raises(ValueError, match="unknown grammar backend"):
        make_grammar_backend("nope", tokenizer)
