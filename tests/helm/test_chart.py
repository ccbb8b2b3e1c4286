"""The chart rendered with realistic value sets; every manifest valid Kubernetes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from socks5_analytics.config import load_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "socks5-analytics"

# The oldest Kubernetes the chart supports and the newest kubernetes-validate ships.
KUBERNETES = ["1.29", kubernetes_validate.latest_version()]
NAMESPACE = "proxies"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-database": {
        "postgresql": {"enabled": False},
        "database": {"external": {"secretName": "analytics-db", "secretKey": "dsn"}},
    },
    "no-tracing-no-hpa": {
        "tracing": {"enabled": False},
        "proxy": {"autoscaling": {"enabled": False}, "replicas": 5,
                  "podDisruptionBudget": {"enabled": False}},
    },
    "production": {
        "postgresql": {"enabled": False},
        "database": {"external": {"secretName": "analytics-db"}},
        "tracing": {"enabled": True, "endpoint": "tempo.observability:4317",
                    "sampleRatio": 0.05},
        "api": {"ingress": {"enabled": True, "className": "nginx",
                            "host": "proxy-stats.example.com", "tlsSecret": "stats-tls"},
                "tokenSecret": "api-token", "replicas": 2},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "networkPolicy": {"enabled": True},
        "operator": {"clusterWide": True},
        "proxy": {"service": {"type": "LoadBalancer",
                              "loadBalancerSourceRanges": ["203.0.113.0/24"]},
                  "workers": 4, "autoscaling": {"maxReplicas": 40},
                  "topologySpread": "DoNotSchedule"},
        "policy": {"destinations": {"block_private": True, "rules": [
            {"action": "deny", "domains": [".internal.example"], "ports": ["1-65535"]}]},
            "limits": {"max_connections": 20000}},
        "config": {"proxy": {"idle_timeout": 600}},
    },
    "policy-secret-watch": {
        "proxy": {"policySecretWatch": {"enabled": True}, "autoscaling": {"enabled": False}},
        "networkPolicy": {"enabled": True},
        "migrations": {"enabled": False},
    },
    "secured-collector-link": {
        "collector": {"tokenSecret": "collector-token",
                      "tls": {"secretName": "collector-tls", "serverName": "collector.example"}},
        "networkPolicy": {"enabled": True},
    },
    "cluster-ip-bundled-db-with-monitoring": {
        "proxy": {"service": {"type": "ClusterIP"}},
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"enabled": True},
        "tracing": {"enabled": True, "endpoint": "otel-gateway:4317"},
        "postgresql": {"auth": {"password": "fixed-password"},
                       "persistence": {"size": "20Gi", "storageClass": "fast"}},
    },
}


def _render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    chart.validate_schema(values)
    return chart.render(copy.deepcopy(values), name="demo", namespace=NAMESPACE,
                        is_install=True)


def _documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict[str, str]]:
    return request.param, _render(chart, VALUE_SETS[request.param])


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_is_valid_kubernetes(rendered: tuple[str, dict[str, str]],
                                             version: str) -> None:
    _, manifests = rendered
    docs = _documents(manifests)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor" and doc["spec"]["endpoints"]
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_lint_is_clean() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


def _by_kind(manifests: dict[str, str], kind: str, suffix: str = "") -> dict[str, Any]:
    [doc] = [d for d in _documents(manifests)
             if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def test_pods_are_locked_down(rendered: tuple[str, dict[str, str]]) -> None:
    _, manifests = rendered
    for doc in _documents(manifests):
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in (*pod.get("initContainers", ()), *pod["containers"]):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"], container["name"]


def test_proxy_mounts_the_policy_directory_and_rolls_on_config(
        rendered: tuple[str, dict[str, str]]) -> None:
    name, manifests = rendered
    proxy = _by_kind(manifests, "Deployment", "-proxy")
    pod = proxy["spec"]["template"]
    assert pod["metadata"]["annotations"]["checksum/config"]
    [container] = [c for c in _containers(proxy) if c["name"] == "proxy"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policy")
    assert "subPath" not in mount  # a subPath mount never sees the Secret's updates
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["S5A_PROXY__POLICY_FILE"] == mount["mountPath"] + "/policy.yaml"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "policy")
    operator = _by_kind(manifests, "Deployment", "-operator")
    op_env = {e["name"]: e.get("value") for e in _containers(operator)[0]["env"]}
    assert volume["secret"]["secretName"] == op_env["S5A_OPERATOR__POLICY_SECRET"]
    # The operator's liveness probe asks kopf's endpoint, where the operator serves it.
    probe = _containers(operator)[0]["livenessProbe"]["httpGet"]
    port = next(p for p in _containers(operator)[0]["ports"] if p["name"] == probe["port"])
    assert probe["path"] == "/healthz"
    assert op_env["S5A_OPERATOR__HEALTH_LISTEN"] == f"0.0.0.0:{port['containerPort']}"
    # Ready once it serves its metrics, on the port the node was told to serve them.
    ready = container["readinessProbe"]["httpGet"]
    metrics_port = next(p for p in container["ports"] if p["name"] == ready["port"])
    assert env["S5A_PROXY__METRICS_LISTEN"] == f"0.0.0.0:{metrics_port['containerPort']}"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(env["S5A_PROXY__SHUTDOWN_GRACE"])
    service = _by_kind(manifests, "Service", "-proxy")
    if service["spec"]["type"] != "ClusterIP":
        assert service["spec"]["externalTrafficPolicy"] == "Local"
    tracing = VALUE_SETS[name].get("tracing", {}).get("enabled", False)
    assert ("otel-collector" in {c["name"] for c in _containers(proxy)}) is tracing
    assert ("S5A_TELEMETRY__OTLP_ENDPOINT" in env) is tracing


def test_container_settings_load(rendered: tuple[str, dict[str, str]],
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The env and config file the chart gives each component are valid settings."""
    _, manifests = rendered
    config = yaml.safe_load(_by_kind(manifests, "ConfigMap", "-config")["data"]["config.yaml"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config or {}))
    monkeypatch.chdir(tmp_path)
    for doc in _documents(manifests):
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in (*pod.get("initContainers", ()), *pod["containers"]):
            if not container.get("args"):
                continue
            with monkeypatch.context() as env:
                for item in container.get("env", []):
                    env.setenv(item["name"], item.get("value") or "from-a-secret-0123456789")
                if "S5A_DATABASE__URL" in {e["name"] for e in container.get("env", [])}:
                    env.setenv("S5A_DATABASE__URL", "postgresql://u:p@db:5432/d")
                load_settings(path)


def test_the_policy_secret_watch_is_opt_in_and_reads_one_secret(
        rendered: tuple[str, dict[str, str]]) -> None:
    name, manifests = rendered
    enabled = VALUE_SETS[name].get("proxy", {}).get("policySecretWatch", {}).get("enabled")
    proxy = _by_kind(manifests, "Deployment", "-proxy")
    pod = proxy["spec"]["template"]["spec"]
    [container] = [c for c in _containers(proxy) if c["name"] == "proxy"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    secret = next(v for v in pod["volumes"] if v["name"] == "policy")["secret"]["secretName"]
    proxy_rbac = [d for d in _documents(manifests)
                  if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
                  and d["metadata"]["name"].endswith("-proxy")]
    if not enabled:
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
        assert not [k for k in env if k.startswith("S5A_PROXY__POLICY_SECRET__")]
        assert proxy_rbac == []
        return
    assert env["S5A_PROXY__POLICY_SECRET__ENABLED"] == "true"
    assert env["S5A_PROXY__POLICY_SECRET__NAME"] == secret  # the Secret the file comes from
    assert env["S5A_PROXY__POLICY_SECRET__KEY"] == Path(env["S5A_PROXY__POLICY_FILE"]).name
    assert pod["automountServiceAccountToken"] is True
    account = _by_kind(manifests, "ServiceAccount", "-proxy")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    role = _by_kind(manifests, "Role", "-proxy")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": [secret], "verbs": ["get", "list", "watch"]}]
    binding = _by_kind(manifests, "RoleBinding", "-proxy")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": NAMESPACE}]


def test_migrations_run_before_the_database_side_starts(
        rendered: tuple[str, dict[str, str]]) -> None:
    """An init container of the API and collector pods, never a Helm hook: a post-install
    hook runs only after `helm install --wait` saw every pod ready, and the API is not ready
    before the schema exists, so such an install would wait for ever."""
    name, manifests = rendered
    enabled = VALUE_SETS[name].get("migrations", {}).get("enabled", True)
    docs = _documents(manifests)
    assert not [d for d in docs if d["kind"] == "Job"
                or "helm.sh/hook" in d["metadata"].get("annotations", {})]
    for component in ("-api", "-collector"):
        pod = _by_kind(manifests, "Deployment", component)["spec"]["template"]["spec"]
        if not enabled:
            assert "initContainers" not in pod
            continue
        [init] = pod["initContainers"]
        assert init["args"] == ["migrate", "upgrade"]
        assert init["image"] == pod["containers"][0]["image"]
        assert {e["name"] for e in init["env"]} >= {"S5A_DATABASE__URL"}
    for component in ("-proxy", "-operator"):
        pod = _by_kind(manifests, "Deployment", component)["spec"]["template"]["spec"]
        assert "initContainers" not in pod


def test_no_probe_opens_a_socks_connection(rendered: tuple[str, dict[str, str]]) -> None:
    """A probe of the SOCKS port would be recorded as a failed connection every few
    seconds, in the stats and the error-ratio alert."""
    _, manifests = rendered
    proxy = _by_kind(manifests, "Deployment", "-proxy")
    [container] = [c for c in _containers(proxy) if c["name"] == "proxy"]
    socks_ports = {p["name"] for p in container["ports"] if p["containerPort"] == 1080}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            check = container[probe]
            assert "tcpSocket" not in check and "grpc" not in check, probe
            assert check["httpGet"]["port"] not in (*socks_ports, 1080), probe


def test_operator_rbac_is_least_privilege(rendered: tuple[str, dict[str, str]]) -> None:
    name, manifests = rendered
    docs = _documents(manifests)
    cluster = VALUE_SETS[name].get("operator", {}).get("clusterWide", False)
    kinds = {d["kind"] for d in docs}
    assert ("ClusterRole" in kinds) is cluster
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            for rule in doc["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"]
                assert "delete" not in rule["verbs"]
                if "secrets" in rule["resources"] and {"update", "patch"} & set(rule["verbs"]):
                    assert rule["resourceNames"] == ["demo-socks5-analytics-policy"]


def test_crds_ship_with_the_chart(chart: helm.Chart) -> None:
    names = {c["name"] for c in chart.crds}
    assert {"crds/proxyusers.socks5.analytics.io.yaml",
            "crds/ipwhitelists.socks5.analytics.io.yaml"} <= names


def test_notes_tell_what_to_run_next(rendered: tuple[str, dict[str, str]]) -> None:
    _, manifests = rendered
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert "kind: ProxyUser" in notes and "rollout status" in notes and "--socks5" in notes


@pytest.mark.parametrize("values", [
    {"proxy": {"replicas": 0}},
    {"proxy": {"service": {"type": "ExternalName"}}},
    {"proxy": {"unknown": True}},
    {"unknownTopLevel": 1},
    {"logLevel": "verbose"},
    {"postgresql": {"enabled": False}},  # and no external database
    {"tracing": {"enabled": True}},  # and no endpoint
    {"api": {"ingress": {"enabled": True, "host": "Not A Host"}}},
    {"proxy": {"resources": {"requests": {"cpu": "lots"}}}},
    {"config": {"proxxy": {}}},
    {"proxy": {"policySecretWatch": {"enabled": "yes"}}},
    {"policy": {"limits": {"max_connections": -3}}},
    {"policy": {"limits": {"connections_per_second_per_ip": -1}}},
    {"policy": {"limits": {"max_conections": 5}}},
    {"policy": {"destinations": {"rules": [{"action": "maybe"}]}}},
    {"policy": {"destinations": {"rules": [{"domains": [".example.com"]}]}}},  # no action
    {"policy": {"destinations": {"rules": [{"action": "deny", "commands": ["get"]}]}}},
    {"policy": {"destinations": {"block_private": "no"}}},
])
def test_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="demo", namespace=NAMESPACE, is_install=True)


def test_autoscaling_needs_min_at_most_max(chart: helm.Chart) -> None:
    values = {"proxy": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    with pytest.raises(helm.HelmError,
                       match=r"minReplicas \(5\) must not exceed maxReplicas \(2\)"):
        chart.render(values, name="demo", namespace=NAMESPACE, is_install=True)


def _file_source(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that a file path of a container comes from."""
    # The deepest mount holding the path: /etc/socks5-analytics/tls, not /etc/socks5-analytics.
    for mount in sorted(container["volumeMounts"], key=lambda m: -len(m["mountPath"])):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            name = path[len(prefix):]
            keys = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
            return volume["secret"]["secretName"], keys.get(name, name)
    raise AssertionError(f"{path} is on no volume")


def test_the_collector_link_can_take_a_token_and_tls(
        rendered: tuple[str, dict[str, str]]) -> None:
    """Both ends get the same token Secret; the collectors their certificate and key, the
    proxies only the CA that signed it, each file from the TLS Secret."""
    name, manifests = rendered
    link = VALUE_SETS[name].get("collector", {})
    ends = {}
    for component, container_name in (("-collector", "collector"), ("-proxy", "proxy")):
        pod = _by_kind(manifests, "Deployment", component)["spec"]["template"]["spec"]
        [container] = [c for c in pod["containers"] if c["name"] == container_name]
        ends[container_name] = (pod, container, {e["name"]: e for e in container["env"]})
    _, _, server = ends["collector"]
    _, _, client = ends["proxy"]
    if not link:
        assert not [n for n in (*server, *client) if "TOKEN" in n or "TLS" in n]
        return
    for env, key in ((server, "S5A_COLLECTOR__TOKEN"), (client, "S5A_PROXY__EVENTS__TOKEN")):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": link["tokenSecret"],
                                                          "key": "token"}
    secret = link["tls"]["secretName"]
    pod, container, env = ends["collector"]
    assert env["S5A_COLLECTOR__TLS__ENABLED"]["value"] == "true"
    for variable, key in (("S5A_COLLECTOR__TLS__CERT_FILE", "tls.crt"),
                          ("S5A_COLLECTOR__TLS__KEY_FILE", "tls.key")):
        assert _file_source(pod, container, env[variable]["value"]) == (secret, key)
    pod, container, env = ends["proxy"]
    assert env["S5A_PROXY__EVENTS__TLS__ENABLED"]["value"] == "true"
    assert _file_source(pod, container, env["S5A_PROXY__EVENTS__TLS__CA_FILE"]["value"]) == (
        secret, "ca.crt")
    assert env["S5A_PROXY__EVENTS__TLS__SERVER_NAME"]["value"] == link["tls"]["serverName"]
    volume = next(v for v in pod["volumes"] if v["name"] == "collector-tls")
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt"]  # never the key
