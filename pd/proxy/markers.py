"""Finding marker strings (tool-call and reasoning tags) in text that arrives in pieces.

A streaming parser never emits text that may still turn out to be (part of) a marker: it holds back the
longest tail that a later delta could complete into one, and looks again once more text has come.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

Delta = dict[str, Any]  # an OpenAI chat.completion.chunk ``delta`` (or part of one)


class MarkerStream(ABC):
    """The feeding loop of a streaming parser: text goes into ``_buf``, ``_step`` consumes what it can and
    appends deltas to ``_out`` (returning True while it made progress), and ``feed``/``finish`` hand them out."""

    def __init__(self) -> None:
        self._buf = ""  # received, not yet consumed
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[Delta]:
        """The deltas still held back, at the end of the output."""
        while self._step(final=True):
            pass
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    @abstractmethod
    def _step(self, final: bool) -> bool:
        """Consumes what it can of ``_buf``; True if the state changed (step again)."""


def first_marker(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """Where the earliest of ``markers`` starts in ``text``, and which one: ``(-1, "")`` if none does."""
    best, found = -1, ""
    for marker in markers:
        i = text.find(marker)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, marker
    return best, found


def partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``markers`` (0 if none)."""
    longest = max(map(len, markers), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


def closing_tail_len(text: str, ends: Sequence[str], fence: str = "") -> int:
    """Length of the longest tail of ``text`` that more text could complete into
    ``whitespace [fence whitespace] end`` for one of ``ends``: what a part stripped of trailing whitespace
    (and of a closing ``fence``) must hold back until its end marker shows up or is ruled out.
    Read from the right, so the cost is that of the tail, not of the text."""
    n = len(text)
    starts = []
    for k in range(min(n, max(map(len, ends), default=0)), -1, -1):  # the tail ends in a prefix of an end
        if k == 0 or any(e.startswith(text[n - k :]) for e in ends):
            i = _whitespace_start(text, n - k)
            if fence and text.endswith(fence, 0, i):
                i = _whitespace_start(text, i - len(fence))
            starts.append(i)
    for k in range(1, min(n + 1, len(fence))):  # ... or in a part of the fence
        if fence.startswith(text[n - k :]):
            starts.append(_whitespace_start(text, n - k))
    return n - min(starts)


def _whitespace_start(text: str, end: int) -> int:
    """Where the run of whitespace that ends at ``end`` starts."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end
