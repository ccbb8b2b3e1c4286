"""The few Kubernetes API calls the reconciler makes itself, over kopf's credentials.

kopf watches the resources and logs in (service account in a pod, kubeconfig elsewhere);
the reconciler, which acts outside any handler, reuses the same `kopf.ConnectionInfo` for
three calls: read a Secret, write the policy Secret, patch a resource's status.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from socks5_operator.render import GROUP, VERSION

__all__ = ["KubeClient", "KubeError", "KubeUnavailable"]

BODY_EXCERPT = 300  # characters of a non-JSON answer quoted in an error


class KubeError(Exception):
    """The API answered with an error status (or with a body that is not JSON)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeUnavailable(KubeError):
    """The API could not be reached (or the operator has not logged in yet)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


def _excerpt(raw: bytes) -> str:
    """A non-JSON answer's body, on one line and truncated, for an error message."""
    text = " ".join(raw.decode(errors="replace").split())
    if not text:
        return "(empty body)"
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "…"


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        cafile = str(info.ca_path) if info.ca_path else None
        if cadata and "-----BEGIN" not in cadata:  # kubeconfig's certificate-authority-data
            cadata = base64.b64decode(cadata).decode()
        context = ssl.create_default_context(cafile=cafile, cadata=cadata)
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    elif info.certificate_data and info.private_key_data:
        # A kubeconfig with embedded client certificates (kind, minikube): ssl wants files.
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for name, data in (("cert", info.certificate_data), ("key", info.private_key_data)):
                raw = data if isinstance(data, bytes) else data.encode()
                if b"-----BEGIN" not in raw:
                    raw = base64.b64decode(raw)
                path = Path(folder) / name
                path.write_bytes(raw)
                paths.append(str(path))
            context.load_cert_chain(paths[0], paths[1])
    return context


class KubeClient:
    """JSON over HTTP to the API server; one session per set of credentials."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stale: aiohttp.ClientSession | None = None  # the previous credentials' session

    def use(self, info: kopf.ConnectionInfo) -> None:
        """Take new credentials (kopf logged in again); the next call uses them."""
        if info != self._info:
            self._info = info
            if self._session is not None:
                self._stale, self._session = self._session, None

    async def close(self) -> None:
        """Release the HTTP session."""
        for session in (self._session, self._stale):
            if session is not None:
                await session.close()
        self._session = self._stale = None

    async def _request(self, method: str, path: str, *, body: Any = None,
                       content_type: str = "application/json") -> dict[str, Any] | None:
        if self._info is None:
            raise KubeUnavailable("not logged in to the Kubernetes API yet")
        if self._stale is not None:
            stale, self._stale = self._stale, None
            await stale.close()
        if self._session is None:
            headers = dict(self._info.as_http_headers())
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/", headers=headers,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self._info)),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        try:
            async with self._session.request(method, path.lstrip("/"), json=body,
                                             headers={"Content-Type": content_type}) as resp:
                if resp.status == 404 and method == "GET":
                    return None
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeUnavailable(f"{method} {path}: {exc!r}") from exc
        # The API server answers JSON (a Status on errors), but what sits in front of it
        # (a proxy, a load balancer, a body-size limit) may answer text: keep the real HTTP
        # status and say what the body was.
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            if resp.status >= 400:
                raise KubeError(resp.status, f"{method} {path}: {_excerpt(raw)}") from None
            raise KubeError(resp.status, f"{method} {path}: the answer is not JSON: "
                            f"{_excerpt(raw)}") from None
        if resp.status >= 400:
            message = payload.get("message") if isinstance(payload, dict) else None
            raise KubeError(resp.status, f"{method} {path}: {message or _excerpt(raw)}")
        return payload if isinstance(payload, dict) else {}

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Secret, or None when there is none."""
        return await self._request("GET", f"api/v1/namespaces/{namespace}/secrets/{name}")

    async def list_objects(self, group: str, version: str, plural: str,
                           namespace: str | None) -> list[dict[str, Any]]:
        """Every object of a custom resource, in one namespace or (None) in all."""
        scope = f"namespaces/{namespace}/" if namespace else ""
        listing = await self._request("GET", f"apis/{group}/{version}/{scope}{plural}")
        items = (listing or {}).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def put_secret(self, manifest: Mapping[str, Any], *, exists: bool) -> None:
        """Create the Secret, or merge-patch it in place when it exists."""
        meta = manifest["metadata"]
        collection = f"api/v1/namespaces/{meta['namespace']}/secrets"
        if exists:
            await self._request("PATCH", f"{collection}/{meta['name']}", body=manifest,
                                content_type="application/merge-patch+json")
        else:
            await self._request("POST", collection, body=manifest)

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: Mapping[str, Any]) -> None:
        """Merge-patch a custom resource's status subresource."""
        path = f"apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}/status"
        await self._request("PATCH", path, body={"status": dict(status)},
                            content_type="application/merge-patch+json")
