"""Starting and stopping real pd processes for tests: each bounded in time, each stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from pd.metrics import parse_samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m <args>`` with output to ``log``; its own session so a test can stop it alone."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(p: subprocess.Popen, grace: float = 15.0) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def wait_healthy(
    url: str, procs: list[subprocess.Popen], timeout: float = 180.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"process {p.args} exited with {p.returncode} during start-up\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log else ""
    raise TimeoutError(f"{url} not healthy within {timeout} s\n{tail}")


@contextlib.contextmanager
def pd_serve(model: Path, log: Path, *extra: str) -> Iterator[str]:
    """A whole deployment through ``pd-serve``; yields the proxy's base URL."""
    port = free_port()
    p = start(["pd.launch.serve", "--model", str(model), "--port", str(port), *extra], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [p], log=log)
        yield url
    finally:
        code = stop(p, grace=30.0)
        assert code == 0, f"pd-serve exited with {code}\n{log.read_text()[-3000:]}"


def kv_pages_used(url: str) -> dict[tuple[str, str, str], float]:
    """``pd_kv_pages_used`` of every registered rank, from the proxy's /metrics: {(role, instance, rank): pages}."""
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    out = {}
    for (name, labels), value in parse_samples(text).items():
        if name == "pd_kv_pages_used":
            d = dict(labels)
            out[(d["role"], d["instance"], d["rank"])] = value
    return out


def wait_pages_idle(url: str, timeout: float = 30.0) -> dict:
    """Waits until every rank's pages are back to zero; returns the last reading."""
    deadline = time.monotonic() + timeout
    pages = kv_pages_used(url)
    while time.monotonic() < deadline:
        pages = kv_pages_used(url)
        if pages and all(v == 0 for v in pages.values()):
            return pages
        time.sleep(0.2)
    return pages
