"""The access decisions of proxy_node.access (and the gatekeeper's admission and revocation
checks built on them) as tables: (policy, request) -> verdict.

Pure functions, no I/O: each table row is one line of the specification in docs/policy.md.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from proxy_node.access import AccessRules, compile_rules, is_private
from proxy_node.errors import ConnectionNotAllowed
from proxy_node.gatekeeper import Admission, Gatekeeper
from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import Policy


def rules_of(**doc: Any) -> AccessRules:
    """Compile a policy document given as keyword arguments (validated like the file)."""
    return compile_rules(Policy.model_validate(doc))


def dest_rules(*rules: dict[str, Any], block_private: bool = True) -> AccessRules:
    return rules_of(destinations={"block_private": block_private, "rules": list(rules)})


# -- is_private: every range block_private covers ------------------------------------------

PRIVATE = [
    # "this network" (0.0.0.0 reaches the host itself on Linux)
    "0.0.0.0", "0.1.2.3", "0.255.255.255",
    # loopback
    "127.0.0.1", "127.255.255.254", "127.1.2.3",
    # RFC 1918
    "10.0.0.0", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.0.1",
    "192.168.255.255",
    # CGNAT (RFC 6598), incl. Alibaba's metadata address
    "100.64.0.0", "100.100.100.200", "100.127.255.255",
    # link-local, incl. the cloud metadata address
    "169.254.0.1", "169.254.169.254",
    # IETF protocol assignments, benchmarking
    "192.0.0.1", "198.18.0.1", "198.19.255.255",
    # multicast, reserved, broadcast
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6: unspecified, loopback, ULA (incl. AWS metadata), link-local, multicast, NAT64 local
    "::", "::1", "fc00::1", "fd00:ec2::254", "fdff:ffff::1", "fe80::1", "febf::1",
    "ff02::1", "ff0e::1", "64:ff9b:1::a",
    # IPv4-mapped IPv6 is judged as the IPv4 address it carries
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.1.2.3", "::ffff:0.0.0.0",
    "::ffff:100.64.1.1", "::ffff:224.0.0.1", "::ffff:192.168.1.1",
]

PUBLIC = [
    "1.1.1.1", "8.8.8.8", "9.255.255.255", "11.0.0.0", "100.63.255.255", "100.128.0.0",
    "126.255.255.255", "128.0.0.0", "169.253.255.255", "169.255.0.0", "172.15.255.255",
    "172.32.0.0", "192.167.255.255", "192.169.0.0", "198.17.255.255", "198.20.0.0",
    "223.255.255.255",
    "2001:4860:4860::8888", "2606:4700::1111", "fe00::1", "fec0::1", "::2",
    "::ffff:1.1.1.1", "::ffff:8.8.8.8", "64:ff9b::808:808",
]


@pytest.mark.parametrize("address", PRIVATE)
def test_is_private(address: str) -> None:
    assert is_private(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_is_public(address: str) -> None:
    assert not is_private(ipaddress.ip_address(address))


# -- the destination decision order: rules (first match wins), then block_private, allow ---

LOOPBACK_ALLOWED = {"action": "allow", "cidrs": ["127.0.0.0/8"], "ports": ["8080"]}

ORDER_TABLE: list[tuple[str, AccessRules, str, str | None, str, int, str]] = [
    # (case, rules, command, domain, address, port, expected)
    ("no rules, public", dest_rules(), "connect", None, "1.1.1.1", 443, "allow"),
    ("no rules, loopback", dest_rules(), "connect", None, "127.0.0.1", 80, "deny"),
    ("no rules, ::1", dest_rules(), "connect", None, "::1", 80, "deny"),
    ("no rules, mapped loopback", dest_rules(), "connect", None, "::ffff:127.0.0.1", 80,
     "deny"),
    ("no rules, metadata via a name", dest_rules(), "connect", "metadata.example",
     "169.254.169.254", 80, "deny"),
    ("block_private off", dest_rules(block_private=False), "connect", None, "127.0.0.1",
     80, "allow"),
    ("allow rule re-allows a private range", dest_rules(LOOPBACK_ALLOWED), "connect", None,
     "127.0.0.1", 8080, "allow"),
    ("allow rule re-allows mapped loopback", dest_rules(LOOPBACK_ALLOWED), "connect", None,
     "::ffff:127.0.0.1", 8080, "allow"),
    ("allow rule, other port: block_private", dest_rules(LOOPBACK_ALLOWED), "connect", None,
     "127.0.0.1", 8081, "deny"),
    ("allow rule, other address: block_private", dest_rules(LOOPBACK_ALLOWED), "connect",
     None, "10.0.0.1", 8080, "deny"),
    ("first match wins: deny before allow",
     dest_rules({"action": "deny", "cidrs": ["1.1.1.0/24"]},
                {"action": "allow", "cidrs": ["1.1.1.1/32"]}),
     "connect", None, "1.1.1.1", 443, "deny"),
    ("first match wins: allow before deny",
     dest_rules({"action": "allow", "cidrs": ["1.1.1.1/32"]},
                {"action": "deny", "cidrs": ["1.1.1.0/24"]}),
     "connect", None, "1.1.1.1", 443, "allow"),
    ("a deny rule on a public address",
     dest_rules({"action": "deny", "cidrs": ["8.8.8.8/32"]}),
     "connect", None, "8.8.8.8", 53, "deny"),
    ("a deny rule, another address: allowed",
     dest_rules({"action": "deny", "cidrs": ["8.8.8.8/32"]}),
     "connect", None, "8.8.4.4", 53, "allow"),
    ("an IPv6 rule", dest_rules({"action": "deny", "cidrs": ["2001:db8::/32"]}),
     "connect", None, "2001:db8::1", 443, "deny"),
    ("an IPv6 rule does not match IPv4",
     dest_rules({"action": "deny", "cidrs": ["::/0"]}), "connect", None, "1.1.1.1", 443,
     "allow"),
    ("an IPv4 rule matches a mapped address",
     dest_rules({"action": "deny", "cidrs": ["1.1.1.0/24"]}), "connect", None,
     "::ffff:1.1.1.1", 443, "deny"),
    ("a mapped-IPv6 rule matches the IPv4 address",
     dest_rules({"action": "deny", "cidrs": ["::ffff:1.1.1.0/120"]}), "connect", None,
     "1.1.1.1", 443, "deny"),
    ("a rule on ports alone matches every address",
     dest_rules({"action": "deny", "ports": ["25"]}), "connect", None, "1.1.1.1", 25,
     "deny"),
    ("a rule on ports alone, other port",
     dest_rules({"action": "deny", "ports": ["25"]}), "connect", None, "1.1.1.1", 26,
     "allow"),
    ("an allow rule on ports alone overrides block_private",
     dest_rules({"action": "allow", "ports": ["7"]}), "connect", None, "127.0.0.1", 7,
     "allow"),
    ("a catch-all deny", dest_rules({"action": "deny"}), "connect", None, "1.1.1.1", 443,
     "deny"),
]


@pytest.mark.parametrize(
    ("rules", "command", "domain", "address", "port", "expected"),
    [row[1:] for row in ORDER_TABLE],
    ids=[row[0] for row in ORDER_TABLE],
)
def test_destination_order(rules: AccessRules, command: str, domain: str | None,
                           address: str, port: int, expected: str) -> None:
    assert rules.for_address(command, domain, address, port) == expected


# -- domains: exact names and ".suffix" ----------------------------------------------------

SUFFIX = dest_rules({"action": "deny", "domains": [".example.com"]})
EXACT = dest_rules({"action": "deny", "domains": ["api.example.org"]})
MIXED_CASE = dest_rules({"action": "deny", "domains": [".Example.NET.", "WWW.Example.Org."]})

DOMAIN_TABLE: list[tuple[AccessRules, str, str]] = [
    (SUFFIX, "example.com", "deny"),
    (SUFFIX, "a.example.com", "deny"),
    (SUFFIX, "a.b.example.com", "deny"),
    (SUFFIX, "badexample.com", "allow"),
    (SUFFIX, "example.com.evil", "allow"),
    (SUFFIX, "example.co", "allow"),
    (EXACT, "api.example.org", "deny"),
    (EXACT, "x.api.example.org", "allow"),
    (EXACT, "example.org", "allow"),
    (EXACT, "badapi.example.org", "allow"),
    (MIXED_CASE, "example.net", "deny"),  # rule names are lower-cased, trailing dot dropped
    (MIXED_CASE, "a.example.net", "deny"),
    (MIXED_CASE, "www.example.org", "deny"),
]


@pytest.mark.parametrize(("rules", "domain", "expected"), DOMAIN_TABLE)
def test_domain_matching(rules: AccessRules, domain: str, expected: str) -> None:
    # after resolving, to a public address: only the name can make it a deny
    assert rules.for_address("connect", domain, "93.184.216.34", 443) == expected
    # before resolving: a name rule that matches decides; otherwise resolve first
    assert rules.before_resolving("connect", domain, 443) == (
        "deny" if expected == "deny" else None
    )


def test_a_domain_rule_never_matches_an_ip_literal() -> None:
    rules = dest_rules({"action": "deny", "domains": [".example.com"]})
    assert rules.for_address("connect", None, "93.184.216.34", 443) == "allow"


def test_an_allow_rule_for_a_name_allows_what_it_resolves_to() -> None:
    """An explicit allow names the destination; block_private does not second-guess it."""
    rules = dest_rules({"action": "allow", "domains": ["db.internal"], "ports": ["5432"]})
    assert rules.before_resolving("connect", "db.internal", 5432) == "allow"
    assert rules.for_address("connect", "db.internal", "10.0.0.5", 5432) == "allow"
    # other names resolving to the same address stay blocked (no rebinding through them)
    assert rules.for_address("connect", "evil.example", "10.0.0.5", 5432) == "deny"
    assert rules.for_address("connect", "db.internal", "10.0.0.5", 22) == "deny"


def test_a_rule_with_domains_and_cidrs_matches_either() -> None:
    rules = dest_rules(
        {"action": "deny", "domains": [".corp.example"], "cidrs": ["203.0.113.0/24"]},
    )
    assert rules.for_address("connect", "x.corp.example", "1.1.1.1", 443) == "deny"
    assert rules.for_address("connect", "other.example", "203.0.113.9", 443) == "deny"
    assert rules.for_address("connect", None, "203.0.113.9", 443) == "deny"
    assert rules.for_address("connect", "other.example", "1.1.1.1", 443) == "allow"
    # before resolving: the name decides if it matches; otherwise the address might
    assert rules.before_resolving("connect", "x.corp.example", 443) == "deny"
    assert rules.before_resolving("connect", "other.example", 443) is None


# -- ports and commands ----------------------------------------------------------------------

PORTS = dest_rules({"action": "deny", "ports": ["22", 25, "6000-6010", "65535"]},
                   block_private=False)


@pytest.mark.parametrize(
    ("port", "expected"),
    [(22, "deny"), (25, "deny"), (6000, "deny"), (6005, "deny"), (6010, "deny"),
     (65535, "deny"), (21, "allow"), (23, "allow"), (5999, "allow"), (6011, "allow"),
     (1, "allow"), (65534, "allow")],
)
def test_port_ranges(port: int, expected: str) -> None:
    assert PORTS.for_address("connect", None, "1.1.1.1", port) == expected
    assert PORTS.for_address("udp_associate", "a.example", "1.1.1.1", port) == expected


COMMANDS = dest_rules({"action": "deny", "commands": ["bind", "udp_associate"]},
                      block_private=False)


@pytest.mark.parametrize(
    ("command", "expected"),
    [("connect", "allow"), ("bind", "deny"), ("udp_associate", "deny")],
)
def test_commands(command: str, expected: str) -> None:
    assert COMMANDS.for_address(command, None, "1.1.1.1", 80) == expected


def test_a_rule_for_other_commands_is_skipped_not_final() -> None:
    rules = dest_rules(
        {"action": "allow", "cidrs": ["127.0.0.0/8"], "commands": ["udp_associate"]},
    )
    assert rules.for_address("udp_associate", None, "127.0.0.1", 53) == "allow"
    assert rules.for_address("connect", None, "127.0.0.1", 53) == "deny"  # block_private


# -- before resolving --------------------------------------------------------------------------

BEFORE_TABLE: list[tuple[str, AccessRules, str, int, str | None]] = [
    ("no rules: resolve", dest_rules(), "a.example", 443, None),
    ("deny by suffix decides", dest_rules({"action": "deny", "domains": [".blocked.invalid"]}),
     "x.blocked.invalid", 443, "deny"),
    ("allow by name decides", dest_rules({"action": "allow", "domains": ["ok.example"]}),
     "ok.example", 443, "allow"),
    ("name rule for another port: resolve",
     dest_rules({"action": "deny", "domains": [".blocked.invalid"], "ports": ["25"]}),
     "x.blocked.invalid", 443, None),
    ("name rule for another command: resolve",
     dest_rules({"action": "deny", "domains": [".blocked.invalid"], "commands": ["bind"]}),
     "x.blocked.invalid", 443, None),
    ("a CIDR rule first: only the address can tell",
     dest_rules({"action": "allow", "cidrs": ["1.1.1.0/24"]},
                {"action": "deny", "domains": [".blocked.invalid"]}),
     "x.blocked.invalid", 443, None),
    ("a CIDR rule for another port does not stop the walk",
     dest_rules({"action": "allow", "cidrs": ["1.1.1.0/24"], "ports": ["80"]},
                {"action": "deny", "domains": [".blocked.invalid"]}),
     "x.blocked.invalid", 443, "deny"),
    ("non-matching name rules are skipped",
     dest_rules({"action": "allow", "domains": ["other.example"]},
                {"action": "deny", "domains": [".blocked.invalid"]}),
     "x.blocked.invalid", 443, "deny"),
    ("a rule on ports alone decides without a lookup",
     dest_rules({"action": "deny", "ports": ["25"]}), "mail.example", 25, "deny"),
    ("a catch-all deny decides without a lookup", dest_rules({"action": "deny"}),
     "a.example", 443, "deny"),
    ("block_private alone never decides before resolving", dest_rules(), "localhost", 80,
     None),
]


@pytest.mark.parametrize(
    ("rules", "domain", "port", "expected"),
    [row[1:] for row in BEFORE_TABLE],
    ids=[row[0] for row in BEFORE_TABLE],
)
def test_before_resolving(rules: AccessRules, domain: str, port: int,
                          expected: str | None) -> None:
    assert rules.before_resolving("connect", domain, port) == expected
    if expected is not None:  # what was decided before resolving holds after it
        for address in ("1.1.1.1", "127.0.0.1", "::1"):
            assert rules.for_address("connect", domain, address, port) == expected


# -- the source whitelist ----------------------------------------------------------------------

WHITELIST_TABLE: list[tuple[list[str], str, bool]] = [
    ([], "203.0.113.7", True),  # empty: every source
    ([], "::1", True),
    (["10.0.0.0/8"], "10.1.2.3", True),
    (["10.0.0.0/8"], "127.0.0.1", False),
    (["10.0.0.0/8"], "11.0.0.1", False),
    (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # mapped: judged as IPv4
    (["10.0.0.0/8"], "::ffff:127.0.0.1", False),
    (["127.0.0.0/8"], "::1", False),  # IPv4 loopback does not cover IPv6 loopback
    (["::1/128"], "::1", True),
    (["::1/128"], "127.0.0.1", False),
    (["2001:db8::/32"], "2001:db8:1::5", True),
    (["2001:db8::/32"], "2001:db9::5", False),
    (["192.168.1.0/24", "::1/128"], "192.168.1.200", True),
    (["192.168.1.0/24", "::1/128"], "192.168.2.1", False),
    (["192.168.1.7"], "192.168.1.7", True),  # a bare address is a /32
    (["192.168.1.7"], "192.168.1.8", False),
    (["10.1.2.3/8"], "10.200.0.1", True),  # host bits are ignored
    (["::ffff:10.0.0.0/104"], "10.9.9.9", True),  # a mapped network covers IPv4 sources
    (["::ffff:10.0.0.0/104"], "::ffff:10.9.9.9", True),
    (["::ffff:10.0.0.0/104"], "11.0.0.1", False),
]


@pytest.mark.parametrize(("whitelist", "source", "expected"), WHITELIST_TABLE)
def test_whitelist(whitelist: list[str], source: str, expected: bool) -> None:
    assert rules_of(whitelist=whitelist).source_allowed(source) is expected


# -- the gatekeeper: admission and revocation decisions ---------------------------------------

HASH_A = hash_password("a", n=2**4)
HASH_B = hash_password("b", n=2**4)


def _policy(**doc: Any) -> Policy:
    doc.setdefault("destinations", {"block_private": False})
    return Policy.model_validate(doc)


def _alice(**fields: Any) -> dict[str, Any]:
    return {"username": "alice", "password_hash": HASH_A, **fields}


def test_gatekeeper_admission_statuses() -> None:
    gate = Gatekeeper(_policy(whitelist=["10.0.0.0/8"], limits={"max_connections_per_ip": 1}))
    assert gate.admit_source("192.0.2.1") == "denied_whitelist"
    assert gate.admit_source("10.0.0.1") is None
    assert gate.admit_source("10.0.0.1") == "rate_limited"
    assert gate.admit_source("::ffff:10.0.0.2") is None
    gate.release(Admission("10.0.0.1"))
    assert gate.admit_source("10.0.0.1") is None


def test_gatekeeper_user_limits() -> None:
    gate = Gatekeeper(_policy(users=[_alice(max_connections=2)]))
    alice = gate.users["alice"]
    assert [gate.admit_user(alice) for _ in range(3)] == [True, True, False]
    gate.release(Admission("127.0.0.1", user="alice", password_hash=HASH_A))
    assert gate.admit_user(alice)


def test_gatekeeper_counters_survive_a_policy_change() -> None:
    gate = Gatekeeper(_policy(limits={"max_connections_per_ip": 1}))
    assert gate.admit_source("10.0.0.1") is None
    gate.update(_policy(limits={"max_connections_per_ip": 1}, whitelist=["10.0.0.0/8"]))
    assert gate.admit_source("10.0.0.1") == "rate_limited"


def test_gatekeeper_auth_throttle_survives_an_unrelated_change() -> None:
    gate = Gatekeeper(_policy(limits={"auth_failures_per_minute_per_ip": 2}))
    gate.auth_attempt("10.0.0.1")
    gate.auth_attempt("10.0.0.1")
    assert gate.auth_blocked("10.0.0.1")
    gate.update(_policy(limits={"auth_failures_per_minute_per_ip": 2}, whitelist=["0.0.0.0/0"]))
    assert gate.auth_blocked("10.0.0.1")  # reloading is no way around the throttle


def test_gatekeeper_denies_destinations_with_the_rule_set_interface() -> None:
    gate = Gatekeeper(Policy.model_validate(
        {"destinations": {"rules": [{"action": "deny", "domains": [".blocked.invalid"]}]}}))
    with pytest.raises(ConnectionNotAllowed):
        gate.check_domain("connect", "x.blocked.invalid", 443)
    gate.check_domain("connect", "localhost", 80)  # block_private needs the addresses
    v4 = (socket.AF_INET, ("127.0.0.1", 80))
    v6 = (socket.AF_INET6, ("2001:db8::1", 80, 0, 0))
    # mixed answers: pinned to the allowed addresses; none allowed: refused
    assert gate.allowed_addresses("connect", "mixed.example", 80, [v4, v6]) == [v6]
    with pytest.raises(ConnectionNotAllowed):
        gate.allowed_addresses("connect", "localhost", 80, [v4])
    with pytest.raises(ConnectionNotAllowed):
        gate.check_destination("udp_associate", "localhost", "127.0.0.1", 53)
    gate.check_destination("udp_associate", "2001:db8::1", "2001:db8::1", 53)


REVOCATION_TABLE: list[tuple[str, Policy, Admission, str | None]] = [
    ("nothing changed", _policy(users=[_alice()]), Admission("127.0.0.1", "alice", HASH_A),
     None),
    ("the whitelist still covers the source",
     _policy(users=[_alice()], whitelist=["127.0.0.0/8", "10.0.0.0/8"]),
     Admission("127.0.0.1", "alice", HASH_A), None),
    ("the source left the whitelist", _policy(users=[_alice()], whitelist=["10.0.0.0/8"]),
     Admission("127.0.0.1", "alice", HASH_A), "denied_whitelist"),
    ("a mapped source left the whitelist", _policy(whitelist=["10.0.0.0/8"]),
     Admission("::ffff:127.0.0.1"), "denied_whitelist"),
    ("the user was disabled", _policy(users=[_alice(disabled=True)]),
     Admission("127.0.0.1", "alice", HASH_A), "auth_failed"),
    ("the user was removed", _policy(users=[{"username": "bob", "password_hash": HASH_B}]),
     Admission("127.0.0.1", "alice", HASH_A), "auth_failed"),
    ("the password changed", _policy(users=[_alice(password_hash=HASH_B)]),
     Admission("127.0.0.1", "alice", HASH_A), "auth_failed"),
    ("the user's limits changed", _policy(users=[_alice(max_connections=1)]),
     Admission("127.0.0.1", "alice", HASH_A), None),
    ("authentication became required", _policy(users=[_alice()]), Admission("127.0.0.1"),
     "auth_failed"),
    ("the destination became forbidden", _policy(destinations={"block_private": True}),
     Admission("127.0.0.1"), "denied_destination"),
    ("authentication is still not required", _policy(limits={"max_connections": 5}),
     Admission("127.0.0.1"), None),
]


@pytest.mark.parametrize(("policy", "admission", "expected"),
                         [row[1:] for row in REVOCATION_TABLE],
                         ids=[row[0] for row in REVOCATION_TABLE])
def test_refusal_of_a_live_session(policy: Policy, admission: Admission,
                                  expected: str | None) -> None:
    gate = Gatekeeper(policy)
    where: dict[str, Any] = {"command": "connect", "domain": None, "dest_ip": "127.0.0.1",
                             "dest_port": 80}
    assert gate.refusal(admission, **where) == expected
    assert gate.still_allowed(admission, **where) is (expected is None)


def test_still_allowed_rechecks_the_destination() -> None:
    gate = Gatekeeper(_policy())
    live = Admission("127.0.0.1")
    args = {"command": "connect", "domain": "localhost", "dest_port": 80}
    assert gate.still_allowed(live, dest_ip="127.0.0.1", **args)
    gate.update(Policy())  # block_private back on
    assert not gate.still_allowed(live, dest_ip="127.0.0.1", **args)
    assert gate.still_allowed(live, dest_ip="192.0.2.10", **args)
    # a session that has no destination yet is judged on its source and user only
    assert gate.still_allowed(live, command="connect", domain=None, dest_ip=None,
                              dest_port=None)
