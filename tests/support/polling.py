"""Bounded waiting: a test polls for a condition and fails, naming it, if it does not come in time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.05
) -> None:
    """Calls ``predicate()`` every ``interval`` seconds until it is true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
