"""The example manifests against the CRDs' schemas; the CRDs against the API's own rules."""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "helm/socks5-analytics/crds").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples/k8s").glob("*.yaml"))


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): an unknown field is an error, except under metadata and preserved fields."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
            for name, child in node["properties"].items():
                if name != "metadata":
                    walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    return schema


def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _validate(body: dict[str, Any]) -> None:
    schema = _schemas()[(body["apiVersion"], body["kind"])]
    jsonschema.validate(body, schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("path", CRDS, ids=lambda p: p.name)
def test_crds_are_valid_kubernetes(path: Path) -> None:
    crd = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(crd, "1.29", strict=True)
    [version] = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Ready", "Reason"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        if doc["apiVersion"].startswith("socks5.analytics.io/"):
            _validate(doc)
        else:
            kubernetes_validate.validate(doc, "1.29", strict=True)


USER = {"apiVersion": "socks5.analytics.io/v1alpha1", "kind": "ProxyUser",
        "metadata": {"name": "u"},
        "spec": {"username": "u", "passwordSecretRef": {"name": "s", "key": "password"}}}
WHITELIST = {"apiVersion": "socks5.analytics.io/v1alpha1", "kind": "IPWhitelist",
             "metadata": {"name": "w"}, "spec": {"cidrs": ["10.0.0.0/8"]}}


@pytest.mark.parametrize(("base", "change"), [
    (USER, {"username": ""}),
    (USER, {"username": "has space"}),
    (USER, {"username": "x" * 256}),
    (USER, {"maxConnections": -1}),
    (USER, {"connectionsPerSecond": -0.5}),
    (USER, {"passwordSecretRef": {"name": "s"}}),
    (USER, {"passwordSecretRef": {"name": "Not_A_Name", "key": "k"}}),
    (USER, {"password": "plain text is not a field"}),
    (WHITELIST, {"cidrs": []}),
    (WHITELIST, {"cidrs": ["10.0.0.0/33"]}),
    (WHITELIST, {"cidrs": ["300.1.1.1/8"]}),
    (WHITELIST, {"cidrs": ["example.com"]}),
    (WHITELIST, {"cidrs": ["2001:db8::/129"]}),
])
def test_schema_refuses_bad_specs(base: dict[str, Any], change: dict[str, Any]) -> None:
    body = copy.deepcopy(base)
    body["spec"].update(change)
    with pytest.raises(jsonschema.ValidationError):
        _validate(body)


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.1/32", "192.0.2.1",
                                  "::/0", "2001:db8::/32", "fe80::1/128", "::ffff:192.0.2.0/120"])
def test_schema_takes_good_cidrs(cidr: str) -> None:
    _validate({**WHITELIST, "spec": {"cidrs": [cidr]}})
    ipaddress.ip_network(cidr)  # and they are real networks
    assert re.fullmatch(r"[0-9a-fA-F:./]+", cidr)
