"""Many concurrent logins from one address with the right password, before any of them was
verified (a cold cache), are not mistaken for brute force; wrong guesses still are."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy_harness import ProxyProcess, TcpServer


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_burst_of_right_passwords_is_not_throttled(
    proxy_factory: Callable[..., ProxyProcess], tcp_server: Any
) -> None:
    proxy = proxy_factory({}, users={"alice": "right"})
    proxy.write_policy({"alice": "right"}, limits={"auth_failures_per_minute_per_ip": 3})
    proxy.send_signal(1)
    await proxy.wait_log("policy applied")
    server: TcpServer = await tcp_server(_echo)

    async def login() -> int:
        tunnel = await proxy.request(1, server.host, server.port, auth=("alice", "right"))
        rep = tunnel.reply.rep
        await tunnel.close()
        return rep

    replies = await asyncio.gather(*(login() for _ in range(30)))
    assert replies == [0] * 30
    assert proxy.has_log("authentication throttled: too many failures") is None

