"""RFC 1928 / RFC 1929 conformance, clause by clause, against a real proxy process.

What test_connect, test_bind, test_udp, test_auth and test_errors already check is not
repeated here; these are the clauses they left open (found by tests/proxy_node/rfc_probe.py,
the standalone probe). Raw sockets, byte-exact; loopback only.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from proxy_harness import (
    BIND,
    DEADLINE,
    ProxyProcess,
    Tunnel,
    is_closed_by_peer,
)


def _loopback_alias(ip: str) -> bool:
    """Whether this machine can use `ip` (in 127/8) as a source address."""
    try:
        with socket.socket() as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


needs_loopback_aliases = pytest.mark.skipif(
    not (_loopback_alias("127.0.0.2") and _loopback_alias("127.0.0.3")),
    reason="127.0.0.2 and 127.0.0.3 are not usable here",
)


async def _stranger_is_turned_away(control: Tunnel, source_ip: str) -> None:
    """A connection to the BIND port from `source_ip` is closed (had it been taken, it
    would stay open for relaying, and the next reply would name it)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port, local_addr=(source_ip, 0)),
        DEADLINE,
    )
    try:
        assert await is_closed_by_peer(reader)
    finally:
        writer.close()


async def _expected_host_is_taken(control: Tunnel, source_ip: str) -> None:
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(control.reply.host, control.reply.port, local_addr=(source_ip, 0)),
        DEADLINE,
    )
    second = await control.read_reply()
    assert (second.rep, second.host, second.port) == (
        0,
        source_ip,
        writer.get_extra_info("sockname")[1],
    )
    writer.close()


# -- BIND (RFC 1928 §4): DST.ADDR names the host expected to connect --------------------------


@needs_loopback_aliases
async def test_bind_to_an_ip_takes_only_that_host(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "127.0.0.2", 0)
    assert control.reply.rep == 0
    await _stranger_is_turned_away(control, "127.0.0.3")
    await _expected_host_is_taken(control, "127.0.0.2")
    await control.close()


@needs_loopback_aliases
async def test_bind_to_a_name_takes_only_the_hosts_it_resolves_to(
    proxy: ProxyProcess,
) -> None:
    """DST.ADDR as a domain is resolved; a host it does not name is turned away."""
    control = await proxy.request(BIND, "localhost", 0)
    assert (control.reply.rep, control.reply.host) == (0, "127.0.0.1")
    await _stranger_is_turned_away(control, "127.0.0.3")
    await _expected_host_is_taken(control, "127.0.0.1")
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["domain"], event["dest_ip"], event["status"]) == ("localhost", "127.0.0.1", "ok")


async def test_bind_to_an_unresolvable_name_is_host_unreachable(proxy: ProxyProcess) -> None:
    control = await proxy.request(BIND, "nothing.invalid", 0)
    assert control.reply.rep == 0x04
    assert await is_closed_by_peer(control.reader)
    await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["status"], event["reply_code"]) == ("dns_failed", 4)
