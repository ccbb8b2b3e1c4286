"""The policy document (DESIGN.md "Policy"): users, whitelist, destination rules, limits.

Loaded from a YAML file and validated strictly: unknown keys and plain-text passwords are
errors. Its version is a hash of the file's content, so every node running the same
document reports the same version.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from socks5_analytics.passwords import PasswordHashError, parse_hash

__all__ = [
    "DestinationRule",
    "Destinations",
    "Limits",
    "Policy",
    "PolicyError",
    "UserEntry",
    "load_policy",
    "parse_policy",
]


class PolicyError(Exception):
    """The policy document is invalid; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserEntry(_Strict):
    """One user allowed to authenticate with RFC 1929 username/password."""

    username: str = Field(min_length=1, max_length=255)
    password_hash: str
    disabled: bool = False
    max_connections: int = Field(default=0, ge=0)
    connections_per_second: float = Field(default=0, ge=0)
    # Optional bandwidth cap, each direction, for all the user's connections together.
    max_bytes_per_second: int = Field(default=0, ge=0)

    @field_validator("username")
    @classmethod
    def _fits_rfc1929(cls, value: str) -> str:
        if len(value.encode()) > 255:
            raise ValueError("longer than 255 bytes (RFC 1929 UNAME)")
        return value

    @field_validator("password_hash")
    @classmethod
    def _is_a_hash(cls, value: str) -> str:
        try:
            parse_hash(value)
        except PasswordHashError as exc:
            raise ValueError(
                f"not a hash from `socks5-analytics hash-password` ({exc})"
            ) from exc
        return value


_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _check_cidrs(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a CIDR ({exc})") from exc
    return values


class DestinationRule(_Strict):
    """One allow/deny rule; it matches when its domains or CIDRs (either, when both are
    given; any destination when neither is), its ports and its commands all match."""

    action: Literal["allow", "deny"]
    domains: list[str] = Field(default_factory=list)
    cidrs: list[str] = Field(default_factory=list)
    ports: list[str | StrictInt] = Field(default_factory=list)
    commands: list[Literal["connect", "bind", "udp_associate"]] = Field(default_factory=list)

    @field_validator("domains")
    @classmethod
    def _domains(cls, values: list[str]) -> list[str]:
        for value in values:
            name = (value[1:] if value.startswith(".") else value).rstrip(".")
            # Clients' names arrive ASCII (IDNA) and are compared as written: a wildcard or
            # a Unicode name would be accepted here and then never match.
            if not name or len(name) > 253 or not _DOMAIN.fullmatch(name):
                raise ValueError(
                    f"{value!r} is not a domain (letters, digits, '-', '_' and dots; "
                    ".example.com for a suffix, no '*'; xn-- form for international names)"
                )
            if _is_address(name):
                raise ValueError(f"{value!r} is an address: list it under cidrs")
        return values

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        return _check_cidrs(values)

    @field_validator("ports")
    @classmethod
    def _ports(cls, values: list[str | int]) -> list[str | int]:
        for value in values:
            low, dash, high = str(value).partition("-")
            if not (low.isdigit() and (not dash or high.isdigit())):
                raise ValueError(f"{value!r} is not a port or a range like 1024-65535")
            first, last = int(low), int(high or low)
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"{value!r}: ports are 1-65535, low to high")
        return values


class Destinations(_Strict):
    """Where clients may connect to."""

    block_private: bool = True
    rules: list[DestinationRule] = Field(default_factory=list)


class Limits(_Strict):
    """Per-node and per-source limits (0: none)."""

    max_connections: int = Field(default=10_000, ge=1)
    max_connections_per_ip: int = Field(default=0, ge=0)
    connections_per_second_per_ip: float = Field(default=0, ge=0)
    auth_failures_per_minute_per_ip: int = Field(default=10, ge=0)


class Policy(_Strict):
    """The whole document; `version` is the content hash of what was loaded."""

    users: list[UserEntry] = Field(default_factory=list)
    whitelist: list[str] = Field(default_factory=list)
    destinations: Destinations = Destinations()
    limits: Limits = Limits()
    version: str = "empty"

    @field_validator("whitelist")
    @classmethod
    def _whitelist(cls, values: list[str]) -> list[str]:
        return _check_cidrs(values)

    @field_validator("users")
    @classmethod
    def _unique_names(cls, users: list[UserEntry]) -> list[UserEntry]:
        seen: set[str] = set()
        for user in users:
            if user.username in seen:
                raise ValueError(f"duplicate username {user.username!r}")
            seen.add(user.username)
        return users

    @property
    def requires_auth(self) -> bool:
        """Users listed: the proxy requires username/password."""
        return bool(self.users)


def parse_policy(text: str, *, source: str = "policy") -> Policy:
    """Validate a policy document's text; raise PolicyError naming the bad key."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping")
    if "version" in data:
        raise PolicyError(f"{source}: version: unknown key (the version is the content hash)")
    version = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        return Policy(**data, version=version)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: "
            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors()
        )
        raise PolicyError(f"{source}: {problems}") from exc


def load_policy(path: Path | None) -> Policy:
    """Read and validate the policy file; no file means no users and no restrictions."""
    if path is None:
        return Policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    return parse_policy(text, source=str(path))
