"""The ``logprobs`` of a response in OpenAI's shapes, from token ids and the logprobs the ranks computed.

A token shows as its text; a token that is not whole UTF-8 on its own (a piece of a character) shows as
``bytes:\\xNN...``, as OpenAI does; chat also gives each token's bytes. Logprobs are those of the logits
the token was sampled from after penalties, bias, min_tokens and a grammar's mask, before temperature and the
top-k/p/min-p filters (``pd.engine.logits``), so a filter or a temperature never makes a logprob ``-inf``. A
mask does: the ranks leave the alternatives it forbids out (``pd.sampling.pair_top_logprobs``), so a token may
have fewer alternatives than asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from pd.proxy.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from pd.tokenizer import Tokenizer
from pd.types import TopLogprobs


def token_text(tok: Tokenizer, token_id: int) -> str:
    data = tok.token_bytes(token_id)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class CompletionLogprobsBuilder:
    """Completions' logprobs, piece by piece (a stream's chunks, or one piece for a whole response); the
    text offsets run on across pieces from ``offset``."""

    def __init__(self, tok: Tokenizer, offset: int = 0) -> None:
        self.tok, self.offset = tok, offset

    def piece(
        self, ids: Sequence[int], logprobs: Sequence[float | None], tops: Sequence[TopLogprobs | None]
    ) -> CompletionLogprobs:
        """``logprobs[i]``/``tops[i]``: token i's (None: not scored, as an echoed prompt's first token)."""
        texts = [token_text(self.tok, t) for t in ids]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=list(logprobs),
            top_logprobs=[
                None if top is None else {token_text(self.tok, t): lp for t, lp in top} for top in tops
            ],
            text_offset=offsets,
        )

    def prompt(self, ids: Sequence[int], scored: Sequence[tuple[float, TopLogprobs]]) -> CompletionLogprobs:
        """An echoed prompt: ``scored`` holds tokens 1.. (token 0 has no logprob)."""
        return self.piece(ids, [None, *(lp for lp, _ in scored)], [None, *(top for _, top in scored)])


def chat_logprobs(
    tok: Tokenizer, ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[TopLogprobs]
) -> ChatLogprobs:
    """Chat's ``logprobs.content``: one entry per generated token (``tops`` may be empty: no alternatives)."""

    def top(t: int, lp: float) -> TopLogprob:
        return TopLogprob(token=token_text(tok, t), logprob=lp, bytes=list(tok.token_bytes(t)))

    content = []
    for i, (t, lp) in enumerate(zip(ids, logprobs)):
        alts = [top(a, alp) for a, alp in tops[i]] if i < len(tops) else []
        entry = top(t, lp)
        content.append(TokenLogprob(token=entry.token, logprob=lp, bytes=entry.bytes, top_logprobs=alts))
    return ChatLogprobs(content=content)


class ResponseLogprobs:
    """One request's logprobs (and echoed prompt), chunk by chunk: ``logprobs_k`` alternatives per token
    (None: the request asked for no logprobs); ``echo``: completions' prompt before the completion."""

    def __init__(
        self, tok: Tokenizer, chat: bool, logprobs_k: int | None, echo: bool, prompt: str | list[int] | None
    ) -> None:
        self.tok, self.chat, self.k, self.echo = tok, chat, logprobs_k, echo
        self.prompt_text = (prompt if isinstance(prompt, str) else tok.decode(prompt or [])) if echo else ""
        self._completion = CompletionLogprobsBuilder(tok)

    def chunk(
        self,
        first: bool,
        prompt_ids: Sequence[int],
        ids: Sequence[int],
        logprobs: Sequence[float],
        tops: Sequence[TopLogprobs],
        scored_prompt: Sequence[tuple[float, TopLogprobs]],
    ) -> tuple[str, CompletionLogprobs | ChatLogprobs | None]:
        """(text to put before the chunk's text, its logprobs) for a chunk of ``ids``; the first chunk
        carries the echoed prompt and ``scored_prompt`` (its tokens 1..)."""
        prefix = self.prompt_text if first else ""
        if self.k is None:
            return prefix, None
        tops = [tops[i] if i < len(tops) else () for i in range(len(ids))]
        if self.chat:
            return prefix, chat_logprobs(self.tok, ids, logprobs, tops)
        all_ids, lps, alts = list(ids), list[float | None](logprobs), list[TopLogprobs | None](tops)
        if first and self.echo:
            all_ids = [*prompt_ids, *all_ids]
            lps = [None, *(lp for lp, _ in scored_prompt), *lps]
            alts = [None, *(top for _, top in scored_prompt), *alts]
        return prefix, self._completion.piece(all_ids, lps, alts)
