"""The operator under kopf against kmock: resources and Secrets in; policy Secret, statuses out."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import socket
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from operator_harness import NS, SECRET, Kube, Operator, OperatorFactory, secret, user, whitelist

from socks5_analytics.passwords import verify_password
from socks5_analytics.policy import parse_policy
from socks5_operator.render import POLICY_LIMIT, SECRET_DATA_LIMIT


def _users(text: str | None) -> dict[str, Any]:
    return {u.username: u for u in parse_policy(text or "").users}


async def test_users_and_whitelists_become_the_policy(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(secret("alice-pw", password="wonderland"))
    await kube.create(user("alice", "alice", "alice-pw", maxConnections=5,
                           connectionsPerSecond=2.5))
    await kube.create(whitelist("office", "203.0.113.0/24", "2001:db8::/32"))
    await kube.create(whitelist("vpn", "198.51.100.7/32"))

    async def applied() -> bool:
        return (await kube.ready("ProxyUser", "alice") == ("True", "Applied")
                and await kube.ready("IPWhitelist", "vpn") == ("True", "Applied"))

    await operator.until(applied)
    text = await kube.policy_text()
    policy = parse_policy(text or "")
    [alice] = policy.users
    assert (alice.username, alice.max_connections, alice.connections_per_second,
            alice.disabled) == ("alice", 5, 2.5, False)
    assert verify_password(b"wonderland", alice.password_hash)
    assert "wonderland" not in (text or "")
    assert policy.whitelist == ["198.51.100.7/32", "203.0.113.0/24", "2001:db8::/32"]

    stored = await kube.get("Secret", SECRET)
    assert stored is not None
    assert stored["metadata"]["annotations"]["socks5.analytics.io/policy-version"] == \
        policy.version
    status = (await kube.get("ProxyUser", "alice") or {})["status"]
    assert status["policyVersion"] == policy.version
    assert status["observedGeneration"] == 1
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert invalid["status"] == "False"


async def test_same_inputs_same_secret_and_no_write(
        run_operator: OperatorFactory, kube: Kube, cluster: Any) -> None:
    await kube.create(secret("pw", password="s3cret", other="x"))
    await kube.create(user("bob", "bob", "pw"))
    await kube.create(whitelist("lan", "192.0.2.0/24"))
    async with run_operator() as operator:
        async def applied() -> bool:
            return await kube.ready("ProxyUser", "bob") == ("True", "Applied")

        await operator.until(applied)
        first = await kube.get("Secret", SECRET)
        writes = _secret_writes(cluster)
        await operator.reconcile_now()  # nothing changed: nothing written
        assert _secret_writes(cluster) == writes
        # A change to another key of the password's Secret re-renders to the same bytes.
        renders = operator.reconciler.renders
        await kube.patch("Secret", "pw", {"data": {"other": base64.b64encode(b"y").decode()}})

        async def rendered() -> bool:
            return bool(operator.reconciler.renders > renders)

        await operator.until(rendered)
        assert _secret_writes(cluster) == writes
    # A restarted operator keeps the hash (the password still verifies): byte for byte.
    async with run_operator() as operator:
        async def reconciled() -> bool:
            return bool(operator.reconciler.renders > 0)

        await operator.until(reconciled)
        assert await kube.get("Secret", SECRET) == first
        assert _secret_writes(cluster) == writes


def _secret_writes(cluster: Any) -> int:
    """Requests that wrote the policy Secret."""
    return sum(1 for request in cluster
               if str(request.method).upper().endswith(("POST", "PATCH", "PUT"))
               and "/secrets" in str(request.url)
               and (str(request.url).endswith(f"/{SECRET}")
                    or ((request.data or {}).get("metadata") or {}).get("name") == SECRET))


async def test_password_change_rehashes(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(secret("carol-pw", password="first"))
    await kube.create(user("carol", "carol", "carol-pw"))

    async def hashed(password: bytes) -> bool:
        users = _users(await kube.policy_text())
        return "carol" in users and verify_password(password, users["carol"].password_hash)

    await operator.until(lambda: hashed(b"first"))
    before = await kube.policy_text()
    await kube.patch("Secret", "carol-pw",
                     {"data": {"password": base64.b64encode(b"second").decode()}})
    await operator.until(lambda: hashed(b"second"))
    assert not verify_password(b"first", _users(await kube.policy_text())["carol"].password_hash)
    assert parse_policy(before or "").version != parse_policy(
        await kube.policy_text() or "").version


async def test_invalid_objects_are_reported_and_others_keep_working(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(secret("pw", password="pw-a", b="pw-b"))
    await kube.create(user("alice", "alice", "pw"))
    await kube.create(user("ghost", "ghost", "missing-secret"))
    await kube.create(user("nokey", "nokey", "pw", key="absent"))
    await kube.create(user("zalice", "alice", "pw", key="b"))  # created later: the duplicate
    await kube.create(whitelist("good", "10.0.0.0/8"))
    # The CRD schema stops most bad CIDRs; host bits set get through it, not the operator.
    await kube.create(whitelist("bad", "192.0.2.1/24"))

    expected = {
        ("ProxyUser", "alice"): ("True", "Applied"),
        ("ProxyUser", "ghost"): ("False", "SecretNotFound"),
        ("ProxyUser", "nokey"): ("False", "SecretKeyNotFound"),
        ("ProxyUser", "zalice"): ("False", "DuplicateUsername"),
        ("IPWhitelist", "good"): ("True", "Applied"),
        ("IPWhitelist", "bad"): ("False", "InvalidCIDR"),
    }

    async def reported() -> bool:
        return all([await kube.ready(*key) == value for key, value in expected.items()])

    await operator.until(reported)
    policy = parse_policy(await kube.policy_text() or "")
    assert [u.username for u in policy.users] == ["alice"]
    assert verify_password(b"pw-a", policy.users[0].password_hash)
    assert policy.whitelist == ["10.0.0.0/8"]
    ghost = (await kube.get("ProxyUser", "ghost") or {})["status"]
    assert "missing-secret" in ghost["conditions"][0]["message"]
    assert "policyVersion" not in ghost or ghost["policyVersion"] is None

    # The missing Secret appears: ghost becomes Ready without touching the ProxyUser.
    await kube.create(secret("missing-secret", password="boo"))

    async def ghost_ready() -> bool:
        return await kube.ready("ProxyUser", "ghost") == ("True", "Applied")

    await operator.until(ghost_ready)
    assert set(_users(await kube.policy_text())) == {"alice", "ghost"}
    # The bad whitelist is fixed: both networks apply.
    await kube.patch("IPWhitelist", "bad", {"spec": {"cidrs": ["192.0.2.0/24"]}})

    async def fixed() -> bool:
        return await kube.ready("IPWhitelist", "bad") == ("True", "Applied")

    await operator.until(fixed)
    assert parse_policy(await kube.policy_text() or "").whitelist == [
        "10.0.0.0/8", "192.0.2.0/24"]


async def test_deleted_objects_leave_the_policy(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(secret("pw", password="x"))
    await kube.create(user("dave", "dave", "pw"))
    await kube.create(user("erin", "erin", "pw"))
    await kube.create(whitelist("lan", "192.0.2.0/24"))

    async def both() -> bool:
        return set(_users(await kube.policy_text())) == {"dave", "erin"}

    await operator.until(both)
    await kube.delete("ProxyUser", "dave")
    await kube.delete("IPWhitelist", "lan")

    async def gone() -> bool:
        policy = parse_policy(await kube.policy_text() or "")
        return [u.username for u in policy.users] == ["erin"] and policy.whitelist == []

    await operator.until(gone)
    # Deleting the password's Secret makes erin Invalid; with no valid user left the policy
    # still requires authentication (a disabled placeholder), it never opens the proxy.
    await kube.delete("Secret", "pw")

    async def closed() -> bool:
        return await kube.ready("ProxyUser", "erin") == ("False", "SecretNotFound")

    await operator.until(closed)
    policy = parse_policy(await kube.policy_text() or "")
    assert policy.requires_auth
    assert all(u.disabled for u in policy.users)


async def test_a_bad_cidr_leaves_the_rest_of_its_whitelist_in_force(operator: Operator) -> None:
    """A typo in the only IPWhitelist (host bits set: the CRD pattern lets it through) must
    not lock every client out: its valid CIDRs apply, the bad one is reported."""
    kube = operator.kube
    await kube.create(whitelist("office", "198.51.100.1/24", "203.0.113.0/24",
                                "2001:db8::/32"))

    async def reported() -> bool:
        return await kube.ready("IPWhitelist", "office") == ("False", "InvalidCIDR")

    await operator.until(reported)
    policy = parse_policy(await kube.policy_text() or "")
    assert policy.whitelist == ["203.0.113.0/24", "2001:db8::/32"]
    status = (await kube.get("IPWhitelist", "office") or {})["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == (
        "2 of its 3 CIDRs applied; left out 1: '198.51.100.1/24' is not a CIDR: "
        "198.51.100.1/24 has host bits set (the network is 198.51.100.0/24)")
    assert status["policyVersion"] == policy.version  # its valid part is in this policy
    # Fixed: Ready, every CIDR applied.
    await kube.patch("IPWhitelist", "office",
                     {"spec": {"cidrs": ["198.51.100.0/24", "203.0.113.0/24"]}})

    async def fixed() -> bool:
        return await kube.ready("IPWhitelist", "office") == ("True", "Applied")

    await operator.until(fixed)
    assert parse_policy(await kube.policy_text() or "").whitelist == [
        "198.51.100.0/24", "203.0.113.0/24"]


def _scattered(block: int, count: int) -> list[str]:
    """`count` IPv6 /128 networks, written at full length, no two of which merge."""
    base = int(ipaddress.IPv6Address("2001:db8:1234:5678:9abc:def0:1000:1"))
    return [f"{ipaddress.IPv6Address(base + (block << 32) + 2 * i)}/128" for i in range(count)]


async def _all_ready_as(kube: Kube, names: list[tuple[str, str]],
                        expected: tuple[str, str]) -> bool:
    return all([await kube.ready(*name) == expected for name in names])


def _size_and_limit(message: str) -> tuple[int, int]:
    found = re.search(r"is (\d+) bytes, over the limit of (\d+) bytes", message)
    assert found, message
    return int(found[1]), int(found[2])


async def test_a_policy_too_large_for_a_secret_is_not_written_and_says_so(
        run_operator: OperatorFactory, kube: Kube, cluster: Any) -> None:
    """The CRDs' limits allow more than a Secret holds (8 IPWhitelists of 4096 /128s render
    about 1.5 MB; Kubernetes refuses Secret data over 1 MiB). Nothing is written then: the
    policy in force stays (revocations and all), every resource says why, and the first
    change that brings the policy under the limit applies."""
    await kube.create(secret("pw", password="pw-a"))
    await kube.create(user("alice", "alice", "pw"))
    await kube.create(whitelist("office", "203.0.113.0/24"))
    async with run_operator() as operator:
        async def applied() -> bool:
            return await _all_ready_as(kube, [("ProxyUser", "alice"),
                                              ("IPWhitelist", "office")], ("True", "Applied"))

        await operator.until(applied)
    before = await kube.policy_text()
    version = parse_policy(before or "").version
    writes = _secret_writes(cluster)
    # Applied together (kubectl apply -f dir/), while the operator restarts.
    big = [f"big-{n}" for n in range(8)]
    for n, name in enumerate(big):
        await kube.create(whitelist(name, *_scattered(n, 4096)))
    names = [("ProxyUser", "alice"), ("IPWhitelist", "office"),
             *[("IPWhitelist", name) for name in big]]
    # A longer quiet window, so that deleting seven whitelists below is one render.
    async with run_operator(debounce=0.5) as operator:
        async def too_large() -> bool:
            return await _all_ready_as(kube, names, ("False", "PolicyTooLarge"))

        await operator.until(too_large, timeout=60)
        assert await kube.policy_text() == before
        assert _secret_writes(cluster) == writes  # not even tried
        status = (await kube.get("IPWhitelist", "big-0") or {})["status"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        size, limit = _size_and_limit(ready["message"])
        assert limit == POLICY_LIMIT and SECRET_DATA_LIMIT < size < 2 * SECRET_DATA_LIMIT
        assert f"the policy in force ({version}) stays" in ready["message"]
        assert status.get("policyVersion") is None
        for name in big[1:]:
            await kube.delete("IPWhitelist", name)

        async def fits() -> bool:
            return await _all_ready_as(kube, names[:3], ("True", "Applied"))

        await operator.until(fits, timeout=60)
    policy = parse_policy(await kube.policy_text() or "")
    assert len(policy.whitelist) == 4096 + 1
    assert [u.username for u in policy.users] == ["alice"]


async def test_while_too_large_the_last_policy_written_is_kept_in_place(
        run_operator: OperatorFactory, kube: Kube) -> None:
    """The policy Secret is still the operator's alone while it cannot write a new one:
    deleted or edited by hand, the last policy it wrote is put back."""
    await kube.create(secret("pw", password="pw-a"))
    await kube.create(user("alice", "alice", "pw"))
    await kube.create(whitelist("office", "203.0.113.0/24"))
    names = [("ProxyUser", "alice"), ("IPWhitelist", "office"), ("IPWhitelist", "more")]
    async with run_operator(max_policy_bytes=2048) as operator:
        async def applied() -> bool:
            return await _all_ready_as(kube, names[:2], ("True", "Applied"))

        await operator.until(applied)
        before = await kube.policy_text()
        await kube.create(whitelist("more", *_scattered(0, 100)))

        async def too_large() -> bool:
            return await _all_ready_as(kube, names, ("False", "PolicyTooLarge"))

        await operator.until(too_large)
        assert await kube.policy_text() == before
        status = (await kube.get("ProxyUser", "alice") or {})["status"]
        size, limit = _size_and_limit(status["conditions"][0]["message"])
        assert limit == 2048 < size

        await _put_back_when_deleted_or_edited(operator, kube, before)
        # Small enough again: written at once.
        await kube.patch("IPWhitelist", "more", {"spec": {"cidrs": _scattered(0, 2)}})

        async def fits() -> bool:
            return await _all_ready_as(kube, names, ("True", "Applied"))

        await operator.until(fits)
        assert parse_policy(await kube.policy_text() or "").whitelist == [
            "203.0.113.0/24", *_scattered(0, 2)]


# The policy's JSON body is over 1 MiB: aiohttp warns about sending it in one piece.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_secret_the_api_refuses_is_reported_and_retried(
        run_operator: OperatorFactory, kube: Kube) -> None:
    """Under the operator's own limit but refused by the API server (kmock refuses a body
    over 1 MiB with a 413 in plain text): every resource says so, with the real status."""
    big = [f"big-{n}" for n in range(5)]  # about 940 kB: 1.25 MB once base64-encoded
    for n, name in enumerate(big):
        await kube.create(whitelist(name, *_scattered(n, 4096)))
    names = [("IPWhitelist", name) for name in big]
    async with run_operator(max_policy_bytes=4 * SECRET_DATA_LIMIT, debounce=0.5) as operator:
        async def refused() -> bool:
            return await _all_ready_as(kube, names, ("False", "PolicyRejected"))

        await operator.until(refused, timeout=60)
        status = (await kube.get("IPWhitelist", "big-0") or {})["status"]
        message = status["conditions"][0]["message"]
        assert "HTTP 413: POST api/v1/namespaces/proxies/secrets: " in message
        assert "Maximum request body size" in message and "JSONDecodeError" not in message
        assert await kube.policy_text() is None
        for name in big[2:]:
            await kube.delete("IPWhitelist", name)

        async def written() -> bool:
            return await _all_ready_as(kube, names[:2], ("True", "Applied"))

        await operator.until(written, timeout=60)
    assert len(parse_policy(await kube.policy_text() or "").whitelist) == 2 * 4096


async def test_only_invalid_whitelists_allow_nobody(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(whitelist("typo", "10.0.0.1/8"))

    async def reported() -> bool:
        return await kube.ready("IPWhitelist", "typo") == ("False", "InvalidCIDR")

    await operator.until(reported)
    assert parse_policy(await kube.policy_text() or "").whitelist == ["0.0.0.0/32", "::/128"]


async def test_base_policy_and_empty_start(run_operator: OperatorFactory, kube: Kube) -> None:
    base = {"destinations": {"block_private": False, "rules": [
        {"action": "deny", "domains": [".internal.example"], "ports": ["1-65535"]}]},
        "limits": {"max_connections": 500}}
    async with run_operator(base=base) as operator:
        async def written() -> bool:
            return await kube.policy_text() is not None

        await operator.until(written)
    policy = parse_policy(await kube.policy_text() or "")
    assert not policy.requires_auth and policy.whitelist == []
    assert policy.destinations.block_private is False
    assert policy.destinations.rules[0].domains == [".internal.example"]
    assert policy.limits.max_connections == 500


class FakeNodes:
    """The API's /nodes, as the test says."""

    def __init__(self) -> None:
        self.nodes: list[Mapping[str, Any]] = []

    async def fetch(self) -> list[Mapping[str, Any]]:
        return list(self.nodes)


async def test_status_counts_nodes_running_the_policy(
        run_operator: OperatorFactory, kube: Kube) -> None:
    nodes = FakeNodes()
    now = "2999-01-01T00:00:00+00:00"  # always live
    async with run_operator(nodes=nodes, rollout_interval=0.01) as operator:
        await kube.create(secret("pw", password="x"))
        await kube.create(user("frank", "frank", "pw"))

        async def applied() -> bool:
            return await kube.ready("ProxyUser", "frank") == ("True", "Applied")

        await operator.until(applied)
        version = parse_policy(await kube.policy_text() or "").version
        nodes.nodes = [
            {"node_id": "a", "last_seen": now, "policy_version": version},
            {"node_id": "b", "last_seen": now, "policy_version": version},
            {"node_id": "c", "last_seen": now, "policy_version": "0000000000000000"},
            {"node_id": "gone", "last_seen": "2000-01-01T00:00:00+00:00",
             "policy_version": version},
        ]

        async def counted() -> bool:
            status = (await kube.get("ProxyUser", "frank") or {}).get("status") or {}
            return status.get("nodes") == "2/3"

        await operator.until(counted)


async def test_namespace_is_the_operators(operator: Operator) -> None:
    await operator.kube.create({**whitelist("elsewhere", "10.0.0.0/8"),
                                "metadata": {"name": "elsewhere", "namespace": "other"}})
    await operator.kube.create(whitelist("here", "192.0.2.0/24"))

    async def here() -> bool:
        return await operator.kube.ready("IPWhitelist", "here") == ("True", "Applied")

    await operator.until(here)
    assert parse_policy(await operator.kube.policy_text() or "").whitelist == ["192.0.2.0/24"]
    assert NS == "proxies"


async def test_the_policy_secret_is_put_back_when_deleted_or_edited(operator: Operator) -> None:
    """The proxies' policy comes from the resources only: a deleted policy Secret (new proxy
    pods could not start) or one edited by hand (users: [] means no authentication) is
    rendered again at once."""
    kube = operator.kube
    await kube.create(secret("pw", password="pw-a"))
    await kube.create(user("alice", "alice", "pw"))

    async def applied() -> bool:
        return await kube.ready("ProxyUser", "alice") == ("True", "Applied")

    await operator.until(applied)
    rendered = await kube.policy_text()
    assert rendered is not None and set(_users(rendered)) == {"alice"}

    await _put_back_when_deleted_or_edited(operator, kube, rendered)


async def test_a_password_no_client_could_send_is_invalid(operator: Operator) -> None:
    kube = operator.kube
    await kube.create(secret("long", password="x" * 256))
    await kube.create(user("longpw", "longpw", "long"))

    async def reported() -> bool:
        return await kube.ready("ProxyUser", "longpw") == ("False", "InvalidPassword")

    await operator.until(reported)
    status = (await kube.get("ProxyUser", "longpw") or {})["status"]
    assert "256 bytes" in status["conditions"][0]["message"]
    assert "longpw" not in _users(await kube.policy_text())


async def test_a_malformed_spec_does_not_stop_the_others(operator: Operator) -> None:
    """A spec the CRD schema would refuse (no schema here): reported, and the loop goes on."""
    kube = operator.kube
    await kube.create({**user("bad", "bad", "pw"),
                       "spec": {"username": "bad", "passwordSecretRef": "pw"}})
    await kube.create(secret("pw", password="pw-a"))
    await kube.create(user("alice", "alice", "pw"))

    async def both() -> bool:
        return (await kube.ready("ProxyUser", "bad") == ("False", "InvalidSpec")
                and await kube.ready("ProxyUser", "alice") == ("True", "Applied"))

    await operator.until(both)
    assert set(_users(await kube.policy_text())) == {"alice"}


async def test_the_liveness_endpoint_answers(run_operator: OperatorFactory, kube: Kube) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with run_operator(liveness=f"http://127.0.0.1:{port}/healthz") as operator:
        async def written() -> bool:
            return await kube.policy_text() is not None

        await operator.until(written)
        async with aiohttp.ClientSession() as http:
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.1)


async def _put_back_when_deleted_or_edited(operator: Operator, kube: Kube, text: str) -> None:
    """The policy Secret is the operator's alone: deleted, or edited by hand to open the
    door, it is written again as `text`."""
    async def restored() -> bool:
        return await kube.policy_text() == text

    await kube.delete("Secret", SECRET)
    await operator.until(restored)
    open_door = base64.b64encode(b"users: []\n").decode()
    await kube.patch("Secret", SECRET, {"data": {"policy.yaml": open_door}})
    await operator.until(restored)
