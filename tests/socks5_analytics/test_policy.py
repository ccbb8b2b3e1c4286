"""The policy document's schema: defaults, and every bad value refused naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy_node.reload import PolicyWatcher
from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import Policy, PolicyError, load_policy, parse_policy

HASH = hash_password("pw", n=2**4)


def test_an_empty_document_is_the_default_policy() -> None:
    for text in ("", "{}", "# nothing\n"):
        policy = parse_policy(text)
        assert policy.users == [] and policy.whitelist == []
        assert not policy.requires_auth
        assert policy.destinations.block_private is True
        assert policy.destinations.rules == []
        limits = policy.limits
        assert (limits.max_connections, limits.max_connections_per_ip,
                limits.connections_per_second_per_ip,
                limits.auth_failures_per_minute_per_ip) == (10_000, 0, 0, 10)


def test_no_file_means_no_users_and_no_restrictions_but_block_private() -> None:
    policy = load_policy(None)
    assert not policy.requires_auth
    assert policy.destinations.block_private is True
    assert policy.version == "empty"


def test_the_full_document_of_the_design() -> None:
    doc = {
        "users": [{"username": "alice", "password_hash": HASH, "disabled": False,
                   "max_connections": 5, "connections_per_second": 2.5,
                   "max_bytes_per_second": 1_000_000}],
        "whitelist": ["10.0.0.0/8", "2001:db8::/32", "::ffff:192.168.0.0/112"],
        "destinations": {
            "block_private": False,
            "rules": [
                {"action": "deny", "domains": [".internal.example"], "ports": ["1-65535"]},
                {"action": "allow", "cidrs": ["10.1.2.0/24"], "ports": ["443", 8443],
                 "commands": ["connect", "udp_associate"]},
            ],
        },
        "limits": {"max_connections": 100, "max_connections_per_ip": 3,
                   "connections_per_second_per_ip": 0.5, "auth_failures_per_minute_per_ip": 0},
    }
    policy = parse_policy(yaml.safe_dump(doc))
    assert policy.requires_auth
    assert policy.users[0].connections_per_second == 2.5
    assert policy.destinations.rules[1].ports == ["443", 8443]
    assert policy.limits.connections_per_second_per_ip == 0.5


# -- the version is a hash of the content --------------------------------------------------

def test_the_version_is_a_content_hash() -> None:
    text = "whitelist: [10.0.0.0/8]\n"
    first, second = parse_policy(text), parse_policy(text, source="elsewhere.yaml")
    assert first.version == second.version  # same document, same version on every node
    assert len(first.version) == 16 and int(first.version, 16) >= 0
    assert parse_policy("whitelist: [10.0.0.0/9]\n").version != first.version
    assert parse_policy(text + "# a comment\n").version != first.version  # the bytes count


def test_load_policy_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("whitelist: ['127.0.0.0/8']\n")
    assert load_policy(path).version == parse_policy(path.read_text()).version


def test_an_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read policy file"):
        load_policy(missing)


def test_a_version_key_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"version: unknown key"):
        parse_policy("version: abc\n")


# -- every bad value names its key ---------------------------------------------------------

BAD: list[tuple[str, dict[str, object] | str, str]] = [
    # (case, document, what the message must contain)
    ("not YAML", "users: [", "not valid YAML"),
    ("not a mapping", "- a\n- b\n", "the top level must be a mapping"),
    ("unknown top-level key", {"userz": []}, "userz: unknown key"),
    ("unknown limits key", {"limits": {"max_conns": 3}}, "limits.max_conns: unknown key"),
    ("unknown user key", {"users": [{"username": "a", "password_hash": HASH, "admin": True}]},
     "users.0.admin: unknown key"),
    ("unknown rule key", {"destinations": {"rules": [{"action": "deny", "host": "x"}]}},
     "destinations.rules.0.host: unknown key"),
    ("bad whitelist CIDR", {"whitelist": ["10.0.0.0/33"]}, "whitelist: "),
    ("whitelist garbage", {"whitelist": ["localhost"]}, "'localhost' is not a CIDR"),
    ("bad rule CIDR", {"destinations": {"rules": [{"action": "deny", "cidrs": ["1.2.3/24x"]}]}},
     "destinations.rules.0.cidrs: "),
    ("port out of range", {"destinations": {"rules": [{"action": "deny", "ports": ["0-70000"]}]}},
     "destinations.rules.0.ports: "),
    ("port zero", {"destinations": {"rules": [{"action": "deny", "ports": [0]}]}},
     "destinations.rules.0.ports: "),
    ("range high to low",
     {"destinations": {"rules": [{"action": "deny", "ports": ["2000-1000"]}]}},
     "'2000-1000': ports are 1-65535, low to high"),
    ("half a range", {"destinations": {"rules": [{"action": "deny", "ports": ["1024-"]}]}},
     "destinations.rules.0.ports: "),
    ("port words", {"destinations": {"rules": [{"action": "deny", "ports": ["https"]}]}},
     "'https' is not a port"),
    ("a boolean port", {"destinations": {"rules": [{"action": "deny", "ports": [True]}]}},
     "destinations.rules.0.ports.0"),
    ("bad action", {"destinations": {"rules": [{"action": "reject"}]}},
     "destinations.rules.0.action"),
    ("missing action", {"destinations": {"rules": [{"cidrs": ["1.1.1.1/32"]}]}},
     "destinations.rules.0.action"),
    ("bad command", {"destinations": {"rules": [{"action": "deny", "commands": ["ping"]}]}},
     "destinations.rules.0.commands.0"),
    ("a wildcard domain", {"destinations": {"rules": [{"action": "deny",
                                                       "domains": ["*.example.com"]}]}},
     "destinations.rules.0.domains: "),
    ("an empty suffix", {"destinations": {"rules": [{"action": "deny", "domains": ["."]}]}},
     "destinations.rules.0.domains: "),
    ("a Unicode domain", {"destinations": {"rules": [{"action": "deny",
                                                      "domains": ["bücher.example"]}]}},
     "xn--"),
    ("an address as a domain", {"destinations": {"rules": [{"action": "deny",
                                                            "domains": ["10.0.0.1"]}]}},
     "list it under cidrs"),
    ("a URL as a domain", {"destinations": {"rules": [{"action": "deny",
                                                       "domains": ["https://x.example/"]}]}},
     "destinations.rules.0.domains: "),
    ("block_private not a boolean", {"destinations": {"block_private": "sometimes"}},
     "destinations.block_private"),
    ("duplicate user", {"users": [{"username": "alice", "password_hash": HASH},
                                  {"username": "alice", "password_hash": HASH}]},
     "duplicate username 'alice'"),
    ("plain password", {"users": [{"username": "alice", "password_hash": "hunter2"}]},
     "users.0.password_hash: "),
    ("a password key", {"users": [{"username": "alice", "password": "hunter2"}]},
     "users.0.password: unknown key"),
    ("empty username", {"users": [{"username": "", "password_hash": HASH}]},
     "users.0.username"),
    ("username over 255 bytes", {"users": [{"username": "é" * 128, "password_hash": HASH}]},
     "users.0.username"),
    ("negative user cap", {"users": [{"username": "a", "password_hash": HASH,
                                      "max_connections": -1}]},
     "users.0.max_connections"),
    ("negative user rate", {"users": [{"username": "a", "password_hash": HASH,
                                       "connections_per_second": -0.5}]},
     "users.0.connections_per_second"),
    ("node cap of zero", {"limits": {"max_connections": 0}}, "limits.max_connections"),
    ("negative per-IP cap", {"limits": {"max_connections_per_ip": -1}},
     "limits.max_connections_per_ip"),
    ("per-IP rate not a number", {"limits": {"connections_per_second_per_ip": "fast"}},
     "limits.connections_per_second_per_ip"),
    ("negative auth throttle", {"limits": {"auth_failures_per_minute_per_ip": -3}},
     "limits.auth_failures_per_minute_per_ip"),
]


@pytest.mark.parametrize(("document", "expected"), [row[1:] for row in BAD],
                         ids=[row[0] for row in BAD])
def test_bad_values_name_the_key(document: dict[str, object] | str, expected: str) -> None:
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="/etc/socks5/policy.yaml")
    message = str(caught.value)
    assert message.startswith("/etc/socks5/policy.yaml: "), message
    assert expected in message, message


def test_every_problem_is_reported_at_once() -> None:
    doc = {"whitelist": ["nope"], "limits": {"max_connections": 0, "extra": 1}}
    with pytest.raises(PolicyError) as caught:
        parse_policy(yaml.safe_dump(doc))
    message = str(caught.value)
    for key in ("whitelist", "limits.max_connections", "limits.extra: unknown key"):
        assert key in message, message


def test_a_plain_password_is_not_echoed_as_a_hash() -> None:
    """The error explains what a hash is; a plain password is never accepted as one."""
    with pytest.raises(PolicyError, match="hash-password"):
        parse_policy(yaml.safe_dump({"users": [{"username": "a", "password_hash": "pw"}]}))


@pytest.mark.parametrize("good", ["example.com", ".example.com", "EXAMPLE.com.", "_srv.x.org",
                                  "xn--bcher-kva.example", "localhost", "a-b.c-d"])
def test_good_domains(good: str) -> None:
    doc = {"destinations": {"rules": [{"action": "deny", "domains": [good]}]}}
    assert parse_policy(yaml.safe_dump(doc)).destinations.rules[0].domains == [good]


def test_policies_are_immutable() -> None:
    policy = parse_policy("whitelist: [10.0.0.0/8]\n")
    with pytest.raises(ValueError):
        policy.whitelist = []  # type: ignore[misc]
    assert isinstance(policy, Policy)


# -- the watcher: a new valid file applies, a bad one is refused and the old one stays -------

class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def error(self, message: str, **fields: object) -> None:
        self.records.append(("error", message, fields))

    def info(self, message: str, **fields: object) -> None:
        self.records.append(("info", message, fields))


def _replace(path: Path, text: str) -> None:
    """Write atomically, as Kubernetes and careful editors do (a new inode each time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _watcher(tmp_path: Path, text: str) -> tuple[Path, PolicyWatcher, list[Policy], _Log]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    applied: list[Policy] = []
    log = _Log()
    watcher = PolicyWatcher(path, current=load_policy(path), interval=1.0,
                            apply=applied.append, log=log)
    return path, watcher, applied, log


def test_the_watcher_applies_a_changed_file_once(tmp_path: Path) -> None:
    path, watcher, applied, log = _watcher(tmp_path, "whitelist: [10.0.0.0/8]\n")
    watcher.check()
    assert applied == []  # unchanged
    _replace(path, "whitelist: [127.0.0.0/8]\n")
    watcher.check()
    watcher.check()
    assert [p.whitelist for p in applied] == [["127.0.0.0/8"]]
    assert watcher.version == applied[0].version
    watcher.check(force=True)  # SIGHUP with the same content: nothing new
    assert len(applied) == 1
    assert log.records == []


def test_the_watcher_sees_in_place_rewrites(tmp_path: Path) -> None:
    path, watcher, applied, _ = _watcher(tmp_path, "whitelist: [10.0.0.0/8]\n")
    path.write_text("whitelist: [10.0.0.0/16]\n")  # same inode, another size
    watcher.check()
    assert [p.whitelist for p in applied] == [["10.0.0.0/16"]]


def test_the_watcher_refuses_a_broken_file_once_and_keeps_the_policy(tmp_path: Path) -> None:
    path, watcher, applied, log = _watcher(tmp_path, "whitelist: [10.0.0.0/8]\n")
    old_version = watcher.version
    _replace(path, "whitelist: [10.0.0.0/33]\n")
    watcher.check()
    watcher.check(force=True)  # the same broken content is not logged twice
    assert applied == []
    assert len(log.records) == 1
    level, message, fields = log.records[0]
    assert (level, message) == ("error", "policy refused; keeping the policy in force")
    assert "whitelist" in str(fields["error"]) and "10.0.0.0/33" in str(fields["error"])
    assert fields["policy_version"] == old_version
    _replace(path, "whitelist: [10.0.0.0/9]\n")
    watcher.check()
    assert [p.whitelist for p in applied] == [["10.0.0.0/9"]]


def test_the_watcher_refuses_an_empty_file(tmp_path: Path) -> None:
    """An in-place rewrite truncates first: the empty file in between must not apply (it
    would drop every user, i.e. switch authentication off)."""
    path, watcher, applied, log = _watcher(
        tmp_path, yaml.safe_dump({"users": [{"username": "a", "password_hash": HASH}]}))
    path.write_text("")
    watcher.check()
    assert applied == []
    assert "empty" in str(log.records[0][2]["error"])
    _replace(path, "{}\n")  # an explicit empty policy is fine
    watcher.check()
    assert len(applied) == 1 and not applied[0].requires_auth


def test_the_watcher_keeps_the_policy_when_the_file_goes_away(tmp_path: Path) -> None:
    path, watcher, applied, log = _watcher(tmp_path, "whitelist: [10.0.0.0/8]\n")
    path.unlink()
    watcher.check()
    watcher.check()
    assert applied == []
    assert [r[1] for r in log.records] == ["policy file unreadable; keeping the policy in force"]
    path.write_text("whitelist: [10.0.0.0/12]\n")
    watcher.check()
    assert [p.whitelist for p in applied] == [["10.0.0.0/12"]]
