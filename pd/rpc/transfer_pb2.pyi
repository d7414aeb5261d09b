from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayoutSpec(_message.Message):
    __slots__ = ("num_layers", "num_pages", "page_size", "latent_dim", "dtype", "order")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_pages: int
    page_size: int
    latent_dim: int
    dtype: str
    order: str
    def __init__(self, num_layers: _Optional[int] = ..., num_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., latent_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., order: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("room", "session", "endpoint", "dst_pages", "aux_slot", "layout", "kv_base", "aux_base", "deadline_ms", "skip_pages")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DST_PAGES_FIELD_NUMBER: _ClassVar[int]
    AUX_SLOT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_FIELD_NUMBER: _ClassVar[int]
    AUX_BASE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    SKIP_PAGES_FIELD_NUMBER: _ClassVar[int]
    room: int
    session: str
    endpoint: str
    dst_pages: _containers.RepeatedScalarFieldContainer[int]
    aux_slot: int
    layout: KVLayoutSpec
    kv_base: int
    aux_base: int
    deadline_ms: int
    skip_pages: int
    def __init__(self, room: _Optional[int] = ..., session: _Optional[str] = ..., endpoint: _Optional[str] = ..., dst_pages: _Optional[_Iterable[int]] = ..., aux_slot: _Optional[int] = ..., layout: _Optional[_Union[KVLayoutSpec, _Mapping]] = ..., kv_base: _Optional[int] = ..., aux_base: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., skip_pages: _Optional[int] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("room", "reason")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    room: int
    reason: str
    def __init__(self, room: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("known", "drained")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    known: bool
    drained: bool
    def __init__(self, known: bool = ..., drained: bool = ...) -> None: ...

class TransferDoneRequest(_message.Message):
    __slots__ = ("room", "kv_checksums")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    room: int
    kv_checksums: bytes
    def __init__(self, room: _Optional[int] = ..., kv_checksums: _Optional[bytes] = ...) -> None: ...

class TransferFailedRequest(_message.Message):
    __slots__ = ("room", "reason")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    room: int
    reason: str
    def __init__(self, room: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class NoticeReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: bool = ...) -> None: ...
