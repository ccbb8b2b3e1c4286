"""What the dashboard and the alert rules may name: the metrics our code registers.

`registered()` instantiates every component's metrics class and lists the sample names
their registries can expose; `metric_names(expr)` finds the metric names a PromQL
expression selects. `promtool()` is Debian's promtool (the package `prometheus`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from api.metrics import ApiMetrics
from collector.metrics import CollectorMetrics
from proxy_node.metrics import ProxyMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "socks5-analytics.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

# Series Prometheus makes itself for every target (not ours to register).
BUILTIN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "and", "or", "unless", "offset", "inf", "nan", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def families() -> dict[str, set[str]]:
    """Every metric family of the proxy, the collector and the API -> the sample names it
    can expose (a labelled family with no child yet still counts)."""
    out: dict[str, set[str]] = {}
    for metrics in (ProxyMetrics(), CollectorMetrics(), ApiMetrics()):
        for family in metrics.registry.collect():
            name = family.name
            names = {sample.name for sample in family.samples}
            if family.type == "counter":
                names |= {f"{name}_total", f"{name}_created"}
            elif family.type == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"}
            else:
                names.add(name)
            assert name not in out, f"two components register {name}"
            out[name] = names
    return out


def registered() -> set[str]:
    """Every sample name the three components' registries can expose."""
    return set().union(*families().values())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables already replaced)."""
    text = _STRING.sub('""', expr)
    while _MATCHERS.search(text):  # a bare {__name__=...} selector would hide a name: none here
        text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before in "._$":  # 1e3, 0.5, a $variable
            continue
        if text[match.end():].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


_GRAFANA_VARIABLES = re.compile(r"\$\{?(__rate_interval|__interval|__range)\}?")
_GRAFANA_SELECTIONS = re.compile(r"\$\{?[A-Za-z_]\w*(?::\w+)?\}?")


def without_grafana_variables(expr: str) -> str:
    """A dashboard expression as Prometheus would receive it (intervals 5m, selections .*)."""
    return _GRAFANA_SELECTIONS.sub(".*", _GRAFANA_VARIABLES.sub("5m", expr))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install prometheus "
                    "(`make test` installs it with `make system-deps`)")
    return path
