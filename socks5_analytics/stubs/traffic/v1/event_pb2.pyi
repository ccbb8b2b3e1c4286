import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_UNSPECIFIED: _ClassVar[Command]
    COMMAND_CONNECT: _ClassVar[Command]
    COMMAND_BIND: _ClassVar[Command]
    COMMAND_UDP_ASSOCIATE: _ClassVar[Command]

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_TCP: _ClassVar[Protocol]
    PROTOCOL_UDP: _ClassVar[Protocol]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_AUTH_FAILED: _ClassVar[Status]
    STATUS_DENIED_WHITELIST: _ClassVar[Status]
    STATUS_DENIED_DESTINATION: _ClassVar[Status]
    STATUS_RATE_LIMITED: _ClassVar[Status]
    STATUS_DNS_FAILED: _ClassVar[Status]
    STATUS_REFUSED: _ClassVar[Status]
    STATUS_UNREACHABLE: _ClassVar[Status]
    STATUS_TIMEOUT: _ClassVar[Status]
    STATUS_ERROR: _ClassVar[Status]

class CloseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOSE_REASON_UNSPECIFIED: _ClassVar[CloseReason]
    CLOSE_REASON_CLIENT: _ClassVar[CloseReason]
    CLOSE_REASON_DESTINATION: _ClassVar[CloseReason]
    CLOSE_REASON_IDLE_TIMEOUT: _ClassVar[CloseReason]
    CLOSE_REASON_SHUTDOWN: _ClassVar[CloseReason]
    CLOSE_REASON_REVOKED: _ClassVar[CloseReason]
    CLOSE_REASON_ERROR: _ClassVar[CloseReason]
COMMAND_UNSPECIFIED: Command
COMMAND_CONNECT: Command
COMMAND_BIND: Command
COMMAND_UDP_ASSOCIATE: Command
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_TCP: Protocol
PROTOCOL_UDP: Protocol
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_AUTH_FAILED: Status
STATUS_DENIED_WHITELIST: Status
STATUS_DENIED_DESTINATION: Status
STATUS_RATE_LIMITED: Status
STATUS_DNS_FAILED: Status
STATUS_REFUSED: Status
STATUS_UNREACHABLE: Status
STATUS_TIMEOUT: Status
STATUS_ERROR: Status
CLOSE_REASON_UNSPECIFIED: CloseReason
CLOSE_REASON_CLIENT: CloseReason
CLOSE_REASON_DESTINATION: CloseReason
CLOSE_REASON_IDLE_TIMEOUT: CloseReason
CLOSE_REASON_SHUTDOWN: CloseReason
CLOSE_REASON_REVOKED: CloseReason
CLOSE_REASON_ERROR: CloseReason

class ConnectionEvent(_message.Message):
    __slots__ = ("event_id", "node_id", "started_at", "ended_at", "source_ip", "source_port", "user", "command", "protocol", "dest_host", "domain", "dest_ip", "dest_port", "status", "reply_code", "close_reason", "connect_ms", "ttfb_ms", "duration_ms", "bytes_out", "bytes_in", "trace_id", "span_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PORT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DEST_HOST_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DEST_IP_FIELD_NUMBER: _ClassVar[int]
    DEST_PORT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    CONNECT_MS_FIELD_NUMBER: _ClassVar[int]
    TTFB_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: bytes
    node_id: str
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    source_ip: bytes
    source_port: int
    user: str
    command: Command
    protocol: Protocol
    dest_host: str
    domain: str
    dest_ip: bytes
    dest_port: int
    status: Status
    reply_code: int
    close_reason: CloseReason
    connect_ms: float
    ttfb_ms: float
    duration_ms: float
    bytes_out: int
    bytes_in: int
    trace_id: bytes
    span_id: bytes
    def __init__(self, event_id: _Optional[bytes] = ..., node_id: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_ip: _Optional[bytes] = ..., source_port: _Optional[int] = ..., user: _Optional[str] = ..., command: _Optional[_Union[Command, str]] = ..., protocol: _Optional[_Union[Protocol, str]] = ..., dest_host: _Optional[str] = ..., domain: _Optional[str] = ..., dest_ip: _Optional[bytes] = ..., dest_port: _Optional[int] = ..., status: _Optional[_Union[Status, str]] = ..., reply_code: _Optional[int] = ..., close_reason: _Optional[_Union[CloseReason, str]] = ..., connect_ms: _Optional[float] = ..., ttfb_ms: _Optional[float] = ..., duration_ms: _Optional[float] = ..., bytes_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ...) -> None: ...

class InterimReport(_message.Message):
    __slots__ = ("event_id", "started_at", "reported_at", "source_ip", "user", "domain", "bytes_out", "bytes_in")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    event_id: bytes
    started_at: _timestamp_pb2.Timestamp
    reported_at: _timestamp_pb2.Timestamp
    source_ip: bytes
    user: str
    domain: str
    bytes_out: int
    bytes_in: int
    def __init__(self, event_id: _Optional[bytes] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reported_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_ip: _Optional[bytes] = ..., user: _Optional[str] = ..., domain: _Optional[str] = ..., bytes_out: _Optional[int] = ..., bytes_in: _Optional[int] = ...) -> None: ...
