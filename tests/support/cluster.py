"""Real pd processes for tests, each bounded in time and stopped by its pid.

``pd_serve`` runs a whole deployment through ``pd-serve``; ``Cluster`` starts one process by process
(bootstrap, prefill and decode instances, proxies) so that a test can kill, hang (SIGSTOP), resume,
restart or reconfigure any one of them. Around them: health waits, the deployment's metrics (pages,
rooms and requests in flight, read through the proxy's /metrics) and the processes' resident memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from pd.metrics import parse_samples
from tests.support.net import free_port

MODEL_NAME = "tiny-ci"  # the name the test deployments serve the tiny model under
RSS_SLACK = 32 << 20  # allocator noise between two equal bursts; a leak per request grows past it
# Every deployment of the suite checks its KV transfers (a test may pass --no-kv-checksum after these).
SUITE_WORKER_FLAGS = ("--kv-checksum",)


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m <args>`` with output to ``log``; its own session so a test can stop it alone."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(p: subprocess.Popen, grace: float = 15.0) -> int:
    """SIGTERM, SIGKILL after ``grace`` seconds; returns the exit code."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def wait_healthy(
    url: str,
    procs: list[subprocess.Popen],
    timeout: float = 180.0,
    log: Path | None = None,
    *,
    any_status: bool = False,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Until ``url``/health answers 200 (with ``any_status``: answers at all, 503 included); fails at once
    if one of ``procs`` exits meanwhile, and after ``timeout``, with the tail of ``log``. ``verify``: how
    an https ``url``'s certificate is checked (httpx's ``verify``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"process {p.args} exited with {p.returncode} during start-up\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(f"{url}/health", timeout=2.0, verify=verify).status_code
            if any_status or status == 200:
                return
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log else ""
    raise TimeoutError(f"{url} not healthy within {timeout} s\n{tail}")


@contextlib.contextmanager
def pd_serve(model: Path, log: Path, *extra: str, ca: Path | None = None) -> Iterator[str]:
    """A whole deployment through ``pd-serve`` (with ``SUITE_WORKER_FLAGS``); yields the proxy's base URL.
    ``ca``: the deployment serves HTTPS (``extra`` holds its --tls-* flags) with a certificate signed by it."""
    port = free_port()
    p = start(
        ["pd.launch.serve", "--model", str(model), "--port", str(port), *SUITE_WORKER_FLAGS, *extra], log
    )
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
    try:
        wait_healthy(url, [p], log=log, verify=ssl.create_default_context(cafile=ca) if ca else True)
        yield url
    finally:
        code = stop(p, grace=30.0)
        assert code == 0, f"pd-serve exited with {code}\n{log.read_text()[-3000:]}"


# ---- a deployment's state, read through the proxy's /metrics ----


def metric_samples(url: str) -> dict:
    """Every sample of ``url``/metrics: {(name, labels): value} (see pd.metrics.parse_samples)."""
    return parse_samples(httpx.get(f"{url}/metrics", timeout=10.0).text)


def proxy_metric(url: str, name: str) -> float:
    """The sum of every sample of metric ``name`` on ``url``/metrics."""
    return sum(v for (n, _), v in metric_samples(url).items() if n == name)


def kv_pages_used(url: str) -> dict[tuple[str, str, str], float]:
    """Pages a request or transfer holds on every registered rank, from one scrape of the proxy's /metrics:
    ``pd_kv_pages_used - pd_kv_pages_cached`` (pages only the prefix cache holds are not leaks), as
    {(role, instance, rank): pages}."""
    return _held_pages(metric_samples(url))


def _held_pages(samples: dict) -> dict[tuple[str, str, str], float]:
    used: dict[tuple[str, str, str], float] = {}
    cached: dict[tuple[str, str, str], float] = {}
    for (name, labels), value in samples.items():
        if name in ("pd_kv_pages_used", "pd_kv_pages_cached"):
            d = dict(labels)
            key = (d["role"], d["instance"], d["rank"])
            (used if name == "pd_kv_pages_used" else cached)[key] = value
    return {key: value - cached.get(key, 0.0) for key, value in used.items()}


def wait_pages_idle(url: str, timeout: float = 30.0) -> dict:
    """Waits until no rank holds a page for a request or transfer (``kv_pages_used``: used less cached) on
    every rank; returns the last reading."""
    deadline = time.monotonic() + timeout
    pages = kv_pages_used(url)
    while time.monotonic() < deadline:
        pages = kv_pages_used(url)
        if pages and all(v == 0 for v in pages.values()):
            return pages
        time.sleep(0.2)
    return pages


IDLE_GAUGES = ("pd_rooms_open", "pd_transfer_rooms_open")
HELD_PAGES = "pd_kv_pages_used - pd_kv_pages_cached"


def rank_gauges(url: str) -> dict[tuple[str, str, str, str], float]:
    """From one scrape: every rank's held pages (under HELD_PAGES), its relayed gauges of IDLE_GAUGES, and
    the proxy's requests in flight: {(name, role, instance, rank): value} (the proxy's own gauge under
    ("...", "proxy", "", ""))."""
    samples = metric_samples(url)
    out = {(HELD_PAGES, *key): value for key, value in _held_pages(samples).items()}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name in IDLE_GAUGES:
            out[(name, d["role"], d["instance"], d["rank"])] = value
        elif name == "pd_proxy_requests_inflight":
            out[(name, "proxy", "", "")] = value
    return out


def wait_idle(url: str, timeout: float = 30.0, ranks: int | None = None) -> dict:
    """Waits until no rank holds a page or a room and the proxy has nothing in flight (and, with
    ``ranks``, that many ranks report); returns the last reading (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        reading = rank_gauges(url)
        reporting = {(role, inst, rank) for (_, role, inst, rank) in reading if role != "proxy"}
        if all(v == 0 for v in reading.values()) and reporting and (ranks is None or len(reporting) == ranks):
            return reading
        if time.monotonic() > deadline:
            return reading
        time.sleep(0.2)


# ---- memory ----


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def rss_growth(samples: list[dict[str, int]]) -> dict[str, int]:
    """Per process, RSS after the last burst minus after the first (bytes)."""
    return {name: samples[-1][name] - samples[0][name] for name in samples[0]}


# ---- a deployment process by process ----


class Cluster:
    """A deployment started process by process (bootstrap, prefill and decode instances, proxies), so
    that a test can kill, stop, resume or restart any one of them. Workers keep their gRPC port (and so
    their instance id) across restarts, like a supervisor restarting them. ``close()`` stops every
    process this object started, by pid. Logs go to ``logdir/<name>.log``. Workers get
    ``SUITE_WORKER_FLAGS`` before ``worker_args``."""

    def __init__(
        self,
        model: Path,
        logdir: Path,
        prefill: int = 1,
        decode: int = 1,
        worker_args: tuple[str, ...] = (),
        proxies: dict[str, tuple[str, ...]] | None = None,
        common_args: tuple[str, ...] = (),
        lease_seconds: float = 2.0,
    ) -> None:
        self.logdir = logdir
        self.boot = f"127.0.0.1:{free_port()}"
        self.cmds: dict[str, list[str]] = {
            "bootstrap": [
                "pd.launch.bootstrap",
                "--port",
                self.boot.rsplit(":", 1)[1],
                "--lease-seconds",
                str(lease_seconds),
                *common_args,
            ]
        }
        base = [
            "--bootstrap",
            self.boot,
            "--model",
            str(model),
            "--model-name",
            MODEL_NAME,
            *SUITE_WORKER_FLAGS,
            *worker_args,
        ]
        for role, n in (("prefill", prefill), ("decode", decode)):
            for i in range(n):
                port = str(free_port())
                self.cmds[f"{role}{i}"] = [f"pd.launch.{role}", *base, "--port", port, *common_args]
        self.urls: dict[str, str] = {}
        for name, extra in (proxies or {"proxy": ()}).items():
            port = free_port()
            self.urls[name] = f"http://127.0.0.1:{port}"
            self.cmds[name] = [
                "pd.launch.proxy",
                "--bootstrap",
                self.boot,
                "--port",
                str(port),
                *extra,
                *common_args,
            ]
        self.procs: dict[str, subprocess.Popen] = {}
        self.num_ranks = prefill + decode

    @property
    def url(self) -> str:
        return next(iter(self.urls.values()))

    def port(self, name: str) -> str:
        """The ``--port`` process ``name`` listens on (a worker's or the bootstrap's gRPC port)."""
        return self.cmds[name][self.cmds[name].index("--port") + 1]

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def tail(self, lines: int = 40) -> str:
        out = []
        for name in self.cmds:
            if self.log(name).exists():
                text = self.log(name).read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)

    def start(self, *names: str) -> None:
        for name in names or tuple(self.cmds):
            assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
            self.procs[name] = start(self.cmds[name], self.log(name))

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until every proxy is healthy and sees every rank."""
        deadline = time.monotonic() + timeout
        for url in self.urls.values():
            while True:
                dead = [n for n, p in self.procs.items() if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"{dead} exited during start-up\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (
                        httpx.get(f"{url}/health", timeout=2.0).status_code == 200
                        and len(kv_pages_used(url)) == self.num_ranks
                    ):
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready within {timeout} s\n{self.tail()}")
                time.sleep(0.25)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def signal(self, name: str, sig: int) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL, then reaps it."""
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(10)

    def heal(self) -> None:
        """Starts whatever is not running, resumes whatever is stopped, and waits until every proxy sees
        every rank again."""
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if dead:
            self.start(*dead)
        for name in self.procs:
            self.signal(name, signal.SIGCONT)
        self.wait_ready()

    def assert_idle(self, ranks: int | None = None, timeout: float = 30.0) -> float:
        """Waits until, seen through every proxy, no rank holds a page or room and no proxy has a request
        in flight, with ``ranks`` (default: all) ranks reporting; asserts so. Returns when that was
        first seen (time.monotonic())."""
        ranks = ranks or self.num_ranks
        idle_at = None
        for url in self.urls.values():
            reading = wait_idle(url, timeout=timeout, ranks=ranks)
            leaked = {k: v for k, v in reading.items() if v}
            reporting = {k[1:] for k in reading if k[1] != "proxy"}
            assert not leaked and len(reporting) == ranks, (reading, self.tail())
            idle_at = idle_at or time.monotonic()
        return idle_at

    def close(self) -> dict[str, int]:
        """Stops everything still running (proxies first, bootstrap last); returns the exit codes."""
        for name in self.procs:
            self.signal(name, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        order = [n for n in reversed(list(self.cmds)) if n in self.procs]
        return {name: stop(self.procs[name]) for name in order}

    def __enter__(self) -> Cluster:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
