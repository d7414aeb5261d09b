"""Shared types: sampling parameters, requests and batches.

Plain Python: the scheduler works on these and never builds tensors; the model runner turns a
``Batch`` into tensors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pd.grammar.spec import GrammarSpec

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
LOGIT_BIAS_LIMIT = 100.0  # each bias is clamped to [-100, 100]
MAX_CHOICES = 16  # n: choices a request may ask for


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``seed`` keys a counter-based random stream by (seed, token position), so a
    seeded request samples the same tokens whatever its batch, rank or CUDA-graph bucket.

    Logits processing, before temperature and the filters (``pd.engine.logits``): ``repetition_penalty``
    (transformers' rule, over prompt and generated tokens; 1 = off), ``frequency_penalty`` and
    ``presence_penalty`` (OpenAI's, over generated tokens; 0 = off), ``logit_bias`` ((token id, bias)
    pairs, bias clamped to +-100), ``min_tokens`` (EOS and ``stop_token_ids`` are masked until that many
    tokens are out). ``top_logprobs``: alternatives returned per sampled token; ``prompt_logprobs``: with
    it (>= 0) every prompt token's logprob and that many alternatives come back (echo). Logprobs are those
    of the processed logits, before temperature and the filters.

    ``grammar``: structured output (``pd.grammar``): each step, tokens the grammar does not allow next are
    masked to -inf (after the processing above, so logprobs see the mask too), and the request ends with
    ``stop`` once the grammar is complete and can take no more text.
    ``n``: choices of one prompt. The prompt is computed once; its first token is sampled n times from the
    same logits, choice i with the seed ``pd.sampling.choice_seed(seed, i)`` (choice 0 with ``seed``
    itself), and the request then decodes as n sequences sharing the prompt's full KV pages.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None
    n: int = 1

    def __post_init__(self) -> None:
        checks = (
            (
                "temperature",
                math.isfinite(self.temperature) and self.temperature >= 0,
                "a finite number >= 0",
            ),
            ("top_p", math.isfinite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", math.isfinite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("n", 1 <= self.n <= MAX_CHOICES, f"in [1, {MAX_CHOICES}]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "in [0, 2**63)"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} strings"),
            (
                "repetition_penalty",
                math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2,
                "in (0, 2]",
            ),
            (
                "frequency_penalty",
                math.isfinite(self.frequency_penalty) and abs(self.frequency_penalty) <= 2,
                "in [-2, 2]",
            ),
            (
                "presence_penalty",
                math.isfinite(self.presence_penalty) and abs(self.presence_penalty) <= 2,
                "in [-2, 2]",
            ),
            (
                "logit_bias",
                len(self.logit_bias) <= MAX_LOGIT_BIAS
                and all(t >= 0 and math.isfinite(b) for t, b in self.logit_bias),
                f"at most {MAX_LOGIT_BIAS} (token id >= 0, finite bias) pairs",
            ),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in [0, max_tokens]"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                f"null or in [0, {MAX_TOP_LOGPROBS}]",
            ),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_STRING_LEN} characters, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        """Whether a penalty needs the request's token counts."""
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def needs_processing(self) -> bool:
        """Whether the logits change before sampling (a penalty, a bias, min_tokens or a grammar)."""
        return (
            self.needs_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.grammar is not None
        )

    @property
    def needs_sorting(self) -> bool:
        """Whether top-k or top-p filtering is on (the only filters that need a sort)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class ReqState(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    """One request's token state. ``pages`` hold the KV of ``all_ids[:num_computed]``."""

    rid: int
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int  # the request's random stream key (its own, or one drawn for it)
    max_context_len: int
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # where top_logprobs > 0
    prompt_logprobs: list[tuple[float, TopLogprobs]] = field(default_factory=list)  # tokens 1.. (echo)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: ReqState = ReqState.WAITING
    finish_reason: FinishReason | None = None
    index: int = 0  # its choice (n > 1): choice 0 is the request itself, choices 1.. are forked from it
    forks: list[Req] = field(default_factory=list, repr=False)  # choice 0's: choices 1.., once forked

    @property
    def all_ids(self) -> list[int]:
        """Prompt and output in one new list (O(length): per-step code uses ``token_at`` and ``ids``)."""
        return self.prompt_ids + self.output_ids

    def token_at(self, pos: int) -> int:
        """``all_ids[pos]`` (``pos >= 0``) without building ``all_ids``."""
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    def ids(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` (``0 <= start <= end``) without building ``all_ids``."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.state is ReqState.FINISHED

    @property
    def width(self) -> int:
        """Sequences it will decode as: ``n`` until its first token is sampled (it forks then), else 1."""
        return self.sampling.n if self.index == 0 and not self.output_ids else 1

    def max_total_len(self) -> int:
        """The longest this request can grow: prompt + max_tokens, capped by the context length."""
        return min(len(self.prompt_ids) + self.sampling.max_tokens, self.max_context_len)


TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Sampled:
    """One sampled token: its id, its logprob, and the alternatives asked for (else ``()``)."""

    token: int
    logprob: float
    top: TopLogprobs = ()


@dataclass
class StepResult:
    """What one step computed, per request of its batch (lists in batch order).

    ``tokens[i]``/``logprobs[i]``: the sampled token and its logprob, None if request i did not sample
    this step (a non-final chunk). ``top[i]``: the ``top_logprobs`` alternatives asked for (else ``()``).
    ``prompt[i]``: for a request asking for prompt logprobs, (logprob, alternatives) of each prompt token
    this step scored, in order (token p is scored by the position before it, so token 0 never is).
    ``forks[i]``: for a request of ``n > 1`` choices that sampled its first token this step, the first
    tokens of choices 1..n-1, sampled from the same logits (``tokens[i]`` is choice 0's); else ``[]``.
    """

    tokens: list[int | None]
    logprobs: list[float | None]
    top: list[TopLogprobs]
    prompt: list[list[tuple[float, TopLogprobs]]]
    forks: list[list[Sampled]]

    @classmethod
    def of(
        cls, tokens: list[int | None], logprobs: list[float | None], forks: list[list[Sampled]] | None = None
    ) -> StepResult:
        n = len(tokens)
        return cls(tokens, logprobs, [()] * n, [[] for _ in tokens], forks or [[] for _ in tokens])


class BatchMode(str, enum.Enum):
    EXTEND = "extend"  # prefill or chunked-prefill tokens: non-absorbed MLA
    DECODE = "decode"  # one token per request over the latent cache: absorbed MLA


@dataclass
class Batch:
    """One forward step: request ``reqs[i]`` computes ``all_ids[starts[i]:ends[i]]``.

    A request samples a token this step iff its range reaches the end of its known tokens
    (``ends[i] == seq_len``); chunks before the last one of a prompt only fill the cache.
    """

    mode: BatchMode
    reqs: list[Req]
    starts: list[int]
    ends: list[int]
    samples: list[bool] = field(init=False)  # fixed when the batch is made
    # (source page, destination page): KV copied, every layer, before the step runs (copy on write)
    copies: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.samples = [e == r.seq_len for r, e in zip(self.reqs, self.ends)]

    @property
    def num_tokens(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))
