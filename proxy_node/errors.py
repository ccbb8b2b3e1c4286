"""The proxy's exceptions, and the one table that maps each to a SOCKS reply and a status.

Foreign errors (OSError errnos, resolver failures) are translated into these classes where
they happen (`translate_os_error`); the reply code is then looked up by class, never from a
message's text.
"""

from __future__ import annotations

import errno

from proxy_node.wire import (
    BadVersion,
    MalformedMessage,
    Reply,
    UnsupportedAddressType,
    UnsupportedCommand,
    WireError,
)

__all__ = [
    "ConnectionNotAllowed",
    "HostUnreachable",
    "LocalFailure",
    "NetworkUnreachable",
    "ProxyError",
    "ResolutionFailed",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "outcome_for",
    "translate_os_error",
]


class ProxyError(Exception):
    """Base of the proxy's own errors."""


class ConnectionNotAllowed(ProxyError):
    """The rule set denies this destination."""


class LocalFailure(ProxyError):
    """A socket call of the proxy's own failed (out of descriptors or buffers): REP 0x01."""


class UpstreamError(ProxyError):
    """Reaching the destination failed for a reason not listed below.

    `address`: the IP whose connection attempt failed last, when one was made (the event's
    `dest_ip` of a failed connection to a name)."""

    address: str | None = None


class ResolutionFailed(UpstreamError):
    """The destination name did not resolve (no such name, or the resolver timed out)."""


class UpstreamRefused(UpstreamError):
    """The destination answered with a reset: nothing listens there."""


class UpstreamTimeout(UpstreamError):
    """The destination did not answer within the connect timeout."""


class NetworkUnreachable(UpstreamError):
    """No route to the destination's network."""


class HostUnreachable(UpstreamError):
    """The destination's network is reachable, the host is not."""


_ERRNO_CLASSES: dict[int, type[UpstreamError]] = {
    errno.ECONNREFUSED: UpstreamRefused,
    errno.ETIMEDOUT: UpstreamTimeout,
    errno.ENETUNREACH: NetworkUnreachable,
    errno.ENETDOWN: NetworkUnreachable,
    errno.EHOSTUNREACH: HostUnreachable,
    errno.EHOSTDOWN: HostUnreachable,
    errno.EADDRNOTAVAIL: HostUnreachable,
}


def translate_os_error(exc: OSError) -> UpstreamError:
    """The UpstreamError subclass for a failed connect, chosen by errno."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("connect timed out")
    cls = _ERRNO_CLASSES.get(exc.errno or 0, UpstreamError)
    return cls(exc.strerror or type(exc).__name__)


# Most specific class first: the first entry the error is an instance of wins.
_OUTCOMES: tuple[tuple[type[BaseException], Reply, str], ...] = (
    (ConnectionNotAllowed, Reply.CONNECTION_NOT_ALLOWED, "denied_destination"),
    (ResolutionFailed, Reply.HOST_UNREACHABLE, "dns_failed"),
    (UpstreamRefused, Reply.CONNECTION_REFUSED, "refused"),
    (UpstreamTimeout, Reply.TTL_EXPIRED, "timeout"),
    (NetworkUnreachable, Reply.NETWORK_UNREACHABLE, "unreachable"),
    (HostUnreachable, Reply.HOST_UNREACHABLE, "unreachable"),
    (UnsupportedCommand, Reply.COMMAND_NOT_SUPPORTED, "error"),
    (UnsupportedAddressType, Reply.ADDRESS_TYPE_NOT_SUPPORTED, "error"),
    (BadVersion, Reply.GENERAL_FAILURE, "error"),
    (MalformedMessage, Reply.GENERAL_FAILURE, "error"),
    (WireError, Reply.GENERAL_FAILURE, "error"),
    (TimeoutError, Reply.TTL_EXPIRED, "timeout"),
)


def outcome_for(exc: BaseException) -> tuple[Reply, str]:
    """The SOCKS reply and the event status for a failed request."""
    for cls, reply, status in _OUTCOMES:
        if isinstance(exc, cls):
            return reply, status
    return Reply.GENERAL_FAILURE, "error"
