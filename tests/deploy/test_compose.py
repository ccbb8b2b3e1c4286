"""docker-compose.yml against the application: commands, variables, ports, files, scrapes.

No Docker engine runs here, so the compose file is checked the way compose would read it
(the compose-spec schema) and the way our processes would read what it gives them (the real
command line parser and configuration loader), service by service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_facts import (
    COMPOSE_FILE,
    DOCKERFILES,
    ROOT,
    WILDCARD_HOSTS,
    compose,
    dockerfile_of,
    environment,
    healthcheck_command,
    host_path,
    load_command,
    mounts,
    parse_dockerfile,
    probed_url,
    published_ports,
    run_tool,
    seconds,
    served_addresses,
    shutdown_grace,
    tool,
    under_writable_mount,
)

from socks5_analytics.config import Settings
from socks5_analytics.passwords import verify_password
from socks5_analytics.policy import parse_policy

SERVICES: dict[str, Any] = compose()["services"]
OURS = sorted(name for name, service in SERVICES.items() if dockerfile_of(service))
# The documented choice (Dockerfile.api says why): the database side shares one image.
IMAGE_OF_COMMAND = {"proxy": "Dockerfile.proxy", "collector": "Dockerfile.api",
                    "migrate": "Dockerfile.api", "api": "Dockerfile.api",
                    "operator": "Dockerfile.api"}
DEMO_PASSWORD = b"socks5-demo"


def image_env(dockerfile: str) -> dict[str, str]:
    """The S5A_* defaults an image sets (compose's environment is laid over them)."""
    _args, stages = parse_dockerfile(ROOT / dockerfile)
    return {k: v for k, v in stages[-1].env().items() if k.startswith("S5A_")}


def image_healthcheck(dockerfile: str) -> str | None:
    _args, stages = parse_dockerfile(ROOT / dockerfile)
    return stages[-1].last("HEALTHCHECK")


@pytest.fixture
def loaded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           tmp_path: Path) -> tuple[str, dict[str, Any], str, Settings]:
    """(name, service, subcommand, settings) of one of our services, as it would start."""
    name: str = request.param
    service = SERVICES[name]
    argv = service.get("command")
    assert isinstance(argv, list), f"{name}: write command as a list (exec form)"
    env = {**image_env(dockerfile_of(service) or ""), **environment(service)}
    args, settings = load_command(argv, env, where=f"docker-compose.yml: {name}",
                                  monkeypatch=monkeypatch, cwd=tmp_path)
    return name, service, args.command, settings


by_service = pytest.mark.parametrize("loaded", OURS, indirect=True)


def commands() -> dict[str, str]:
    return {name: SERVICES[name]["command"][0] for name in OURS}


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                      str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_has_every_part() -> None:
    cmds = commands()
    assert sorted(cmds.values()).count("proxy") == 2, "two proxy nodes"
    for command in ("migrate", "collector", "api"):
        assert command in cmds.values(), f"no service runs `{command}`"
    third_party = {name: s["image"].split(":")[0] for name, s in SERVICES.items()
                   if name not in OURS}
    assert set(third_party.values()) == {"postgres", "jaegertracing/jaeger", "prom/prometheus"}
    for name, image in ((n, s["image"]) for n, s in SERVICES.items()):
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag"


@pytest.mark.parametrize("name", OURS)
def test_each_command_runs_from_its_image(name: str) -> None:
    service = SERVICES[name]
    command = service["command"][0]
    assert dockerfile_of(service) == IMAGE_OF_COMMAND[command]
    tags = {dockerfile_of(s): s["image"] for s in SERVICES.values() if dockerfile_of(s)}
    assert service["image"] == tags[dockerfile_of(service)], "one tag per Dockerfile"
    assert service["build"]["context"] == "."


@by_service
def test_ports_and_listen_addresses_match_the_configuration(
        loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, service, command, settings = loaded
    served = served_addresses(command, settings)
    for role, (host, port) in served.items():
        assert host in WILDCARD_HOSTS, (
            f"{name}: {role} listens on {host}:{port}, unreachable from other containers")
    served_ports = {port for _host, port in served.values()}
    for host_ip, _published, target in published_ports(service):
        assert target in served_ports, (
            f"{name}: publishes container port {target}, but `{command}` listens on "
            f"{sorted(served_ports)}")
        assert host_ip == "127.0.0.1", f"{name}: publish on 127.0.0.1 only (a demo stack)"


def test_the_two_proxies_are_on_different_host_ports() -> None:
    proxies = [n for n, c in commands().items() if c == "proxy"]
    host_ports = [p for n in proxies for _ip, p, _t in published_ports(SERVICES[n])]
    assert len(host_ports) == len(set(host_ports)) == len(proxies)


@by_service
def test_healthcheck_probes_a_served_port(
        loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, service, command, settings = loaded
    override = service.get("healthcheck")
    if served_addresses(command, settings) == {}:
        assert override == {"disable": True}, f"{name}: a one-shot job has no health check"
        return
    if override is not None:
        assert override.get("test", [""])[0] == "CMD", f"{name}: exec form"
        probe = override["test"][1:]
    else:
        args = image_healthcheck(dockerfile_of(service) or "")
        assert args is not None, f"{name}: no health check in its image"
        probe = healthcheck_command(args)
        assert probe is not None
    host, port, path = probed_url(probe)
    # The metrics port: a probe of the SOCKS port would be recorded as a connection, one of
    # the gRPC port would need a client. The API's metrics share its HTTP port.
    assert (host, port) == ("127.0.0.1", served_addresses(command, settings)["metrics"][1]), (
        f"{name}: the health check probes {host}:{port}")
    assert path == ("/healthz" if command == "api" else "/metrics")


@by_service
def test_stop_grace_outlasts_the_shutdown(
        loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, service, command, settings = loaded
    needed = shutdown_grace(command, settings)
    if needed is None:
        return
    given = seconds(service.get("stop_grace_period", "10s"))
    assert given > needed, (
        f"{name}: stop_grace_period {given:g}s, but `{command}` may take {needed:g}s to stop")


@by_service
def test_writable_paths_are_mounted(loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, service, command, settings = loaded
    assert service.get("read_only") is True, f"{name}: read-only root filesystem"
    assert any(m.kind == "tmpfs" and m.target == "/tmp" for m in mounts(service))
    if command == "proxy":
        events = settings.proxy.events
        writable = [events.spool_dir] + ([events.path] if events.kind == "jsonl" else [])
        for path in writable:
            assert path.is_absolute() and under_writable_mount(service, path), (
                f"{name}: {path} must be on a volume or tmpfs (read-only root)")


@by_service
def test_database_and_telemetry_point_at_services(
        loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, _service, command, settings = loaded
    if command in ("collector", "api", "migrate"):
        url = settings.database.url
        assert url is not None, f"{name}: no S5A_DATABASE__URL (it would start an embedded one)"
        parts = urlsplit(url)
        assert parts.hostname in SERVICES, f"{name}: database host {parts.hostname} is no service"
        postgres = environment(SERVICES[parts.hostname])
        assert (parts.username, parts.password, parts.path.lstrip("/")) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])
        assert SERVICES[name]["depends_on"], f"{name}: must wait for its database"
    if command != "migrate":
        endpoint = urlsplit(settings.telemetry.otlp_endpoint or "")
        assert endpoint.hostname == "jaeger" and endpoint.port == 4317, (
            f"{name}: traces go to jaeger's OTLP/gRPC port")


def test_database_side_waits_for_the_migration() -> None:
    cmds = commands()
    migrate = next(n for n, c in cmds.items() if c == "migrate")
    assert SERVICES[migrate]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES[migrate]["restart"] == "no"
    for name, command in cmds.items():
        if command in ("collector", "api"):
            assert SERVICES[name]["depends_on"][migrate]["condition"] == (
                "service_completed_successfully")
    postgres = SERVICES["postgres"]
    assert postgres["healthcheck"]["test"][0] == "CMD"
    assert any(m.kind == "volume" for m in mounts(postgres)), "the database on a named volume"


@by_service
def test_proxies_stream_to_the_collector(
        loaded: tuple[str, dict[str, Any], str, Settings], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    name, _service, command, settings = loaded
    if command != "proxy":
        return
    assert settings.proxy.events.kind == "grpc"
    for host, port in settings.proxy.events.collectors:
        target = SERVICES.get(host)
        assert target is not None and target["command"][0] == "collector", (
            f"{name}: collector address {host}:{port} is not a collector service")
        env = {**image_env(dockerfile_of(target) or ""), **environment(target)}
        _args, collector = load_command(target["command"], env, where=host,
                                        monkeypatch=monkeypatch, cwd=tmp_path)
        assert collector.collector.listen[1] == port


@by_service
def test_policy_file_is_mounted_from_the_repository_and_valid(
        loaded: tuple[str, dict[str, Any], str, Settings]) -> None:
    name, service, command, settings = loaded
    if command != "proxy":
        return
    policy_file = settings.proxy.policy_file
    assert policy_file is not None, f"{name}: the example stack has a policy (one user)"
    source = host_path(service, policy_file)
    assert source is not None, f"{name}: {policy_file} is not on a bind mount"
    assert source.is_relative_to(ROOT) and source.is_file(), f"{name}: {source} is missing"
    mount = next(m for m in mounts(service) if policy_file.is_relative_to(m.target))
    assert mount.read_only and (ROOT / mount.source).is_dir(), (
        f"{name}: mount the policy's folder read-only (a file mount misses edits)")
    policy = parse_policy(source.read_text(encoding="utf-8"), source=str(source))
    assert len(policy.users) == 1


def test_example_password_is_the_documented_one() -> None:
    policy_files = {host_path(SERVICES[n], Path(
        {**image_env("Dockerfile.proxy"), **environment(SERVICES[n])}
        ["S5A_PROXY__POLICY_FILE"])) for n, c in commands().items() if c == "proxy"}
    assert len(policy_files) == 1, "both proxy nodes read the same policy"
    (source,) = policy_files
    assert source is not None
    (user,) = parse_policy(source.read_text(encoding="utf-8")).users
    assert verify_password(DEMO_PASSWORD, user.password_hash)
    guide = (ROOT / "docs" / "compose.md").read_text(encoding="utf-8")
    assert f"{user.username}:{DEMO_PASSWORD.decode()}" in guide


def test_bind_mounts_exist_in_the_repository() -> None:
    for name, service in SERVICES.items():
        for mount in mounts(service):
            if mount.kind == "bind":
                source = (ROOT / mount.source).resolve()
                assert source.is_relative_to(ROOT) and source.exists(), f"{name}: {source}"
                assert mount.read_only, f"{name}: {mount.source} is mounted writable"


def test_prometheus_scrapes_every_metrics_port(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    prometheus = SERVICES["prometheus"]
    config_file = host_path(prometheus, Path("/etc/prometheus/prometheus.yml"))
    assert config_file is not None and config_file.is_file()
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    scraped = {target for job in config["scrape_configs"]
               for static in job["static_configs"] for target in static["targets"]}
    expected = set()
    for name in OURS:
        service = SERVICES[name]
        env = {**image_env(dockerfile_of(service) or ""), **environment(service)}
        args, settings = load_command(service["command"], env, where=name,
                                      monkeypatch=monkeypatch, cwd=tmp_path)
        metrics = served_addresses(args.command, settings).get("metrics")
        if metrics is not None:
            expected.add(f"{name}:{metrics[1]}")
    ours = {target for target in scraped if target.split(":")[0] in SERVICES}
    assert ours == expected
    assert scraped - ours == {"localhost:9090"}


def test_every_dockerfile_is_used() -> None:
    assert {dockerfile_of(SERVICES[name]) for name in OURS} == set(DOCKERFILES)
