from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_COLOCATED: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_COLOCATED: Role

class RankInfo(_message.Message):
    __slots__ = ("protocol_version", "model_fingerprint", "model_name", "max_context_len", "role", "instance_id", "dp_rank", "dp_size", "grpc_endpoint", "transfer_session", "transfer_protocol", "kv_base_addr", "kv_nbytes", "num_pages", "page_size", "page_nbytes_per_layer", "num_layers", "latent_dim", "kv_dtype", "kv_order", "aux_base_addr", "aux_nbytes", "aux_slot_nbytes", "incarnation", "kv_checksum", "speculative_algorithm", "num_speculative_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SESSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_ADDR_FIELD_NUMBER: _ClassVar[int]
    KV_NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_NBYTES_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_ORDER_FIELD_NUMBER: _ClassVar[int]
    AUX_BASE_ADDR_FIELD_NUMBER: _ClassVar[int]
    AUX_NBYTES_FIELD_NUMBER: _ClassVar[int]
    AUX_SLOT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_fingerprint: str
    model_name: str
    max_context_len: int
    role: Role
    instance_id: str
    dp_rank: int
    dp_size: int
    grpc_endpoint: str
    transfer_session: str
    transfer_protocol: str
    kv_base_addr: int
    kv_nbytes: int
    num_pages: int
    page_size: int
    page_nbytes_per_layer: int
    num_layers: int
    latent_dim: int
    kv_dtype: str
    kv_order: str
    aux_base_addr: int
    aux_nbytes: int
    aux_slot_nbytes: int
    incarnation: str
    kv_checksum: bool
    speculative_algorithm: str
    num_speculative_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., model_name: _Optional[str] = ..., max_context_len: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ..., instance_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., dp_size: _Optional[int] = ..., grpc_endpoint: _Optional[str] = ..., transfer_session: _Optional[str] = ..., transfer_protocol: _Optional[str] = ..., kv_base_addr: _Optional[int] = ..., kv_nbytes: _Optional[int] = ..., num_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., page_nbytes_per_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., latent_dim: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., kv_order: _Optional[str] = ..., aux_base_addr: _Optional[int] = ..., aux_nbytes: _Optional[int] = ..., aux_slot_nbytes: _Optional[int] = ..., incarnation: _Optional[str] = ..., kv_checksum: bool = ..., speculative_algorithm: _Optional[str] = ..., num_speculative_tokens: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("running_requests", "waiting_requests", "free_pages", "total_pages")
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    waiting_requests: int
    free_pages: int
    total_pages: int
    def __init__(self, running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., free_pages: _Optional[int] = ..., total_pages: _Optional[int] = ...) -> None: ...

class RankEntry(_message.Message):
    __slots__ = ("info", "load")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    info: RankInfo
    load: Load
    def __init__(self, info: _Optional[_Union[RankInfo, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "role", "dp_size", "ranks")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: Role
    dp_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankEntry]
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., dp_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankEntry, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "load")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    info: RankInfo
    load: Load
    def __init__(self, info: _Optional[_Union[RankInfo, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("instance_id", "dp_rank", "incarnation", "load")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    dp_rank: int
    incarnation: str
    load: Load
    def __init__(self, instance_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., incarnation: _Optional[str] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: Role
    def __init__(self, role: _Optional[_Union[Role, str]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("instances", "server_id", "lease_seconds")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    server_id: str
    lease_seconds: float
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., server_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("instance_id", "dp_rank")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    dp_rank: int
    def __init__(self, instance_id: _Optional[str] = ..., dp_rank: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rank",)
    RANK_FIELD_NUMBER: _ClassVar[int]
    rank: RankEntry
    def __init__(self, rank: _Optional[_Union[RankEntry, _Mapping]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("instance_id", "dp_rank", "incarnation")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    dp_rank: int
    incarnation: str
    def __init__(self, instance_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: bool = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "protocol_version", "num_ranks")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    protocol_version: int
    num_ranks: int
    def __init__(self, serving: bool = ..., protocol_version: _Optional[int] = ..., num_ranks: _Optional[int] = ...) -> None: ...
