"""Unit tests for `proxy_node.wire`: the SOCKS5 (RFC 1928) and RFC 1929 wire format.

Byte scripts are written field by field, each annotated with the field it carries, so a
failing case can be read against the RFC diagrams without decoding hex in one's head.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy_node.wire import (
    AddressType,
    AuthMethod,
    AuthRequest,
    BadVersion,
    Command,
    Greeting,
    MalformedMessage,
    Reply,
    Request,
    UdpHeader,
    UnsupportedAddressType,
    UnsupportedCommand,
    WireError,
    encode_auth_reply,
    encode_method_selection,
    encode_reply,
    encode_udp_header,
    parse_auth_request,
    parse_greeting,
    parse_request,
    parse_udp_header,
)

Parser = Callable[[bytes | bytearray], Any]

# --------------------------------------------------------------------------------------
# Address fragments (ATYP, DST.ADDR, DST.PORT) shared by requests, replies and UDP headers.
# --------------------------------------------------------------------------------------

ADDR_IPV4 = (
    b"\x01"  # ATYP: IPv4
    b"\xc0\x00\x02\x01"  # DST.ADDR: 192.0.2.1
    b"\x01\xbb"  # DST.PORT: 443
)
ADDR_IPV4_ANY = (
    b"\x01"  # ATYP: IPv4
    b"\x00\x00\x00\x00"  # DST.ADDR: 0.0.0.0 (UDP ASSOCIATE: "not known yet")
    b"\x00\x00"  # DST.PORT: 0
)
ADDR_IPV6 = (
    b"\x04"  # ATYP: IPv6
    b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"  # DST.ADDR: 2001:db8::1
    b"\x00\x50"  # DST.PORT: 80
)
ADDR_DOMAIN = (
    b"\x03"  # ATYP: DOMAINNAME
    b"\x0b"  # length: 11
    b"example.com"  # DST.ADDR
    b"\x1f\x90"  # DST.PORT: 8080
)
ADDR_DOMAIN_UTF8 = (
    b"\x03"  # ATYP: DOMAINNAME
    b"\x0f"  # length: 15 bytes (14 characters: "ü" is two bytes in UTF-8)
    b"b\xc3\xbccher.example"  # DST.ADDR: "bücher.example", raw UTF-8 as sent
    b"\x00\x15"  # DST.PORT: 21
)

ADDRESSES = {
    "ipv4": (ADDR_IPV4, AddressType.IPV4, "192.0.2.1", 443),
    "ipv4-any": (ADDR_IPV4_ANY, AddressType.IPV4, "0.0.0.0", 0),
    "ipv6": (ADDR_IPV6, AddressType.IPV6, "2001:db8::1", 80),
    "domain": (ADDR_DOMAIN, AddressType.DOMAINNAME, "example.com", 8080),
    "domain-utf8": (ADDR_DOMAIN_UTF8, AddressType.DOMAINNAME, "bücher.example", 21),
}


def _request(command: int, address: bytes) -> bytes:
    return (
        b"\x05"  # VER
        + bytes((command,))  # CMD
        + b"\x00"  # RSV
        + address  # ATYP, DST.ADDR, DST.PORT
    )


# --------------------------------------------------------------------------------------
# Greeting / method selection (RFC 1928 §3)
# --------------------------------------------------------------------------------------

GREETINGS = [
    pytest.param(
        b"\x05"  # VER
        b"\x01"  # NMETHODS: 1
        b"\x00",  # METHODS: NO AUTHENTICATION REQUIRED
        frozenset({0x00}),
        id="no-auth",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\x02"  # NMETHODS: 2
        b"\x00"  # METHOD: NO AUTHENTICATION REQUIRED
        b"\x02",  # METHOD: USERNAME/PASSWORD
        frozenset({0x00, 0x02}),
        id="no-auth-and-userpass",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\x03"  # NMETHODS: 3
        b"\x02"  # METHOD: USERNAME/PASSWORD
        b"\x02"  # METHOD: USERNAME/PASSWORD again (duplicates collapse)
        b"\x01",  # METHOD: GSSAPI
        frozenset({0x01, 0x02}),
        id="duplicates",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\x02"  # NMETHODS: 2
        b"\x80"  # METHOD: private method 0x80
        b"\xfe",  # METHOD: private method 0xFE
        frozenset({0x80, 0xFE}),
        id="private-methods",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\xff"  # NMETHODS: 255 (the maximum)
        + bytes(range(255)),  # METHODS: 0x00..0xFE
        frozenset(range(255)),
        id="255-methods",
    ),
]


@pytest.mark.parametrize(("data", "methods"), GREETINGS)
def test_parse_greeting(data: bytes, methods: frozenset[int]) -> None:
    assert parse_greeting(data) == (Greeting(methods), len(data))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        pytest.param(AuthMethod.NO_AUTHENTICATION_REQUIRED, b"\x05\x00", id="no-auth"),
        pytest.param(AuthMethod.GSSAPI, b"\x05\x01", id="gssapi"),
        pytest.param(AuthMethod.USERNAME_PASSWORD, b"\x05\x02", id="userpass"),
        pytest.param(AuthMethod.NO_ACCEPTABLE_METHODS, b"\x05\xff", id="no-acceptable"),
    ],
)
def test_encode_method_selection(method: AuthMethod, expected: bytes) -> None:
    # VER, METHOD
    assert encode_method_selection(method) == expected


# --------------------------------------------------------------------------------------
# Username/password sub-negotiation (RFC 1929)
# --------------------------------------------------------------------------------------

AUTH_REQUESTS = [
    pytest.param(
        b"\x01"  # VER: 1 (sub-negotiation version, not 5)
        b"\x05"  # ULEN: 5
        b"alice"  # UNAME
        b"\x06"  # PLEN: 6
        b"s3cret",  # PASSWD
        AuthRequest(b"alice", b"s3cret"),
        id="ascii",
    ),
    pytest.param(
        b"\x01"  # VER
        b"\x01"  # ULEN: 1
        b"u"  # UNAME
        b"\x01"  # PLEN: 1
        b"p",  # PASSWD
        AuthRequest(b"u", b"p"),
        id="one-byte-each",
    ),
    pytest.param(
        b"\x01"  # VER
        b"\x04"  # ULEN: 4
        b"j\xc3\xb6e"  # UNAME: "jöe" in UTF-8
        b"\x03"  # PLEN: 3
        b"\x00\xff\x80",  # PASSWD: arbitrary bytes, kept as bytes
        AuthRequest("jöe".encode(), b"\x00\xff\x80"),
        id="binary",
    ),
    pytest.param(
        b"\x01"  # VER
        b"\xff"  # ULEN: 255 (the maximum)
        + b"u" * 255  # UNAME
        + b"\xff"  # PLEN: 255 (the maximum)
        + b"p" * 255,  # PASSWD
        AuthRequest(b"u" * 255, b"p" * 255),
        id="maximum-lengths",
    ),
]


@pytest.mark.parametrize(("data", "expected"), AUTH_REQUESTS)
def test_parse_auth_request(data: bytes, expected: AuthRequest) -> None:
    assert parse_auth_request(data) == (expected, len(data))


@pytest.mark.parametrize(
    ("success", "expected"),
    [
        pytest.param(True, b"\x01\x00", id="success"),  # VER 1, STATUS 0x00
        pytest.param(False, b"\x01\x01", id="failure"),  # VER 1, STATUS != 0x00
    ],
)
def test_encode_auth_reply(success: bool, expected: bytes) -> None:
    assert encode_auth_reply(success) == expected


# --------------------------------------------------------------------------------------
# Requests (RFC 1928 §4, §5)
# --------------------------------------------------------------------------------------

REQUESTS = [
    pytest.param(
        _request(command, address),
        Request(Command(command), atyp, host, port),
        id=f"{Command(command).name.lower()}-{name}",
    )
    for command, (name, (address, atyp, host, port)) in itertools.product(
        (Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE), ADDRESSES.items()
    )
] + [
    pytest.param(
        b"\x05"  # VER
        b"\x01"  # CMD: CONNECT
        b"\x00"  # RSV
        b"\x04"  # ATYP: IPv6
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\x0a\x00\x00\x01"  # ::ffff:10.0.0.1
        b"\xff\xff",  # DST.PORT: 65535
        # The spelling of a mapped address differs between Python versions.
        Request(Command.CONNECT, AddressType.IPV6,
                str(ipaddress.IPv6Address("::ffff:10.0.0.1")), 65535),
        id="connect-ipv4-mapped-ipv6",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\x01"  # CMD: CONNECT
        b"\x00"  # RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\xff"  # length: 255 (the maximum)
        + b"a" * 255  # DST.ADDR
        + b"\x00\x01",  # DST.PORT: 1
        Request(Command.CONNECT, AddressType.DOMAINNAME, "a" * 255, 1),
        id="connect-domain-255-bytes",
    ),
    pytest.param(
        b"\x05"  # VER
        b"\x01"  # CMD: CONNECT
        b"\x00"  # RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x07"  # length: 7
        b"1.2.3.4"  # DST.ADDR: an IP literal sent as a name stays a name
        b"\x00\x50",  # DST.PORT: 80
        Request(Command.CONNECT, AddressType.DOMAINNAME, "1.2.3.4", 80),
        id="connect-ip-literal-as-domain",
    ),
]


@pytest.mark.parametrize(("data", "expected"), REQUESTS)
def test_parse_request(data: bytes, expected: Request) -> None:
    assert parse_request(data) == (expected, len(data))


@pytest.mark.parametrize(("data", "expected"), REQUESTS)
def test_parse_request_accepts_bytearray(data: bytes, expected: Request) -> None:
    assert parse_request(bytearray(data)) == (expected, len(data))


# --------------------------------------------------------------------------------------
# Replies (RFC 1928 §6)
# --------------------------------------------------------------------------------------

REPLIES = [
    pytest.param(
        Reply.SUCCEEDED,
        "192.0.2.1",
        443,
        b"\x05"  # VER
        b"\x00"  # REP: succeeded
        b"\x00"  # RSV
        b"\x01"  # ATYP: IPv4
        b"\xc0\x00\x02\x01"  # BND.ADDR: 192.0.2.1
        b"\x01\xbb",  # BND.PORT: 443
        id="ipv4",
    ),
    pytest.param(
        Reply.SUCCEEDED,
        "2001:db8::1",
        80,
        b"\x05"  # VER
        b"\x00"  # REP: succeeded
        b"\x00"  # RSV
        b"\x04"  # ATYP: IPv6
        b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"  # BND.ADDR
        b"\x00\x50",  # BND.PORT: 80
        id="ipv6",
    ),
    pytest.param(
        Reply.SUCCEEDED,
        "::ffff:10.0.0.1",
        1080,
        b"\x05"  # VER
        b"\x00"  # REP: succeeded
        b"\x00"  # RSV
        b"\x01"  # ATYP: IPv4, not IPv6: clients asked in IPv4 expect IPv4 back
        b"\x0a\x00\x00\x01"  # BND.ADDR: 10.0.0.1
        b"\x04\x38",  # BND.PORT: 1080
        id="ipv4-mapped-ipv6-becomes-ipv4",
    ),
    pytest.param(
        Reply.SUCCEEDED,
        "example.com",
        8080,
        b"\x05"  # VER
        b"\x00"  # REP: succeeded
        b"\x00"  # RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x0b"  # length: 11
        b"example.com"  # BND.ADDR
        b"\x1f\x90",  # BND.PORT: 8080
        id="domain",
    ),
    pytest.param(
        Reply.SUCCEEDED,
        "bücher.example",
        80,
        b"\x05"  # VER
        b"\x00"  # REP: succeeded
        b"\x00"  # RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x15"  # length: 21
        b"xn--bcher-kva.example"  # BND.ADDR: the IDNA A-label of "bücher.example"
        b"\x00\x50",  # BND.PORT: 80
        id="domain-non-ascii-idna",
    ),
    pytest.param(
        Reply.GENERAL_FAILURE,
        "0.0.0.0",
        0,
        b"\x05"  # VER
        b"\x01"  # REP: general SOCKS server failure
        b"\x00"  # RSV
        b"\x01"  # ATYP: IPv4
        b"\x00\x00\x00\x00"  # BND.ADDR: 0.0.0.0
        b"\x00\x00",  # BND.PORT: 0
        id="failure",
    ),
] + [
    pytest.param(
        reply,
        "0.0.0.0",
        0,
        b"\x05" + bytes((reply,)) + b"\x00" + ADDR_IPV4_ANY,  # VER, REP, RSV, address
        id=f"rep-{reply.name.lower()}",
    )
    for reply in Reply
]


@pytest.mark.parametrize(("reply", "host", "port", "expected"), REPLIES)
def test_encode_reply(reply: Reply, host: str, port: int, expected: bytes) -> None:
    assert encode_reply(reply, host, port) == expected


def test_encode_reply_defaults_to_unspecified_ipv4() -> None:
    assert encode_reply(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00" + ADDR_IPV4_ANY


@pytest.mark.parametrize(
    ("host", "length"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("a" * 256, 256, id="ascii-256-bytes"),
    ],
)
def test_encode_reply_rejects_domain_lengths_that_do_not_fit(host: str, length: int) -> None:
    with pytest.raises(MalformedMessage, match=f"{length} bytes"):
        encode_reply(Reply.SUCCEEDED, host, 80)


def test_encode_reply_rejects_unencodable_non_ascii_domain_as_malformed() -> None:
    # A non-ASCII name whose label is longer than IDNA allows (63) cannot be encoded; the
    # ASCII path reports an unencodable name as MalformedMessage, so should this one.
    with pytest.raises(MalformedMessage):
        encode_reply(Reply.SUCCEEDED, "é" * 70 + ".example", 80)


# --------------------------------------------------------------------------------------
# UDP header (RFC 1928 §7)
# --------------------------------------------------------------------------------------

UDP_DATAGRAMS = [
    pytest.param(
        b"\x00\x00"  # RSV
        b"\x00"  # FRAG: 0 (standalone datagram)
        b"\x01"  # ATYP: IPv4
        b"\x08\x08\x08\x08"  # DST.ADDR: 8.8.8.8
        b"\x00\x35"  # DST.PORT: 53
        b"dns query",  # DATA
        UdpHeader(0, AddressType.IPV4, "8.8.8.8", 53, 10),
        id="ipv4",
    ),
    pytest.param(
        b"\x00\x00"  # RSV
        b"\x00"  # FRAG
        b"\x04"  # ATYP: IPv6
        b"\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"  # 2001:db8::1
        b"\x00\x7b"  # DST.PORT: 123
        b"\x00\x01\x02",  # DATA
        UdpHeader(0, AddressType.IPV6, "2001:db8::1", 123, 22),
        id="ipv6",
    ),
    pytest.param(
        b"\x00\x00"  # RSV
        b"\x00"  # FRAG
        b"\x03"  # ATYP: DOMAINNAME
        b"\x0b"  # length: 11
        b"example.com"  # DST.ADDR
        b"\x01\xbb"  # DST.PORT: 443
        b"quic",  # DATA
        UdpHeader(0, AddressType.DOMAINNAME, "example.com", 443, 18),
        id="domain",
    ),
    pytest.param(
        b"\x00\x00"  # RSV
        b"\x00"  # FRAG
        b"\x01"  # ATYP: IPv4
        b"\x7f\x00\x00\x01"  # DST.ADDR: 127.0.0.1
        b"\x00\x07",  # DST.PORT: 7; no DATA at all
        UdpHeader(0, AddressType.IPV4, "127.0.0.1", 7, 10),
        id="empty-payload",
    ),
    pytest.param(
        b"\x00\x00"  # RSV
        b"\x03"  # FRAG: 3 (a fragment; reported, the caller decides to drop it)
        b"\x01"  # ATYP: IPv4
        b"\x7f\x00\x00\x01"  # DST.ADDR: 127.0.0.1
        b"\x00\x07"  # DST.PORT: 7
        b"x",  # DATA
        UdpHeader(3, AddressType.IPV4, "127.0.0.1", 7, 10),
        id="fragment-number",
    ),
]


@pytest.mark.parametrize(("datagram", "expected"), UDP_DATAGRAMS)
def test_parse_udp_header(datagram: bytes, expected: UdpHeader) -> None:
    assert parse_udp_header(datagram) == expected
    assert parse_udp_header(bytearray(datagram)) == expected


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        pytest.param(
            "8.8.8.8",
            53,
            b"\x00\x00"  # RSV
            b"\x00"  # FRAG
            b"\x01"  # ATYP: IPv4
            b"\x08\x08\x08\x08"  # DST.ADDR
            b"\x00\x35",  # DST.PORT: 53
            id="ipv4",
        ),
        pytest.param(
            "2001:db8::1",
            80,
            b"\x00\x00"  # RSV
            b"\x00"  # FRAG
            + ADDR_IPV6,  # ATYP, DST.ADDR, DST.PORT
            id="ipv6",
        ),
        pytest.param(
            "::ffff:10.0.0.1",
            1080,
            b"\x00\x00"  # RSV
            b"\x00"  # FRAG
            b"\x01"  # ATYP: IPv4 (from an IPv4-mapped IPv6 source)
            b"\x0a\x00\x00\x01"  # DST.ADDR: 10.0.0.1
            b"\x04\x38",  # DST.PORT: 1080
            id="ipv4-mapped-ipv6-becomes-ipv4",
        ),
        pytest.param(
            "example.com",
            8080,
            b"\x00\x00"  # RSV
            b"\x00"  # FRAG
            + ADDR_DOMAIN,  # ATYP, DST.ADDR, DST.PORT
            id="domain",
        ),
    ],
)
def test_encode_udp_header(host: str, port: int, expected: bytes) -> None:
    assert encode_udp_header(host, port) == expected


# --------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------

MALFORMED = [
    # Bad versions.
    pytest.param(parse_greeting, b"\x04\x01\x00", BadVersion, id="greeting-socks4"),
    pytest.param(parse_greeting, b"\x00", BadVersion, id="greeting-version-0-alone"),
    pytest.param(parse_greeting, b"GET / HTTP/1.1\r\n", BadVersion, id="greeting-http"),
    pytest.param(
        parse_auth_request,
        b"\x05"  # VER: 5 is the SOCKS version, not the sub-negotiation version
        b"\x01u\x01p",
        BadVersion,
        id="auth-version-5",
    ),
    pytest.param(parse_auth_request, b"\x02", BadVersion, id="auth-version-2-alone"),
    pytest.param(parse_request, _request(0x01, ADDR_IPV4).replace(b"\x05", b"\x04", 1),
                 BadVersion, id="request-version-4"),
    pytest.param(parse_request, b"\x01", BadVersion, id="request-version-1-alone"),
    # Unknown ATYP.
    *(
        pytest.param(
            parse_request,
            b"\x05"  # VER
            b"\x01"  # CMD: CONNECT
            b"\x00"  # RSV
            + bytes((atyp,))  # ATYP: unknown
            + b"\x00" * 18,
            UnsupportedAddressType,
            id=f"request-atyp-{atyp:#04x}",
        )
        for atyp in (0x00, 0x02, 0x05, 0xFF)
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x02",  # ATYP: unknown, and nothing after it yet
        UnsupportedAddressType,
        id="request-atyp-unknown-before-address",
    ),
    # Unknown CMD (only raised once the whole request is there).
    *(
        pytest.param(
            parse_request,
            _request(cmd, ADDR_IPV4),
            UnsupportedCommand,
            id=f"request-cmd-{cmd:#04x}",
        )
        for cmd in (0x00, 0x04, 0x80, 0xFF)
    ),
    # Bad domain names.
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x00"  # length: 0
        b"\x00\x50",  # DST.PORT
        MalformedMessage,
        id="request-domain-empty",
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x00",  # length: 0, known bad before the port arrives
        MalformedMessage,
        id="request-domain-empty-no-port-yet",
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x04"  # length: 4
        b"a\xffb\xfe"  # DST.ADDR: not UTF-8
        b"\x00\x50",  # DST.PORT
        MalformedMessage,
        id="request-domain-not-utf8",
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x02"  # length: 2
        b"\xc3\x28"  # DST.ADDR: invalid UTF-8 continuation
        b"\x00\x50",  # DST.PORT
        MalformedMessage,
        id="request-domain-bad-continuation",
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x0c"  # length: 12
        b"evil\x00.example"  # DST.ADDR: NUL inside
        b"\x00\x50",  # DST.PORT
        MalformedMessage,
        id="request-domain-nul",
    ),
    pytest.param(
        parse_request,
        b"\x05\x01\x00"  # VER, CMD, RSV
        b"\x03"  # ATYP: DOMAINNAME
        b"\x01"  # length: 1
        b"\x00"  # DST.ADDR: a lone NUL
        b"\x00\x50",  # DST.PORT
        MalformedMessage,
        id="request-domain-only-nul",
    ),
    # UDP headers.
    pytest.param(parse_udp_header, b"", MalformedMessage, id="udp-empty"),
    pytest.param(parse_udp_header, b"\x00\x00\x00", MalformedMessage, id="udp-3-bytes"),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x01"  # ATYP: IPv4
        b"\x08\x08\x08",  # DST.ADDR: truncated
        MalformedMessage,
        id="udp-short-ipv4",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x04"  # ATYP: IPv6
        + b"\x00" * 17,  # DST.ADDR + one byte of DST.PORT
        MalformedMessage,
        id="udp-short-ipv6",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x03"  # ATYP: DOMAINNAME
        b"\x0b"  # length: 11
        b"example",  # DST.ADDR: truncated
        MalformedMessage,
        id="udp-short-domain",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x01"  # RSV: nonzero (low byte)
        b"\x00"  # FRAG
        + ADDR_IPV4,
        MalformedMessage,
        id="udp-rsv-low-nonzero",
    ),
    pytest.param(
        parse_udp_header,
        b"\x80\x00"  # RSV: nonzero (high byte)
        b"\x00"  # FRAG
        + ADDR_IPV4,
        MalformedMessage,
        id="udp-rsv-high-nonzero",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x07"  # ATYP: unknown
        + b"\x00" * 8,
        UnsupportedAddressType,
        id="udp-atyp-unknown",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x03"  # ATYP: DOMAINNAME
        b"\x00"  # length: 0
        b"\x00\x35",  # DST.PORT
        MalformedMessage,
        id="udp-domain-empty",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x03"  # ATYP: DOMAINNAME
        b"\x01"  # length: 1
        b"\xff"  # DST.ADDR: not UTF-8
        b"\x00\x35",  # DST.PORT
        MalformedMessage,
        id="udp-domain-not-utf8",
    ),
    pytest.param(
        parse_udp_header,
        b"\x00\x00\x00"  # RSV, FRAG
        b"\x03"  # ATYP: DOMAINNAME
        b"\x03"  # length: 3
        b"a\x00b"  # DST.ADDR: NUL inside
        b"\x00\x35",  # DST.PORT
        MalformedMessage,
        id="udp-domain-nul",
    ),
]


@pytest.mark.parametrize(("parser", "data", "error"), MALFORMED)
def test_malformed_input_raises(parser: Parser, data: bytes, error: type[WireError]) -> None:
    with pytest.raises(error):
        parser(data)


@pytest.mark.parametrize(
    "error", [BadVersion, MalformedMessage, UnsupportedCommand, UnsupportedAddressType]
)
def test_every_error_is_a_wire_error(error: type[Exception]) -> None:
    assert issubclass(error, WireError)


def test_unknown_command_waits_for_the_whole_request() -> None:
    data = _request(0x09, ADDR_DOMAIN)
    for cut in range(len(data)):
        assert parse_request(data[:cut]) is None
    with pytest.raises(UnsupportedCommand):
        parse_request(data)


# --------------------------------------------------------------------------------------
# Incremental parsing: prefixes and pipelining
# --------------------------------------------------------------------------------------

STREAM_MESSAGES = (
    [pytest.param(parse_greeting, p.values[0], id=f"greeting-{p.id}") for p in GREETINGS]
    + [pytest.param(parse_auth_request, p.values[0], id=f"auth-{p.id}") for p in AUTH_REQUESTS]
    + [pytest.param(parse_request, p.values[0], id=f"request-{p.id}") for p in REQUESTS]
)


@pytest.mark.parametrize(("parser", "data"), STREAM_MESSAGES)
def test_every_strict_prefix_needs_more(parser: Parser, data: bytes) -> None:
    for cut in range(len(data)):
        assert parser(data[:cut]) is None, f"prefix of {cut} bytes"
        assert parser(bytearray(data[:cut])) is None, f"bytearray prefix of {cut} bytes"


@pytest.mark.parametrize(("parser", "data"), STREAM_MESSAGES)
def test_byte_at_a_time_arrival(parser: Parser, data: bytes) -> None:
    buffer = bytearray()
    result = None
    for byte in data:
        assert result is None, "parsed before the last byte arrived"
        buffer.append(byte)
        result = parser(buffer)
    assert result is not None
    assert result == parser(data)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"\x05", id="one-byte"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", id="http"),
        pytest.param(b"\x00" * 300, id="300-zero-bytes"),
    ],
)
@pytest.mark.parametrize(("parser", "data"), STREAM_MESSAGES)
def test_pipelined_bytes_are_not_consumed(parser: Parser, data: bytes, extra: bytes) -> None:
    alone = parser(data)
    assert alone is not None
    assert parser(data + extra) == alone
    assert alone[1] == len(data)


def test_pipelined_handshake_parses_message_by_message() -> None:
    stream = (
        b"\x05\x01\x02"  # greeting: VER, NMETHODS, USERNAME/PASSWORD
        b"\x01\x05alice\x06s3cret"  # auth: VER, ULEN, UNAME, PLEN, PASSWD
        + _request(Command.CONNECT, ADDR_DOMAIN)  # request
        + b"GET / HTTP/1.1\r\n\r\n"  # application data, already sent
    )
    greeting = parse_greeting(stream)
    assert greeting == (Greeting(frozenset({2})), 3)
    rest = stream[greeting[1] :]
    auth = parse_auth_request(rest)
    assert auth == (AuthRequest(b"alice", b"s3cret"), 14)
    rest = rest[auth[1] :]
    request = parse_request(rest)
    assert request == (Request(Command.CONNECT, AddressType.DOMAINNAME, "example.com", 8080), 18)
    assert rest[request[1] :] == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    ("parser", "data"),
    [
        pytest.param(parse_greeting, b"\x04\x01\x00", id="greeting"),
        pytest.param(parse_auth_request, b"\x05\x05alice\x06s3cret", id="auth"),
        pytest.param(parse_request, b"\x04" + _request(1, ADDR_IPV4)[1:], id="request"),
    ],
)
def test_prefix_showing_bad_version_raises(parser: Parser, data: bytes) -> None:
    assert parser(b"") is None
    for cut in range(1, len(data) + 1):
        with pytest.raises(BadVersion):
            parser(data[:cut])


@pytest.mark.parametrize(("datagram", "expected"), UDP_DATAGRAMS)
def test_udp_header_truncated_anywhere_raises(datagram: bytes, expected: UdpHeader) -> None:
    # A datagram arrives whole: a truncated header is malformed, never "need more".
    for cut in range(expected.length):
        with pytest.raises(MalformedMessage):
            parse_udp_header(datagram[:cut])


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------

STREAM_PARSERS = [
    pytest.param(parse_greeting, b"\x05", id="greeting"),
    pytest.param(parse_auth_request, b"\x01", id="auth"),
    pytest.param(parse_request, b"\x05", id="request"),
]

# Arbitrary bytes, plus arbitrary bytes behind the right version byte (or behind a valid
# request header) so that the fuzzing gets past the first check.
_ARBITRARY = st.binary(max_size=600)


def _fuzz(version: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _ARBITRARY,
        _ARBITRARY.map(lambda tail: version + tail),
        st.tuples(st.sampled_from([1, 2, 3, 0, 9]), st.sampled_from([1, 3, 4, 0, 2]),
                  _ARBITRARY).map(lambda t: version + bytes((t[0], 0, t[1])) + t[2]),
    )


@pytest.mark.parametrize(("parser", "version"), STREAM_PARSERS)
@given(data=st.data())
def test_stream_parsers_never_crash(parser: Parser, version: bytes, data: st.DataObject) -> None:
    raw = data.draw(_fuzz(version), label="raw")
    as_bytearray = data.draw(st.booleans(), label="as_bytearray")
    buffer: bytes | bytearray = bytearray(raw) if as_bytearray else raw
    try:
        result = parser(buffer)
    except WireError:
        return
    if result is None:
        return
    _message, consumed = result
    assert 0 < consumed <= len(raw)
    # The result depends only on the bytes it consumed.
    assert parser(raw[:consumed]) == result
    assert parser(raw + b"\x00\xff") == result


@given(raw=st.one_of(_ARBITRARY, _ARBITRARY.map(lambda tail: b"\x00\x00" + tail)))
def test_udp_parser_never_crashes(raw: bytes) -> None:
    try:
        header = parse_udp_header(raw)
    except WireError:
        return
    assert 0 < header.length <= len(raw)
    assert parse_udp_header(raw[: header.length]) == header


_LABEL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
    min_size=1,
    max_size=63,
)
_ASCII_DOMAINS = (
    st.lists(_LABEL, min_size=1, max_size=5).map(".".join).filter(lambda d: len(d) <= 255)
)
_PORTS = st.integers(min_value=0, max_value=65535)
_COMMANDS = st.sampled_from(list(Command))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _expected_address(host: str) -> tuple[AddressType, str]:
    """What a peer parses back after we encode `host`."""
    if not _is_ip(host):
        return AddressType.DOMAINNAME, host
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return AddressType.IPV4, str(ip.ipv4_mapped)
        return AddressType.IPV6, str(ip)
    return AddressType.IPV4, str(ip)


_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.exploded),  # non-canonical spelling
    _ASCII_DOMAINS.filter(lambda d: not _is_ip(d)),
)


@given(command=_COMMANDS, host=_HOSTS, port=_PORTS, extra=st.binary(max_size=32))
def test_request_round_trip(command: Command, host: str, port: int, extra: bytes) -> None:
    # ATYP, ADDR, PORT as this module encodes them (after RSV and FRAG of a UDP header).
    address = encode_udp_header(host, port)[3:]
    data = _request(command, address)
    atyp, expected_host = _expected_address(host)
    assert parse_request(data + extra) == (
        Request(command, atyp, expected_host, port),
        len(data),
    )


@given(reply=st.sampled_from([Reply.SUCCEEDED, Reply.GENERAL_FAILURE, Reply.CONNECTION_REFUSED]),
       host=_HOSTS, port=_PORTS)
def test_reply_round_trip(reply: Reply, host: str, port: int) -> None:
    # A reply has a request's layout with REP where CMD is; parse it as one to read it back.
    encoded = encode_reply(reply, host, port)
    assert encoded[:3] == bytes((5, reply, 0))
    atyp, expected_host = _expected_address(host)
    parsed = parse_request(b"\x05\x01\x00" + encoded[3:])
    assert parsed == (Request(Command.CONNECT, atyp, expected_host, port), len(encoded))


@given(host=_HOSTS, port=_PORTS, payload=st.binary(max_size=64))
def test_udp_header_round_trip(host: str, port: int, payload: bytes) -> None:
    header = encode_udp_header(host, port)
    atyp, expected_host = _expected_address(host)
    assert parse_udp_header(header + payload) == UdpHeader(
        0, atyp, expected_host, port, len(header)
    )


_UTF8_DOMAINS = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=100,
).filter(lambda d: len(d.encode()) <= 255)


@given(command=_COMMANDS, host=_UTF8_DOMAINS, port=_PORTS)
def test_utf8_domain_request_round_trip(command: Command, host: str, port: int) -> None:
    raw = host.encode()
    data = _request(
        command,
        b"\x03"  # ATYP: DOMAINNAME
        + bytes((len(raw),))  # length
        + raw  # DST.ADDR: UTF-8 as sent
        + port.to_bytes(2, "big"),  # DST.PORT
    )
    assert parse_request(data) == (Request(command, AddressType.DOMAINNAME, host, port), len(data))


@given(methods=st.lists(st.integers(0, 255), min_size=1, max_size=255))
def test_greeting_round_trip(methods: list[int]) -> None:
    data = b"\x05" + bytes((len(methods),)) + bytes(methods)
    assert parse_greeting(data) == (Greeting(frozenset(methods)), len(data))


@given(username=st.binary(min_size=1, max_size=255), password=st.binary(min_size=1, max_size=255))
def test_auth_request_round_trip(username: bytes, password: bytes) -> None:
    data = b"\x01" + bytes((len(username),)) + username + bytes((len(password),)) + password
    assert parse_auth_request(data) == (AuthRequest(username, password), len(data))


def test_non_ascii_domain_in_reply_is_sent_as_its_idna_a_label() -> None:
    # Encoding uses IDNA, so a UTF-8 name comes back as its A-label, equal after decoding.
    encoded = encode_reply(Reply.SUCCEEDED, "bücher.example", 80)
    parsed = parse_request(b"\x05\x01\x00" + encoded[3:])
    assert parsed is not None
    assert parsed[0].host == "xn--bcher-kva.example"
    assert parsed[0].host.encode("ascii").decode("idna") == "bücher.example"

