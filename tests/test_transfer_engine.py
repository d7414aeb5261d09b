"""The Mooncake wrapper: config, transport detection, and real engines (in child processes, so the
MC_* variables the wrapper sets never leak into the test process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pd.transfer.engine import TransferConfig, detect_transport


@pytest.mark.parametrize(
    ("line", "transport"),
    [
        ("I1123 tcp_transport.cpp:391] TcpTransport: listen on port 16360", "tcp"),
        ("I1123 transfer_engine_impl.cpp:301] MC_FORCE_TCP is set, using TCP transport only", "tcp"),
        ("I1123 ...] Using TCP transport (no HCA detected)", "tcp"),  # CUDA build, gpu/NOTES.md
        ("I1123 ...] Using Intra-Node NVLink transport (MC_INTRANODE_NVLINK set)", "nvlink"),
        ("I1123 ...] installTransport, type=rdma", "rdma"),
        ("I1123 ...] Using cross-node NVLink transport (MC_FORCE_MNNVL or no HCA detected)", "mnnvl"),
        ("I1123 ...] Topology discovery complete. Found 0 HCAs.", None),
    ],
)
def test_detect_transport(line, transport):
    assert detect_transport("W1123 something else\n" + line + "\n") == transport


def test_config_sets_the_engine_variables_explicitly():
    env = TransferConfig(protocol="tcp", transfer_timeout_s=2.5).environment
    assert env["MC_FORCE_TCP"] == "1" and env["MC_INTRANODE_NVLINK"] is None
    assert env["MC_TCP_PROGRESS_TIMEOUT_SEC"] == env["MC_TRANSFER_TIMEOUT"] == "3"
    nvlink = TransferConfig(protocol="nvlink")
    assert nvlink.environment["MC_INTRANODE_NVLINK"] == "1" and nvlink.environment["MC_FORCE_TCP"] is None
    assert nvlink.mooncake_protocol == "nvlink_intra"
    with pytest.raises(ValueError, match="protocol"):
        TransferConfig(protocol="infiniband")
    with pytest.raises(ValueError, match="max_batch_pieces"):
        TransferConfig(max_batch_pieces=4096)


def run_child(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_package_imports_without_mooncake():
    proc = run_child(
        """
        import sys
        sys.modules["mooncake"] = None  # as if not installed
        from pd.transfer import engine, receiver, sender  # noqa: F401
        try:
            engine.TransferEngine(engine.TransferConfig())
        except ImportError as e:
            print("ImportError:", e)
        """
    )
    assert "ImportError: the Mooncake transfer engine is not installed" in proc.stdout


def test_fallback_to_tcp_is_detected_warned_and_refused_on_request():
    pytest.importorskip("mooncake.engine")
    proc = run_child(
        """
        from pd.transfer.engine import TransferConfig, TransferEngine, TransferError
        e = TransferEngine(TransferConfig(protocol="rdma"))  # no RDMA NIC here: the engine uses TCP
        print("transport", e.transport)
        try:
            TransferEngine(TransferConfig(protocol="rdma", require_protocol=True))
        except TransferError as err:
            print("refused:", err)
        """
    )
    assert "transport tcp" in proc.stdout
    assert "refused: asked for protocol 'rdma' but the engine installed tcp" in proc.stdout
    assert "asked for protocol 'rdma'" in proc.stderr  # the loud warning


def test_write_is_byte_exact_in_batches_and_fails_cleanly():
    pytest.importorskip("mooncake.engine")
    proc = run_child(
        """
        import time, torch
        from pd.transfer.engine import TransferConfig, TransferEngine, TransferError
        cfg = TransferConfig(transfer_timeout_s=2, max_batch_pieces=100)
        a, b = TransferEngine(cfg), TransferEngine(cfg)
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
        dst = torch.zeros(1 << 20, dtype=torch.uint8)
        a.register(src.data_ptr(), src.numel())
        a.register(src.data_ptr(), src.numel())  # again: a no-op
        b.register(dst.data_ptr(), dst.numel())
        # 1000 pieces of 512 bytes, scattered in reverse order: 10 native batches
        pieces = [(src.data_ptr() + i * 512, dst.data_ptr() + (999 - i) * 1024, 512) for i in range(1000)]
        a.write(b.session_id, pieces)
        ok = all(torch.equal(src[i * 512 : (i + 1) * 512], dst[(999 - i) * 1024 : (999 - i) * 1024 + 512]) for i in range(1000))
        print("exact", ok, "untouched zero", int(dst.view(-1, 1024)[:, 512:].sum()) == 0)
        for name, call in [
            ("unregistered", lambda: a.write(b.session_id, [(src.data_ptr(), dst.data_ptr() + (2 << 20), 64)])),
            ("deadline", lambda: a.write(b.session_id, pieces, deadline=time.monotonic() - 1)),
            ("no peer", lambda: a.write("127.0.0.1:9", pieces[:1])),
        ]:
            try:
                call()
                print(name, "no error")
            except TransferError as e:
                print(name, "TransferError")
        try:
            a.register(src.data_ptr() + 10, 100)
        except ValueError as e:
            print("overlap", e)
        """
    )
    assert "exact True untouched zero True" in proc.stdout
    for name in ("unregistered", "deadline", "no peer"):
        assert f"{name} TransferError" in proc.stdout
    assert "overlap region" in proc.stdout


@pytest.mark.gpu
def test_tcp_write_of_gpu_memory_does_not_wait_for_the_model_stream():
    """Mooncake's TCP transport stages GPU memory through the host with a synchronous ``cudaMemcpy`` per
    64 KiB on the legacy default stream, which waits for every kernel queued on a blocking stream. With a
    long kernel on the default stream a write waits for it (the cap that held TCP serving at ~6 req/s);
    with the kernel on a stream of its own (``ModelRunner.bind_thread``) the write finishes while it runs."""
    pytest.importorskip("mooncake.engine")
    proc = run_child(
        """
        import torch
        from pd.transfer.engine import TransferConfig, TransferEngine
        cfg = TransferConfig(transfer_timeout_s=30)
        a, b = TransferEngine(cfg), TransferEngine(cfg)
        src = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8, device="cuda")
        dst = torch.zeros(4 << 20, dtype=torch.uint8, device="cuda")
        a.register(src.data_ptr(), src.numel())
        b.register(dst.data_ptr(), dst.numel())
        torch.cuda.synchronize()
        own = torch.cuda.Stream()
        for name, stream in [("default", torch.cuda.default_stream()), ("own", own)]:
            dst.zero_()
            torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(4_000_000_000)  # about 2 s of GPU time
            a.write(b.session_id, [(src.data_ptr(), dst.data_ptr(), src.numel())])
            print(name, "kernel still running after the write:", not stream.query())
            torch.cuda.synchronize()
            print(name, "exact:", torch.equal(src, dst))
        """
    )
    assert "default kernel still running after the write: False" in proc.stdout, proc.stdout + proc.stderr
    assert "own kernel still running after the write: True" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("exact: True") == 2, proc.stdout
