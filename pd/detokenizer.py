"""Generated token ids to text deltas, one token at a time, with OpenAI's stop strings (``IncrementalDetokenizer``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pd.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for bytes that are not (yet) complete UTF-8


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    `add` never returns part of a character: while the decoded text ends in U+FFFD (a token ended inside a
    multi-byte character) that character is held back until a later token completes it. The deltas of all
    `add` calls plus `flush()` equal `tokenizer.decode(output_ids)`, cut before the first stop string.

    Stop strings (OpenAI semantics): after the first token with which the output text contains one of
    `stop`, `stopped` is True, `stop_string` names it (of those then in the text, the one occurring first),
    the text returned ends just before it, and later calls return "". Text that could be the start of a stop
    string is held back until it is known not to be.

    Each call decodes a window of a few tokens: the tokens since the last character boundary plus
    CONTEXT_TOKENS before it (decoders that drop a leading space need the token before).
    """

    CONTEXT_TOKENS = 4
    # Tokens after the last clean boundary before the window is cut anyway: a run of tokens that each end
    # inside a character (valid text: merges across character boundaries; or garbage bytes) has no clean
    # boundary, and the window must stay bounded.
    MAX_OPEN_TOKENS = 16

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        for s in self._stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._max_stop_len = max(map(len, self._stop), default=0)
        # The window: the last tokens, of which the first `_open` (a token index) are already fully accounted
        # for, and the first `_sent` characters of the window's text already emitted (or the prompt's).
        self._ids = list(prompt_ids)[-self.CONTEXT_TOKENS :]
        self._open = len(self._ids)
        self._sent = len(self._decode(self._ids))
        self._held = ""  # emitted-ready text withheld because it may start a stop string
        self.stopped = False
        self.stop_string: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The new text that `token_id` completes (possibly "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        # Everything before a trailing U+FFFD is final: later bytes can only change the incomplete character.
        complete = not text.endswith(REPLACEMENT_CHAR)
        end = len(text) if complete else len(text) - 1
        delta = text[self._sent : end]
        self._sent = max(self._sent, end)
        if complete:
            if len(self._ids) >= 2 * self.CONTEXT_TOKENS:
                self._restart_window(self.CONTEXT_TOKENS, complete=True)
            else:
                self._open = len(self._ids)
        elif len(self._ids) - self._open > self.MAX_OPEN_TOKENS:
            self._restart_window(self._tokens_holding_last_bytes(), complete=False)
        return self._release(delta, final=False)

    def _tokens_holding_last_bytes(self) -> int:
        """How many trailing tokens surely contain the incomplete character's first byte: an incomplete
        UTF-8 character has at most 3 bytes and every token that decodes to something has at least one."""
        skipped = self._tokenizer.special_token_ids if self._skip_special_tokens else frozenset()
        count = with_bytes = 0
        for token_id in reversed(self._ids):
            count += 1
            with_bytes += token_id not in skipped
            if with_bytes == 4:
                break
        return count

    def _restart_window(self, keep: int, complete: bool) -> None:
        """Keeps only the last `keep` tokens, re-expressing `_sent` in the new window's text: all of it is
        emitted when the text is complete, all but the trailing incomplete character otherwise."""
        self._ids = self._ids[-keep:]
        self._open = len(self._ids)
        text = self._decode(self._ids)
        self._sent = len(text) if complete else len(text) - 1

    def flush(self) -> str:
        """The text still held back, at the end of generation (an incomplete character decodes to U+FFFD,
        as in decode)."""
        if self.stopped:
            return ""
        text = self._decode(self._ids)
        delta = text[self._sent :]
        self._sent = len(text)
        self._open = len(self._ids)
        return self._release(delta, final=True)

    def _release(self, delta: str, final: bool) -> str:
        """Applies stop strings to the next `delta` of output text: returns what may be emitted."""
        if not self._stop:
            return delta
        text = self._held + delta
        hits = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        if hits:
            cut, self.stop_string = min(hits)
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0
        if not final:
            # The longest tail of `text` that a stop string starts with could still become that stop string.
            for k in range(min(len(text), self._max_stop_len - 1), 0, -1):
                if any(s.startswith(text[-k:]) for s in self._stop):
                    keep = k
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]
