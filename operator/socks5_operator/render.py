"""From custom resources to the policy document and the Secret that carries it; pure.

Every function here is deterministic: the same resources, password hashes and base policy
give the same text, byte for byte, so the operator can tell "nothing changed" by comparing
and never writes a Secret or a status for nothing. Randomness (password salts) and the
network live in the reconciler; this module only decides.

The document follows DESIGN.md "Policy". Its version is the proxies' own: the first 16 hex
digits of the SHA-256 of the whole text, so the version written here is the version every
node reports once it has loaded the file.

An invalid resource is left out of the policy and reported; the others still apply. An
IPWhitelist with some bad entries keeps its good ones in the policy (only the bad ones are
left out, and reported). Two rules keep a bad resource from opening the proxy:
- ProxyUsers exist but none is valid: the policy lists one disabled placeholder user, so
  authentication stays required and nobody gets in (no users at all means no authentication).
- IPWhitelists exist but none is valid: the whitelist holds only the unspecified addresses
  (0.0.0.0/32, ::/128), which no client connects from (an empty whitelist allows everyone).

The whitelist is rendered compactly: the networks of every IPWhitelist are merged per address
family (`ipaddress.collapse_addresses`: duplicates, overlaps and adjacent networks become one),
which allows exactly the same sources. The document must fit in a Secret (Kubernetes refuses
more than 1 MiB of Secret data); `POLICY_LIMIT` is what the reconciler lets through, and
`refused` gives the outcomes of a policy that was not written.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "GROUP",
    "VERSION",
    "Outcome",
    "Ref",
    "Rendered",
    "SpecError",
    "UserSpec",
    "WhitelistSpec",
    "parse_user",
    "parse_whitelist",
    "policy_secret",
    "policy_version",
    "refused",
    "render_policy",
    "status_for",
]

GROUP = "socks5.analytics.io"
VERSION = "v1alpha1"
VERSION_ANNOTATION = f"{GROUP}/policy-version"
MANAGED_BY = "socks5-analytics-operator"
PLACEHOLDER_USER = "socks5-operator-no-valid-user"
# A well-formed scrypt hash whose key is all zeros: no password derives it, and the user
# holding it is disabled anyway.
PLACEHOLDER_HASH = "scrypt$16384$8$1${}${}".format(
    base64.b64encode(b"socks5-operator!").decode(), base64.b64encode(bytes(32)).decode()
)
NOBODY = ("0.0.0.0/32", "::/128")
# Kubernetes refuses a Secret whose data (all keys, decoded) is over 1 MiB. The policy may
# use all of it but a margin, kept for other keys someone may add to the Secret.
SECRET_DATA_LIMIT = 1024 * 1024
POLICY_LIMIT = SECRET_DATA_LIMIT - 16 * 1024
# Bad CIDRs named in one status message, at most (a status must stay small).
LISTED_PROBLEMS = 10
HEADER = "# Rendered by the socks5-analytics operator from ProxyUser and IPWhitelist " \
    "resources. Do not edit.\n"


class SpecError(ValueError):
    """A resource's spec cannot be used; `reason` is the condition reason (CamelCase)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, order=True)
class Ref:
    """Which resource: kind, namespace, name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class UserSpec:
    """What the policy needs from one ProxyUser (the password is resolved separately)."""

    ref: Ref
    generation: int
    created: str
    username: str
    secret_name: str
    secret_key: str
    disabled: bool = False
    max_connections: int = 0
    connections_per_second: float = 0


@dataclass(frozen=True)
class WhitelistSpec:
    """What the policy needs from one IPWhitelist."""

    ref: Ref
    generation: int
    created: str
    cidrs: tuple[str, ...]
    description: str = ""
    rejected: tuple[str, ...] = ()  # the bad entries left out, each with why


@dataclass(frozen=True)
class Outcome:
    """Whether one resource made it into the policy, and why not."""

    ready: bool
    reason: str
    message: str
    generation: int
    partial: bool = False  # not Ready, yet some of it is in the policy (its valid CIDRs)

    @property
    def in_policy(self) -> bool:
        """Whether the policy carries this resource, all of it or its valid part."""
        return self.ready or self.partial


@dataclass(frozen=True)
class Rendered:
    """The policy text, its version, and each resource's outcome."""

    text: str
    version: str
    outcomes: Mapping[Ref, Outcome] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The document's size in bytes, as the Secret holds it (decoded)."""
        return len(self.text.encode())

    def included(self) -> frozenset[tuple[Ref, int]]:
        """The (resource, generation) pairs this policy carries."""
        return frozenset((ref, o.generation) for ref, o in self.outcomes.items()
                         if o.in_policy)


def _meta(body: Mapping[str, Any], kind: str) -> tuple[Ref, int, str]:
    meta = body.get("metadata") or {}
    ref = Ref(kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
    generation = meta.get("generation")
    generation = generation if isinstance(generation, int) and generation > 0 else 1
    return ref, generation, str(meta.get("creationTimestamp") or "")


def _spec(body: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = body.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise SpecError("InvalidSpec", f"spec must be a mapping, got {spec!r}")
    return spec


def _integer(spec: Mapping[str, Any], key: str) -> int:
    value = spec.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError("InvalidSpec", f"spec.{key} must be a whole number >= 0, got {value!r}")
    return int(value)


def parse_user(body: Mapping[str, Any]) -> UserSpec:
    """A ProxyUser body → UserSpec; raise SpecError for what the CRD schema let through."""
    ref, generation, created = _meta(body, "ProxyUser")
    spec = _spec(body)
    username = spec.get("username")
    if not isinstance(username, str) or not username:
        raise SpecError("InvalidSpec", "spec.username is required")
    if len(username.encode()) > 255:
        raise SpecError("InvalidUsername", "spec.username is longer than 255 bytes (RFC 1929)")
    if any(ch.isspace() or not ch.isprintable() for ch in username):
        raise SpecError("InvalidUsername", "spec.username must not contain whitespace or "
                        "control characters")
    secret_ref = spec.get("passwordSecretRef") or {}
    if not isinstance(secret_ref, Mapping):
        raise SpecError("InvalidSpec", "spec.passwordSecretRef must be a mapping with a name "
                        f"and a key, got {secret_ref!r}")
    name, key = secret_ref.get("name"), secret_ref.get("key")
    if not isinstance(name, str) or not name or not isinstance(key, str) or not key:
        raise SpecError("InvalidSpec", "spec.passwordSecretRef needs a name and a key")
    rate = spec.get("connectionsPerSecond", 0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
        raise SpecError("InvalidSpec", f"spec.connectionsPerSecond must be >= 0, got {rate!r}")
    return UserSpec(
        ref=ref, generation=generation, created=created, username=username,
        secret_name=name, secret_key=key, disabled=bool(spec.get("disabled", False)),
        max_connections=_integer(spec, "maxConnections"), connections_per_second=rate,
    )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(text: Any) -> Network:
    if not isinstance(text, str):
        raise SpecError("InvalidCIDR", f"{text!r} is not a CIDR")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        message = f"{text!r} is not a CIDR: {exc}"
        try:  # host bits set: say which network was probably meant
            message += f" (the network is {ipaddress.ip_network(text, strict=False)})"
        except ValueError:
            pass
        raise SpecError("InvalidCIDR", message) from exc


def _listed(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:LISTED_PROBLEMS])
    more = len(problems) - LISTED_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def parse_whitelist(body: Mapping[str, Any]) -> WhitelistSpec:
    """An IPWhitelist body → WhitelistSpec with its valid CIDRs, the bad ones in `rejected`;
    raise SpecError when it has no valid CIDR at all."""
    ref, generation, created = _meta(body, "IPWhitelist")
    spec = _spec(body)
    cidrs = spec.get("cidrs")
    if not isinstance(cidrs, list) or not cidrs:
        raise SpecError("InvalidSpec", "spec.cidrs needs at least one CIDR")
    networks: list[str] = []
    rejected: list[str] = []
    for text in cidrs:
        try:
            networks.append(str(_network(text)))
        except SpecError as exc:
            rejected.append(exc.message)
    if not networks:
        raise SpecError("InvalidCIDR", f"none of its {len(cidrs)} CIDRs is valid, so none is "
                        f"applied: {_listed(rejected)}")
    return WhitelistSpec(
        ref=ref, generation=generation, created=created, cidrs=tuple(networks),
        description=str(spec.get("description") or ""), rejected=tuple(rejected),
    )


def policy_version(text: str) -> str:
    """The proxies' policy version of a document: its content hash."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _collapsed(networks: Iterable[str]) -> list[str]:
    """The fewest networks covering exactly the same addresses, IPv4 first, each family in
    address order (so the same sources always give the same list)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in networks:
        net = ipaddress.ip_network(text)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return ([str(net) for net in sorted(ipaddress.collapse_addresses(v4))]
            + [str(net) for net in sorted(ipaddress.collapse_addresses(v6))])


def render_policy(
    *,
    users: Sequence[tuple[UserSpec, str | SpecError]],
    whitelists: Sequence[WhitelistSpec | tuple[Ref, int, SpecError]],
    invalid_users: Iterable[tuple[Ref, int, SpecError]] = (),
    base: Mapping[str, Any] | None = None,
) -> Rendered:
    """Compile users (each with its password hash, or the problem resolving it), whitelists
    and the base document (destinations, limits) into the policy.

    A username claimed twice goes to the oldest resource (creation time, then namespace and
    name); the others are Invalid. Invalid resources stay out; see the module docstring.
    """
    outcomes: dict[Ref, Outcome] = {}
    for ref, generation, error in invalid_users:
        outcomes[ref] = Outcome(False, error.reason, error.message, generation)

    owners: dict[str, UserSpec] = {}
    for spec, _ in sorted(users, key=lambda item: (item[0].created, item[0].ref)):
        owners.setdefault(spec.username, spec)

    entries: list[dict[str, Any]] = []
    for spec, credential in users:
        owner = owners[spec.username]
        if owner.ref != spec.ref:
            outcomes[spec.ref] = Outcome(
                False, "DuplicateUsername",
                f"username {spec.username!r} is already taken by {owner.ref}", spec.generation,
            )
        elif isinstance(credential, SpecError):
            outcomes[spec.ref] = Outcome(False, credential.reason, credential.message,
                                         spec.generation)
        else:
            entries.append({
                "username": spec.username,
                "password_hash": credential,
                "disabled": spec.disabled,
                "max_connections": spec.max_connections,
                "connections_per_second": spec.connections_per_second,
            })
            outcomes[spec.ref] = Outcome(True, "Applied", "in the policy", spec.generation)
    entries.sort(key=lambda entry: entry["username"])
    if not entries and (users or outcomes):
        entries.append({"username": PLACEHOLDER_USER, "password_hash": PLACEHOLDER_HASH,
                        "disabled": True, "max_connections": 0, "connections_per_second": 0})

    networks: set[str] = set()
    any_whitelist = False
    for item in whitelists:
        any_whitelist = True
        if isinstance(item, WhitelistSpec):
            networks.update(item.cidrs)
            if item.rejected:
                total = len(item.cidrs) + len(item.rejected)
                outcomes[item.ref] = Outcome(
                    False, "InvalidCIDR",
                    f"{len(item.cidrs)} of its {total} CIDRs applied; left out "
                    f"{len(item.rejected)}: {_listed(item.rejected)}",
                    item.generation, partial=True)
            else:
                outcomes[item.ref] = Outcome(True, "Applied", "in the policy", item.generation)
        else:
            ref, generation, error = item
            outcomes[ref] = Outcome(False, error.reason, error.message, generation)
    whitelist = _collapsed(networks)
    if any_whitelist and not whitelist:
        whitelist = list(NOBODY)

    document: dict[str, Any] = {"users": entries, "whitelist": whitelist}
    for key in ("destinations", "limits"):
        if base and key in base:
            document[key] = base[key]
    text = HEADER + yaml.safe_dump(document, sort_keys=True, default_flow_style=False,
                                   allow_unicode=True)
    version = policy_version(text)
    return Rendered(text=text, version=version, outcomes=outcomes)


def refused(rendered: Rendered, reason: str, why: str) -> Rendered:
    """The outcomes of a policy that was not written: every resource Ready=False with
    `reason` and `why` (a resource with a problem of its own also names that problem)."""
    outcomes = {
        ref: Outcome(False, reason, why if outcome.ready
                     else f"{why}; besides, this resource: {outcome.reason}: {outcome.message}",
                     outcome.generation)
        for ref, outcome in rendered.outcomes.items()
    }
    return Rendered(text=rendered.text, version=rendered.version, outcomes=outcomes)


def policy_secret(rendered: Rendered, *, name: str, namespace: str, key: str) -> dict[str, Any]:
    """The Secret manifest that carries the policy (the proxies mount it as a directory)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/part-of": "socks5-analytics",
            },
            "annotations": {VERSION_ANNOTATION: rendered.version},
        },
        "data": {key: base64.b64encode(rendered.text.encode()).decode()},
    }


def status_for(
    outcome: Outcome,
    *,
    version: str,
    current: Mapping[str, Any] | None,
    now: str,
    nodes: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The status of one resource: conditions Ready and Invalid, the generation applied, the
    policy version and, when known, how many live nodes run a policy that includes it.

    lastTransitionTime is kept from `current` while a condition's status stays the same, so
    an unchanged outcome gives an unchanged status (and no write).
    """
    previous = {c.get("type"): c for c in (current or {}).get("conditions") or []}

    def condition(kind: str, status: bool) -> dict[str, Any]:
        value = "True" if status else "False"
        before = previous.get(kind) or {}
        since = before.get("lastTransitionTime") if before.get("status") == value else None
        return {
            "type": kind,
            "status": value,
            "reason": outcome.reason,
            "message": outcome.message,
            "observedGeneration": outcome.generation,
            "lastTransitionTime": since or now,
        }

    status: dict[str, Any] = {
        "observedGeneration": outcome.generation,
        "conditions": [condition("Ready", outcome.ready), condition("Invalid", not outcome.ready)],
    }
    if outcome.in_policy:
        status["policyVersion"] = version
    if nodes is not None and outcome.in_policy:
        updated, total = nodes
        status.update(nodesUpdated=updated, nodesTotal=total, nodes=f"{updated}/{total}")
    return status


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether a status already says what `b` says (keys absent from `b` are cleared)."""
    a = a or {}
    keys = {"observedGeneration", "conditions", "policyVersion", "nodesUpdated", "nodesTotal",
            "nodes"}
    return all(a.get(key) == b.get(key) for key in keys)
