"""A user's max_bytes_per_second caps their transfers, in each direction, across connections.

A rate cap is a statement about time, so these tests check elapsed time, but only as a lower
bound (the cap must hold); a slow machine can never make them fail.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from proxy_harness import ProxyProcess, TcpServer

RATE = 400_000  # bytes per second
SIZE = 1_000_000


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    received = 0
    while chunk := await reader.read(65536):
        received += len(chunk)
    writer.write(str(received).encode())
    await writer.drain()
    writer.close()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"d" * SIZE)
    await writer.drain()
    writer.close()


def _capped_proxy(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    proxy = proxy_factory({}, users={"alice": "pw", "bob": "pw"})
    proxy.write_policy({"alice": "pw", "bob": "pw"})
    import yaml

    doc: dict[str, Any] = yaml.safe_load(proxy.policy_path.read_text())  # type: ignore[union-attr]
    for user in doc["users"]:
        if user["username"] == "alice":
            user["max_bytes_per_second"] = RATE
    scratch = proxy.workdir / "policy.tmp"
    scratch.write_text(yaml.safe_dump(doc))
    os.replace(scratch, proxy.policy_path)  # type: ignore[arg-type]
    proxy.send_signal(1)  # SIGHUP: apply now
    return proxy


async def _upload(proxy: ProxyProcess, server: TcpServer, user: str) -> float:
    started = time.monotonic()
    tunnel = await proxy.open(server.host, server.port, auth=(user, "pw"))
    tunnel.writer.write(b"u" * SIZE)
    await tunnel.writer.drain()
    tunnel.writer.write_eof()
    answer = await asyncio.wait_for(tunnel.reader.read(), 30)
    await tunnel.close()
    assert int(answer) == SIZE
    return time.monotonic() - started


async def test_upload_is_capped_for_the_capped_user_only(
    proxy_factory: Callable[..., ProxyProcess], tcp_server: Any
) -> None:
    proxy = _capped_proxy(proxy_factory)
    await proxy.wait_log("policy applied")
    server = await tcp_server(_sink)
    capped = await _upload(proxy, server, "alice")
    # A burst of one second's worth, then RATE bytes per second.
    assert capped >= (SIZE - RATE) / RATE * 0.9
    uncapped = await _upload(proxy, server, "bob")
    assert uncapped < capped


async def test_download_is_capped(
    proxy_factory: Callable[..., ProxyProcess], tcp_server: Any
) -> None:
    proxy = _capped_proxy(proxy_factory)
    await proxy.wait_log("policy applied")
    server = await tcp_server(_source)
    started = time.monotonic()
    tunnel = await proxy.open(server.host, server.port, auth=("alice", "pw"))
    data = await asyncio.wait_for(tunnel.reader.read(), 30)
    await tunnel.close()
    assert len(data) == SIZE
    assert time.monotonic() - started >= (SIZE - RATE) / RATE * 0.9
    event = await proxy.event_for(tunnel.local_port)
    assert event["bytes_in"] == SIZE and event["user"] == "alice"
