"""render.py is pure: tables of resources in, policy text and outcomes out."""

from __future__ import annotations

from typing import Any

import pytest

from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import parse_policy
from socks5_operator.render import (
    PLACEHOLDER_USER,
    Outcome,
    Ref,
    SpecError,
    parse_user,
    parse_whitelist,
    policy_secret,
    render_policy,
    same_status,
    status_for,
)

HASH = hash_password("pw", n=2**4)


def _user(name: str, username: str | None = None, created: str = "2026-01-01T00:00:00Z",
          **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "generation": 2,
                         "creationTimestamp": created},
            "spec": {"username": username or name,
                     "passwordSecretRef": {"name": "s", "key": "k"}, **spec}}


def _whitelist(name: str, *cidrs: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"cidrs": list(cidrs)}}


def test_the_same_inputs_give_the_same_bytes_in_any_order() -> None:
    users = [(parse_user(_user("b")), HASH), (parse_user(_user("a")), HASH)]
    lists = [parse_whitelist(_whitelist("w1", "10.0.0.0/8", "2001:db8::/32")),
             parse_whitelist(_whitelist("w2", "192.0.2.0/24", "10.0.0.0/8"))]
    one = render_policy(users=users, whitelists=lists)
    two = render_policy(users=users[::-1], whitelists=lists[::-1])
    assert one.text == two.text and one.version == two.version
    policy = parse_policy(one.text)
    assert policy.version == one.version  # the proxies report the operator's version
    assert [u.username for u in policy.users] == ["a", "b"]
    assert policy.whitelist == ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]
    secret = policy_secret(one, name="p", namespace="ns", key="policy.yaml")
    assert secret["metadata"]["annotations"]["socks5.analytics.io/policy-version"] == one.version


def test_duplicate_username_goes_to_the_oldest() -> None:
    old = parse_user(_user("old", "carol", created="2026-01-01T00:00:00Z"))
    new = parse_user(_user("new", "carol", created="2026-02-01T00:00:00Z"))
    rendered = render_policy(users=[(new, HASH), (old, HASH)], whitelists=[])
    assert rendered.outcomes[old.ref].ready
    outcome = rendered.outcomes[new.ref]
    assert (outcome.ready, outcome.reason) == (False, "DuplicateUsername")
    assert "ProxyUser ns/old" in outcome.message
    assert len(parse_policy(rendered.text).users) == 1


@pytest.mark.parametrize(("body", "reason"), [
    (_user("x", username="with space"), "InvalidUsername"),
    (_user("x", username="é" * 128), "InvalidUsername"),
    (_user("x", maxConnections=-1), "InvalidSpec"),
    (_user("x", maxConnections=True), "InvalidSpec"),
    (_user("x", connectionsPerSecond="fast"), "InvalidSpec"),
    ({"metadata": {"name": "x"}, "spec": {"username": "x"}}, "InvalidSpec"),
    (_user("x", passwordSecretRef="pw"), "InvalidSpec"),  # a string, not {name, key}
    (_user("x", passwordSecretRef=["pw"]), "InvalidSpec"),
    ({"metadata": {"name": "x"}, "spec": "alice"}, "InvalidSpec"),
    ({"metadata": {"name": "x", "generation": "two"}, "spec": []}, "InvalidSpec"),
])
def test_bad_user_specs(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_user(body)
    assert caught.value.reason == reason


def test_a_whitelist_whose_spec_is_not_a_mapping_is_invalid() -> None:
    with pytest.raises(SpecError) as caught:
        parse_whitelist({"metadata": {"name": "w"}, "spec": "10.0.0.0/8"})
    assert caught.value.reason == "InvalidSpec"


@pytest.mark.parametrize("cidr", ["10.0.0.1/8", "10.0.0.0/33", "nope", "::1/200", 42, ""])
def test_bad_cidrs(cidr: Any) -> None:
    with pytest.raises(SpecError) as caught:
        parse_whitelist(_whitelist("w", "10.0.0.0/8", cidr))
    assert caught.value.reason == "InvalidCIDR"


def test_invalid_resources_fail_closed() -> None:
    spec = parse_user(_user("u"))
    problem = SpecError("SecretNotFound", "no Secret")
    rendered = render_policy(
        users=[(spec, problem)],
        whitelists=[(Ref("IPWhitelist", "ns", "w"), 1, SpecError("InvalidCIDR", "bad"))],
    )
    policy = parse_policy(rendered.text)
    assert policy.requires_auth
    assert [(u.username, u.disabled) for u in policy.users] == [(PLACEHOLDER_USER, True)]
    assert policy.whitelist == ["0.0.0.0/32", "::/128"]
    assert not rendered.included()


def test_nothing_means_no_auth_and_every_source() -> None:
    policy = parse_policy(render_policy(users=[], whitelists=[]).text)
    assert not policy.requires_auth and policy.whitelist == []


def test_status_keeps_transition_time_while_unchanged() -> None:
    ok = Outcome(True, "Applied", "in the policy", 3)
    first = status_for(ok, version="v1", current=None, now="T1")
    second = status_for(ok, version="v1", current=first, now="T2")
    assert second == first and same_status(first, second)
    bad = Outcome(False, "InvalidCIDR", "bad", 4)
    third = status_for(bad, version="v2", current=second, now="T3")
    ready = next(c for c in third["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["lastTransitionTime"]) == ("False", "T3")
    assert "policyVersion" not in third and not same_status(second, third)
    counted = status_for(ok, version="v1", current=first, now="T4", nodes=(2, 5))
    assert counted["nodes"] == "2/5" and not same_status(first, counted)
