"""RFC 1928 / RFC 1929 conformance, clause by clause, against a real proxy process.

What test_connect, test_bind, test_udp, test_auth and test_errors already check is not
repeated here; these are the clauses they left open (found by tests/proxy_node/rfc_probe.py,
the standalone probe). Raw sockets, byte-exact; loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from proxy_harness import (
    BIND,
    CONNECT,
    DEADLINE,
    UDP_ASSOCIATE,
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


# -- RFC 1928 §6: every failure is answered, even one of the proxy's own -----------------------


@contextlib.contextmanager
def _one_free_descriptor(pid: int) -> Iterator[None]:
    """Lower the process's descriptor limit so that exactly one descriptor number is left
    (the next accept takes it, and the request's own socket then fails with EMFILE)."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    free = next(n for n in range(len(used) + 1) if n not in used)
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (free + 1, free + 1))
    except (PermissionError, ValueError) as exc:
        pytest.skip(f"cannot lower the proxy's descriptor limit: {exc}")
    try:
        yield
    finally:
        with contextlib.suppress(PermissionError, ValueError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


@pytest.mark.parametrize(
    ("cmd", "host"),
    [(CONNECT, "127.0.0.1"), (BIND, "0.0.0.0"), (UDP_ASSOCIATE, "0.0.0.0")],
    ids=["connect", "bind", "udp-associate"],
)
async def test_out_of_descriptors_is_a_general_failure_reply(
    proxy_factory: Callable[..., ProxyProcess], cmd: int, host: str
) -> None:
    """A socket the proxy cannot open for the request (EMFILE) is REP 0x01, then a close;
    not a silent close with a traceback in the log."""
    proxy = proxy_factory()
    proxy.allow_errors = True  # the accept loop's own EMFILE is logged as an error
    with _one_free_descriptor(proxy.pid):
        control = await proxy.request(cmd, host, 9)
        assert control.reply.rep == 0x01
        assert await is_closed_by_peer(control.reader)
        await control.close()
    event = await proxy.event_for(control.local_port)
    assert (event["status"], event["reply_code"], event["close_reason"]) == ("error", 1, "error")
    assert not [line for line in proxy.problems() if "accept failed" not in line]


# -- a Chromium-style client: greeting offering only 0x00, the name sent as ATYP 0x03 ----------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps)")
async def test_chromium_fetches_a_page_through_the_proxy(
    tmp_path: Path, http_server: tuple[str, int]
) -> None:
    """Chromium's SOCKS5 client (no-auth only, domain ATYP, reads the reply header in two
    parts) loads a plain-HTTP page: no HTTP CONNECT, the bytes go straight through."""
    proxy = ProxyProcess(tmp_path / "proxy", {})
    # Only localhost may be reached, so Chromium's own background requests (if any get
    # through the flags below) are refused by name before any DNS query.
    proxy.write_policy(
        {},
        destinations={
            "block_private": False,
            "rules": [{"action": "allow", "domains": ["localhost"]}, {"action": "deny"}],
        },
    )
    proxy.start()
    _, port = http_server
    assert CHROMIUM is not None
    try:
        with tempfile.TemporaryDirectory(prefix="s5a-chromium-") as profile:
            command = [
                CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                f"--user-data-dir={profile}",
                f"--proxy-server=socks5://127.0.0.1:{proxy.port}",
                "--proxy-bypass-list=<-loopback>",  # loopback goes through the proxy too
                "--dump-dom", f"http://localhost:{port}/page",
            ]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, timeout=120, check=False
            )
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        assert b"Error code: 404" in done.stdout, done.stdout[-500:]  # HttpHandler's answer
        events = await proxy.wait_events(lambda e: e["domain"] == "localhost")
        assert all(e["command"] == "connect" for e in events)
        served = [e for e in events if e["status"] == "ok" and e["bytes_in"] > 0]
        assert served, events
        assert (served[0]["dest_port"], served[0]["reply_code"]) == (port, 0)
    finally:
        proxy.stop()
    assert not proxy.problems(), proxy.problems()
