"""Watch the operator's policy Secret through the Kubernetes API: sub-second policy updates.

The mounted Secret file reaches the pod only at the kubelet's next sync (up to a minute or
so); this task LISTs the one Secret (a GET), then WATCHes it (`watch=true` with a field
selector on its name, from the resourceVersion just read), and hands every new text to the
same `offer` as the file watcher (proxy_node/reload.py): the same parsing, the same refusal
of a bad document, and one current version, so a change is applied by whichever source sees
it first and is a no-op for the other.

Every failure (no API server, 403, a dropped stream, 410 Gone) ends one list-and-watch
cycle; the next starts after a backoff that doubles up to a cap and resets once a watch is
open again. A failure is logged once per distinct message, as a warning: the mounted file
keeps working meanwhile. Nothing here ever raises into the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import random
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from socks5_analytics.config import PolicySecretSettings, format_address

__all__ = ["SecretWatch", "SecretWatchError"]

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_LINE = 16 * 1024 * 1024  # a Secret is at most 1 MiB; a watch event line far less than this


class SecretWatchError(Exception):
    """One list-and-watch cycle failed; the message is what gets logged."""


class _Gone(SecretWatchError):
    """410 Gone: the resourceVersion is too old; list again."""


class SecretWatch:
    """List, then watch, one Secret; offer each new `data[key]` text to `offer(text, source)`."""

    def __init__(self, settings: PolicySecretSettings, *, offer: Callable[[str, str], Any],
                 log: Any, backoff_initial: float = 0.5, backoff_max: float = 30.0,
                 watch_timeout: int = 300, environ: Mapping[str, str] | None = None,
                 namespace_file: Path = NAMESPACE_FILE) -> None:
        self.settings = settings
        self.offer = offer
        self.log = log
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.watch_timeout = watch_timeout
        self._environ = os.environ if environ is None else environ
        self._namespace_file = namespace_file
        self._backoff = backoff_initial
        self._problem: str | None = None  # the last failure logged, until a watch is open
        self._missing = False  # the Secret was not found (logged once, until it exists)
        self._bad_data: str | None = None  # the last unusable content logged
        self._announced = False
        self.lists = 0  # LIST requests answered (tests and debugging)
        self.events = 0  # watch events handled
        self.watched = 0  # ADDED/MODIFIED events of the Secret
        self.failures = 0  # cycles that failed

    # -- where and how to connect --------------------------------------------------------

    def namespace(self) -> str:
        if self.settings.namespace:
            return self.settings.namespace
        try:
            text = self._namespace_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretWatchError(
                f"no namespace configured and {self._namespace_file} unreadable: "
                f"{exc.strerror}") from exc
        if not text:
            raise SecretWatchError(f"no namespace configured and {self._namespace_file} empty")
        return text

    def api_server(self) -> str:
        if self.settings.api_server:
            return self.settings.api_server.rstrip("/")
        host = self._environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise SecretWatchError(
                "no api_server configured and KUBERNETES_SERVICE_HOST is not set")
        port = self._environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not port.isdigit():
            raise SecretWatchError(f"KUBERNETES_SERVICE_PORT is not a port: {port!r}")
        return f"https://{format_address(host, int(port))}"

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        try:  # re-read every time: projected service-account tokens rotate
            token = self.settings.token_file.read_text(encoding="utf-8").strip()
        except OSError:
            token = ""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _ssl(self, server: str) -> ssl.SSLContext | bool:
        if not server.startswith("https"):
            return False
        cafile = str(self.settings.ca_file) if self.settings.ca_file.is_file() else None
        return ssl.create_default_context(cafile=cafile)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled; never raises anything else."""
        while True:
            try:
                await self._cycle()
                delay = self.backoff_initial  # the stream ended: list again shortly
            except asyncio.CancelledError:
                raise
            except _Gone:
                self.log.info("policy Secret watch expired (410 Gone); listing again")
                delay = self.backoff_initial
            except SecretWatchError as exc:
                delay = self._failed(str(exc))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                delay = self._failed(_describe(exc))
            except Exception as exc:  # a bug must not take the proxy down; the file still works
                delay = self._failed(f"unexpected {type(exc).__name__}: {exc}")
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    def _failed(self, problem: str) -> float:
        self.failures += 1
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)
        if problem != self._problem:
            self._problem = problem
            self.log.warning("policy Secret watch failed; the policy file still applies, "
                             "retrying", error=problem, secret=self.settings.name,
                             retry_in=round(delay, 2))
        return delay

    def _connected(self, namespace: str, server: str) -> None:
        self._backoff = self.backoff_initial
        if self._problem is not None or not self._announced:
            self._announced = True
            self._problem = None
            self.log.info("watching the policy Secret", namespace=namespace,
                          secret=self.settings.name, key=self.settings.key, api_server=server)

    async def _cycle(self) -> None:
        namespace, server = self.namespace(), self.api_server()
        collection = f"/api/v1/namespaces/{quote(namespace)}/secrets"
        source = f"Secret {namespace}/{self.settings.name} key {self.settings.key}"
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        connector = aiohttp.TCPConnector(ssl=self._ssl(server))
        async with aiohttp.ClientSession(base_url=server, connector=connector,
                                         timeout=timeout) as session:
            version = await self._list(session, collection, source)
            await self._watch(session, collection, source, version, namespace, server)

    async def _list(self, session: aiohttp.ClientSession, collection: str,
                    source: str) -> str | None:
        """GET the Secret and offer its text; its resourceVersion (None: it does not exist)."""
        path = f"{collection}/{quote(self.settings.name)}"
        async with session.get(path, headers=self._headers(),
                               timeout=aiohttp.ClientTimeout(total=15)) as resp:
            if resp.status == 404:
                self.lists += 1
                if not self._missing:
                    self._missing = True
                    self.log.warning("policy Secret not found; watching for it",
                                     secret=self.settings.name)
                return None
            body = await _json_body(resp)
        self.lists += 1
        self._handle_object(body, source)
        return _resource_version(body)

    async def _watch(self, session: aiohttp.ClientSession, collection: str, source: str,
                     version: str | None, namespace: str, server: str) -> None:
        params = {
            "watch": "true",
            "fieldSelector": f"metadata.name={self.settings.name}",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        if version:
            params["resourceVersion"] = version
        limit = aiohttp.ClientTimeout(total=self.watch_timeout + 30, connect=10)
        async with session.get(collection, params=params, headers=self._headers(),
                               timeout=limit) as resp:
            if resp.status >= 400:
                await _json_body(resp)  # raises with the API's message
            self._connected(namespace, server)
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._handle_line(line, source)
                if len(buffer) > MAX_LINE:
                    raise SecretWatchError("a watch event longer than 16 MiB")
            self._handle_line(buffer, source)  # a last line without its newline

    def _handle_line(self, line: bytes, source: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise SecretWatchError(f"a watch event that is not JSON: {exc}") from exc
        if not isinstance(event, dict):
            raise SecretWatchError("a watch event that is not an object")
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise SecretWatchError(f"a {kind} watch event without an object")
        self.events += 1
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone(str(obj.get("message") or "410 Gone"))
            raise SecretWatchError(f"watch error {code}: {obj.get('message') or obj}")
        if kind == "BOOKMARK":
            return
        if (obj.get("metadata") or {}).get("name") != self.settings.name:
            return  # not ours (a server that ignores the field selector)
        if kind in ("ADDED", "MODIFIED"):
            self.watched += 1
            self._handle_object(obj, source)
        elif kind == "DELETED":
            self.log.warning("policy Secret deleted; keeping the policy in force",
                             secret=self.settings.name)

    def _handle_object(self, obj: dict[str, Any], source: str) -> None:
        self._missing = False
        data = obj.get("data") or {}
        encoded = data.get(self.settings.key) if isinstance(data, dict) else None
        if not isinstance(encoded, str):
            self._unusable(obj, f"the Secret has no key {self.settings.key!r}")
            return
        try:
            text = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            self._unusable(obj, f"the Secret's {self.settings.key!r} is not base64 UTF-8 "
                                f"text: {exc}")
            return
        self._bad_data = None
        self.offer(text, source)

    def _unusable(self, obj: dict[str, Any], problem: str) -> None:
        """Log a Secret without a usable policy once per (resourceVersion, problem)."""
        seen = f"{_resource_version(obj)} {problem}"
        if self._bad_data != seen:
            self._bad_data = seen
            self.log.warning("policy Secret unusable; keeping the policy in force",
                             secret=self.settings.name, error=problem)


async def _json_body(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object of an answer; a SecretWatchError (or _Gone) for an error status."""
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        body = None
    if resp.status == 410:
        raise _Gone("410 Gone")
    if resp.status >= 400:
        message = body.get("message") if isinstance(body, dict) else None
        raise SecretWatchError(f"HTTP {resp.status} from {resp.method} {resp.url.path}"
                               + (f": {message}" if message else ""))
    if not isinstance(body, dict):
        raise SecretWatchError(f"{resp.method} {resp.url.path}: the answer is not a JSON object")
    return body


def _resource_version(obj: dict[str, Any]) -> str | None:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
