"""The fast `inet` codec against asyncpg's own, through a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from typing import Any

import asyncpg
import pytest

from socks5_analytics.storage.codecs import decode_inet, encode_inet, use_fast_inet

# (value written, what PostgreSQL stores as text)
WRITTEN: list[tuple[Any, str]] = [
    (IPv4Address("192.0.2.7").packed, "192.0.2.7/32"),
    (IPv6Address("2001:db8::7").packed, "2001:db8::7/128"),
    (IPv4Address("10.1.2.3"), "10.1.2.3/32"),
    (IPv6Address("::1"), "::1/128"),
    (IPv6Address("::ffff:10.0.0.1"), "::ffff:10.0.0.1/128"),
    ("198.51.100.255", "198.51.100.255/32"),
    ("fe80::1", "fe80::1/128"),
    ("10.1.2.3/8", "10.1.2.3/8"),
    (IPv4Interface("10.1.2.3/24"), "10.1.2.3/24"),
    (IPv6Interface("2001:db8::1/64"), "2001:db8::1/64"),
]


@pytest.fixture
async def both(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    fast = await asyncpg.connect(database_url)
    plain = await asyncpg.connect(database_url)
    await use_fast_inet(fast)
    try:
        yield fast, plain
    finally:
        await fast.close()
        await plain.close()


@pytest.mark.parametrize(("value", "stored"), WRITTEN)
async def test_writes_what_asyncpg_writes(
    both: tuple[asyncpg.Connection, asyncpg.Connection], value: Any, stored: str
) -> None:
    fast, plain = both
    # asyncpg's own encoder parses bytes and objects alike; text as the parameter too
    plain_value = ip_address(value) if isinstance(value, bytes) else value
    assert await fast.fetchval("SELECT $1::inet::text", value) == stored
    assert await plain.fetchval("SELECT $1::inet::text", plain_value) == stored


@pytest.mark.parametrize("text", [stored for _, stored in WRITTEN])
async def test_reads_what_asyncpg_reads(
    both: tuple[asyncpg.Connection, asyncpg.Connection], text: str
) -> None:
    fast, plain = both
    ours = await fast.fetchval("SELECT $1::text::inet", text)
    theirs = await plain.fetchval("SELECT $1::text::inet", text)
    assert ours == theirs and type(ours) is type(theirs)


async def test_copy_and_arrays(both: tuple[asyncpg.Connection, asyncpg.Connection]) -> None:
    fast, _ = both
    await fast.execute("CREATE TEMP TABLE t (a inet, b inet)")
    rows = [(IPv4Address("192.0.2.1").packed, None), (IPv6Address("::2").packed, "10.0.0.0/8")]
    await fast.copy_records_to_table("t", records=rows, columns=("a", "b"))
    assert await fast.fetch("SELECT a::text, b::text FROM t ORDER BY a") == [
        ("192.0.2.1/32", None), ("::2/128", "10.0.0.0/8")]
    addresses = [IPv4Address("192.0.2.1"), IPv6Address("::2")]
    assert await fast.fetchval("SELECT $1::inet[]", addresses) == addresses


@pytest.mark.parametrize("bad", [b"\x01\x02\x03", b"", "not an address", "10.0.0.1/33", 3.5])
def test_bad_values_are_refused(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        encode_inet(bad)


@pytest.mark.parametrize("bad", [
    bytes((2, 32, 0, 16)) + bytes(16),  # IPv4 with 16 address bytes
    bytes((4, 32, 0, 4)) + bytes(4),  # no such family
    bytes((2, 33, 0, 4)) + bytes(4),  # prefix longer than the address
    bytes((3, 128, 0, 16)) + bytes(15),  # truncated
])
def test_bad_binary_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_inet(bad)
