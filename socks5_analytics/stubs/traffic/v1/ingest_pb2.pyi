import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from socks5_analytics.stubs.traffic.v1 import event_pb2 as _event_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestRequest(_message.Message):
    __slots__ = ("hello", "batch", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_id", "version", "boot_id", "policy_version", "started_at")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    boot_id: bytes
    policy_version: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., boot_id: _Optional[bytes] = ..., policy_version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("sequence", "events", "interims", "traceparent")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    INTERIMS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.ConnectionEvent]
    interims: _containers.RepeatedCompositeFieldContainer[_event_pb2.InterimReport]
    traceparent: str
    def __init__(self, sequence: _Optional[int] = ..., events: _Optional[_Iterable[_Union[_event_pb2.ConnectionEvent, _Mapping]]] = ..., interims: _Optional[_Iterable[_Union[_event_pb2.InterimReport, _Mapping]]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("active_connections", "policy_version", "sent_at")
    ACTIVE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    active_connections: int
    policy_version: str
    sent_at: _timestamp_pb2.Timestamp
    def __init__(self, active_connections: _Optional[int] = ..., policy_version: _Optional[str] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("ack", "rejection")
    ACK_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    rejection: Rejection
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., rejection: _Optional[_Union[Rejection, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence", "inserted", "duplicates")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    inserted: int
    duplicates: int
    def __init__(self, sequence: _Optional[int] = ..., inserted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("sequence", "inserted", "duplicates", "invalid")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    inserted: int
    duplicates: int
    invalid: _containers.RepeatedCompositeFieldContainer[InvalidItem]
    def __init__(self, sequence: _Optional[int] = ..., inserted: _Optional[int] = ..., duplicates: _Optional[int] = ..., invalid: _Optional[_Iterable[_Union[InvalidItem, _Mapping]]] = ...) -> None: ...

class InvalidItem(_message.Message):
    __slots__ = ("index", "interim", "event_id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INTERIM_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    interim: bool
    event_id: bytes
    reason: str
    def __init__(self, index: _Optional[int] = ..., interim: _Optional[bool] = ..., event_id: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...
