"""Helpers of the operator tests: kubectl-like calls over HTTP, manifests, the running
operator's handle. (A module of its own: test modules import it by name, never `conftest`.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from socks5_operator.reconcile import Reconciler

NS = "proxies"
GROUP_VERSION = "socks5.analytics.io/v1alpha1"
SECRET = "socks5-analytics-policy"
PLURAL = {"ProxyUser": "proxyusers", "IPWhitelist": "ipwhitelists"}


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


