"""The proxy's settings, one frozen dataclass (``pd-proxy`` fills it from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pd.proxy.prefix_routing import RoutingConfig
from pd.rpc.tls import TLSConfig


@dataclass(frozen=True)
class ProxyConfig:
    bootstrap: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cluster_token: str | None = None
    tls: TLSConfig | None = None  # mutual TLS to the registry and ranks; HTTPS (server-only) to clients
    max_body_bytes: int = 8 << 20
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_completion_tokens: int = 16384  # cap of max_tokens (and the default for chat)
    max_inflight: int = 4096  # requests in flight before new ones get 429
    request_timeout_s: float = 600.0  # a whole request, from the proxy's point of view
    body_timeout_s: float = 30.0  # reading a request body (a client that trickles it gets 408)
    refresh_s: float = 1.0  # how often the registry view is refreshed
    keepalive_s: float = 5.0  # pings on worker channels: a hung worker fails its calls within ~2x this
    retry_prefill: bool = True  # a prefill rank that fails before the first token: retry once elsewhere
    drain_timeout_s: float = 30.0  # on SIGTERM: seconds open requests may run on before they are cut
    reasoning_parser: str | None = None  # chat: reasoning text to reasoning_content (pd.proxy.reasoning)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # which rank computes a prompt
    tool_call_parser: str | None = None  # chat: the model's tool-call format (pd.proxy.tools); None: no tools

    def __post_init__(self) -> None:
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
