"""The rule-set seam: who may connect, and where to.

The default permits everything; source whitelists, destination rules and rate limits plug in
here without the protocol code knowing how they decide.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["PermitAll", "RuleSet"]


class RuleSet(Protocol):
    """Decides on sources and destinations; a denial is an exception from `errors`."""

    def check_source(self, source_ip: str) -> None:
        """Raise if this client address may not use the proxy."""

    def check_destination(self, command: str, host: str, ip: str | None, port: int) -> None:
        """Raise ConnectionNotAllowed if the destination is denied."""


class PermitAll:
    """Allows every source and destination."""

    def check_source(self, source_ip: str) -> None:
        """Every source is allowed."""

    def check_destination(self, command: str, host: str, ip: str | None, port: int) -> None:
        """Every destination is allowed."""
