"""The operator run by kopf against kmock's Kubernetes API emulator, on loopback.

`cluster` is the emulator with the two CRDs' resources, Secrets and namespaces declared;
`operator` runs `socks5_operator.main.serve` (kopf and the reconciler) logged in to it.
Tests change objects over HTTP, as kubectl would, and wait for the reconciler's renders
(a condition, never a sleep).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock
import kopf
import pytest

from socks5_operator.main import serve
from socks5_operator.reconcile import NodesSource, Reconciler, ReconcilerOptions

NS = "proxies"
GROUP_VERSION = "socks5.analytics.io/v1alpha1"
SECRET = "socks5-analytics-policy"
PLURAL = {"ProxyUser": "proxyusers", "IPWhitelist": "ipwhitelists"}


@pytest.fixture
def cluster(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    """The emulator with every resource the operator lists and watches."""
    verbs = {"list", "watch", "get", "patch", "create", "update", "delete"}
    info = kmock.ResourceInfo
    kmock.resources[f"{GROUP_VERSION}/proxyusers"] = info(
        kind="ProxyUser", namespaced=True, subresources={"status"}, verbs=verbs)
    kmock.resources[f"{GROUP_VERSION}/ipwhitelists"] = info(
        kind="IPWhitelist", namespaced=True, subresources={"status"}, verbs=verbs)
    kmock.resources["v1/secrets"] = info(kind="Secret", namespaced=True, verbs=verbs)
    # kopf looks these up at start even with scanning off.
    kmock.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=verbs)
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)
    return kmock


@dataclass
class Kube:
    """kubectl in a few lines: create, patch, delete, get over the emulator's HTTP API."""

    session: aiohttp.ClientSession

    @staticmethod
    def _collection(kind: str, namespace: str) -> str:
        if kind == "Secret":
            return f"/api/v1/namespaces/{namespace}/secrets"
        return f"/apis/{GROUP_VERSION}/namespaces/{namespace}/{PLURAL[kind]}"

    async def create(self, body: Mapping[str, Any]) -> None:
        namespace = body["metadata"].get("namespace", NS)
        body = {**body, "metadata": {"namespace": namespace, **body["metadata"]}}
        async with self.session.post(self._collection(body["kind"], namespace),
                                     json=body) as resp:
            assert resp.status < 300, await resp.text()

    async def patch(self, kind: str, name: str, patch: Mapping[str, Any],
                    namespace: str = NS) -> None:
        async with self.session.patch(f"{self._collection(kind, namespace)}/{name}", json=patch,
                                      headers={"Content-Type": "application/merge-patch+json"}
                                      ) as resp:
            assert resp.status < 300, await resp.text()

    async def delete(self, kind: str, name: str, namespace: str = NS) -> None:
        async with self.session.delete(f"{self._collection(kind, namespace)}/{name}") as resp:
            assert resp.status < 300, await resp.text()

    async def get(self, kind: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        async with self.session.get(f"{self._collection(kind, namespace)}/{name}") as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]

    async def policy_text(self) -> str | None:
        secret = await self.get("Secret", SECRET)
        if secret is None:
            return None
        return base64.b64decode(secret["data"]["policy.yaml"]).decode()

    async def ready(self, kind: str, name: str) -> tuple[str, str] | None:
        """(Ready status, reason) of a resource, None before the operator wrote one."""
        body = await self.get(kind, name)
        for condition in ((body or {}).get("status") or {}).get("conditions") or []:
            if condition["type"] == "Ready":
                return condition["status"], condition["reason"]
        return None


def secret(name: str, **data: str) -> dict[str, Any]:
    """A Secret manifest with `data` base64-encoded."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def user(name: str, username: str, secret_name: str, key: str = "password",
         **spec: Any) -> dict[str, Any]:
    """A ProxyUser manifest."""
    return {"apiVersion": GROUP_VERSION, "kind": "ProxyUser",
            "metadata": {"name": name, "creationTimestamp": f"2026-01-01T00:00:{len(name):02d}Z"},
            "spec": {"username": username,
                     "passwordSecretRef": {"name": secret_name, "key": key}, **spec}}


def whitelist(name: str, *cidrs: str) -> dict[str, Any]:
    """An IPWhitelist manifest."""
    return {"apiVersion": GROUP_VERSION, "kind": "IPWhitelist", "metadata": {"name": name},
            "spec": {"cidrs": list(cidrs)}}


@dataclass
class Operator:
    """A running operator and what the tests use to drive and observe it."""

    reconciler: Reconciler
    kube: Kube
    rendered: asyncio.Event
    loop: asyncio.AbstractEventLoop

    async def reconcile_now(self) -> None:
        """One reconciliation on the operator's loop, as if something had changed."""
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self.reconciler.reconcile(), self.loop))

    async def until(self, predicate: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
        """Wait, render after render, until `predicate` holds."""
        async with asyncio.timeout(timeout):
            while True:
                self.rendered.clear()
                if await predicate():
                    return
                await self.rendered.wait()


OperatorFactory = Callable[..., contextlib.AbstractAsyncContextManager[Operator]]


@pytest.fixture
async def kube(cluster: kmock.KubernetesEmulator) -> AsyncIterator[Kube]:
    async with aiohttp.ClientSession(base_url=str(cluster.url)) as session:
        yield Kube(session)


@pytest.fixture
def run_operator(cluster: kmock.KubernetesEmulator, kube: Kube) -> OperatorFactory:
    """Start an operator (several in a row share the cluster, as restarts do).

    It runs on a loop of its own in a thread, as in production: kopf treats every task
    created on its loop after it started as its own and cancels it when it stops, which
    would include the test's teardown.
    """

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(cluster.url))

    @contextlib.asynccontextmanager
    async def start(nodes: NodesSource | None = None, **options: Any) -> AsyncIterator[Operator]:
        settings = ReconcilerOptions(namespace=NS, secret_name=SECRET, secret_key="policy.yaml",
                                     base=options.pop("base", {}), debounce=0.01, **options)
        test_loop = asyncio.get_running_loop()
        rendered = asyncio.Event()
        made: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event,
                                              Reconciler]] = concurrent.futures.Future()

        async def main() -> None:
            stop = asyncio.Event()
            reconciler_made: asyncio.Future[Reconciler] = (
                asyncio.get_running_loop().create_future())
            task = asyncio.create_task(serve(settings, login=login, nodes=nodes,
                                             stop_flag=stop, reconciler_ready=reconciler_made))
            reconciler = await reconciler_made
            def wake() -> None:
                test_loop.call_soon_threadsafe(rendered.set)

            reconciler.subscribe(wake)
            made.set_result((asyncio.get_running_loop(), stop, reconciler))
            await task

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="operator")
        thread.start()
        loop, stop, reconciler = await asyncio.wrap_future(made)
        try:
            yield Operator(reconciler, kube, rendered, loop)
        finally:
            loop.call_soon_threadsafe(stop.set)
            await asyncio.to_thread(thread.join, 10)
            assert not thread.is_alive()

    return start


@pytest.fixture
async def operator(run_operator: OperatorFactory) -> AsyncIterator[Operator]:
    async with run_operator() as running:
        yield running
