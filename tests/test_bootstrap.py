"""The bootstrap registry: real gRPC on 127.0.0.1, real pd-bootstrap process."""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from pd.bootstrap.client import BootstrapClient, BootstrapError, IncompatibleRankError
from pd.bootstrap.compat import mismatches, model_fingerprint
from pd.bootstrap.server import BootstrapServer, Registry, RegistryError
from pd.rpc import PROTOCOL_VERSION
from pd.rpc import bootstrap_pb2 as pb
from pd.rpc import bootstrap_pb2_grpc as pb_grpc
from pd.rpc.auth import aio_server_interceptors, auth_metadata, server_interceptors, with_token
from pd.rpc.generate import stale_files
from tests.support.polling import wait_until

TOKEN = "s3cret-token"


def rank_info(
    instance: str = "p0", dp_rank: int = 0, role: int = pb.ROLE_PREFILL, **overrides
) -> pb.RankInfo:
    """A well-formed rank of a 2-rank instance: 4 layers, 64 pages of 16 tokens, bf16 latent 576."""
    fields = dict(
        protocol_version=PROTOCOL_VERSION,
        model_fingerprint="0123456789abcdef",
        model_name="tiny",
        max_context_len=4096,
        role=role,
        instance_id=instance,
        dp_rank=dp_rank,
        dp_size=2,
        grpc_endpoint=f"127.0.0.1:{7000 + dp_rank}",
        transfer_session=f"127.0.0.1:{8000 + dp_rank}",
        transfer_protocol="tcp",
        kv_base_addr=0x7F0000000000,
        num_pages=64,
        page_size=16,
        num_layers=4,
        latent_dim=576,
        kv_dtype="bfloat16",
        kv_order="layer_major",
        aux_base_addr=0x7F1000000000,
        aux_nbytes=64 * 32,
        aux_slot_nbytes=32,
    )
    fields.update(overrides)
    fields.setdefault("page_nbytes_per_layer", fields["page_size"] * fields["latent_dim"] * 2)
    fields.setdefault(
        "kv_nbytes", fields["num_layers"] * fields["num_pages"] * fields["page_nbytes_per_layer"]
    )
    return pb.RankInfo(**fields)


@pytest.fixture
def server():
    srv = BootstrapServer(port=0, lease_seconds=1.0).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def clients(server):
    """Makes clients of ``server``; closes them all at the end."""
    made: list[BootstrapClient] = []

    def make(target: str | None = None, **kwargs) -> BootstrapClient:
        made.append(BootstrapClient(target or server.address, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def ranks_of(instances) -> dict[str, list[int]]:
    return {inst.instance_id: [r.info.dp_rank for r in inst.ranks] for inst in instances}


# -- generated code, fingerprint, compat -------------------------------------------------------


def test_generated_code_is_not_stale():
    assert stale_files() == [], "run python -m pd.rpc.generate"


DSV3_OLD_STYLE = {
    "model_type": "deepseek_v3",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 32,
    "intermediate_size": 128,
    "n_shared_experts": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}


def test_fingerprint_same_for_both_rope_spellings():
    from transformers import DeepseekV3Config

    # transformers 5 rewrites rope_scaling + rope_theta as rope_parameters; same model, same hash.
    saved = DeepseekV3Config(**copy.deepcopy(DSV3_OLD_STYLE)).to_dict()  # it edits rope_scaling in place
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    assert model_fingerprint(saved) == model_fingerprint(DSV3_OLD_STYLE)

    plain_old = {**DSV3_OLD_STYLE, "rope_scaling": None}
    plain_new = {k: v for k, v in DSV3_OLD_STYLE.items() if k not in ("rope_scaling", "rope_theta")}
    plain_new["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert model_fingerprint(plain_old) == model_fingerprint(plain_new)
    assert model_fingerprint(plain_old) != model_fingerprint(DSV3_OLD_STYLE)
    assert len(model_fingerprint(plain_old)) == 16


def test_fingerprint_ignores_unrelated_keys_and_sees_architecture():
    base = model_fingerprint(DSV3_OLD_STYLE)
    unrelated = {**DSV3_OLD_STYLE, "torch_dtype": "float32", "eos_token_id": 7, "architectures": ["X"]}
    assert model_fingerprint(unrelated) == base
    assert model_fingerprint(json.loads(json.dumps(DSV3_OLD_STYLE, indent=2))) == base
    assert model_fingerprint({**DSV3_OLD_STYLE, "n_routed_experts": 16}) != base
    assert model_fingerprint({**DSV3_OLD_STYLE, "q_lora_rank": 24}) != base
    assert model_fingerprint({**DSV3_OLD_STYLE, "rope_theta": 50000}) != base
    yarn2 = {**DSV3_OLD_STYLE["rope_scaling"], "factor": 8}
    assert model_fingerprint({**DSV3_OLD_STYLE, "rope_scaling": yarn2}) != base


def test_mismatches_name_field_and_both_values():
    prefill = rank_info("p0", 0, pb.ROLE_PREFILL, page_size=16)
    decode = rank_info("d0", 0, pb.ROLE_DECODE, page_size=64, page_nbytes_per_layer=64 * 576 * 2)
    assert mismatches(prefill, decode) == [
        "page_size: 16 (prefill p0/0) vs 64 (decode d0/0)",
        f"page_nbytes_per_layer: {16 * 576 * 2} (prefill p0/0) vs {64 * 576 * 2} (decode d0/0)",
    ]
    # dp size and role matter only within one instance.
    assert mismatches(rank_info("p0", 0, dp_size=2), rank_info("d0", 0, pb.ROLE_DECODE, dp_size=4)) == []
    assert mismatches(rank_info("p0", 0), rank_info("p0", 1, pb.ROLE_DECODE, dp_size=4)) == [
        "dp_size: 2 (prefill p0/0) vs 4 (decode p0/1)",
        "role: prefill (prefill p0/0) vs decode (decode p0/1)",
    ]
    assert mismatches(rank_info(kv_dtype="bfloat16"), rank_info(dp_rank=1, kv_dtype="float16")) == [
        "kv_dtype: 'bfloat16' (prefill p0/0) vs 'float16' (prefill p0/1)"
    ]


# -- registry over gRPC -----------------------------------------------------------------------


def test_register_list_lookup_two_instances(server, clients):
    registered = {}
    for instance, role in (("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE)):
        for dp_rank in range(2):
            client = clients()
            info = client.register(rank_info(instance, dp_rank, role))
            assert info.incarnation  # filled in by the client
            client.heartbeat(
                pb.Load(running_requests=dp_rank, waiting_requests=3, free_pages=50, total_pages=63)
            )
            registered[(instance, dp_rank)] = info

    observer = clients()
    instances = observer.list()
    assert ranks_of(instances) == {"d0": [0, 1], "p0": [0, 1]}
    assert [(i.role, i.dp_size) for i in instances] == [(pb.ROLE_DECODE, 2), (pb.ROLE_PREFILL, 2)]
    for inst in instances:
        for entry in inst.ranks:
            assert entry.info == registered[(inst.instance_id, entry.info.dp_rank)]
            assert entry.load == pb.Load(
                running_requests=entry.info.dp_rank, waiting_requests=3, free_pages=50, total_pages=63
            )
    assert ranks_of(observer.list(pb.ROLE_DECODE)) == {"d0": [0, 1]}
    assert ranks_of(observer.list(pb.ROLE_PREFILL)) == {"p0": [0, 1]}

    entry = observer.lookup("d0", 1)
    assert entry.info == registered[("d0", 1)] and entry.info.transfer_session == "127.0.0.1:8001"
    assert observer.lookup("d0", 5) is None
    assert observer.health() == pb.HealthResponse(
        serving=True, protocol_version=PROTOCOL_VERSION, num_ranks=4
    )


def test_lease_expiry_and_reregistration(server, clients):
    silent, beating, observer = clients(), clients(), clients()
    silent.register(rank_info("p0", 0))
    beating.register(rank_info("p0", 1))
    beating.start_heartbeat(lambda: pb.Load(free_pages=7), interval=0.1)

    wait_until(lambda: observer.lookup("p0", 0) is None, what="silent rank's lease expiry")
    assert ranks_of(observer.list()) == {"p0": [1]}
    assert observer.lookup("p0", 1).load.free_pages == 7

    # The expired rank's next heartbeat is answered NOT_FOUND and the client registers again.
    silent.heartbeat(pb.Load(free_pages=3))
    entry = observer.lookup("p0", 0)
    assert entry.info == silent.info and entry.load.free_pages == 3


def test_restarted_rank_replaces_old_incarnation(server, clients):
    old, new, observer = clients(), clients(), clients()
    old_info = old.register(rank_info("d0", 0, pb.ROLE_DECODE))
    # The restart may even change the layout: the old incarnation it replaces is not a peer.
    new_info = new.register(rank_info("d0", 0, pb.ROLE_DECODE, page_size=32))
    assert new_info.incarnation != old_info.incarnation
    assert observer.lookup("d0", 0).info == new_info

    stub = pb_grpc.BootstrapStub(grpc.insecure_channel(server.address))
    key = dict(instance_id="d0", dp_rank=0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Heartbeat(pb.HeartbeatRequest(**key, incarnation=old_info.incarnation), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "replaced" in err.value.details()
    # A late Deregister of the old incarnation leaves the new one alone.
    assert not stub.Deregister(
        pb.DeregisterRequest(**key, incarnation=old_info.incarnation), timeout=5
    ).removed
    assert observer.lookup("d0", 0).info == new_info
    assert new.deregister() is True
    assert observer.lookup("d0", 0) is None


def test_server_restart_is_repopulated_by_heartbeats(clients):
    first = BootstrapServer(port=0, lease_seconds=1.0).start()
    port = first.port
    try:
        for instance, role in (("p0", pb.ROLE_PREFILL), ("d0", pb.ROLE_DECODE)):
            for dp_rank in range(2):
                client = clients(first.address)
                client.register(rank_info(instance, dp_rank, role))
                client.start_heartbeat(lambda r=dp_rank: pb.Load(running_requests=r + 1), interval=0.1)
    finally:
        first.stop(grace=0)

    second = BootstrapServer(port=port, lease_seconds=1.0).start()
    try:
        observer = clients(second.address)
        wait_until(lambda: len(second.registry) == 4, what="re-population of the restarted server")
        instances = observer.list()
        assert ranks_of(instances) == {"d0": [0, 1], "p0": [0, 1]}
        wait_until(
            lambda: [e.load.running_requests for i in observer.list() for e in i.ranks] == [1, 2, 1, 2],
            what="load hints after re-population",
        )
    finally:
        second.stop(grace=0)


def test_incompatible_ranks_refused_with_named_mismatch(server, clients):
    clients().register(rank_info("p0", 0))

    with pytest.raises(IncompatibleRankError) as err:
        clients().register(
            rank_info("d0", 0, pb.ROLE_DECODE, page_size=64, model_fingerprint="feedfacefeedface")
        )
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_fingerprint: 'feedfacefeedface' (decode d0/0) vs '0123456789abcdef' (prefill p0/0)" in str(
        err.value
    )
    assert "page_size: 64 (decode d0/0) vs 16 (prefill p0/0)" in str(err.value)

    with pytest.raises(IncompatibleRankError, match=r"dp_size: 4 \(prefill p0/1\) vs 2 \(prefill p0/0\)"):
        clients().register(rank_info("p0", 1, dp_size=4))
    with pytest.raises(
        IncompatibleRankError, match=r"role: decode \(decode p0/1\) vs prefill \(prefill p0/0\)"
    ):
        clients().register(rank_info("p0", 1, pb.ROLE_DECODE))
    with pytest.raises(IncompatibleRankError, match=r"protocol_version: 99 \(decode d0/0\) vs 1 \(bootstrap"):
        clients().register(rank_info("d0", 0, pb.ROLE_DECODE, protocol_version=99))
    assert ranks_of(clients().list()) == {"p0": [0]}
    clients().register(rank_info("d0", 0, pb.ROLE_DECODE))  # a compatible decode rank is admitted
    assert ranks_of(clients().list()) == {"d0": [0], "p0": [0]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(instance_id=""), "instance_id must be 1-128 characters, got 0"),
        (dict(instance_id="p 0"), "instance_id 'p 0' must be"),
        (dict(dp_rank=2), "dp_rank must be in [0, dp_size=2), got 2"),
        (dict(dp_rank=-1), "dp_rank must be in [0, dp_size=2), got -1"),
        (dict(page_size=-16), "page_size must be in [1, 65536], got -16"),
        (dict(num_layers=1 << 20), "num_layers must be in [1, 4096], got 1048576"),
        (dict(dp_size=0), "dp_size must be in [1, 1024], got 0"),
        (dict(grpc_endpoint="localhost"), "grpc_endpoint must be 'host:port'"),
        (dict(kv_nbytes=100), "kv_nbytes 100 is smaller than"),
        (dict(role=pb.ROLE_UNSPECIFIED), "role must be ROLE_PREFILL, ROLE_DECODE or ROLE_COLOCATED, got 0"),
        (dict(kv_dtype="x" * 33), "kv_dtype must be 1-32 characters, got 33"),
    ],
)
def test_invalid_rank_info_refused(server, clients, overrides, message):
    with pytest.raises(BootstrapError) as err:
        clients().register(rank_info(**overrides))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.message
    assert clients().list() == []


def test_invalid_heartbeat_list_lookup_refused(server, clients):
    client = clients()
    client.register(rank_info())
    with pytest.raises(BootstrapError, match=r"load.free_pages must be in \[0, \d+\], got -5") as err:
        client.heartbeat(pb.Load(free_pages=-5))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(BootstrapError, match="role must be a Role value, got 7"):
        client.list(role=7)
    with pytest.raises(BootstrapError, match="instance_id '' must be"):
        client.lookup("", 0)


def test_registry_is_bounded():
    registry = Registry(lease_seconds=10, max_ranks=2)
    registry.register(rank_info("p0", 0, incarnation="a"), pb.Load())
    registry.register(rank_info("p0", 1, incarnation="b"), pb.Load())
    with pytest.raises(RegistryError, match=r"registry is full \(2 ranks\)") as err:
        registry.register(rank_info("d0", 0, pb.ROLE_DECODE, incarnation="c"), pb.Load())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    registry.register(rank_info("p0", 1, incarnation="restarted"), pb.Load())  # replacing is fine
    assert len(registry) == 2


def test_registry_lease_on_fake_clock():
    now = [100.0]  # steps below are exact binary fractions
    registry = Registry(lease_seconds=4, max_ranks=8, clock=lambda: now[0])
    registry.register(rank_info("p0", 0, incarnation="a"), pb.Load())
    registry.register(rank_info("p0", 1, incarnation="b"), pb.Load())  # both leases end at 104
    now[0] = 103.5
    registry.heartbeat("p0", 0, "a", pb.Load(free_pages=1))  # renews p0/0 to 107.5
    now[0] = 104.0
    assert ranks_of(registry.list()) == {"p0": [0]}
    now[0] = 107.25
    assert registry.lookup("p0", 0).load.free_pages == 1
    now[0] = 107.5
    with pytest.raises(RegistryError) as err:
        registry.heartbeat("p0", 0, "a", pb.Load())
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "register again" in err.value.message
    assert registry.list() == [] and len(registry) == 0


def test_unreachable_server_retried_then_reported(clients):
    probe = BootstrapServer(port=0).start()
    port = probe.port
    probe.stop(grace=0)

    client = clients(f"127.0.0.1:{port}", retry_for=0.3, timeout=1.0)
    with pytest.raises(BootstrapError) as err:
        client.register(rank_info())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE

    # A registration that starts before the server is up succeeds once it comes up.
    late = clients(f"127.0.0.1:{port}", retry_for=30, timeout=1.0)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(late.register(rank_info())))
    thread.start()
    time.sleep(0.3)
    server = BootstrapServer(port=port).start()
    try:
        thread.join(timeout=30)
        assert not thread.is_alive() and len(result) == 1
        assert clients(server.address).lookup("p0", 0).info == result[0]
    finally:
        server.stop(grace=0)


# -- cluster token ------------------------------------------------------------------------------


def test_cluster_token_required_when_set(clients):
    server = BootstrapServer(port=0, cluster_token=TOKEN).start()
    try:
        for token in (None, "wrong-token"):
            client = clients(server.address, cluster_token=token)
            with pytest.raises(BootstrapError) as err:
                client.health()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(BootstrapError) as err:
                client.register(rank_info())
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        client = clients(server.address, cluster_token=TOKEN)
        assert client.health().serving
        client.register(rank_info())
        assert ranks_of(client.list()) == {"p0": [0]}
    finally:
        server.stop(grace=0)


def _echo_handlers(is_async: bool) -> grpc.GenericRpcHandler:
    """A unary-unary and a stream-stream echo service on raw bytes."""
    if is_async:

        async def unary(request, context):
            return request

        async def stream(requests, context):
            async for request in requests:
                yield request
    else:

        def unary(request, context):
            return request

        def stream(requests, context):
            yield from requests

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


def _echo_calls(channel: grpc.Channel, metadata=()) -> list[grpc.StatusCode]:
    """Status of a unary and a streaming call on ``channel``."""
    codes = []
    for call in (
        lambda: channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5, metadata=metadata),
        lambda: list(
            channel.stream_stream("/test.Echo/Stream")(iter([b"a", b"b"]), timeout=5, metadata=metadata)
        ),
    ):
        try:
            call()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    return codes


def test_token_interceptor_sync_streaming():
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=server_interceptors(TOKEN))
    server.add_generic_rpc_handlers([_echo_handlers(is_async=False)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _echo_calls(channel) == [grpc.StatusCode.UNAUTHENTICATED] * 2
            assert _echo_calls(with_token(channel, TOKEN)) == [grpc.StatusCode.OK] * 2
            assert _echo_calls(channel, auth_metadata(TOKEN)) == [grpc.StatusCode.OK] * 2
            assert _echo_calls(with_token(channel, "other")) == [grpc.StatusCode.UNAUTHENTICATED] * 2
    finally:
        server.stop(0)


def test_token_interceptor_aio_streaming():
    async def main() -> None:
        server = grpc.aio.server(interceptors=aio_server_interceptors(TOKEN))
        server.add_generic_rpc_handlers([_echo_handlers(is_async=True)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            results = await asyncio.to_thread(
                lambda: [
                    _echo_calls(grpc.insecure_channel(f"127.0.0.1:{port}")),
                    _echo_calls(grpc.insecure_channel(f"127.0.0.1:{port}"), auth_metadata(TOKEN)),
                ]
            )
        finally:
            await server.stop(0)
        assert results == [[grpc.StatusCode.UNAUTHENTICATED] * 2, [grpc.StatusCode.OK] * 2]

    asyncio.run(main())


# -- pd-bootstrap process ---------------------------------------------------------------------


def _pd_bootstrap_command() -> list[str]:
    script = Path(sys.executable).parent / "pd-bootstrap"  # the installed console script
    return [str(script)] if script.exists() else [sys.executable, "-m", "pd.launch.bootstrap"]


def test_pd_bootstrap_process_serves_and_stops_on_sigterm(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cmd = [
        *_pd_bootstrap_command(),
        "--port",
        "0",
        "--lease-seconds",
        "5",
        "--cluster-token-file",
        str(token_file),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        address = None
        while address is None:
            line = lines.get(timeout=30)
            if "listening on " in line:
                address = line.split("listening on ")[1].split()[0]
        with BootstrapClient(address, cluster_token=TOKEN) as client:
            health = client.health()
            assert health.serving and health.num_ranks == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("shutting down" in line for line in rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
