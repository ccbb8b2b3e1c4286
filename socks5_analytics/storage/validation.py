"""Row checks that mirror the CHECK constraints of `traffic_logs`, run before a batch's COPY.

A constraint violation inside COPY aborts the whole statement and names no row, so every
row is checked here first: a bad row is set aside with a reason naming its field, and the
rest of the batch is written. The database constraints stay as the last line of defence.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from socks5_analytics.storage.models import InterimReport, StoredEvent
from socks5_analytics.storage.schema import CLOSE_REASONS, COMMANDS, PROTOCOLS, STATUSES

__all__ = ["check_event", "check_interim"]

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_IP_TYPES = (IPv4Address, IPv6Address)


def _aware(value: object) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None


def _port(value: object) -> bool:
    return isinstance(value, int) and 0 <= value <= 65535


def _ms(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _count(value: object) -> bool:
    return isinstance(value, int) and 0 <= value < 1 << 63


def _name(value: object, longest: int) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= longest


def check_event(event: StoredEvent) -> str | None:
    """Return why `event` cannot be stored (naming the field), or None when it can."""
    problems: list[str] = []
    if not _name(event.node_id, 128):
        problems.append("node_id must be 1-128 characters")
    if not _aware(event.started_at) or not _aware(event.ended_at):
        problems.append("started_at and ended_at must be timezone-aware")
    elif event.ended_at < event.started_at:
        problems.append("ended_at is before started_at")
    if not isinstance(event.source_ip, _IP_TYPES):
        problems.append("source_ip must be an IP address")
    if not _port(event.source_port):
        problems.append("source_port must be 0-65535")
    if not isinstance(event.user_name, str) or len(event.user_name) > 255:
        problems.append("user_name must be a string of at most 255 characters")
    if event.command not in COMMANDS:
        problems.append(f"command {event.command!r} is not one of {sorted(COMMANDS)}")
    if event.protocol not in PROTOCOLS:
        problems.append(f"protocol {event.protocol!r} is not one of {sorted(PROTOCOLS)}")
    if event.dest_host is not None and not _name(event.dest_host, 255):
        problems.append("dest_host must be 1-255 characters")
    if event.domain is not None and (
        not _name(event.domain, 253) or event.domain != event.domain.lower()
    ):
        problems.append("domain must be 1-253 lower-case characters")
    if event.registered_domain is not None:
        if not _name(event.registered_domain, 253):
            problems.append("registered_domain must be 1-253 characters")
        elif event.domain is None:
            problems.append("registered_domain is set but domain is not")
    if event.dest_ip is not None and not isinstance(event.dest_ip, _IP_TYPES):
        problems.append("dest_ip must be an IP address")
    if event.dest_port is not None and not _port(event.dest_port):
        problems.append("dest_port must be 0-65535")
    if event.status not in STATUSES:
        problems.append(f"status {event.status!r} is not a known status")
    if event.reply_code is not None and not (
        isinstance(event.reply_code, int) and 0 <= event.reply_code <= 255
    ):
        problems.append("reply_code must be 0-255")
    if event.close_reason not in CLOSE_REASONS:
        problems.append(f"close_reason {event.close_reason!r} is not a known reason")
    for name in ("connect_ms", "ttfb_ms"):
        value = getattr(event, name)
        if value is not None and not _ms(value):
            problems.append(f"{name} must be a finite number >= 0")
    if not _ms(event.duration_ms):
        problems.append("duration_ms must be a finite number >= 0")
    if not _count(event.bytes_out) or not _count(event.bytes_in):
        problems.append("bytes_in and bytes_out must be integers >= 0")
    if event.trace_id is not None and (
        not isinstance(event.trace_id, str) or not _TRACE_ID.fullmatch(event.trace_id)
    ):
        problems.append("trace_id must be 32 lower-case hex digits")
    return "; ".join(problems) or None


def check_interim(report: InterimReport) -> str | None:
    """Return why `report` cannot be applied (naming the field), or None when it can."""
    problems: list[str] = []
    if not _name(report.node_id, 128):
        problems.append("node_id must be 1-128 characters")
    if not _aware(report.started_at) or not _aware(report.reported_at):
        problems.append("started_at and reported_at must be timezone-aware")
    elif report.reported_at < report.started_at:
        problems.append("reported_at is before started_at")
    if not isinstance(report.source_ip, _IP_TYPES):
        problems.append("source_ip must be an IP address")
    if not isinstance(report.user_name, str) or len(report.user_name) > 255:
        problems.append("user_name must be a string of at most 255 characters")
    if report.domain is not None and (
        not _name(report.domain, 253) or report.domain != report.domain.lower()
    ):
        problems.append("domain must be 1-253 lower-case characters")
    if report.registered_domain is not None and not _name(report.registered_domain, 253):
        problems.append("registered_domain must be 1-253 characters")
    if not _count(report.bytes_out) or not _count(report.bytes_in):
        problems.append("bytes_in and bytes_out must be integers >= 0")
    return "; ".join(problems) or None
