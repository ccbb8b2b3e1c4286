"""The rule-set seam the protocol code sees: may this client connect, and to where?

`Gatekeeper` implements it from the policy file; `PermitAll` allows everything (tests,
embedding). The protocol code only ever calls these methods.
"""

from __future__ import annotations

from typing import Protocol

from proxy_node.resolver import SockAddr

__all__ = ["PermitAll", "RuleSet"]


class RuleSet(Protocol):
    """Decides on destinations; a denial raises `errors.ConnectionNotAllowed`."""

    def check_domain(self, command: str, domain: str, port: int) -> None:
        """Raise before resolving when the name itself is denied."""

    def check_command(self, command: str) -> None:
        """Raise when the command is denied whatever the destination."""

    def allowed_addresses(
        self, command: str, domain: str | None, port: int, candidates: list[SockAddr]
    ) -> list[SockAddr]:
        """The candidates that may be connected to; raise if none may."""

    def check_destination(self, command: str, host: str, ip: str | None, port: int) -> None:
        """Raise if sending to `ip` (asked for as `host`) is denied."""


class PermitAll:
    """Allows every destination."""

    def check_domain(self, command: str, domain: str, port: int) -> None:
        """Every name is allowed."""

    def check_command(self, command: str) -> None:
        """Every command is allowed."""

    def allowed_addresses(
        self, command: str, domain: str | None, port: int, candidates: list[SockAddr]
    ) -> list[SockAddr]:
        """Every address is allowed."""
        return candidates

    def check_destination(self, command: str, host: str, ip: str | None, port: int) -> None:
        """Every destination is allowed."""
