"""render.py is pure: tables of resources in, policy text and outcomes out."""

from __future__ import annotations

from typing import Any

import pytest

from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import parse_policy
from socks5_operator.render import (
    LISTED_PROBLEMS,
    PLACEHOLDER_USER,
    Outcome,
    Ref,
    SpecError,
    parse_user,
    parse_whitelist,
    policy_secret,
    refused,
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


BAD_CIDRS = ["10.0.0.1/8", "10.0.0.0/33", "nope", "::1/200", 42, ""]


@pytest.mark.parametrize("cidr", BAD_CIDRS)
def test_a_whitelist_with_no_valid_cidr_is_invalid(cidr: Any) -> None:
    with pytest.raises(SpecError) as caught:
        parse_whitelist(_whitelist("w", cidr))
    assert caught.value.reason == "InvalidCIDR"
    assert repr(cidr) in caught.value.message


@pytest.mark.parametrize("cidr", BAD_CIDRS)
def test_a_bad_cidr_leaves_only_itself_out(cidr: Any) -> None:
    spec = parse_whitelist(_whitelist("w", "10.0.0.0/8", cidr))
    assert spec.cidrs == ("10.0.0.0/8",)
    [problem] = spec.rejected
    assert problem.startswith(f"{cidr!r} is not a CIDR")


def test_a_partly_valid_whitelist_applies_its_valid_cidrs_and_says_which_are_not() -> None:
    """One typo in a long list must not drop the list (with it the only whitelist, that
    would lock every client out): the rest applies, and the status names each bad entry."""
    partly = parse_whitelist(_whitelist("office", "198.51.100.1/24", "203.0.113.0/24", "nope",
                                        "2001:db8::/32"))
    rendered = render_policy(users=[], whitelists=[partly])
    assert parse_policy(rendered.text).whitelist == ["203.0.113.0/24", "2001:db8::/32"]
    outcome = rendered.outcomes[partly.ref]
    assert (outcome.ready, outcome.reason, outcome.in_policy) == (False, "InvalidCIDR", True)
    assert outcome.message.startswith("2 of its 4 CIDRs applied; left out 2: ")
    assert "'198.51.100.1/24' is not a CIDR: 198.51.100.1/24 has host bits set (the network " \
        "is 198.51.100.0/24)" in outcome.message
    assert "'nope' is not a CIDR" in outcome.message
    # The policy carries it: its status gets the version, the rollout counts it.
    assert rendered.included() == {(partly.ref, partly.generation)}
    status = status_for(outcome, version=rendered.version, current=None, now="T",
                        nodes=(1, 2))
    assert (status["policyVersion"], status["nodes"]) == (rendered.version, "1/2")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidCIDR")


def test_a_status_names_a_few_bad_cidrs_and_counts_the_rest() -> None:
    bad = [f"10.0.{i}.1/24" for i in range(50)]
    spec = parse_whitelist(_whitelist("w", "192.0.2.0/24", *bad))
    message = render_policy(users=[], whitelists=[spec]).outcomes[spec.ref].message
    assert message.startswith("1 of its 51 CIDRs applied; left out 50: ")
    assert message.count("is not a CIDR") == LISTED_PROBLEMS
    assert message.endswith(f"; and {50 - LISTED_PROBLEMS} more")
    with pytest.raises(SpecError) as caught:
        parse_whitelist(_whitelist("w", *bad))
    assert caught.value.message.startswith("none of its 50 CIDRs is valid, so none is applied")
    assert caught.value.message.endswith(f"; and {50 - LISTED_PROBLEMS} more")


def test_the_whitelist_is_merged_into_the_fewest_networks() -> None:
    """Duplicates, overlaps and neighbours across IPWhitelists become one network per
    range (the same sources are allowed), in one order whatever the input order."""
    lists = [
        parse_whitelist(_whitelist("a", "10.0.0.0/25", "2001:db8::/33", "192.0.2.0/24",
                                   "198.51.100.7/32")),
        parse_whitelist(_whitelist("b", "10.0.0.128/25", "2001:db8:8000::/33",
                                   "192.0.2.64/26", "172.16.0.0/12", "198.51.100.7/32")),
    ]
    one = render_policy(users=[], whitelists=lists)
    two = render_policy(users=[], whitelists=lists[::-1])
    assert one.text == two.text
    merged = ["10.0.0.0/24", "172.16.0.0/12", "192.0.2.0/24", "198.51.100.7/32",
              "2001:db8::/32"]
    assert parse_policy(one.text).whitelist == merged
    # Block style with no indentation to spare: one "- network" line each.
    assert "\nwhitelist:\n" + "".join(f"- {net}\n" for net in merged) in one.text
    assert one.included() == {(spec.ref, spec.generation) for spec in lists}


def test_a_refused_policy_makes_every_resource_not_ready() -> None:
    good = parse_whitelist(_whitelist("good", "192.0.2.0/24"))
    partly = parse_whitelist(_whitelist("partly", "10.0.0.0/8", "10.0.0.1/8"))
    user = parse_user(_user("u"))
    rendered = render_policy(users=[(user, HASH)], whitelists=[good, partly])
    refusal = refused(rendered, "PolicyTooLarge", "2000000 bytes, over 1032192")
    assert refusal.version == rendered.version
    assert not refusal.included()
    assert {(o.ready, o.reason) for o in refusal.outcomes.values()} == {
        (False, "PolicyTooLarge")}
    assert refusal.outcomes[good.ref].message == "2000000 bytes, over 1032192"
    assert refusal.outcomes[partly.ref].message.startswith(
        "2000000 bytes, over 1032192; besides, this resource: InvalidCIDR: 1 of its 2 ")
    status = status_for(refusal.outcomes[user.ref], version=refusal.version, current=None,
                        now="T", nodes=(3, 3))
    assert "policyVersion" not in status and "nodes" not in status


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
