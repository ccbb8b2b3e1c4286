"""Unit tests for `socks5_analytics.config`: sources, their priority, and error messages."""

from __future__ import annotations

import os
import socket
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from socks5_analytics.config import (
    ConfigError,
    EventSinkSettings,
    LogSettings,
    ProxySettings,
    Settings,
    format_address,
    load_settings,
    parse_address,
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No S5A_* variables from the outside world, and no stray `.env` in the cwd."""
    for name in list(os.environ):
        if name.upper().startswith("S5A_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.node_id == socket.gethostname()
    assert settings.log == LogSettings(level="info", format="auto")
    proxy = settings.proxy
    assert proxy.listen == ("127.0.0.1", 1080)
    assert proxy.policy_file is None
    assert proxy.workers == 1
    assert proxy.max_connections == 10_000
    assert proxy.handshake_timeout == 10.0
    assert proxy.connect_timeout == 10.0
    assert proxy.dns_timeout == 5.0
    assert proxy.dns_cache_ttl == 30.0
    assert proxy.dns_cache_size == 4096
    assert proxy.idle_timeout == 300.0
    assert proxy.half_close_timeout == 30.0
    assert proxy.udp_idle_timeout == 120.0
    assert proxy.bind_timeout == 60.0
    assert proxy.shutdown_grace == 30.0
    assert proxy.relay == "auto"
    assert proxy.events == EventSinkSettings(
        sink="auto", path=Path("var/events.jsonl"), buffer_events=100_000, flush_interval=0.2
    )


def test_no_config_file_equals_empty_config_file(tmp_path: Path) -> None:
    assert load_settings(config_file=_write(tmp_path, "")) == load_settings()
    assert load_settings(config_file=_write(tmp_path, "# only a comment\n")) == load_settings()


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.node_id = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        settings.proxy.workers = 4  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# YAML file
# --------------------------------------------------------------------------------------


def test_yaml_file_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
node_id: edge-1
log:
  level: debug
  format: json
proxy:
  listen: "[::1]:1081"
  policy_file: /etc/s5a/policy.yaml
  workers: 4
  max_connections: 500
  connect_timeout: 2.5
  dns_cache_size: 0
  relay: copy
  events:
    sink: none
    path: /tmp/events.jsonl
    buffer_events: 1000
    flush_interval: 1
""",
    )
    settings = load_settings(config_file=path)
    assert settings.node_id == "edge-1"
    assert settings.log == LogSettings(level="debug", format="json")
    assert settings.proxy.listen == ("::1", 1081)
    assert settings.proxy.policy_file == Path("/etc/s5a/policy.yaml")
    assert settings.proxy.workers == 4
    assert settings.proxy.max_connections == 500
    assert settings.proxy.connect_timeout == 2.5
    assert settings.proxy.dns_cache_size == 0
    assert settings.proxy.relay == "copy"
    assert settings.proxy.events == EventSinkSettings(
        sink="none", path=Path("/tmp/events.jsonl"), buffer_events=1000, flush_interval=1.0
    )
    # What the file does not mention keeps its default.
    assert settings.proxy.idle_timeout == ProxySettings().idle_timeout


def test_yaml_listen_port_only_binds_all_interfaces(tmp_path: Path) -> None:
    path = _write(tmp_path, 'proxy:\n  listen: ":9101"\n')
    assert load_settings(config_file=path).proxy.listen == ("0.0.0.0", 9101)


def test_config_file_is_only_read_by_load_settings(tmp_path: Path) -> None:
    path = _write(tmp_path, "proxy:\n  workers: 3\n")
    assert load_settings(config_file=path).proxy.workers == 3
    # The file is bound for one call only: neither a later call nor a bare Settings() sees it.
    assert load_settings().proxy.workers == 1
    assert Settings().proxy.workers == 1


# --------------------------------------------------------------------------------------
# Priority: overrides > environment > .env > file > defaults
# --------------------------------------------------------------------------------------


def test_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, 'proxy:\n  listen: "127.0.0.1:1080"\n  workers: 2\n')
    monkeypatch.setenv("S5A_PROXY__LISTEN", "0.0.0.0:9000")
    settings = load_settings(config_file=path)
    assert settings.proxy.listen == ("0.0.0.0", 9000)
    assert settings.proxy.workers == 2  # sections merge key by key


def test_env_ipv6_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S5A_PROXY__LISTEN", "[::1]:1080")
    assert load_settings().proxy.listen == ("::1", 1080)


@pytest.mark.parametrize(
    ("name", "value", "read", "expected"),
    [
        pytest.param("S5A_PROXY__WORKERS", "8", lambda s: s.proxy.workers, 8, id="int"),
        pytest.param("S5A_PROXY__RELAY", "splice", lambda s: s.proxy.relay, "splice",
                     id="literal"),
        pytest.param("S5A_LOG__LEVEL", "error", lambda s: s.log.level, "error", id="log-section"),
        pytest.param("S5A_NODE_ID", "env-node", lambda s: s.node_id, "env-node", id="top-level"),
        pytest.param("S5A_PROXY__EVENTS__BUFFER_EVENTS", "7000",
                     lambda s: s.proxy.events.buffer_events, 7000, id="two-levels-deep"),
        pytest.param("s5a_proxy__workers", "8", lambda s: s.proxy.workers, 8, id="lower-case"),
    ],
)
def test_env_values_beat_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    read: Callable[[Settings], object],
    expected: object,
) -> None:
    path = _write(
        tmp_path,
        "node_id: file-node\nlog:\n  level: debug\n"
        "proxy:\n  workers: 2\n  relay: copy\n  events:\n    buffer_events: 3000\n",
    )
    assert read(load_settings(config_file=path)) != expected
    monkeypatch.setenv(name, value)
    assert read(load_settings(config_file=path)) == expected


def test_overrides_beat_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "node_id: file-node\nproxy:\n  workers: 2\n  max_connections: 5\n")
    monkeypatch.setenv("S5A_PROXY__WORKERS", "3")
    monkeypatch.setenv("S5A_NODE_ID", "env-node")
    settings = load_settings(config_file=path, node_id="cli-node", proxy={"workers": 4})
    assert settings.node_id == "cli-node"
    assert settings.proxy.workers == 4
    assert settings.proxy.max_connections == 5  # untouched keys still come from the file


def test_override_listen_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S5A_PROXY__LISTEN", "0.0.0.0:9000")
    settings = load_settings(proxy={"listen": "[::1]:7000"})
    assert settings.proxy.listen == ("::1", 7000)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nS5A_PROXY__WORKERS=6\nS5A_LOG__FORMAT=console\n", encoding="utf-8"
    )
    settings = load_settings()
    assert settings.proxy.workers == 6
    assert settings.log.format == "console"


def test_dotenv_listen(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("S5A_PROXY__LISTEN=0.0.0.0:9000\n", encoding="utf-8")
    assert load_settings().proxy.listen == ("0.0.0.0", 9000)


def test_dotenv_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("S5A_PROXY__WORKERS=6\nS5A_NODE_ID=dotenv\n", encoding="utf-8")
    path = _write(tmp_path, "node_id: file\nproxy:\n  workers: 2\n  relay: copy\n")
    settings = load_settings(config_file=path)
    assert settings.proxy.workers == 6  # .env beats the file
    assert settings.proxy.relay == "copy"
    monkeypatch.setenv("S5A_PROXY__WORKERS", "9")
    settings = load_settings(config_file=path)
    assert settings.proxy.workers == 9  # the environment beats .env
    assert settings.node_id == "dotenv"


def test_dotenv_ignores_other_programs_variables(tmp_path: Path) -> None:
    # A shared .env (docker compose, other tools) holds variables without our prefix; like
    # the process environment, they are none of our business and must not be "unknown keys".
    (tmp_path / ".env").write_text(
        "COMPOSE_PROJECT_NAME=proxy\nS5A_PROXY__WORKERS=6\n", encoding="utf-8"
    )
    assert load_settings().proxy.workers == 6


def test_dotenv_typo_in_our_prefix_is_an_unknown_key(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("S5A_BOGUS=1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        load_settings()


# --------------------------------------------------------------------------------------
# Errors name the key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("bogus: 1\n", "bogus", id="top-level"),
        pytest.param("proxy:\n  listne: ':1080'\n", "proxy.listne", id="typo-in-section"),
        pytest.param("log:\n  colour: true\n", "log.colour", id="log-section"),
        pytest.param("proxy:\n  events:\n    pth: x\n", "proxy.events.pth", id="two-deep"),
    ],
)
def test_unknown_key_in_file(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(^|\W){key}: unknown key"):
        load_settings(config_file=_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        pytest.param("proxy:\n  listen: '127.0.0.1:70000'\n", "proxy.listen", "70000",
                     id="listen-port-too-big"),
        pytest.param("proxy:\n  listen: '127.0.0.1:-1'\n", "proxy.listen", "-1",
                     id="listen-port-negative"),
        pytest.param("proxy:\n  listen: '127.0.0.1:http'\n", "proxy.listen", "http",
                     id="listen-port-name"),
        pytest.param("proxy:\n  listen: 1080\n", "proxy.listen", "1080", id="listen-int"),
        pytest.param("proxy:\n  listen: localhost\n", "proxy.listen", "localhost",
                     id="listen-no-port"),
        pytest.param("proxy:\n  listen: '::1:1080'\n", "proxy.listen", "brackets",
                     id="listen-ipv6-without-brackets"),
        pytest.param("proxy:\n  listen: '[nope]:1080'\n", "proxy.listen", "nope",
                     id="listen-bad-ipv6"),
        pytest.param("proxy:\n  listen: [127.0.0.1, 70000]\n", "proxy.listen", "70000",
                     id="listen-list-port-too-big"),
        pytest.param("proxy:\n  listen: [127.0.0.1, -1]\n", "proxy.listen", "-1",
                     id="listen-list-port-negative"),
        pytest.param("proxy:\n  listen: [127.0.0.1, null]\n", "proxy.listen", "",
                     id="listen-list-port-null"),
        pytest.param("proxy:\n  workers: many\n", "proxy.workers", "many", id="workers-str"),
        pytest.param("proxy:\n  workers: 0\n", "proxy.workers", "0", id="workers-zero"),
        pytest.param("proxy:\n  workers: 65\n", "proxy.workers", "65", id="workers-too-many"),
        pytest.param("proxy:\n  handshake_timeout: -1\n", "proxy.handshake_timeout", "-1",
                     id="timeout-negative"),
        pytest.param("proxy:\n  idle_timeout: 0\n", "proxy.idle_timeout", "0",
                     id="timeout-zero"),
        pytest.param("proxy:\n  relay: turbo\n", "proxy.relay", "turbo", id="relay-literal"),
        pytest.param("proxy:\n  events:\n    sink: kafka\n", "proxy.events.sink", "kafka",
                     id="nested-literal"),
        pytest.param("proxy:\n  events:\n    buffer_events: 999\n", "proxy.events",
                     "buffer_events (999) must be at least twice batch_max_events (500)",
                     id="buffer-below-two-batches"),
        pytest.param("proxy:\n  events:\n    buffer_events: 0\n", "proxy.events.buffer_events",
                     "0", id="nested-range"),
        pytest.param("log:\n  level: verbose\n", "log.level", "verbose", id="log-level"),
        pytest.param("node_id: ''\n", "node_id", "''", id="node-id-empty"),
        pytest.param("proxy: 5\n", "proxy", "5", id="section-not-mapping"),
        pytest.param("proxy:\n", "proxy", "None", id="section-null"),
    ],
)
def test_bad_value_in_file(tmp_path: Path, text: str, key: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=_write(tmp_path, text))
    message = str(info.value)
    assert f"{key}: " in message
    assert detail in message


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "proxy:\n  workers: 0\n  bogus: 1\nlog:\n  level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    message = str(info.value)
    for key in ("proxy.workers", "proxy.bogus", "log.level"):
        assert key in message


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        pytest.param("S5A_PROXY__WORKERS", "abc", "proxy.workers", id="workers"),
        pytest.param("S5A_LOG__LEVEL", "loud", "log.level", id="log-level"),
        pytest.param("S5A_PROXY__LISTEN", "nope", "proxy.listen", id="listen-no-port"),
        pytest.param("S5A_PROXY__LISTEN", "0.0.0.0:99999", "proxy.listen", id="listen-port"),
    ],
)
def test_bad_env_value(monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"{key}: .*{value}"):
        load_settings()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        pytest.param({"proxy": {"listen": "nope"}}, "proxy.listen", id="listen"),
        pytest.param({"proxy": {"workers": -3}}, "proxy.workers", id="workers"),
        pytest.param({"bogus": 1}, "bogus", id="unknown"),
    ],
)
def test_bad_override(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(^|\W){key}: "):
        load_settings(**overrides)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("proxy: [\n", id="unclosed-flow"),
        pytest.param("proxy:\n  listen: ':1080'\n workers: 2\n", id="bad-indentation"),
        pytest.param("proxy:\n\tworkers: 2\n", id="tab"),
        pytest.param("key: 'unterminated\n", id="unterminated-string"),
    ],
)
def test_malformed_yaml_names_the_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text, name="broken.yaml")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_settings(config_file=path)
    assert str(path) in str(info.value)
    assert "line" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("- proxy\n- log\n", id="list"),
        pytest.param("just a string\n", id="scalar"),
        pytest.param("42\n", id="number"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_settings(config_file=path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_settings(config_file=path)
    assert str(path) in str(info.value)


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=tmp_path)


# --------------------------------------------------------------------------------------
# parse_address / format_address
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1:1080", ("127.0.0.1", 1080), id="ipv4"),
        pytest.param("[::1]:1080", ("::1", 1080), id="ipv6-loopback"),
        pytest.param("[2001:db8::1]:443", ("2001:db8::1", 443), id="ipv6"),
        pytest.param("[::]:0", ("::", 0), id="ipv6-any-port-0"),
        pytest.param("[::ffff:10.0.0.1]:80", ("::ffff:10.0.0.1", 80), id="ipv4-mapped"),
        pytest.param(":9101", ("0.0.0.0", 9101), id="port-only"),
        pytest.param("localhost:65535", ("localhost", 65535), id="name-max-port"),
        pytest.param("proxy.example.com:0", ("proxy.example.com", 0), id="name-port-0"),
        pytest.param("  example.com:443\n", ("example.com", 443), id="surrounding-space"),
        pytest.param("host:01080", ("host", 1080), id="leading-zero-port"),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


def test_parse_address_default_host() -> None:
    assert parse_address(":9101", default_host="127.0.0.1") == ("127.0.0.1", 9101)
    assert parse_address("10.0.0.1:9101", default_host="127.0.0.1") == ("10.0.0.1", 9101)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(":", id="colon-only"),
        pytest.param("1080", id="no-colon"),
        pytest.param("localhost", id="host-only"),
        pytest.param("host:", id="no-port"),
        pytest.param("host:-1", id="negative-port"),
        pytest.param("host:65536", id="port-too-big"),
        pytest.param("host:+80", id="plus-sign"),
        pytest.param("host: 80", id="space-in-port"),
        pytest.param("host:80.0", id="float-port"),
        pytest.param("host:http", id="service-name"),
        pytest.param("host:0x50", id="hex-port"),
        pytest.param("host:١٠٨٠", id="non-ascii-digits"),
        pytest.param("host:²", id="superscript-digit"),
        pytest.param("::1:1080", id="ipv6-without-brackets"),
        pytest.param("::1", id="bare-ipv6"),
        pytest.param("[::1]", id="brackets-no-port"),
        pytest.param("[::1]:", id="brackets-empty-port"),
        pytest.param("[::1]1080", id="brackets-no-colon"),
        pytest.param("[]:1080", id="empty-brackets"),
        pytest.param("[nope]:1080", id="brackets-not-ipv6"),
        pytest.param("[127.0.0.1]:1080", id="brackets-ipv4"),
        pytest.param("[::1]:1]:2", id="brackets-twice"),
        pytest.param("[::1:1080", id="unclosed-bracket"),
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"port|expected|IPv6|Address|brackets|[Oo]ctet|parts"):
        parse_address(text)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        pytest.param("127.0.0.1", 1080, "127.0.0.1:1080", id="ipv4"),
        pytest.param("::1", 1080, "[::1]:1080", id="ipv6-loopback"),
        pytest.param("2001:db8::1", 443, "[2001:db8::1]:443", id="ipv6"),
        pytest.param("::", 0, "[::]:0", id="ipv6-any"),
        pytest.param("0.0.0.0", 9101, "0.0.0.0:9101", id="any"),
        pytest.param("example.com", 65535, "example.com:65535", id="name"),
    ],
)
def test_format_address(host: str, port: int, expected: str) -> None:
    assert format_address(host, port) == expected
    assert parse_address(expected) == (host, port)


def test_unknown_environment_section_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S5A_PROXYY__LISTEN", "0.0.0.0:1080")
    with pytest.raises(ConfigError, match="S5A_PROXYY__LISTEN: unknown environment variable"):
        load_settings(None)


# --------------------------------------------------------------------------------------
# Sections, duplicate keys, database URLs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["proxy: 5\n", "proxy: hello\n", "proxy: [1, 2]\n",
                                  "proxy: false\n"])
def test_a_section_that_is_not_a_mapping_is_refused_even_with_an_override(
        tmp_path: Path, text: str) -> None:
    """Sources merge key by key: `--listen` used to replace `proxy: 5` without a word."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"proxy: expected a mapping of keys in the config"):
        load_settings(config_file=path, proxy={"listen": "127.0.0.1:0"})


@pytest.mark.parametrize(("value", "detail"), [
    ("5", "expected a mapping of keys in the environment, got 5"),
    ("garbage", "S5A_PROXY is not a JSON object; set its keys one by one"),
    ("[1]", "expected a mapping of keys in the environment, got [1]"),
])
def test_a_section_variable_must_be_a_json_object(
        monkeypatch: pytest.MonkeyPatch, value: str, detail: str) -> None:
    monkeypatch.setenv("S5A_PROXY", value)
    with pytest.raises(ConfigError, match=rf"proxy: .*{detail}".replace("[", r"\[")
                       .replace("]", r"\]")):
        load_settings(proxy={"listen": "127.0.0.1:0"})


def test_a_section_variable_may_be_a_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S5A_PROXY", '{"workers": 3}')
    assert load_settings().proxy.workers == 3


def test_a_section_in_the_dotenv_file_must_be_a_mapping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "S5A_COLLECTOR=garbage\n", name=".env")
    with pytest.raises(ConfigError, match=r"collector: the \.env file S5A_COLLECTOR is not"):
        load_settings()


@pytest.mark.parametrize("text", [
    "proxy:\n  listen: '127.0.0.1:99999'\n  listen: '127.0.0.1:0'\n",
    "log:\n  level: info\nlog:\n  level: debug\n",
])
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"found the key '(listen|log)' twice"):
        load_settings(config_file=_write(tmp_path, text))


@pytest.mark.parametrize(("url", "detail"), [
    ("notaurl", "expected a URL postgresql://"),
    ("mysql://u@127.0.0.1/db", "expected a URL postgresql://"),
    ("postgresql://u@127.0.0.1:notaport/db", "port 'notaport' is not a number 1-65535"),
    ("postgresql://u@127.0.0.1:99999/db", "port '99999' is not a number 1-65535"),
    ("postgresql://u@127.0.0.1:0/db", "port '0' is not a number 1-65535"),
    ("postgresql://u@[::1/db", "needs its closing ']'"),
    ("postgresql://u@[nope]:5432/db", "not an IPv6 address"),
    ("postgresql://u@[::1]x/db", "expected ':port' after ']'"),
    ("postgresql://u@h1:5432,h2:x/db", "port 'x' is not a number"),
    ("postgresql://u@127.0.0.1/db?sslmode=bogus", "sslmode 'bogus' is not one of"),
])
def test_a_bad_database_url_names_the_key(monkeypatch: pytest.MonkeyPatch, url: str,
                                          detail: str) -> None:
    monkeypatch.setenv("S5A_DATABASE__URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "database.url: " in str(info.value) and detail in str(info.value)


@pytest.mark.parametrize("url", [
    "postgresql://u:p@127.0.0.1:5432/db",
    "postgres://u@localhost/db",
    "postgresql://u@[::1]:5432/db?sslmode=require",
    "postgresql://u@h1:5432,h2:5433/db",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql://u@host/db?application_name=x&sslmode=verify-full",
])
def test_good_database_urls_pass(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("S5A_DATABASE__URL", url)
    assert load_settings().database.url == url


def test_a_bad_database_url_does_not_show_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S5A_DATABASE__URL", "postgresql://app:hunter2@db:notaport/x")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "hunter2" not in str(info.value)
    assert "postgresql://app:***@db:notaport/x" in str(info.value)


# Every SecretStr field of the settings, as a dotted key and the environment variable.
_SECRETS = [("api.token", "S5A_API__TOKEN"), ("collector.token", "S5A_COLLECTOR__TOKEN"),
            ("proxy.events.token", "S5A_PROXY__EVENTS__TOKEN"),
            ("operator.api_token", "S5A_OPERATOR__API_TOKEN")]


def _secret_keys(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _secret_keys(annotation, f"{prefix}{name}.")
        elif SecretStr in typing.get_args(annotation) or annotation is SecretStr:
            keys.add(f"{prefix}{name}")
    return keys


def test_the_secret_table_lists_every_secret_field() -> None:
    assert _secret_keys() == {key for key, _ in _SECRETS}


@pytest.mark.parametrize(("key", "variable"), _SECRETS)
def test_a_too_short_secret_is_not_shown(monkeypatch: pytest.MonkeyPatch, key: str,
                                         variable: str) -> None:
    monkeypatch.setenv(variable, "hunter2")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "hunter2" not in message
    assert message == (f"invalid configuration: {key}: Value should have at least 16 "
                       "characters, not 7")


@pytest.mark.parametrize(("text", "shown"), [
    pytest.param("api:\n  token: 1234567890123456789\n", "1234567890123456789",
                 id="a-number"),
    pytest.param("operator:\n  api_token: [hunter2]\n", "hunter2", id="a-list"),
    pytest.param("collector:\n  token: hunter2hunter2\n", "hunter2", id="too-short"),
])
def test_a_bad_secret_in_the_file_is_not_shown(tmp_path: Path, text: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=_write(tmp_path, text))
    assert shown not in str(info.value)
    assert "(got" not in str(info.value)


@pytest.mark.parametrize(("url", "secret", "shown"), [
    pytest.param("app:hunter2@db:5432/x", "hunter2", "app:***@db:5432/x", id="no-scheme"),
    pytest.param("postgresql://app:hunt@er2@db:notaport/x", "er2",
                 "postgresql://app:***@db:notaport/x", id="at-sign-in-password"),
    pytest.param("postgresql://app@db:notaport/x?sslmode=require&password=hunter2", "hunter2",
                 "postgresql://app@db:notaport/x?sslmode=require&password=***",
                 id="password-parameter"),
    pytest.param("postgresql://:hunter2@db:notaport/x", "hunter2",
                 "postgresql://:***@db:notaport/x", id="password-only"),
])
def test_a_bad_database_url_never_shows_its_password(monkeypatch: pytest.MonkeyPatch,
                                                     url: str, secret: str,
                                                     shown: str) -> None:
    monkeypatch.setenv("S5A_DATABASE__URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert secret not in str(info.value)
    assert f"(got {shown!r})" in str(info.value)


def test_a_too_short_string_says_characters() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(node_id="")
    assert "node_id: String should have at least 1 character" in str(info.value)


def test_a_database_url_given_as_the_section_does_not_show_its_password(
        tmp_path: Path) -> None:
    path = _write(tmp_path, "database: postgresql://app:hunter2@db/x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert "hunter2" not in str(info.value)
    assert "got 'postgresql://app:***@db/x'" in str(info.value)
