"""The policy in force on a node: who may connect, where to, and how often.

It combines the pure decisions of `access` with the counters of `limits`, swaps in a new
policy atomically, and answers, for a live session, whether the new policy still allows it
(so a revocation can close it). It is the rule set the protocol code sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy_node.access import AccessRules, compile_rules
from proxy_node.errors import ConnectionNotAllowed
from proxy_node.limits import AuthThrottle, BandwidthLimiter, ConnectionLimiter, TokenBucket
from proxy_node.resolver import SockAddr
from socks5_analytics.policy import Policy, UserEntry

__all__ = ["Admission", "Gatekeeper"]


@dataclass(slots=True)
class Admission:
    """What a session was admitted as, so its counters can be released and re-checked."""

    source_ip: str
    user: str | None = None
    password_hash: str | None = None


class Gatekeeper:
    """Enforces one policy at a time; `update()` switches to a new one."""

    def __init__(self, policy: Policy) -> None:
        self.per_source = ConnectionLimiter()
        self.per_user = ConnectionLimiter()
        self.bandwidth = BandwidthLimiter()
        self.update(policy)

    def update(self, policy: Policy) -> None:
        """Enforce `policy` for every decision from now on (counters carry over)."""
        self.policy = policy
        self.rules: AccessRules = compile_rules(policy)
        self.users = {user.username: user for user in policy.users}
        limits = policy.limits
        previous = getattr(self, "auth_throttle", None)
        if previous is None or previous.per_minute != limits.auth_failures_per_minute_per_ip:
            self.auth_throttle = AuthThrottle(limits.auth_failures_per_minute_per_ip)

    @property
    def max_connections(self) -> int:
        """The policy's per-node connection cap."""
        return self.policy.limits.max_connections

    # -- admission ---------------------------------------------------------------------------

    def admit_source(self, source_ip: str) -> str | None:
        """None if this source may start a session (and it is counted), else the status."""
        if not self.rules.source_allowed(source_ip):
            return "denied_whitelist"
        limits = self.policy.limits
        if not self.per_source.admit(
            source_ip,
            max_active=limits.max_connections_per_ip,
            rate=limits.connections_per_second_per_ip,
            now=time.monotonic(),
        ):
            return "rate_limited"
        return None

    def admit_user(self, user: UserEntry) -> bool:
        """Whether the authenticated user is within their limits (and count them if so)."""
        return self.per_user.admit(
            user.username,
            max_active=user.max_connections,
            rate=user.connections_per_second,
            now=time.monotonic(),
        )

    def bandwidth_buckets(self, admission: Admission) -> tuple[TokenBucket, TokenBucket] | None:
        """The (upload, download) byte buckets of the session's user, if they have a cap."""
        user = self.users.get(admission.user) if admission.user is not None else None
        if user is None or not user.max_bytes_per_second:
            return None
        return self.bandwidth.buckets(user.username, user.max_bytes_per_second)

    def release(self, admission: Admission) -> None:
        """The session counted by `admission` has ended."""
        self.per_source.release(admission.source_ip)
        if admission.user is not None:
            self.per_user.release(admission.user)

    def auth_blocked(self, source_ip: str) -> bool:
        """Whether this source failed authentication too often in the last minute."""
        return self.auth_throttle.blocked(source_ip, time.monotonic())

    def auth_attempt(self, source_ip: str) -> None:
        """Count an attempt as failed before checking it, so parallel guesses cannot outrun
        the throttle; `auth_succeeded` takes it back."""
        self.auth_throttle.failed(source_ip, time.monotonic())

    def auth_succeeded(self, source_ip: str) -> None:
        """The attempt counted by `auth_attempt` succeeded."""
        self.auth_throttle.forgive(source_ip)

    def check_command(self, command: str) -> None:
        """Raise when a rule denies the command whatever the destination (UDP ASSOCIATE)."""
        if self.rules.command_verdict(command) == "deny":
            raise ConnectionNotAllowed(f"{command} denied by rule")

    # -- the rule-set interface --------------------------------------------------------------

    def check_source(self, source_ip: str) -> None:
        """Raise if the whitelist excludes this source."""
        if not self.rules.source_allowed(source_ip):
            raise ConnectionNotAllowed(f"source {source_ip} is not whitelisted")

    def check_domain(self, command: str, domain: str, port: int) -> None:
        """Raise before resolving when a rule denies the name itself."""
        if self.rules.before_resolving(command, domain, port) == "deny":
            raise ConnectionNotAllowed(f"destination {domain} denied by rule")

    def allowed_addresses(
        self, command: str, domain: str | None, port: int, candidates: list[SockAddr]
    ) -> list[SockAddr]:
        """The resolved addresses the rules allow (the connection is pinned to them)."""
        allowed = [
            candidate for candidate in candidates
            if self.rules.for_address(command, domain, candidate[1][0], port) == "allow"
        ]
        if not allowed:
            target = domain or candidates[0][1][0]
            raise ConnectionNotAllowed(f"destination {target}:{port} denied by rule")
        return allowed

    def check_destination(self, command: str, host: str, ip: str | None, port: int) -> None:
        """Raise if connecting to `ip` (for `host`) is denied."""
        domain = None if ip is None or host == ip else host
        if ip is None:
            self.check_domain(command, host, port)
        elif self.rules.for_address(command, domain, ip, port) != "allow":
            raise ConnectionNotAllowed(f"destination {host}:{port} denied by rule")

    # -- revocation --------------------------------------------------------------------------

    def still_allowed(
        self,
        admission: Admission,
        *,
        command: str,
        domain: str | None,
        dest_ip: str | None,
        dest_port: int | None,
    ) -> bool:
        """Whether a live session would still be admitted under the current policy."""
        return self.refusal(admission, command=command, domain=domain, dest_ip=dest_ip,
                            dest_port=dest_port) is None

    def refusal(
        self,
        admission: Admission,
        *,
        command: str,
        domain: str | None,
        dest_ip: str | None,
        dest_port: int | None,
    ) -> str | None:
        """The status a live session would now be refused with (None: still admitted)."""
        if not self.rules.source_allowed(admission.source_ip):
            return "denied_whitelist"
        if admission.user is not None:
            user = self.users.get(admission.user)
            if user is None or user.disabled or user.password_hash != admission.password_hash:
                return "auth_failed"
        elif self.policy.requires_auth:
            return "auth_failed"  # authentication became required
        if dest_ip is not None and dest_port is not None:
            verdict = self.rules.for_address(command, domain, dest_ip, dest_port)
            if verdict != "allow":
                return "denied_destination"
        return None
