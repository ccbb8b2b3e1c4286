"""The SOCKS5 wire format (RFC 1928) and username/password sub-negotiation (RFC 1929).

Pure functions only: parsers take the bytes received so far and return the message and how
many bytes it used, or `None` when more bytes are needed (handshakes may arrive a byte at a
time, or pipelined with the data that follows). Malformed input raises a `WireError`
subclass; nothing here touches a socket.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "AddressType",
    "AuthMethod",
    "AuthRequest",
    "BadVersion",
    "Command",
    "Greeting",
    "MalformedMessage",
    "Reply",
    "Request",
    "UdpHeader",
    "UnsupportedAddressType",
    "UnsupportedCommand",
    "WireError",
    "encode_auth_reply",
    "encode_method_selection",
    "encode_reply",
    "encode_udp_header",
    "parse_auth_request",
    "parse_greeting",
    "parse_request",
    "parse_udp_header",
]

SOCKS_VERSION = 5
AUTH_VERSION = 1


class AuthMethod(IntEnum):
    """METHOD values of the method-selection message (RFC 1928 §3)."""

    NO_AUTHENTICATION_REQUIRED = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(IntEnum):
    """CMD values of a request (RFC 1928 §4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """ATYP values (RFC 1928 §5)."""

    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """REP values of a reply (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class WireError(Exception):
    """Bytes that are not a valid SOCKS5 message."""


class BadVersion(WireError):
    """The VER field is not the protocol version this message must carry."""


class MalformedMessage(WireError):
    """A length or field that no valid message can have."""


class UnsupportedCommand(WireError):
    """A request whose CMD is not CONNECT, BIND or UDP ASSOCIATE."""


class UnsupportedAddressType(WireError):
    """An ATYP other than IPv4, domain name or IPv6."""


@dataclass(frozen=True, slots=True)
class Greeting:
    """The version identifier/method selection message.

        +----+----------+----------+
        |VER | NMETHODS | METHODS  |
        +----+----------+----------+
        | 1  |    1     | 1 to 255 |
        +----+----------+----------+
    """

    methods: frozenset[int]


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """The username/password request (RFC 1929 §2).

        +----+------+----------+------+----------+
        |VER | ULEN |  UNAME   | PLEN |  PASSWD  |
        +----+------+----------+------+----------+
        | 1  |  1   | 1 to 255 |  1   | 1 to 255 |
        +----+------+----------+------+----------+
    """

    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """A SOCKS request; `host` is an IP literal or a domain name as sent.

        +----+-----+-------+------+----------+----------+
        |VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |
        +----+-----+-------+------+----------+----------+
        | 1  |  1  | X'00' |  1   | Variable |    2     |
        +----+-----+-------+------+----------+----------+
    """

    command: Command
    address_type: AddressType
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class UdpHeader:
    """The header of each UDP datagram relayed (RFC 1928 §7); `length` is its size.

        +----+------+------+----------+----------+----------+
        |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
        +----+------+------+----------+----------+----------+
        | 2  |  1   |  1   | Variable |    2     | Variable |
        +----+------+------+----------+----------+----------+
    """

    fragment: int
    address_type: AddressType
    host: str
    port: int
    length: int


def parse_greeting(data: bytes | bytearray) -> tuple[Greeting, int] | None:
    """Parse the client's greeting; `None` until all of it has arrived."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise BadVersion(f"greeting version {data[0]:#04x}, expected 0x05")
    if len(data) < 2:
        return None
    end = 2 + data[1]
    if len(data) < end:
        return None
    return Greeting(frozenset(data[2:end])), end


def encode_method_selection(method: AuthMethod) -> bytes:
    """The server's choice of authentication method (0xFF: none acceptable)."""
    return bytes((SOCKS_VERSION, method))


def parse_auth_request(data: bytes | bytearray) -> tuple[AuthRequest, int] | None:
    """Parse an RFC 1929 username/password request; `None` until complete."""
    if not data:
        return None
    if data[0] != AUTH_VERSION:
        raise BadVersion(f"auth version {data[0]:#04x}, expected 0x01")
    if len(data) < 2:
        return None
    ulen = data[1]
    if len(data) < 3 + ulen:
        return None
    plen = data[2 + ulen]
    end = 3 + ulen + plen
    if len(data) < end:
        return None
    return AuthRequest(bytes(data[2 : 2 + ulen]), bytes(data[3 + ulen : end])), end


def encode_auth_reply(success: bool) -> bytes:
    """RFC 1929 status: 0x00 success, anything else failure (we send 0x01)."""
    return bytes((AUTH_VERSION, 0x00 if success else 0x01))


def _parse_address(
    data: bytes | bytearray, offset: int
) -> tuple[AddressType, str, int, int] | None:
    """ATYP, DST.ADDR, DST.PORT starting at `offset`: (type, host, port, end) or None."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        end = offset + 1 + 4 + 2
        if len(data) < end:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(data[offset + 1 : offset + 5]))
    elif atyp == AddressType.IPV6:
        end = offset + 1 + 16 + 2
        if len(data) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(data[offset + 1 : offset + 17])))
    elif atyp == AddressType.DOMAINNAME:
        if len(data) < offset + 2:
            return None
        length = data[offset + 1]
        if length == 0:
            raise MalformedMessage("empty domain name")
        end = offset + 2 + length + 2
        if len(data) < end:
            return None
        raw = bytes(data[offset + 2 : offset + 2 + length])
        try:
            host = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage("domain name is not UTF-8") from exc
        if "\x00" in host:
            raise MalformedMessage("domain name contains a NUL byte")
    else:
        raise UnsupportedAddressType(f"address type {atyp:#04x}")
    (port,) = struct.unpack_from("!H", data, end - 2)
    return AddressType(atyp), host, port, end


def parse_request(data: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse a request; `None` until complete. The CMD is checked after the whole message."""
    if not data:
        return None
    if data[0] != SOCKS_VERSION:
        raise BadVersion(f"request version {data[0]:#04x}, expected 0x05")
    if len(data) < 4:
        return None
    parsed = _parse_address(data, 3)
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    try:
        command = Command(data[1])
    except ValueError as exc:
        raise UnsupportedCommand(f"command {data[1]:#04x}") from exc
    return Request(command, atyp, host, port), end


def _encode_address(host: str, port: int) -> bytes:
    if not 0 <= port <= 65535:
        raise MalformedMessage(f"port {port} out of range")
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    else:
        return b"\x01" + packed + port.to_bytes(2, "big")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            name = host.encode("ascii") if host.isascii() else host.encode("idna")
        except UnicodeError as exc:
            raise MalformedMessage(f"domain name {host!r} cannot be encoded") from exc
        if b"\x00" in name:
            raise MalformedMessage("domain name contains a NUL byte") from None
        if not 0 < len(name) < 256:
            raise MalformedMessage(f"domain name of {len(name)} bytes") from None
        return bytes((AddressType.DOMAINNAME, len(name))) + name + port.to_bytes(2, "big")
    if ip.version == 4:
        return bytes((AddressType.IPV4,)) + ip.packed + port.to_bytes(2, "big")
    if ip.ipv4_mapped is not None:
        # Clients asked in IPv4 expect IPv4 back, not ::ffff:a.b.c.d.
        return bytes((AddressType.IPV4,)) + ip.ipv4_mapped.packed + port.to_bytes(2, "big")
    return bytes((AddressType.IPV6,)) + ip.packed + port.to_bytes(2, "big")


def encode_reply(reply: Reply, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A reply with BND.ADDR/BND.PORT (an IP literal or a domain name)."""
    return bytes((SOCKS_VERSION, reply, 0x00)) + _encode_address(host, port)


def parse_udp_header(datagram: bytes | bytearray) -> UdpHeader:
    """Parse the header of a client datagram; raise if it is truncated or malformed."""
    if len(datagram) < 4:
        raise MalformedMessage("UDP datagram shorter than its header")
    if datagram[0] != 0 or datagram[1] != 0:
        raise MalformedMessage("UDP header RSV is not zero")
    parsed = _parse_address(datagram, 3)
    if parsed is None:
        raise MalformedMessage("UDP datagram shorter than its header")
    atyp, host, port, end = parsed
    return UdpHeader(datagram[2], atyp, host, port, end)


def encode_udp_header(host: str, port: int) -> bytes:
    """The header the relay puts before a datagram it returns to the client."""
    return b"\x00\x00\x00" + _encode_address(host, port)
