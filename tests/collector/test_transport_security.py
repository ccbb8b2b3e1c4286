"""Proxy → collector transport security: the shared token, TLS and mTLS, end to end.

A real collector (in-process, real PostgreSQL) and the proxy's real exporter; certificates
are made by `openssl` for each test session: one CA that signs the collector and a good
client, and a second CA that signs a client the collector must refuse.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.main import check_tls_files
from proxy_node.events import ConnectionEvent, ConnectionRecord
from proxy_node.exporter import GrpcExporter, NodeIdentity
from socks5_analytics.config import ConfigError, EventSinkSettings, TlsServerSettings
from socks5_analytics.logs import get_logger

TOKEN = "a-shared-secret-of-some-length"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, ca: str, name: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=cwd)
    extra: list[str] = []
    if san is not None:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extra, cwd=cwd)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (signs collector + client), rogue-ca (signs rogue)."""
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-subj", f"/CN={ca}", "-days", "2", "-out", f"{ca}.crt", cwd=folder)
    _issue(folder, "ca", "collector", san="IP:127.0.0.1,DNS:localhost")
    _issue(folder, "ca", "client")
    _issue(folder, "rogue-ca", "rogue")
    return folder


def _event(index: int) -> ConnectionEvent:
    record = ConnectionRecord("192.0.2.9", 50000 + index, time.monotonic())
    record.status, record.reply_code = "ok", 0
    record.dest_host = record.dest_ip = "198.51.100.2"
    record.dest_port = 443
    return record.finish(node_id="secure-node", now_mono=time.monotonic())


def _exporter(tmp_path: Path, port: int, **events: Any) -> GrpcExporter:
    settings = EventSinkSettings(
        sink="grpc", collectors=[("127.0.0.1", port)], spool_dir=tmp_path / "spool",
        flush_interval=0.02, backoff_initial=0.05, backoff_max=0.2, drain_timeout=0.5,
        **events,
    )
    identity = NodeIdentity("secure-node", "0.1.0", b"\x02" * 16, datetime.now(UTC))
    return GrpcExporter(settings, identity=identity, status=lambda: (0, "p"),
                        log=get_logger("test"))


async def _rows(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval(
            "SELECT count(*) FROM traffic_logs WHERE node_id = 'secure-node'"))
    finally:
        await connection.close()


async def _deliver(exporter: GrpcExporter, count: int, url: str, *, expect: bool) -> None:
    await exporter.start()
    for i in range(count):
        exporter.emit(_event(i))
    try:
        if expect:
            deadline = time.monotonic() + 20
            while await _rows(url) < count:
                assert time.monotonic() < deadline, "events not delivered"
                await asyncio.sleep(0.05)
        else:
            # Several reconnect attempts' worth; none may get through.
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert not exporter.connected or exporter.delivered == 0
                await asyncio.sleep(0.05)
            assert await _rows(url) == 0
            assert exporter.delivered == 0
    finally:
        await exporter.close()


async def test_token_required(start_collector: Callable[..., Any], database_url: str,
                              tmp_path: Path) -> None:
    server = await start_collector(token=TOKEN)
    port = server.address[1]
    await _deliver(_exporter(tmp_path / "a", port), 5, database_url, expect=False)
    await _deliver(_exporter(tmp_path / "b", port, token="wrong-secret-of-some-length"),
                   5, database_url, expect=False)
    await _deliver(_exporter(tmp_path / "c", port, token=TOKEN), 5, database_url, expect=True)


async def test_mutual_tls(start_collector: Callable[..., Any], database_url: str,
                          tmp_path: Path, pki: Path) -> None:
    server = await start_collector(tls={
        "enabled": True, "cert_file": str(pki / "collector.crt"),
        "key_file": str(pki / "collector.key"), "client_ca_file": str(pki / "ca.crt"),
    })
    port = server.address[1]
    trust = {"enabled": True, "ca_file": pki / "ca.crt"}
    # No client certificate, then one from another CA: both refused.
    await _deliver(_exporter(tmp_path / "a", port, tls=trust), 3, database_url, expect=False)
    rogue = {**trust, "cert_file": pki / "rogue.crt", "key_file": pki / "rogue.key"}
    await _deliver(_exporter(tmp_path / "b", port, tls=rogue), 3, database_url, expect=False)
    # Plaintext to a TLS port: refused too.
    await _deliver(_exporter(tmp_path / "c", port), 3, database_url, expect=False)
    good = {**trust, "cert_file": pki / "client.crt", "key_file": pki / "client.key"}
    await _deliver(_exporter(tmp_path / "d", port, tls=good), 3, database_url, expect=True)


@pytest.mark.parametrize(("files", "message"), [
    ({"cert_file": "missing.crt", "key_file": "collector.key"},
     r"collector\.tls\.cert_file: cannot read .*missing\.crt: No such file"),
    ({"cert_file": "junk.pem", "key_file": "junk.pem"},
     r"collector\.tls\.cert_file, collector\.tls\.key_file: not a PEM certificate"),
    ({"cert_file": "collector.crt", "key_file": "client.key"},
     r"not a PEM certificate and its private key"),  # a key of another certificate
    ({"cert_file": "collector.crt", "key_file": "collector.key", "client_ca_file": "junk.pem"},
     r"collector\.tls\.client_ca_file: not a PEM bundle"),
])
def test_unusable_tls_files_name_the_key(pki: Path, files: dict[str, str],
                                         message: str) -> None:
    (pki / "junk.pem").write_text("junk\n")
    tls = TlsServerSettings(enabled=True, **{key: pki / name for key, name in files.items()})
    with pytest.raises(ConfigError, match=message):
        check_tls_files(tls)


def test_usable_tls_files_pass(pki: Path) -> None:
    check_tls_files(TlsServerSettings(enabled=True, cert_file=pki / "collector.crt",
                                      key_file=pki / "collector.key",
                                      client_ca_file=pki / "ca.crt"))
