"""The reconciler: resources seen by kopf → one policy Secret and every resource's status.

kopf's event handlers only record what they see (`note_*`) and mark the state dirty; one
background task renders after a quiet `debounce` window, so a burst of changes gives one
write. Before its first render it lists both kinds itself, so a restarting operator never
writes a policy that lacks users it simply has not heard of yet (no users = no auth).

Passwords: a user's hash is kept while the password in its Secret still verifies against
it (the previous hash comes from the policy Secret itself, so restarts and replicas agree),
and a fresh random salt is drawn only for a new or changed password. Deriving the salt from
the password or the Secret would have been stateless too, but a salt computed from the
password is a fast hash of it published next to the slow one. Verifications are remembered
in memory (keyed by a digest of the password), so a steady state costs no scrypt at all.

A policy that cannot be written is never half-applied: too large for a Secret (over
`max_policy_bytes`, checked before writing) or refused by the API for its content (400, 413,
422), the policy in force stays (the last one written; put back if the Secret is deleted or
edited meanwhile), and every resource's status says why (PolicyTooLarge, PolicyRejected).
A policy too large is an answer, not a failure: the loop waits for the next change at its
usual pace; a refused write is retried with backoff like any API error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import yaml

from socks5_analytics.logs import get_logger
from socks5_analytics.passwords import PasswordHashError, hash_password, verify_password
from socks5_operator.kube import KubeClient, KubeError
from socks5_operator.render import (
    GROUP,
    POLICY_LIMIT,
    SECRET_DATA_LIMIT,
    VERSION,
    VERSION_ANNOTATION,
    Outcome,
    Ref,
    Rendered,
    SpecError,
    UserSpec,
    WhitelistSpec,
    parse_user,
    parse_whitelist,
    policy_secret,
    refused,
    render_policy,
    same_status,
    status_for,
)

__all__ = ["NodesSource", "PasswordBook", "Reconciler", "ReconcilerOptions"]

log = get_logger("operator")

PLURALS = {"ProxyUser": "proxyusers", "IPWhitelist": "ipwhitelists"}
STATUS_KEYS = ("observedGeneration", "conditions", "policyVersion", "nodesUpdated",
               "nodesTotal", "nodes")
HISTORY = 64  # rendered versions remembered for the rollout count
# API answers that refuse the policy Secret's content (too large for the server, invalid):
# the same write would be refused again, so the resources say so.
REFUSED = frozenset({400, 413, 422})


class NodesSource(Protocol):
    """Where the proxy nodes' reported policy versions come from (the API's /nodes)."""

    async def fetch(self) -> list[Mapping[str, Any]]:
        """Every node seen: node_id, last_seen (ISO 8601) and policy_version."""
        ...


@dataclass(frozen=True)
class ReconcilerOptions:
    """What the reconciler needs from `settings.operator`, resolved."""

    namespace: str
    secret_name: str
    secret_key: str
    base: Mapping[str, Any]
    debounce: float = 0.5
    cluster_wide: bool = False
    rollout_interval: float = 5.0
    node_stale_after: float = 30.0
    retry_max: float = 30.0
    max_policy_bytes: int = POLICY_LIMIT  # not a setting: what fits in a Secret


class PasswordBook:
    """Password → hash, stable while the password does not change."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, bytes], str] = {}

    async def hash_for(self, username: str, password: str, previous: str | None) -> str:
        """The previous hash if the password still matches it, else a fresh one."""
        digest = hashlib.sha256(password.encode()).digest()
        known = self._known.get((username, digest))
        if known is not None and (previous is None or known == previous):
            return known
        if previous is not None:
            try:
                same = await asyncio.to_thread(verify_password, password.encode(), previous)
            except PasswordHashError:
                same = False
            if same:
                self._known[(username, digest)] = previous
                return previous
        if known is not None:
            return known
        fresh = await asyncio.to_thread(hash_password, password)
        self._known[(username, digest)] = fresh
        return fresh

    def keep_only(self, usernames: set[str]) -> None:
        """Forget the users that are gone."""
        self._known = {k: v for k, v in self._known.items() if k[0] in usernames}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ref(kind: str, body: Mapping[str, Any]) -> Ref:
    meta = body.get("metadata") or {}
    return Ref(kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _previous_hashes(secret: Mapping[str, Any] | None, key: str) -> dict[str, str]:
    """username → hash from the policy Secret as it is now (nothing if unreadable)."""
    try:
        text = base64.b64decode(((secret or {}).get("data") or {}).get(key, "")).decode()
        users = (yaml.safe_load(text) or {}).get("users") or []
        return {u["username"]: u["password_hash"] for u in users
                if isinstance(u, dict) and "username" in u and "password_hash" in u}
    except (binascii.Error, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError):
        return {}


class Reconciler:
    """The operator's state and its two loops (render, rollout)."""

    def __init__(self, options: ReconcilerOptions, client: KubeClient, *,
                 nodes: NodesSource | None = None,
                 clock: Callable[[], str] = _now) -> None:
        self.options = options
        self.client = client
        self._nodes = nodes
        self._clock = clock
        self._bodies: dict[Ref, Mapping[str, Any]] = {}
        self._secrets: dict[tuple[str, str], Mapping[str, str]] = {}
        self._passwords = PasswordBook()
        self._dirty = asyncio.Event()
        self._logged_in = asyncio.Event()
        self._primed = False
        self._rendered: Rendered | None = None
        self._written: str | None = None  # the policy Secret's data as last rendered
        self._in_force: dict[str, Any] | None = None  # the manifest last written or found
        self._history: collections.OrderedDict[str, frozenset[tuple[Ref, int]]] = (
            collections.OrderedDict())
        self._node_counts: dict[Ref, tuple[int, int]] = {}
        self.renders = 0  # completed reconciliations
        self._listeners: list[Callable[[], None]] = []

    # -- what kopf tells us -------------------------------------------------------------

    def logged_in(self) -> None:
        """kopf has credentials; the loops may start talking to the API."""
        self._logged_in.set()

    def note(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A ProxyUser or IPWhitelist was listed, added, modified or deleted."""
        ref = _ref(kind, body)
        if event_type == "DELETED":
            if self._bodies.pop(ref, None) is not None:
                self._dirty.set()
            return
        before = self._bodies.get(ref)
        self._bodies[ref] = body
        # Our own status writes come back as MODIFIED events: only a new spec re-renders.
        if before is None or before.get("spec") != body.get("spec") or (
                (before.get("metadata") or {}).get("generation")
                != (body.get("metadata") or {}).get("generation")):
            self._dirty.set()

    def note_secret(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A Secret changed; re-render if a ProxyUser points at it."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if key == (self.options.namespace, self.options.secret_name):
            # Our own writes come back unchanged; anything else (deleted, edited by hand)
            # is put right by the next render, which writes what the resources say.
            written = self._written
            if written is not None and (event_type == "DELETED" or (body.get("data") or {})
                                        .get(self.options.secret_key) != written):
                self._dirty.set()
            return
        referenced = key in self._referenced()
        if event_type == "DELETED":
            if self._secrets.pop(key, None) is not None or referenced:
                self._dirty.set()
            return
        if referenced or key in self._secrets:
            data = dict(body.get("data") or {})
            if self._secrets.get(key) != data:
                self._secrets[key] = data
                self._dirty.set()

    def _referenced(self) -> set[tuple[str, str]]:
        refs: set[tuple[str, str]] = set()
        for ref, body in self._bodies.items():
            if ref.kind == "ProxyUser":
                spec = body.get("spec")
                secret_ref = spec.get("passwordSecretRef") if isinstance(spec, Mapping) else None
                name = secret_ref.get("name") if isinstance(secret_ref, Mapping) else None
                if isinstance(name, str):
                    refs.add((ref.namespace, name))
        return refs

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Render whenever something changed, after a quiet window; retry on API errors."""
        await self._logged_in.wait()
        delay = 0.1
        while not self._primed:
            try:
                await self._prime()
            except KubeError as exc:
                log.warning("listing the resources failed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.retry_max)
        self._dirty.set()
        delay = 0.1
        while True:
            await self._dirty.wait()
            # Debounce: let a burst of changes land before one render.
            await asyncio.sleep(self.options.debounce)
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # the loop's top: it must outlive any one render
                if isinstance(exc, KubeError):
                    log.warning("reconciliation failed; retrying", error=str(exc),
                                retry_in=delay)
                else:
                    log.exception("reconciliation failed unexpectedly; retrying",
                                  retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.retry_max)
                self._dirty.set()
            else:
                delay = 0.1

    async def run_rollout(self) -> None:
        """Every rollout_interval: count the live nodes running each resource's policy."""
        if self._nodes is None:
            return
        while True:
            await asyncio.sleep(self.options.rollout_interval)
            if self._rendered is None:
                continue
            try:
                nodes = await self._nodes.fetch()
            except (OSError, ValueError) as exc:
                log.warning("reading the nodes' policy versions failed", error=str(exc))
                continue
            counts = self.count_nodes(nodes)
            if counts != self._node_counts:
                self._node_counts = counts
                try:
                    await self._publish_statuses()
                except KubeError as exc:
                    log.warning("status update failed", error=str(exc))
                self._notify()

    def count_nodes(self, nodes: list[Mapping[str, Any]],
                    now: datetime.datetime | None = None) -> dict[Ref, tuple[int, int]]:
        """For each applied resource: (live nodes whose policy includes it, live nodes)."""
        now = now or datetime.datetime.now(datetime.UTC)
        horizon = now - datetime.timedelta(seconds=self.options.node_stale_after)
        live: list[str] = []
        for node in nodes:
            try:
                seen = datetime.datetime.fromisoformat(str(node.get("last_seen")))
            except ValueError:
                continue
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=datetime.UTC)
            if seen >= horizon:
                live.append(str(node.get("policy_version") or ""))
        counts: dict[Ref, tuple[int, int]] = {}
        if self._rendered is None:
            return counts
        for pair in self._rendered.included():
            versions = {v for v, included in self._history.items() if pair in included}
            counts[pair[0]] = (sum(1 for v in live if v in versions), len(live))
        return counts

    # -- one reconciliation ---------------------------------------------------------------

    async def _prime(self) -> None:
        namespace = None if self.options.cluster_wide else self.options.namespace
        for kind, plural in PLURALS.items():
            for body in await self.client.list_objects(GROUP, VERSION, plural, namespace):
                body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, **body}
                self._bodies.setdefault(_ref(kind, body), body)
        self._primed = True

    async def reconcile(self) -> Rendered:
        """Render the policy, write it if it changed, then the statuses that changed."""
        options = self.options
        current = await self.client.get_secret(options.namespace, options.secret_name)
        previous = _previous_hashes(current, options.secret_key)

        users: list[tuple[UserSpec, str | SpecError]] = []
        invalid_users: list[tuple[Ref, int, SpecError]] = []
        whitelists: list[WhitelistSpec | tuple[Ref, int, SpecError]] = []
        for ref, body in sorted(self._bodies.items()):
            generation = int((body.get("metadata") or {}).get("generation") or 1)
            try:
                if ref.kind == "ProxyUser":
                    spec = parse_user(body)
                    users.append((spec, await self._credential(spec, previous)))
                else:
                    whitelists.append(parse_whitelist(body))
            except SpecError as exc:
                (invalid_users if ref.kind == "ProxyUser" else whitelists).append(
                    (ref, generation, exc))
        self._passwords.keep_only({spec.username for spec, _ in users})

        rendered = render_policy(users=users, whitelists=whitelists,
                                 invalid_users=invalid_users, base=options.base)
        if rendered.size > options.max_policy_bytes:
            return await self._keep_in_force(rendered, current)
        manifest = policy_secret(rendered, name=options.secret_name,
                                 namespace=options.namespace, key=options.secret_key)
        self._written = manifest["data"][options.secret_key]
        if not self._holds(current, manifest):
            try:
                await self.client.put_secret(manifest, exists=current is not None)
            except KubeError as exc:
                if exc.status in REFUSED:
                    log.error("the API refused the policy Secret; not written",
                              error=str(exc), size=rendered.size, version=rendered.version)
                    await self._refuse(rendered, "PolicyRejected",
                                       f"the API server refused the policy Secret "
                                       f"({rendered.size} bytes): {exc}; retrying")
                raise
            log.info("policy written", version=rendered.version,
                     secret=f"{options.namespace}/{options.secret_name}",
                     users=sum(1 for o in rendered.outcomes.values() if o.ready))
        self._in_force = manifest
        self._rendered = rendered
        self._history[rendered.version] = rendered.included()
        self._history.move_to_end(rendered.version)
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)
        await self._publish_statuses()
        self.renders += 1
        self._notify()
        return rendered

    def _holds(self, current: Mapping[str, Any] | None, manifest: Mapping[str, Any]) -> bool:
        """Whether the policy Secret already holds what `manifest` carries."""
        if current is None:
            return False
        key = self.options.secret_key
        return bool(
            (current.get("data") or {}).get(key) == manifest["data"][key]
            and ((current.get("metadata") or {}).get("annotations") or {}).get(
                VERSION_ANNOTATION) == manifest["metadata"]["annotations"][VERSION_ANNOTATION])

    async def _keep_in_force(self, rendered: Rendered,
                             current: Mapping[str, Any] | None) -> Rendered:
        """The policy is too large for a Secret: write nothing new, keep the one in force
        (putting it back if it was deleted or edited), and tell every resource."""
        options = self.options
        secret = f"{options.namespace}/{options.secret_name}"
        in_force = self._in_force
        if in_force is not None and not self._holds(current, in_force):
            self._written = in_force["data"][options.secret_key]
            await self.client.put_secret(in_force, exists=current is not None)
            current = in_force
            log.warning("policy Secret put back to the last policy written", secret=secret)
        version: str | None = None
        if current is None:
            kept = f"there is no policy Secret {secret}, so new proxy pods cannot start"
        else:
            annotations = (current.get("metadata") or {}).get("annotations") or {}
            version = annotations.get(VERSION_ANNOTATION)
            kept = f"the policy in force ({version or 'unversioned'}) stays"
        why = (f"the policy rendered from all ProxyUsers and IPWhitelists is {rendered.size} "
               f"bytes, over the limit of {options.max_policy_bytes} bytes (a Secret holds at "
               f"most {SECRET_DATA_LIMIT}): not written, {kept}; remove ProxyUsers or CIDRs "
               "until it fits")
        log.error("policy too large for its Secret; not written", size=rendered.size,
                  limit=options.max_policy_bytes, secret=secret, in_force=version)
        return await self._refuse(rendered, "PolicyTooLarge", why)

    async def _refuse(self, rendered: Rendered, reason: str, why: str) -> Rendered:
        """Publish that `rendered` was not written (the rollout counts nothing for it)."""
        self._rendered = refused(rendered, reason, why)
        await self._publish_statuses()
        self.renders += 1
        self._notify()
        return self._rendered

    async def _credential(self, spec: UserSpec, previous: Mapping[str, str]) -> str | SpecError:
        key = (spec.ref.namespace, spec.secret_name)
        data = self._secrets.get(key)
        if data is None:
            secret = await self.client.get_secret(*key)
            if secret is None:
                return SpecError("SecretNotFound", f"Secret {key[0]}/{key[1]} does not exist")
            data = self._secrets[key] = dict(secret.get("data") or {})
        if spec.secret_key not in data:
            return SpecError("SecretKeyNotFound",
                             f"Secret {key[0]}/{key[1]} has no key {spec.secret_key!r}")
        try:
            password = base64.b64decode(data[spec.secret_key], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return SpecError("InvalidPassword", f"Secret {key[0]}/{key[1]} key "
                             f"{spec.secret_key!r} is not UTF-8 text")
        if not password:
            return SpecError("EmptyPassword",
                             f"Secret {key[0]}/{key[1]} key {spec.secret_key!r} is empty")
        if len(password.encode()) > 255:
            return SpecError("InvalidPassword", f"Secret {key[0]}/{key[1]} key "
                             f"{spec.secret_key!r} holds {len(password.encode())} bytes; "
                             "RFC 1929 carries at most 255, so no client could send it")
        return await self._passwords.hash_for(spec.username, password,
                                              previous.get(spec.username))

    async def _publish_statuses(self) -> None:
        rendered = self._rendered
        if rendered is None:
            return
        for ref, outcome in sorted(rendered.outcomes.items()):
            body = self._bodies.get(ref)
            if body is None:
                continue
            await self._publish_status(ref, outcome, body, rendered.version)

    async def _publish_status(self, ref: Ref, outcome: Outcome, body: Mapping[str, Any],
                              version: str) -> None:
        current = body.get("status") or {}
        desired = status_for(outcome, version=version, current=current, now=self._clock(),
                             nodes=self._node_counts.get(ref) if self._nodes else None)
        if same_status(current, desired):
            return
        patch = {key: desired.get(key) for key in STATUS_KEYS}  # None clears a stale key
        try:
            await self.client.patch_status(PLURALS[ref.kind], ref.namespace, ref.name, patch)
        except KubeError as exc:
            if exc.status == 404:  # deleted meanwhile; its DELETED event re-renders
                return
            raise
        # Remember what we wrote, so the rollout loop does not rewrite it before the
        # MODIFIED event brings it back.
        self._bodies[ref] = {**body, "status": {**current, **desired}}

    # -- observers ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every reconciliation and rollout count (tests wait on it;
        it runs on the operator's loop, so a listener on another loop must hop threads)."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()

    @property
    def rendered(self) -> Rendered | None:
        """The last policy rendered."""
        return self._rendered

