"""The operator run by kopf against kmock's Kubernetes API emulator, on loopback.

`cluster` is the emulator with the two CRDs' resources, Secrets and namespaces declared;
`operator` runs `socks5_operator.main.serve` (kopf and the reconciler) logged in to it.
Tests change objects over HTTP, as kubectl would, and wait for the reconciler's renders
(a condition, never a sleep).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from operator_harness import GROUP_VERSION, NS, SECRET, Kube, Operator, OperatorFactory

from socks5_operator.main import serve
from socks5_operator.reconcile import NodesSource, Reconciler, ReconcilerOptions


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
    async def start(nodes: NodesSource | None = None, liveness: str | None = None,
                    **options: Any) -> AsyncIterator[Operator]:
        settings = ReconcilerOptions(namespace=NS, secret_name=SECRET, secret_key="policy.yaml",
                                     base=options.pop("base", {}),
                                     debounce=options.pop("debounce", 0.01), **options)
        test_loop = asyncio.get_running_loop()
        rendered = asyncio.Event()
        made: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event,
                                              Reconciler]] = concurrent.futures.Future()

        async def main() -> None:
            stop = asyncio.Event()
            reconciler_made: asyncio.Future[Reconciler] = (
                asyncio.get_running_loop().create_future())
            task = asyncio.create_task(serve(settings, login=login, nodes=nodes,
                                             stop_flag=stop, reconciler_ready=reconciler_made,
                                             liveness=liveness))
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
