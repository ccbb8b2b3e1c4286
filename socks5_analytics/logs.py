"""Structured logs with one schema for every component.

Each line carries `time`, `level`, `component`, `node` and `message`, plus the fields of what
happened. JSON when the output is not a terminal (or when asked); readable lines on a terminal.
Standard-library loggers (asyncio, third-party code) go through the same pipeline.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from socks5_analytics.config import LogSettings

__all__ = ["configure_logging", "get_logger"]


def configure_logging(settings: LogSettings, *, component: str, node: str) -> None:
    """Route structlog and the standard `logging` module to stderr in one schema."""
    as_json = settings.format == "json" or (
        settings.format == "auto" and not sys.stderr.isatty()
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(event_key="message")
    )
    context = {"component": component, "node": node}

    def add_context(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in context.items():
            event.setdefault(key, value)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _trace_ids,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.add_log_level,
        add_context,
        structlog.processors.format_exc_info,
        structlog.processors.EventRenamer("message"),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _trace_ids(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Inside a span, the line carries its trace_id and span_id (no cost until the
    OpenTelemetry API has been imported, i.e. unless tracing is on)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return event
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", f"{context.trace_id:032x}")
        event.setdefault("span_id", f"{context.span_id:016x}")
    return event


def get_logger(name: str) -> Any:
    """A structured logger; call it as `log.info("what happened", key=value)`."""
    return structlog.stdlib.get_logger(name)
