"""A prefill or decode rank's KV data plane in its own process, and ``Peer``, the test's handle on one.

The process (this file run as a script, ``main``) has the real parts: a CPU KVPool, the Mooncake engine
over TCP on 127.0.0.1, a gRPC server, and the KVSender or KVReceiver. Protocol: JSON lines. Startup
prints ``{"endpoint", "session", "pid"}``; then each stdin line is a command answered by one
``{"reply": ...}`` or ``{"error": ...}`` line, and every ``on_final`` prints ``{"event": "final", ...}``.
The process also checks that pages are released exactly once per room (a second on_final prints an
``"error"`` event). It imports nothing from ``tests``: it runs with this folder as its path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from pd.kv_cache import KVLayout, KVOrder, KVPool
from pd.transfer.aux import AuxBuffer, AuxRecord
from pd.transfer.engine import TransferConfig, TransferEngine
from pd.transfer.layers import LayerReady
from pd.transfer.receiver import KVReceiver
from pd.transfer.rpc import start_server
from pd.transfer.sender import KVSender
from pd.transfer.staging import HostStaging
from pd.transfer.state import TransferTimeouts

WAIT_S = 15.0  # bound on any single wait for a reply or for a room to end

_out_lock = threading.Lock()


def emit(obj: dict) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def page_digests(pool: KVPool, pages: list[int]) -> list[str]:
    """sha256 of each page's bytes over all layers."""
    out = []
    for p in pages:
        h = hashlib.sha256()
        for layer in range(pool.layout.num_layers):
            h.update(pool.layer(layer)[p].contiguous().view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def forward(sender: KVSender, pool: KVPool, cmd: dict) -> None:
    """What a prefill engine does with ``--transfer-granularity layer``: hands the chunk's pages to the sender
    with a ``LayerReady`` first, then stores fresh bytes (seeded by ``cmd["seed"]``) into them layer by layer
    (the first ``cmd["layers"]``, default all), marking each after a pause (``cmd["pause_s"]``): a sender that
    did not wait for the marks would write the pages' old bytes."""
    pages, layout = cmd["pages"], pool.layout
    ready = LayerReady(layout.num_layers, torch.device("cpu"))
    sender.send(cmd["room"], pages, ready_event=ready)
    g = torch.Generator().manual_seed(cmd["seed"])
    for layer in range(cmd.get("layers", layout.num_layers)):
        time.sleep(cmd.get("pause_s", 0.05))
        shape = (len(pages), layout.page_size, layout.latent_dim)
        bits = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=g)
        pool.layer(layer)[pages] = bits.view(layout.dtype)
        ready.mark(layer)
    if "layers" not in cmd:
        ready.finish()
    if cmd.get("aux"):
        sender.send(cmd["room"], [], last=True, aux=AuxRecord(cmd["room"], *cmd["aux"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--order", choices=[o.value for o in KVOrder], default="layer_major")
    parser.add_argument("--page-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeouts", default="3,3,3,1", help="bootstrapping,waiting_for_input,transferring,grace"
    )
    parser.add_argument("--transfer-timeout", type=float, default=2.0)
    parser.add_argument("--rpc-timeout", type=float, default=1.0)
    parser.add_argument(
        "--staging-pages", type=int, default=0, help="host staging of this many pages (0: none)"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"[{args.role} %(threadName)s] %(message)s"
    )

    layout = KVLayout(
        num_layers=3,
        num_pages=32,
        page_size=args.page_size,
        latent_dim=24,
        dtype=torch.bfloat16,
        order=KVOrder(args.order),
    )
    pool = KVPool(layout, "cpu")
    if args.role == "prefill":  # random KV the decode side must receive byte for byte
        g = torch.Generator().manual_seed(args.seed)
        pool.buffer.view(torch.int16).copy_(
            torch.randint(-(2**15), 2**15, layout.shape, generator=g, dtype=torch.int16)
        )
    aux = AuxBuffer(8)
    engine = TransferEngine(
        TransferConfig(hostname="127.0.0.1", protocol="tcp", transfer_timeout_s=args.transfer_timeout)
    )
    b, w, t, grace = (float(x) for x in args.timeouts.split(","))
    timeouts = TransferTimeouts(
        bootstrapping_s=b, waiting_for_input_s=w, transferring_s=t, abort_grace_s=grace
    )

    owned: dict[int, list[int]] = {}  # room -> pages this process must release exactly once
    lock = threading.Lock()

    def release(room: int, state, record: AuxRecord | None = None) -> None:
        with lock:
            pages = owned.pop(room, None)
        if pages is None:
            emit(
                {
                    "event": "error",
                    "room": room,
                    "message": f"on_final twice (or for an unknown room): {state}",
                }
            )
            return
        emit(
            {
                "event": "final",
                "room": room,
                "state": state.value,
                "aux": None
                if record is None
                else [record.first_token, record.first_logprob, record.prompt_len],
            }
        )

    unit = layout.num_layers * layout.page_nbytes_per_layer
    staging = HostStaging(pool, args.staging_pages * unit) if args.staging_pages else None
    if args.role == "prefill":
        manager = KVSender(
            engine,
            pool,
            aux,
            lambda room, state, reason: release(room, state),
            timeouts,
            args.rpc_timeout,
            staging=staging,
        )
    else:
        manager = KVReceiver(
            engine,
            pool,
            aux,
            lambda room, state, record, reason: release(room, state, record),
            None,
            timeouts,
            args.rpc_timeout,
            staging=staging,
        )
    server, port = start_server([manager.add_to_server])
    endpoint = f"127.0.0.1:{port}"
    if args.role == "decode":
        manager.endpoint = endpoint
    emit({"endpoint": endpoint, "session": engine.session_id, "pid": os.getpid()})

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "add_room":
                with lock:
                    owned[cmd["room"]] = cmd["pages"]
                if args.role == "prefill":
                    manager.add_room(cmd["room"], cmd["pages"])
                else:
                    manager.add_room(cmd["room"], cmd["prefill"], cmd["pages"], cmd["aux_slot"])
                reply = None
            elif op == "send":
                record = AuxRecord(cmd["room"], *cmd["aux"]) if cmd.get("aux") else None
                manager.send(cmd["room"], cmd["pages"], last=cmd.get("last", False), aux=record)
                reply = None
            elif op == "forward":  # a chunk's forward with layer-by-layer sends (prefill)
                forward(manager, pool, cmd)
                reply = None
            elif op == "staging_free":
                reply = None if staging is None else staging.num_free == staging.capacity
            elif op == "abort":
                manager.abort(cmd["room"], cmd.get("reason", "test abort"))
                reply = None
            elif op == "state":
                state = manager.state(cmd["room"])
                reply = None if state is None else state.value
            elif op == "digests":
                reply = page_digests(pool, cmd["pages"])
            elif op == "owned":
                with lock:
                    reply = sorted(owned)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            emit({"error": f"{type(e).__name__}: {e}"})
        else:
            emit({"reply": reply})
    manager.close()
    server.stop(0)


# ---- the test side ----


class Peer:
    """One peer process (``main`` above); the test started it and kills it, by pid, at the end."""

    def __init__(self, role: str, log_dir: Path, **opts: object) -> None:
        cmd = [sys.executable, __file__, "--role", role]
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.role = role
        self.log_path = log_dir / f"{role}-{id(self)}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        self._replies: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self.finals: dict[int, list[dict]] = {}
        self.errors: list[dict] = []
        self._info: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            info = self._info.get(timeout=60)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"{role} peer did not start; log:\n{self.log_path.read_text()}") from None
        self.endpoint, self.session, self.pid = info["endpoint"], info["session"], info["pid"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            obj = json.loads(line)
            if "endpoint" in obj:
                self._info.put(obj)
            elif obj.get("event") == "error":
                self.errors.append(obj)
            elif "event" in obj:
                self._events.put(obj)
            else:
                self._replies.put(obj)

    def call(self, op: str, **kw: object) -> object:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._replies.get(timeout=WAIT_S)
        if "error" in reply:
            raise AssertionError(f"{self.role} {op}: {reply['error']}")
        return reply["reply"]

    def wait_final(self, room: int, timeout: float = WAIT_S) -> dict:
        """The room's release event; fails if it does not come within ``timeout``."""
        end = time.monotonic() + timeout
        while not self.finals.get(room):
            try:
                event = self._events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{self.role} released no room {room} within {timeout}s; log:\n{self.log_path.read_text()[-4000:]}"
                ) from None
            self.finals.setdefault(event["room"], []).append(event)
        return self.finals[room][0]

    def check_released_once(self) -> None:
        """Every room was released exactly once and nothing is held."""
        time.sleep(0.3)  # a second (wrong) release would arrive by now
        assert not self.errors, self.errors
        assert self.call("owned") == []
        assert all(len(v) == 1 for v in self.finals.values()), self.finals

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


if __name__ == "__main__":
    main()
