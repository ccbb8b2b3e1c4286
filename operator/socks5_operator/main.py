"""The operator process: settings → kopf + the reconciler, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kopf
import yaml

from socks5_analytics import runtime
from socks5_analytics.config import ConfigError, Settings, format_address
from socks5_analytics.logs import configure_logging, get_logger
from socks5_analytics.policy import PolicyError, parse_policy
from socks5_operator.handlers import Login, build_registry, default_login
from socks5_operator.kube import KubeClient
from socks5_operator.reconcile import NodesSource, Reconciler, ReconcilerOptions
from socks5_operator.rollout import ApiNodes

__all__ = ["kopf_settings", "options_from", "run", "serve"]

log = get_logger("operator")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
BASE_KEYS = {"destinations", "limits"}


def _namespace(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise ConfigError("operator.namespace: required outside a pod (no service account "
                          "namespace to default to)") from None


def _base(path: Path | None) -> Mapping[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"operator.base_policy_file: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or set(data) - BASE_KEYS:
        raise ConfigError(f"operator.base_policy_file: {path} may hold only "
                          f"{sorted(BASE_KEYS)}; users and whitelist come from the resources")
    # Checked as the proxies will check it (the policy document is the contract): a base
    # they refuse would give every resource Ready=True and no proxy a loadable policy.
    try:
        parse_policy(yaml.safe_dump(data), source=f"operator.base_policy_file: {path}")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from exc
    return data


def options_from(settings: Settings) -> ReconcilerOptions:
    """The reconciler's options from `settings.operator`; ConfigError when unusable."""
    config = settings.operator
    return ReconcilerOptions(
        namespace=_namespace(config.namespace),
        secret_name=config.policy_secret,
        secret_key=config.policy_key,
        base=_base(config.base_policy_file),
        debounce=config.debounce,
        cluster_wide=config.cluster_wide,
        rollout_interval=config.rollout_interval,
        node_stale_after=config.node_stale_after,
    )


def kopf_settings() -> kopf.OperatorSettings:
    """kopf tuned for least privilege: no CRD or namespace scanning, no Events posted."""
    settings = kopf.OperatorSettings()
    # The chart installs the CRDs; scanning would need cluster-wide list/watch on CRDs
    # and namespaces.
    settings.scanning.disabled = True
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    return settings


async def serve(
    options: ReconcilerOptions,
    *,
    login: Login = default_login,
    nodes: NodesSource | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    reconciler_ready: asyncio.Future[Reconciler] | None = None,
    liveness: str | None = None,
) -> None:
    """Run kopf and the reconciler until `stop_flag` is set (or the task is cancelled);
    `liveness`: kopf's liveness endpoint URL (http://HOST:PORT/healthz), if any."""
    client = KubeClient()
    reconciler = Reconciler(options, client, nodes=nodes)
    if reconciler_ready is not None:
        reconciler_ready.set_result(reconciler)
    registry = build_registry(reconciler, login=login)
    loops = [asyncio.create_task(reconciler.run(), name="reconcile"),
             asyncio.create_task(reconciler.run_rollout(), name="rollout")]
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings(),
            clusterwide=options.cluster_wide,
            namespaces=() if options.cluster_wide else [options.namespace],
            standalone=True,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            liveness_endpoint=liveness,
        )
    finally:
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()


def run(settings: Settings) -> int:
    """`socks5-analytics operator`: returns the process exit status."""
    configure_logging(settings.log, component="operator", node=settings.node_id)
    options = options_from(settings)
    config = settings.operator
    nodes = None
    if config.api_url:
        token = config.api_token.get_secret_value() if config.api_token else None
        nodes = ApiNodes(config.api_url, token)
    liveness = None
    if config.health_listen is not None:
        liveness = f"http://{format_address(*config.health_listen)}/healthz"
    log.info("operator starting", namespace=options.namespace,
             cluster_wide=options.cluster_wide,
             secret=f"{options.namespace}/{options.secret_name}", liveness=liveness)
    # kopf handles SIGTERM/SIGINT itself and returns once it has stopped.
    runtime.run(serve(options, nodes=nodes, liveness=liveness))
    return 0
