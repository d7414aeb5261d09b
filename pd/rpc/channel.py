"""Options of the gRPC channels and servers between pd processes (one place for all of them)."""

from __future__ import annotations

# Reconnect soon after a peer comes back: grpc's default backoff starts at 1 s and grows to 120 s,
# so a restarted worker or bootstrap server would stay unreachable for minutes. Not
# "grpc.min_reconnect_backoff_ms": grpc also takes it as the time a connection attempt may take,
# and at 100 ms a loaded peer's first SETTINGS frame comes too late ("connection attempt timed
# out before receiving SETTINGS frame").
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Servers answer keepalive pings at any rate: by default grpc answers pings more frequent than
# every 5 minutes with GOAWAY ("too_many_pings"), which would cut the calls keepalive protects.
# They also ping their clients while calls are open: the calls of a client that stopped answering
# (a hung proxy, a stopped peer) are cancelled within 2 * SERVER_KEEPALIVE_S, freeing their rooms.
SERVER_KEEPALIVE_S = 10.0
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", 100),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", int(SERVER_KEEPALIVE_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(SERVER_KEEPALIVE_S * 1000)),
    ("grpc.http2.ping_timeout_ms", int(SERVER_KEEPALIVE_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 0),
]


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """Client options that fail the open calls of a connection whose peer stops answering.

    While a call is open the client pings the peer every ``seconds``; a ping unanswered for
    ``seconds`` closes the connection and fails its calls with UNAVAILABLE. A SIGSTOPped or hung
    process (whose kernel still acknowledges TCP) is thus noticed within about 2 * ``seconds``,
    not after the call's own deadline. The pings are answered by grpc's core threads, so a busy
    Python process does not miss them.
    """
    if not seconds > 0:
        raise ValueError(f"keepalive seconds must be positive, got {seconds}")
    ms = max(1, round(seconds * 1000))
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        # Any unanswered ping (not only keepalive's) ends the connection after this; its default of
        # one minute otherwise wins when a flow-control ping is the one in flight as the peer stops.
        ("grpc.http2.ping_timeout_ms", ms),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]
