"""The policy Secret watch against kmock's Kubernetes API emulator.

The watch feeds the real PolicyWatcher (parse, refuse, one current version) whose `apply`
records what it was given; the last test runs a real proxy process pointed at the emulator.
Nothing sleeps to wait: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from proxy_harness import ProxyProcess, poll

from proxy_node.reload import PolicyWatcher
from proxy_node.secret_watch import SecretWatch
from socks5_analytics.config import PolicySecretSettings
from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import Policy, parse_policy

NS = "proxies"
NAME = "socks5-analytics-policy"
KEY = "policy.yaml"
TOKEN = "service-account-token-0123456789"


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def policy_text(*cidrs: str) -> str:
    return yaml.safe_dump({"whitelist": list(cidrs), "destinations": {"block_private": False}})


def secret_body(text: str, name: str = NAME, key: str = KEY) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NS},
            "data": {key: base64.b64encode(text.encode()).decode()}}


class Log:
    """A structlog-like logger that records (level, message, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(message: str, **fields: Any) -> None:
            self.records.append((level, message, fields))
        return record

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lv, m, _ in self.records if level is None or lv == level]


@pytest.fixture
def cluster(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    kmock.resources["v1/secrets"] = kmock.ResourceInfo(
        kind="Secret", namespaced=True,
        verbs={"list", "watch", "get", "patch", "create", "update", "delete"})
    return kmock


@pytest.fixture
async def kube(cluster: kmock.KubernetesEmulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(cluster.url)) as session:
        yield session


async def put_secret(kube: aiohttp.ClientSession, text: str, **kw: Any) -> None:
    """Create the Secret, or replace its data (a merge patch, as the operator's writes)."""
    body = secret_body(text, **kw)
    path = f"/api/v1/namespaces/{NS}/secrets"
    async with kube.get(f"{path}/{body['metadata']['name']}") as resp:
        exists = resp.status == 200
    if exists:
        async with kube.patch(f"{path}/{body['metadata']['name']}", json={"data": body["data"]},
                              headers={"Content-Type": "application/merge-patch+json"}) as resp:
            assert resp.status < 300, await resp.text()
    else:
        async with kube.post(path, json=body) as resp:
            assert resp.status < 300, await resp.text()


class Rig:
    """A PolicyWatcher (no file) fed by a SecretWatch; `applied` records every policy."""

    def __init__(self, server: str, tmp_path: Path, *, initial: str = "{}\n") -> None:
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        self.applied: list[Policy] = []
        self.log = Log()
        self.policy = PolicyWatcher(None, current=parse_policy(initial, source="initial"),
                                    interval=3600, apply=self.applied.append, log=self.log)
        settings = PolicySecretSettings(enabled=True, namespace=NS, name=NAME, key=KEY,
                                        api_server=server, token_file=token,
                                        ca_file=tmp_path / "no-ca.crt")
        self.watch = SecretWatch(settings, offer=self.policy.offer, log=self.log,
                                 backoff_initial=0.02, backoff_max=0.1)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.watch.run())

    def versions(self) -> list[str]:
        return [p.version for p in self.applied]

    async def applied_version(self, version: str, timeout: float = 5.0) -> float:
        """Wait until `version` was applied; the seconds it took."""
        started = time.monotonic()
        await poll(lambda: version in self.versions(), timeout=timeout,
                   what=f"policy {version} applied (applied: {self.versions()})")
        return time.monotonic() - started


@pytest.fixture
async def rig(cluster: kmock.KubernetesEmulator, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig, not yet running: tests arrange the emulator, then `rig.start()`."""
    made = Rig(str(cluster.url).rstrip("/"), tmp_path)
    yield made
    if made.task is not None:
        made.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await made.task
    assert not [r for r in made.log.records if "unexpected" in str(r[2].get("error"))]


async def test_the_initial_list_applies_the_policy(
        cluster: kmock.KubernetesEmulator, kube: aiohttp.ClientSession, rig: Rig) -> None:
    text = policy_text("10.0.0.0/8")
    await put_secret(kube, text)
    rig.start()
    await rig.applied_version(version_of(text))
    assert [p.whitelist for p in rig.applied] == [["10.0.0.0/8"]]
    assert rig.policy.version == version_of(text)
    await poll(lambda: [r for r in list(cluster) if r.params.get("watch") == "true"],
               what="the watch request")
    # Every request the watcher made carried the service account's token; the test's own
    # requests (creating the Secret) carried none.
    ours = [r for r in list(cluster) if r.headers.get("Authorization") == f"Bearer {TOKEN}"]
    [listed, watched] = ours[:2]
    assert (listed.method, listed.url.path) == ("GET", f"/api/v1/namespaces/{NS}/secrets/{NAME}")
    assert watched.url.path == f"/api/v1/namespaces/{NS}/secrets"
    assert watched.params["watch"] == "true"
    assert watched.params["fieldSelector"] == f"metadata.name={NAME}"
    assert "watching the policy Secret" in rig.log.messages("info")


async def test_a_modified_secret_applies_well_under_a_second(
        kube: aiohttp.ClientSession, rig: Rig) -> None:
    first = policy_text("10.0.0.0/8")
    await put_secret(kube, first)
    rig.start()
    await rig.applied_version(version_of(first))
    # The emulator replays the Secret as ADDED when a watch starts: then the watch is open.
    await poll(lambda: rig.watch.watched >= 1, what="the watch to be open")
    lists = rig.watch.lists
    for cidr in ("10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"):
        text = policy_text(cidr)
        await put_secret(kube, text)
        took = await rig.applied_version(version_of(text), timeout=2.0)
        assert took < 0.5, f"took {took:.3f} s"
    assert rig.watch.lists == lists  # the watch carried them, not re-lists
    assert [p.whitelist[0] for p in rig.applied] == [
        "10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]


async def test_a_bad_policy_in_the_secret_is_refused_and_the_old_stays(
        kube: aiohttp.ClientSession, rig: Rig) -> None:
    good = policy_text("10.0.0.0/8")
    await put_secret(kube, good)
    rig.start()
    await rig.applied_version(version_of(good))
    await put_secret(kube, policy_text("10.0.0.0/33"))
    await poll(lambda: "policy refused; keeping the policy in force"
               in rig.log.messages("error"), what="the refusal")
    [(_, _, fields)] = [r for r in rig.log.records if r[0] == "error"]
    assert "10.0.0.0/33" in fields["error"] and fields["policy_version"] == version_of(good)
    assert f"Secret {NS}/{NAME}" in fields["source"]
    await put_secret(kube, "")  # empty: refused too (it would switch authentication off)
    await poll(lambda: len(rig.log.messages("error")) == 2, what="the second refusal")
    assert "empty" in rig.log.records[-1][2]["error"]
    assert rig.versions() == [version_of(good)] and rig.policy.version == version_of(good)
    fixed = policy_text("10.0.0.0/9")
    await put_secret(kube, fixed)
    await rig.applied_version(version_of(fixed))


async def test_another_secret_in_the_namespace_is_ignored(
        kube: aiohttp.ClientSession, rig: Rig) -> None:
    good = policy_text("10.0.0.0/8")
    await put_secret(kube, good)
    rig.start()
    await rig.applied_version(version_of(good))
    await put_secret(kube, policy_text("10.9.0.0/16"), name="unrelated")
    marker = policy_text("10.0.0.0/10")
    await put_secret(kube, marker)  # events arrive in order: after this, the other was seen
    await rig.applied_version(version_of(marker))
    assert [p.whitelist[0] for p in rig.applied] == ["10.0.0.0/8", "10.0.0.0/10"]


@pytest.mark.parametrize("how", ["http-410", "error-event-410", "disconnect"])
async def test_gone_or_a_dropped_watch_lists_again(
        cluster: kmock.KubernetesEmulator, kube: aiohttp.ClientSession, rig: Rig,
        how: str) -> None:
    broken = {"on": True}

    def is_watch(request: Any) -> bool:
        return bool(broken["on"]) and request.params.get("watch") == "true"

    gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
            "reason": "Expired", "message": "too old resource version: 1 (2)"}
    if how == "http-410":
        cluster[is_watch] << 410 << gone
    elif how == "error-event-410":
        cluster[is_watch] << {"type": "ERROR", "object": gone}
    else:
        cluster[is_watch] << b""  # the stream ends at once: a dropped connection
    first = policy_text("10.0.0.0/8")
    await put_secret(kube, first)
    rig.start()
    await rig.applied_version(version_of(first))
    await poll(lambda: rig.watch.lists >= 3, what="re-lists after the broken watches")
    # Every watch breaks at once: only a re-list can carry this change.
    second = policy_text("10.1.0.0/16")
    await put_secret(kube, second)
    await rig.applied_version(version_of(second))
    if how == "disconnect":
        assert not rig.log.messages("warning")  # a stream that ends is no failure
    else:
        assert "policy Secret watch expired (410 Gone); listing again" in rig.log.messages()
    # The server heals: a watch stays open and carries the next change.
    assert rig.watch.watched == 0  # no broken watch delivered the Secret
    broken["on"] = False
    await poll(lambda: rig.watch.watched >= 1, what="a working watch (its replayed ADDED)")
    third = policy_text("10.2.0.0/16")
    await put_secret(kube, third)
    await rig.applied_version(version_of(third))
    assert rig.versions() == [version_of(t) for t in (first, second, third)]


async def test_an_unreachable_api_server_is_logged_once_and_retried(tmp_path: Path) -> None:
    with socket_closed_port() as port:
        made = Rig(f"http://127.0.0.1:{port}", tmp_path)
        made.start()
        try:
            await poll(lambda: made.watch.failures >= 4, what="several failed attempts")
        finally:
            assert made.task is not None
            made.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await made.task
    warnings = made.log.messages("warning")
    assert warnings == ["policy Secret watch failed; the policy file still applies, retrying"]
    assert made.applied == []


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listening, so nobody takes it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def test_the_api_server_and_namespace_come_from_the_pod(tmp_path: Path) -> None:
    namespace = tmp_path / "namespace"
    namespace.write_text("tenant-a\n")
    watch = SecretWatch(PolicySecretSettings(enabled=True), offer=lambda *_: None, log=Log(),
                        environ={"KUBERNETES_SERVICE_HOST": "fd00::1",
                                 "KUBERNETES_SERVICE_PORT": "6443"},
                        namespace_file=namespace)
    assert watch.api_server() == "https://[fd00::1]:6443"
    assert watch.namespace() == "tenant-a"
    assert watch.settings.name == "socks5-analytics-policy" and watch.settings.key == KEY


# -- end to end: a proxy process whose Secret changes ---------------------------------------

async def test_a_proxy_applies_the_secret_and_revokes_sessions(
        cluster: kmock.KubernetesEmulator, kube: aiohttp.ClientSession, tmp_path: Path,
        echo_server: Any) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    first = policy_text()  # no users: no authentication
    await put_secret(kube, first)
    proxy = ProxyProcess(tmp_path / "proxy", {"proxy": {
        "policy_poll_interval": 3600,  # the file never reloads here: only the watch can
        "policy_secret": {"enabled": True, "namespace": NS, "name": NAME, "key": KEY,
                          "api_server": str(cluster.url).rstrip("/"),
                          "token_file": str(token)}}})
    try:
        proxy.start()
        await proxy.wait_log("watching the policy Secret")
        await wait_logged(proxy, "policy applied", policy_version=version_of(first))
        tunnel = await proxy.open("127.0.0.1", echo_server.port)
        assert await tunnel.roundtrip(b"ping") == b"ping"
        with_user = yaml.safe_dump({
            "users": [{"username": "alice", "password_hash": hash_password("pw", n=2**4)}],
            "destinations": {"block_private": False}})
        started = time.monotonic()
        await put_secret(kube, with_user)
        applied = await wait_logged(proxy, "policy applied", policy_version=version_of(with_user))
        assert time.monotonic() - started < 1.0
        assert applied["users"] == 1 and applied["revoked_sessions"] == 1
        assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""  # closed by the proxy
        await tunnel.close()
    finally:
        proxy.close_clients()
        proxy.stop()
    assert not proxy.problems(), proxy.problems()


async def wait_logged(proxy: ProxyProcess, message: str, **fields: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for record in list(proxy.logs):
            if record.get("message") == message and all(
                    record.get(k) == v for k, v in fields.items()):
                return record
        return None

    result: dict[str, Any] = await poll(found, what=f"log {message!r} with {fields}")
    return result
