"""The launchers: --help, flag defaults against the config dataclasses, ports checked before anything
starts (pd-serve's proxy port, a multi-rank instance's PORT..PORT+N-1), and a torch-free pd-bootstrap."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pd.attention import ATTENTION_BACKENDS
from pd.bootstrap.server import BootstrapConfig
from pd.config import EngineConfig, ParallelConfig
from pd.ep import BACKENDS as EP_BACKENDS
from pd.ep.placement import PLACEMENTS
from pd.launch import bootstrap, worker
from pd.launch.args import PortInUse, field_default, reserve_port
from pd.speculative import SpeculativeConfig
from pd.transfer.engine import GRANULARITIES, PROTOCOLS, TransferConfig
from pd.transfer.state import TransferTimeouts
from pd.worker.builder import WorkerConfig
from tests.support.polling import wait_until

# pd-proxy and pd-serve run on uvicorn and starlette: pd's dependencies, but missing from a bare GPU image
# that runs `pytest -m gpu` with a few wheels added.
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
from pd.launch import proxy, serve
from pd.proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[1]
bounded = pytest.mark.timeout(120)


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(pd-[\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def test_every_launcher_help_exits_0(capsys):
    scripts = console_scripts()
    assert set(scripts) == {
        "pd-serve",
        "pd-bootstrap",
        "pd-prefill",
        "pd-decode",
        "pd-colocated",
        "pd-proxy",
        "pd-make-tiny-model",
        "pd-bench",
    }
    for name, target in scripts.items():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0, name
        assert out.startswith(f"usage: {name}"), name


# ---------------------------------------------------------------------------------------------
# Defaults and choices come from the configs and the registries.

WORKER_FIELDS = {
    "device": (EngineConfig, "device"),
    "dtype": (EngineConfig, "dtype"),
    "load_format": (EngineConfig, "load_format"),
    "page_size": (EngineConfig, "page_size"),
    "num_pages": (EngineConfig, "num_pages"),
    "gpu_memory_fraction": (EngineConfig, "gpu_memory_fraction"),
    "chunk_size": (EngineConfig, "chunk_size"),
    "max_running": (EngineConfig, "max_running"),
    "max_waiting": (EngineConfig, "max_waiting"),
    "max_context_len": (EngineConfig, "max_context_len"),
    "attention_backend": (EngineConfig, "attention_backend"),
    "seed": (EngineConfig, "seed"),
    "cuda_graph": (EngineConfig, "cuda_graph"),
    "graph_extend_tokens": (EngineConfig, "graph_extend_tokens"),
    "piecewise_graphs": (EngineConfig, "piecewise_graphs"),
    "kv_layout": (EngineConfig, "kv_layout"),
    "speculative_algorithm": (SpeculativeConfig, "algorithm"),
    "num_speculative_tokens": (SpeculativeConfig, "num_tokens"),
    "speculative_oracle": (SpeculativeConfig, "oracle"),
    "dp": (ParallelConfig, "size"),
    "ep_backend": (ParallelConfig, "ep_backend"),
    "expert_placement": (ParallelConfig, "expert_placement"),
    "nnodes": (ParallelConfig, "nnodes"),
    "node_rank": (ParallelConfig, "node_rank"),
    "dist_init_addr": (ParallelConfig, "dist_init_addr"),
    "host": (WorkerConfig, "host"),
    "port": (WorkerConfig, "port"),
    "instance_id": (WorkerConfig, "instance_id"),
    "model_name": (WorkerConfig, "model_name"),
    "aux_slots": (WorkerConfig, "aux_slots"),
    "decode_headroom_tokens": (WorkerConfig, "decode_headroom_tokens"),
    "drain_timeout": (WorkerConfig, "drain_timeout_s"),
    "transfer_protocol": (TransferConfig, "protocol"),
    "transfer_device_names": (TransferConfig, "device_names"),
    "transfer_timeout": (TransferConfig, "transfer_timeout_s"),
    "transfer_writers": (TransferConfig, "writers_per_peer"),
    "transfer_granularity": (TransferConfig, "granularity"),
    "bootstrapping_timeout": (TransferTimeouts, "bootstrapping_s"),
    "waiting_timeout": (TransferTimeouts, "waiting_for_input_s"),
    "transferring_timeout": (TransferTimeouts, "transferring_s"),
    "abort_grace": (TransferTimeouts, "abort_grace_s"),
}
PROXY_FIELDS = {
    "host": (ProxyConfig, "host"),
    "port": (ProxyConfig, "port"),
    "max_body_bytes": (ProxyConfig, "max_body_bytes"),
    "max_prompt_tokens": (ProxyConfig, "max_prompt_tokens"),
    "max_completion_tokens": (ProxyConfig, "max_completion_tokens"),
    "max_inflight": (ProxyConfig, "max_inflight"),
    "request_timeout": (ProxyConfig, "request_timeout_s"),
    "body_timeout": (ProxyConfig, "body_timeout_s"),
    "keepalive": (ProxyConfig, "keepalive_s"),
    "retry_prefill": (ProxyConfig, "retry_prefill"),
    "drain_timeout": (ProxyConfig, "drain_timeout_s"),
}
BOOTSTRAP_FIELDS = {
    "host": (BootstrapConfig, "host"),
    "port": (BootstrapConfig, "port"),
    "lease_seconds": (BootstrapConfig, "lease_seconds"),
    "max_ranks": (BootstrapConfig, "max_ranks"),
}
SERVE_FIELDS = {
    **{k: v for k, v in WORKER_FIELDS.items() if v[0] in (EngineConfig, SpeculativeConfig)},
    **PROXY_FIELDS,
    "dp": (ParallelConfig, "size"),
    "ep_backend": (ParallelConfig, "ep_backend"),
    "expert_placement": (ParallelConfig, "expert_placement"),
    "transfer_granularity": (TransferConfig, "granularity"),
}


def parsers() -> dict[str, tuple[argparse.ArgumentParser, dict]]:
    return {
        "pd-prefill": (worker.build_parser("prefill"), WORKER_FIELDS),
        "pd-decode": (worker.build_parser("decode"), WORKER_FIELDS),
        "pd-colocated": (worker.build_parser("colocated"), WORKER_FIELDS),
        "pd-proxy": (proxy.build_parser(), PROXY_FIELDS),
        "pd-bootstrap": (bootstrap.build_parser(), BOOTSTRAP_FIELDS),
        "pd-serve": (serve.build_parser()[0], SERVE_FIELDS),
    }


def test_flag_defaults_are_the_config_defaults():
    """Every flag that sets a config field has that field's default (here by an independent table, and for
    every flag the launchers mark as reading one)."""
    for name, (parser, table) in parsers().items():
        actions = {a.dest: a for a in parser._actions}
        for dest, (cls, field) in table.items():
            assert dest in actions, (name, dest)
            assert actions[dest].default == field_default(cls, field), (name, dest, cls.__name__, field)
        marked = [a for a in parser._actions if hasattr(a, "config_field")]
        assert {a.dest for a in marked} >= set(table) - {"model_name"}, name
        for a in marked:
            assert a.default == field_default(*a.config_field), (name, a.dest)


def test_configs_built_from_default_flags_equal_the_dataclass_defaults():
    """Parsing no optional flag gives the configs the dataclasses give (the transfer timeouts were 30/120 s
    in TransferTimeouts and 60/300 s in the flags: the flags' values, which users ran with, won)."""
    for role in ("prefill", "decode", "colocated"):
        args = worker.parse(role, ["--model", "/m", "--bootstrap", "127.0.0.1:1"])
        assert worker.worker_config(role, args) == WorkerConfig(
            role=role, engine=EngineConfig(model_path="/m"), bootstrap="127.0.0.1:1"
        )
    assert TransferTimeouts().bootstrapping_s == 60.0 and TransferTimeouts().waiting_for_input_s == 300.0
    assert proxy.proxy_config(proxy.parse(["--bootstrap", "b:1"])) == ProxyConfig(bootstrap="b:1")
    assert bootstrap.bootstrap_config(bootstrap.parse_args([])) == BootstrapConfig()


def test_choices_come_from_the_registries():
    for name, (parser, _) in parsers().items():
        actions = {a.dest: a for a in parser._actions}
        if "ep_backend" in actions:
            assert sorted(actions["ep_backend"].choices) == sorted(EP_BACKENDS), name
            assert tuple(actions["expert_placement"].choices) == PLACEMENTS, name
            protocols = ("auto", *PROTOCOLS) if name == "pd-serve" else PROTOCOLS
            assert tuple(actions["transfer_protocol"].choices) == protocols, name
            assert tuple(actions["attention_backend"].choices) == ATTENTION_BACKENDS, name
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model_path="/m", attention_backend="nope")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_transfer_granularity_reaches_the_prefill_config(granularity):
    """--transfer-granularity: pd-serve hands it to its workers, whose TransferConfig carries it."""
    args = serve.parse(["--transfer-granularity", granularity])
    [(_, prefill_argv)] = [c for c in serve.commands(args, "/m", 1) if c[0] == "prefill"]
    flags = prefill_argv[prefill_argv.index("pd.launch.prefill") + 1 :]
    parsed = worker.parse("prefill", [*flags, "--model", "/m"])
    assert worker.transfer_config(parsed).granularity == granularity
    with pytest.raises(ValueError, match="granularity must be one of"):
        TransferConfig(granularity="token")


def test_pd_serve_picks_nvlink_between_gpus_of_its_host():
    parse = serve.build_parser()[0].parse_args
    assert serve.transfer_protocol(parse(["--device", "cuda"])) == "nvlink"
    assert (
        serve.transfer_protocol(parse(["--prefill-device", "cuda:0", "--decode-device", "cuda:1"]))
        == "nvlink"
    )
    assert serve.transfer_protocol(parse([])) == TransferConfig.protocol  # CPU
    assert (
        serve.transfer_protocol(parse(["--device", "cuda", "--decode-device", "cpu"]))
        == TransferConfig.protocol
    )
    assert serve.transfer_protocol(parse(["--device", "cuda", "--transfer-protocol", "tcp"])) == "tcp"


def test_bootstrap_launcher_imports_no_torch():
    code = (
        "import sys; import pd.launch.bootstrap, pd.bootstrap.server; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# Ports.


@contextlib.contextmanager
def other_http_server():
    """Another server on a free port of 127.0.0.1 that answers 200 to everything (as another pd would)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def run_launcher(module: str, args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )


@bounded
def test_pd_serve_on_a_busy_port_fails_naming_it(tmp_path):
    """A second pd-serve on the port of another server fails before starting anything, naming the port and
    what it was for; it never says it is serving (its probe used to reach the other server)."""
    with other_http_server() as port:
        p = run_launcher("pd.launch.serve", ["--model", str(tmp_path / "no-model"), "--port", str(port)])
    assert p.returncode == 1
    assert "pd is serving" not in p.stdout
    assert f"port {port} on 127.0.0.1 (the proxy's HTTP port, --port)" in p.stderr
    assert "started" not in p.stderr  # no child was started


def test_pd_serve_holds_its_ports_exclusively():
    """The proxy port pd-serve reserves (and hands to its proxy child) cannot be bound by another process
    meanwhile, so whatever answers on it is its own proxy."""
    args = serve.parse(["--port", "0"])
    proxy_sock, boot_sock = serve.reserve_ports(args)
    try:
        for s, what in ((proxy_sock, "proxy"), (boot_sock, "bootstrap")):
            port = s.getsockname()[1]
            with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1"):
                reserve_port("127.0.0.1", port, what)
            with socket.socket() as other, pytest.raises(OSError):  # a server that sets SO_REUSEADDR
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                other.bind(("127.0.0.1", port))
    finally:
        proxy_sock.close()
        boot_sock.close()


def test_reserved_rank_port_admits_its_own_grpc_server_only():
    """A rank's reservation (held from before its engine starts) still lets its own gRPC server bind the
    port (gRPC binds with SO_REUSEPORT), while another launcher's reservation of it fails, and so does a
    reservation of a port a gRPC server listens on."""
    held = reserve_port("127.0.0.1", 0, "a rank", share_with_grpc=True)
    port = held.getsockname()[1]
    server = grpc.server(futures.ThreadPoolExecutor(1))
    try:
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        with pytest.raises(PortInUse, match=f"port {port}"):
            reserve_port("127.0.0.1", port, "another rank", share_with_grpc=True)
        held.close()
        with pytest.raises(PortInUse, match=f"port {port}"):  # the gRPC server alone
            reserve_port("127.0.0.1", port, "another rank", share_with_grpc=True)
    finally:
        server.stop(0)
        held.close()


@contextlib.contextmanager
def grpc_style_listener():
    """A listener bound like a gRPC server binds (SO_REUSEADDR + SO_REUSEPORT), on a free port whose
    predecessor is free too (tests put rank 0 there; a random neighbour in use made them flaky)."""
    for _ in range(50):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        try:
            with socket.socket() as below:
                below.bind(("127.0.0.1", port - 1))
        except OSError:
            s.close()
            continue
        s.listen()
        try:
            yield port
        finally:
            s.close()
        return
    raise RuntimeError("no free port with a free predecessor")


def free_port_pair() -> int:
    """A port P with P + 1 free too (best effort)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


@bounded
def test_multi_rank_port_range_clash_fails_at_start_naming_port_and_rank(tmp_path):
    """pd-prefill --port P --dp 2 binds P and P + 1; with P + 1 taken (the README's pd-decode --port 9002
    beside pd-prefill --port 9001 --dp 2) it fails before any rank starts, naming P + 1 and rank 1."""
    with grpc_style_listener() as busy:
        base = ["--model", str(tmp_path / "no-model"), "--bootstrap", "127.0.0.1:1"]
        p = run_launcher("pd.launch.prefill", [*base, "--port", str(busy - 1), "--dp", "2"])
        assert p.returncode == 1, p.stderr
        assert f"port {busy} on 127.0.0.1 (the gRPC port of rank 1 of this prefill instance" in p.stderr
        assert f"--port {busy - 1} + local rank 1" in p.stderr
        assert "no-model" not in p.stderr  # no rank got as far as reading the model
        # One rank on a taken port: the same, before the engine is built.
        p = run_launcher("pd.launch.decode", [*base, "--port", str(busy)])
        assert p.returncode == 1, p.stderr
        assert f"port {busy} on 127.0.0.1 (the gRPC port of this decode rank, --port)" in p.stderr
        assert "no-model" not in p.stderr


def test_worker_port_help_says_a_multi_rank_instance_takes_a_range():
    text = " ".join(worker.build_parser("prefill").format_help().split())
    assert "PORT..PORT+N-1" in text


def test_reserve_port_tolerates_time_wait_of_an_earlier_process():
    """A restarted worker on its old port: connections its predecessor closed first sit in TIME_WAIT."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    reserve_port("127.0.0.1", port, "restart", share_with_grpc=True).close()


def test_field_default_reads_factories():
    assert field_default(WorkerConfig, "timeouts") == TransferTimeouts()
    with pytest.raises(AttributeError):
        field_default(WorkerConfig, "nope")
    assert all(f.name != "nope" for f in dataclasses.fields(WorkerConfig))


def _worker_flag(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--device", "cuda"], (EngineConfig.gpu_memory_fraction / 2,) * 2),  # one GPU for both: half each
        (["--device", "cuda", "--gpu-memory-fraction", "0.3"], (0.3, 0.3)),  # the user's share is kept
        (["--device", "cuda", "--prefill-device", "cuda:0", "--decode-device", "cuda:1"], (None, None)),
        (["--device", "cpu"], (None, None)),
    ],
)
def test_pd_serve_splits_a_shared_gpu_between_prefill_and_decode(argv, expected):
    """On one GPU both instances sized their KV pool as if alone: the second one started had no room
    ("KVLayout.num_pages must be positive, got -7203" on an H200)."""
    args = serve.parse(argv)
    flags = [serve._engine_flags(args, "m", args.prefill_device or args.device),
             serve._engine_flags(args, "m", args.decode_device or args.device)]  # fmt: skip
    got = tuple(_worker_flag(f, "--gpu-memory-fraction") for f in flags)
    assert tuple(None if g is None else float(g) for g in got) == expected


@pytest.mark.parametrize(
    "launcher, flags, message",
    [
        ("pd.launch.serve", ["--transfer-writers", "0"], "writers_per_peer must be >= 1"),
        ("pd.launch.serve", ["--gpu-memory-fraction", "2"], "gpu_memory_fraction must be in (0, 1)"),
        ("pd.launch.serve", ["--graph-extend-tokens", "-1"], "graph_extend_tokens must be >= 0"),
        ("pd.launch.serve", ["--piecewise-graphs", "--speculative-algorithm", "mtp", "--num-speculative-tokens",
                             "1"], "piecewise_graphs: speculative decoding's verify graphs are captured whole"),
        ("pd.launch.serve", ["--kv-layout", "rows"], "invalid choice: 'rows'"),
        ("pd.launch.serve", ["--drain-timeout", "-1"], "drain_timeout_s must be >= 0"),
        ("pd.launch.decode", ["--model", "/m", "--bootstrap", "127.0.0.1:1", "--transfer-writers", "0"],
         "writers_per_peer must be >= 1"),
        ("pd.launch.prefill", ["--model", "/m", "--bootstrap", "127.0.0.1:1", "--drain-timeout", "-1"],
         "drain_timeout_s must be >= 0"),
    ],
)  # fmt: skip
def test_launchers_refuse_bad_settings_by_name_before_starting(launcher, flags, message):
    p = subprocess.run([sys.executable, "-m", launcher, *flags], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_ranks_of_a_killed_multi_rank_launcher_end_with_it(tiny_model_dir):
    """pd-serve kills a rank launcher that does not stop in time (a rank stuck in a collective ignores
    SIGTERM): its ranks must not outlive it. Here the launcher of a 2-rank prefill instance is SIGKILLed once
    both ranks run; both are gone within seconds (the bootstrap address is never served: they would
    otherwise keep trying to register)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"
    cmd = [sys.executable, "-m", "pd.launch.prefill", "--model", str(tiny_model_dir), "--device", "cpu"]
    cmd += ["--dp", "2", "--ep", "2", "--host", "127.0.0.1", "--bootstrap", nowhere]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    try:
        wait_until(lambda: len(children.read_text().split()) == 2, 30, "two ranks started", interval=0.1)
        ranks = [int(pid) for pid in children.read_text().split()]
        time.sleep(1.0)  # past their exec: they run pd's rank code
        launcher.kill()
        launcher.wait(10)
        wait_until(lambda: not any(running(pid) for pid in ranks), 15, "ranks gone")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in ranks if "ranks" in locals() else []:  # a failed run leaves nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
