"""Method negotiation and RFC 1929 username/password against a real proxy process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from proxy_harness import (
    CONNECT,
    DEADLINE,
    HTTP_BODY,
    ProxyProcess,
    TcpServer,
    auth_request,
    greeting,
    is_closed_by_peer,
    socks_request,
    started_after,
)
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

USERS = {"alice": "correct horse", "bob": "battery staple"}


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy whose policy lists users: username/password required."""
    proc = ProxyProcess(tmp_path_factory.mktemp("auth-proxy"), {}, users=USERS).start()
    yield proc
    proc.stop()
    assert proc.returncode == 0
    assert not proc.problems(), "\n".join(proc.problems())


async def test_python_socks_with_credentials(
    auth_proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    since = time.time()
    client = Proxy.from_url(f"socks5://alice:correct%20horse@127.0.0.1:{auth_proxy.port}")
    sock = await client.connect("127.0.0.1", echo_server.port, timeout=DEADLINE)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"authenticated")
    assert await asyncio.wait_for(reader.readexactly(13), DEADLINE) == b"authenticated"
    local_port = writer.get_extra_info("sockname")[1]
    writer.close()
    await writer.wait_closed()
    event = await auth_proxy.event_for(local_port, since=since)
    assert event["user"] == "alice"
    assert event["status"] == "ok"
    assert event["reply_code"] == 0


async def test_curl_with_credentials(
    auth_proxy: ProxyProcess, http_server: tuple[str, int], curl: str
) -> None:
    since = time.time()
    done = await asyncio.to_thread(
        subprocess.run,
        [curl, "-sS", "--fail", "--max-time", "20", "--noproxy", "", "--output", "-",
         "--socks5-hostname", f"127.0.0.1:{auth_proxy.port}",
         "--proxy-user", "bob:battery staple", f"http://localhost:{http_server[1]}/data"],
        capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == HTTP_BODY
    await auth_proxy.wait_events(
        lambda e: e["user"] == "bob" and e["status"] == "ok" and started_after(e, since))


async def test_wrong_password_is_refused(auth_proxy: ProxyProcess) -> None:
    reader, writer = await auth_proxy.raw()
    writer.write(greeting(b"\x02"))
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x02"
    writer.write(auth_request("alice", "wrong password"))
    status = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
    assert status[0] == 0x01 and status[1] != 0x00, status
    assert await is_closed_by_peer(reader)
    port = writer.get_extra_info("sockname")[1]
    writer.close()
    event = await auth_proxy.event_for(port)
    assert event["status"] == "auth_failed"
    assert event["user"] == "alice"
    assert event["reply_code"] is None  # no SOCKS request was ever answered
    assert (event["bytes_in"], event["bytes_out"]) == (0, 0)
    assert event["dest_host"] is None


async def test_unknown_user_is_refused(auth_proxy: ProxyProcess) -> None:
    reader, writer = await auth_proxy.raw()
    # a pipelined attempt: the request behind the failed authentication must not be served
    writer.write(greeting(b"\x02") + auth_request("mallory", "correct horse")
                 + socks_request(CONNECT, "127.0.0.1", 9))
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x02"
    status = await asyncio.wait_for(reader.readexactly(2), DEADLINE)
    assert status[0] == 0x01 and status[1] != 0x00, status
    assert await is_closed_by_peer(reader)
    port = writer.get_extra_info("sockname")[1]
    writer.close()
    event = await auth_proxy.event_for(port)
    assert (event["status"], event["user"]) == ("auth_failed", "mallory")


async def test_no_acceptable_method_when_users_exist(auth_proxy: ProxyProcess) -> None:
    reader, writer = await auth_proxy.raw()
    writer.write(greeting(b"\x00"))  # no-auth only
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\xff"
    assert await is_closed_by_peer(reader)
    port = writer.get_extra_info("sockname")[1]
    writer.close()
    event = await auth_proxy.event_for(port)
    assert event["status"] == "auth_failed"
    assert event["user"] == ""


async def test_no_acceptable_method_without_users(proxy: ProxyProcess) -> None:
    reader, writer = await proxy.raw()
    writer.write(greeting(b"\x02\x01\x80"))  # username/password, GSSAPI, private: no no-auth
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\xff"
    assert await is_closed_by_peer(reader)
    writer.close()


@pytest.mark.parametrize("with_users", [False, True])
async def test_method_choice_among_several(
    proxy: ProxyProcess, auth_proxy: ProxyProcess, with_users: bool
) -> None:
    target, expected = (auth_proxy, b"\x05\x02") if with_users else (proxy, b"\x05\x00")
    reader, writer = await target.raw()
    writer.write(greeting(b"\x80\x02\x01\x00"))
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == expected
    writer.close()


@pytest.mark.parametrize("style", ["pipelined", "bytewise"])
async def test_auth_handshake_framing(
    auth_proxy: ProxyProcess, echo_server: TcpServer, style: str
) -> None:
    tunnel = await auth_proxy.open("127.0.0.1", echo_server.port,
                                   auth=("alice", USERS["alice"]), style=style, early=b"hi")
    assert await asyncio.wait_for(tunnel.reader.readexactly(2), DEADLINE) == b"hi"
    await tunnel.close()
    event = await auth_proxy.event_for(tunnel.local_port)
    assert (event["user"], event["status"], event["bytes_out"]) == ("alice", "ok", 2)


async def test_many_authenticated_connections(
    auth_proxy: ProxyProcess, echo_server: TcpServer
) -> None:
    """The verified credential is reused: 50 logins at once all succeed."""
    async def one(i: int) -> None:
        tunnel = await auth_proxy.open("127.0.0.1", echo_server.port,
                                       auth=("bob", USERS["bob"]))
        assert await tunnel.roundtrip(b"%d" % i) == b"%d" % i
        await tunnel.close()

    async with asyncio.timeout(30):
        await asyncio.gather(*(one(i) for i in range(50)))


async def test_sighup_reloads_users(
    proxy_factory: Callable[..., ProxyProcess], echo_server: TcpServer
) -> None:
    proxy = proxy_factory(users={"alice": "old"})
    tunnel = await proxy.open("127.0.0.1", echo_server.port, auth=("alice", "old"))
    await tunnel.close()

    proxy.write_policy({"carol": "new"})
    proxy.send_signal(signal.SIGHUP)
    await proxy.wait_log("policy applied")

    tunnel = await proxy.open("127.0.0.1", echo_server.port, auth=("carol", "new"))
    assert await tunnel.roundtrip(b"carol") == b"carol"
    await tunnel.close()
    client = Proxy.from_url(f"socks5://alice:old@127.0.0.1:{proxy.port}")
    with pytest.raises(ProxyError):
        await client.connect("127.0.0.1", echo_server.port, timeout=DEADLINE)
