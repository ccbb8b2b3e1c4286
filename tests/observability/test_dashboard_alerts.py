"""The Grafana dashboard and the Prometheus alert rules against the metrics the code registers.

Every PromQL expression may only name metrics that ProxyMetrics, CollectorMetrics or
ApiMetrics register (so a renamed metric breaks this test, not a dashboard in production),
every metric family has a panel, every expression parses (promtool), and promtool's rule
unit tests (deploy/prometheus/alerts_test.yml) show each alert firing when it should.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promql_names import (
    ALERTS,
    ALERTS_TEST,
    BUILTIN,
    DASHBOARD,
    ROOT,
    families,
    metric_names,
    promtool,
    registered,
    without_grafana_variables,
)


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in document["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows keep theirs inside
    return out


def _dashboard_exprs(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [(f"panel {panel['title']!r} {target['refId']}", target["expr"])
            for panel in _panels(document) for target in panel.get("targets", [])]


def _variable_metrics(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, metric) of every label_values(metric, label) query variable."""
    out = []
    for variable in document["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) \
            else variable["query"]
        match = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        out.append((variable["name"], match.group(1)))
    return out


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_name_finder() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (route, le) (rate(a_bucket{x=~"b(c)"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / on (instance) group_left(version) "
                        "max by (instance) (y_info) > 1e3 and z offset 5m") == \
        {"x_total", "y_info", "z"}
    assert metric_names('count(count by (version) (p)) > bool 1') == {"p"}


def test_dashboard_is_a_grafana_model() -> None:
    document = _dashboard()
    assert 36 <= document["schemaVersion"] <= 41
    assert document["uid"] and document["title"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    panels = _panels(document)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
            panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_dashboard_names_only_registered_metrics() -> None:
    document = _dashboard()
    known = registered()
    unknown = {}
    for where, expr in _dashboard_exprs(document):
        names = metric_names(without_grafana_variables(expr))
        assert names, f"{where}: no metric in {expr!r}"
        if names - known:
            unknown[where] = sorted(names - known)
    for name, metric in _variable_metrics(document):
        if metric not in known:
            unknown[f"variable {name}"] = [metric]
    assert not unknown, f"metrics the code does not register: {unknown}"


def test_dashboard_has_a_panel_for_every_metric_family() -> None:
    used = set()
    for _, expr in _dashboard_exprs(_dashboard()):
        used |= metric_names(without_grafana_variables(expr))
    missing = sorted(family for family, names in families().items() if not names & used)
    assert not missing, f"metric families without a panel: {missing}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables replaced as Grafana would)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": without_grafana_variables(expr)}
             for i, (_, expr) in enumerate(_dashboard_exprs(_dashboard()))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_pass_promtool_check() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in checked.stdout


def test_alert_rules_fire_when_they_should() -> None:
    tested = subprocess.run([promtool(), "test", "rules", str(ALERTS_TEST)],
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=ALERTS_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alert_rules_name_only_registered_metrics() -> None:
    known = registered() | BUILTIN
    for rule in _alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric in its expression"
        assert names <= known, f"{rule['alert']}: unknown metrics {sorted(names - known)}"
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("metric", [
    "s5a_proxy_collector_connected",      # collector unreachable from a node
    "s5a_proxy_spool_bytes",              # spool growing
    "s5a_proxy_events_dropped_total",     # events lost
    "s5a_proxy_connections_total",        # error ratio
    "s5a_collector_database_up",          # database down
    "s5a_api_requests_total",             # API 5xx
])
def test_what_an_operator_must_know_has_an_alert(metric: str) -> None:
    assert any(metric in metric_names(rule["expr"]) for rule in _alert_rules())
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    series = [s["series"] for t in tests["tests"] for s in t["input_series"]]
    assert any(s.startswith(metric + "{") for s in series), f"no unit test feeds {metric}"


def test_the_compose_prometheus_loads_the_alert_rules(tmp_path: Path) -> None:
    """docker-compose.yml mounts alerts.yml where deploy/compose/prometheus.yml loads it from,
    and that configuration passes `promtool check config` (with the rules at that path)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    volumes = compose["services"]["prometheus"]["volumes"]
    mounted = {}
    for volume in volumes:
        source, target, *_ = volume.split(":")
        mounted[target] = source
    config_path = ROOT / mounted["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    assert config["rule_files"], "the compose Prometheus loads no rules"
    for rule_file in config["rule_files"]:
        assert (ROOT / mounted[rule_file]).resolve() == ALERTS
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
