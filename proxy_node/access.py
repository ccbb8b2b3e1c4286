"""Access decisions: the source whitelist and the destination rules, as pure functions.

A `Policy` is compiled once into an `AccessRules` (parsed networks, domain suffixes, port
ranges); every decision is then a function of (rules, request) with no I/O, so the tables in
the tests are the specification. Destination order (DESIGN.md): the rules, first match
wins; then `block_private`; then allow. A domain is checked before it is resolved (a rule
that names it decides without a lookup) and each resolved address after; addresses a
name resolves to that are denied are dropped and the connection is pinned to the allowed
ones (refused when none is left), so DNS cannot rebind a name onto a private address.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from socks5_analytics.policy import DestinationRule, Policy

__all__ = [
    "PRIVATE_NETWORKS",
    "AccessRules",
    "Verdict",
    "compile_rules",
    "is_private",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Verdict = Literal["allow", "deny"]

PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network", incl. 0.0.0.0 which Linux routes to the host itself
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "100.64.0.0/10",  # CGNAT (RFC 6598)
        "169.254.0.0/16",  # link-local, incl. cloud metadata 169.254.169.254
        "192.0.0.0/24",  # IETF protocol assignments (incl. DS-Lite, NAT64 discovery)
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast 255.255.255.255
        "::/128", "::1/128",  # unspecified, loopback
        "fc00::/7",  # unique local (ULA), incl. AWS metadata fd00:ec2::254
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
        "64:ff9b:1::/48",  # local-use NAT64
    )
)


def _plain(address: IPAddress) -> IPAddress:
    """IPv4-mapped and 6to4-free: ::ffff:a.b.c.d is judged as a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _network(cidr: str) -> IPNetwork:
    """A CIDR from the policy; an IPv4-mapped IPv6 network (::ffff:a.b.c.d/104..128) is the
    IPv4 network it maps, since addresses are compared after `_plain`."""
    network = ipaddress.ip_network(cidr, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def is_private(address: IPAddress) -> bool:
    """Whether `block_private` keeps the proxy away from this address."""
    plain = _plain(address)
    return any(plain in network for network in PRIVATE_NETWORKS if network.version == plain.version)


# Sources and destinations repeat, and parsing a text address (plus the private-range walk)
# cost more than the rest of a CONNECT's decision: both are memoized, bounded.
parse_ip = functools.lru_cache(maxsize=8192)(ipaddress.ip_address)


@functools.lru_cache(maxsize=8192)
def _private_text(address: str) -> bool:
    return is_private(parse_ip(address))


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    verdict: Verdict
    exact: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[IPNetwork, ...]
    ports: tuple[tuple[int, int], ...]
    commands: frozenset[str]

    @property
    def names_domains(self) -> bool:
        return bool(self.exact or self.suffixes)

    @property
    def names_addresses(self) -> bool:
        return bool(self.networks)

    def applies_to(self, command: str, port: int) -> bool:
        if self.commands and command not in self.commands:
            return False
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def matches_domain(self, domain: str) -> bool:
        return domain in self.exact or any(
            domain == suffix[1:] or domain.endswith(suffix) for suffix in self.suffixes
        )

    def matches_address(self, address: IPAddress) -> bool:
        plain = _plain(address)
        return any(plain in net for net in self.networks if net.version == plain.version)


def _compile_rule(rule: DestinationRule) -> _CompiledRule:
    domains = [d.lower().rstrip(".") for d in rule.domains]
    ports = []
    for spec in rule.ports:
        low, _, high = str(spec).partition("-")
        ports.append((int(low), int(high or low)))
    return _CompiledRule(
        verdict=rule.action,
        exact=frozenset(d for d in domains if not d.startswith(".")),
        suffixes=tuple(d for d in domains if d.startswith(".")),
        networks=tuple(_network(c) for c in rule.cidrs),
        ports=tuple(ports),
        commands=frozenset(rule.commands),
    )


@dataclass(frozen=True, slots=True)
class AccessRules:
    """A policy's whitelist and destination rules, ready for fast decisions."""

    whitelist: tuple[IPNetwork, ...]
    rules: tuple[_CompiledRule, ...]
    block_private: bool

    def source_allowed(self, source_ip: str) -> bool:
        """Empty whitelist: every source; otherwise the address must be in a listed CIDR."""
        if not self.whitelist:
            return True
        plain = _plain(parse_ip(source_ip))
        return any(plain in net for net in self.whitelist if net.version == plain.version)

    def before_resolving(self, command: str, domain: str, port: int) -> Verdict | None:
        """The verdict for a domain when a rule naming it decides; None: resolve first.

        Rules are walked in order; the walk stops undecided at the first rule that could
        match by address, since only the resolved address can tell whether it applies.
        """
        for rule in self.rules:
            if not rule.applies_to(command, port):
                continue
            if not rule.names_domains and not rule.names_addresses:
                return rule.verdict  # a rule on ports/commands alone: no lookup needed
            if rule.names_domains and rule.matches_domain(domain):
                return rule.verdict
            if rule.names_addresses:
                return None
        return None

    def command_verdict(self, command: str) -> Verdict | None:
        """The verdict of a rule that names neither destinations nor ports for `command`;
        None when the first rule that applies depends on the destination."""
        for rule in self.rules:
            if rule.commands and command not in rule.commands:
                continue
            if rule.names_domains or rule.names_addresses or rule.ports:
                return None
            return rule.verdict
        return None

    def for_address(
        self, command: str, domain: str | None, address: str, port: int
    ) -> Verdict:
        """The verdict for connecting to `address` (resolved from `domain`, if any)."""
        if not self.rules:
            return "deny" if self.block_private and _private_text(address) else "allow"
        ip = parse_ip(address)
        for rule in self.rules:
            if not rule.applies_to(command, port):
                continue
            if not rule.names_domains and not rule.names_addresses:
                return rule.verdict  # a rule on ports/commands alone
            if domain is not None and rule.names_domains and rule.matches_domain(domain):
                return rule.verdict
            if rule.names_addresses and rule.matches_address(ip):
                return rule.verdict
        if self.block_private and _private_text(address):
            return "deny"
        return "allow"


def compile_rules(policy: Policy) -> AccessRules:
    """Compile a validated policy's whitelist and destination rules."""
    return AccessRules(
        whitelist=tuple(_network(c) for c in policy.whitelist),
        rules=tuple(_compile_rule(rule) for rule in policy.destinations.rules),
        block_private=policy.destinations.block_private,
    )
