"""The request's address as the event records it (`destination`, `plain_ip`): pure, table-driven."""

from __future__ import annotations

import pytest

from proxy_node.errors import ResolutionFailed
from proxy_node.request import Destination, destination, plain_ip
from proxy_node.wire import AddressType, Command, Request

V4, NAME, V6 = AddressType.IPV4, AddressType.DOMAINNAME, AddressType.IPV6


@pytest.mark.parametrize(("address", "expected"), [
    ("192.0.2.1", "192.0.2.1"),
    ("2001:db8::1", "2001:db8::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),  # the kernel's spelling
    ("::ffff:c000:201", "192.0.2.1"),  # Python's spelling of the same address
    ("::ffff:0:c000:201", "::ffff:0:c000:201"),  # IPv4-translated, not mapped
    ("::1", "::1"),
])
def test_plain_ip(address: str, expected: str) -> None:
    assert plain_ip(address) == expected


@pytest.mark.parametrize(("atyp", "host", "expected"), [
    (V4, "192.0.2.1", Destination("192.0.2.1", 443, False)),
    (V6, "::ffff:c000:201", Destination("192.0.2.1", 443, False)),
    (V6, "2001:db8::1", Destination("2001:db8::1", 443, False)),
    (NAME, "Example.COM.", Destination("example.com", 443, True)),
    (NAME, "bücher.example", Destination("xn--bcher-kva.example", 443, True)),
    (NAME, "192.0.2.1", Destination("192.0.2.1", 443, False)),
    (NAME, "2001:DB8::0:1", Destination("2001:db8::1", 443, False)),
    (NAME, "::FFFF:192.0.2.1", Destination("192.0.2.1", 443, False)),
])
def test_destination(atyp: AddressType, host: str, expected: Destination) -> None:
    assert destination(Request(Command.CONNECT, atyp, host, 443)) == expected


@pytest.mark.parametrize("host", [
    "::1%lo",  # a scoped literal names an interface of the proxy's own host
    "fe80::1%1",
    ".",
    "a" * 254,
])
def test_unusable_names(host: str) -> None:
    with pytest.raises(ResolutionFailed):
        destination(Request(Command.CONNECT, NAME, host, 443))
