"""What the container files say, read the way Docker and the application read them.

The deployment tests compare these facts with the application's own command line parser and
configuration loader, so a renamed flag, key or port fails a test instead of a deployment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from socks5_analytics.cli import parse_command
from socks5_analytics.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = ("Dockerfile.proxy", "Dockerfile.api")
ENTRY_POINT = "socks5-analytics"
ENV_PREFIX = "S5A_"
WILDCARD_HOSTS = {"0.0.0.0", "::"}


# --- tools ------------------------------------------------------------------------------

def tool(name: str) -> str:
    """The path of a command-line tool of the test extra; fail (never skip) without it."""
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with the test extra: "
                    f"pip install -e '.[test]'", pytrace=False)
    return found


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root, capturing its output."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


# --- pyproject --------------------------------------------------------------------------

def pyproject() -> dict[str, Any]:
    """The parsed pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


# --- the application --------------------------------------------------------------------

def load_command(argv: list[str], env: Mapping[str, str], *, where: str,
                 monkeypatch: pytest.MonkeyPatch, cwd: Path) -> tuple[Any, Settings]:
    """Parse `argv` with the real CLI and load the settings from exactly `env`.

    Runs in an empty `cwd` so that no `.env` of the developer leaks in. A variable outside
    S5A_* fails (the application reads no other), and so does an S5A_* whose section is not
    a settings key (pydantic-settings would ignore it silently).
    """
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            pytest.fail(f"{where}: {name} is not read by socks5-analytics (only {ENV_PREFIX}* "
                        "variables are)", pytrace=False)
        section = name[len(ENV_PREFIX):].split("__", 1)[0].lower()
        if section not in Settings.model_fields:
            pytest.fail(f"{where}: {name}: no configuration key {section!r} "
                        f"(known: {', '.join(sorted(Settings.model_fields))})", pytrace=False)
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cwd)
    try:
        return parse_command(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{ENTRY_POINT} {shlex.join(argv)}` is not a valid command line",
                    pytrace=False)
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}", pytrace=False)


def served_addresses(command: str, settings: Settings) -> dict[str, tuple[str, int]]:
    """The addresses a subcommand listens on, by role (`metrics`: where Prometheus scrapes)."""
    if command == "proxy":
        served = {"socks": settings.proxy.listen, "metrics": settings.proxy.metrics_listen}
    elif command == "collector":
        served = {"grpc": settings.collector.listen,
                  "metrics": settings.collector.metrics_listen}
    elif command == "api":
        served = {"http": settings.api.listen, "metrics": settings.api.listen}
    else:  # migrate, hash-password: one-shot commands, nothing served
        served = {}
    return {role: address for role, address in served.items() if address is not None}


def shutdown_grace(command: str, settings: Settings) -> float | None:
    """Seconds a subcommand takes to stop cleanly after SIGTERM, where it has a setting."""
    if command == "proxy":
        return settings.proxy.shutdown_grace + settings.proxy.events.drain_timeout
    if command == "collector":
        return settings.collector.shutdown_grace
    return None


# --- Dockerfiles ------------------------------------------------------------------------

@dataclass
class Stage:
    """One FROM ... stage of a Dockerfile: its base, name and instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The arguments of every `keyword` instruction of the stage."""
        return [args for word, args in self.instructions if word == keyword]

    def last(self, keyword: str) -> str | None:
        """The arguments of the last `keyword` instruction (the one in effect)."""
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV as the image has it (the `KEY=VALUE ...` form)."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                values[key] = value
        return values


def _logical_lines(text: str) -> Iterator[str]:
    # Docker drops comment lines, also inside a continued instruction.
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        yield (current + stripped).strip()
        current = ""
    if current.strip():
        yield current.strip()


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (with defaults) and the stages of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: only ARG may come before FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT in exec (JSON) form; the shell form is refused."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(args: str) -> list[str] | None:
    """The exec-form command of `HEALTHCHECK [OPTIONS] CMD [...]`; None for `NONE`."""
    if args.strip().upper() == "NONE":
        return None
    _options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK {args!r}: expected CMD"
    return exec_form(command)


_URL = re.compile(r"http://(?P<host>[^/:]+):(?P<port>\d+)(?P<path>/[\w/.-]*)")


def probed_url(command: list[str]) -> tuple[str, int, str]:
    """(host, port, path) of the one URL a health check fetches."""
    urls = [match for part in command for match in _URL.finditer(part)]
    assert len(urls) == 1, f"expected one http:// URL in {command}"
    return urls[0]["host"], int(urls[0]["port"]), urls[0]["path"]


# --- compose ----------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    """docker-compose.yml with its anchors and merge keys resolved, as compose reads it."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dockerfile_of(service: Mapping[str, Any]) -> str | None:
    """Which of our Dockerfiles builds a service's image (None: a third-party image)."""
    build = service.get("build")
    if isinstance(build, dict) and build.get("dockerfile") in DOCKERFILES:
        return str(build["dockerfile"])
    return None


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    """One volume of a service: a bind mount (source is a host path) or a named volume."""

    kind: str
    source: str
    target: str
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """A service's volumes (short or long syntax) and tmpfs mounts."""
    found = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            kind, source, target = volume["type"], volume.get("source", ""), volume["target"]
            read_only = bool(volume.get("read_only", False))
        found.append(Mount(kind, source, target, read_only))
    tmpfs = service.get("tmpfs") or []
    for target in [tmpfs] if isinstance(tmpfs, str) else tmpfs:
        found.append(Mount("tmpfs", "", target.split(":")[0], False))
    return found


def published_ports(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each `ports:` entry."""
    published = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published.append((entry.get("host_ip", ""), int(entry["published"]),
                              int(entry["target"])))
            continue
        parts = str(entry).split(":")
        assert "/" not in parts[-1], f"{entry}: our ports are TCP, written without /tcp"
        host_ip = parts[0] if len(parts) == 3 else ""
        published.append((host_ip, int(parts[-2]), int(parts[-1])))
    return published


def host_path(service: Mapping[str, Any], container_path: Path) -> Path | None:
    """The repository file behind a container path of a bind mount, if any."""
    for mount in mounts(service):
        if mount.kind != "bind":
            continue
        target = Path(mount.target)
        if container_path == target or target in container_path.parents:
            return (ROOT / mount.source / container_path.relative_to(target)).resolve()
    return None


def under_writable_mount(service: Mapping[str, Any], container_path: Path) -> bool:
    """Whether a path is on a writable volume or tmpfs of the service."""
    for mount in mounts(service):
        target = Path(mount.target)
        if not mount.read_only and (container_path == target or target in container_path.parents):
            return True
    return False


def seconds(duration: str | int | float) -> float:
    """A compose duration (`40s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


# --- .dockerignore ----------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def in_build_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends a file to the builder: the last matching line decides.

    A pattern that matches a folder matches everything in it, as in Docker.
    """
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included
