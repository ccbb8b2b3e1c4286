"""kopf handlers: small, and all they do is tell the reconciler what they saw."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf

from socks5_operator.reconcile import Reconciler
from socks5_operator.render import GROUP, VERSION

__all__ = ["Login", "build_registry", "default_login"]

Login = Callable[..., kopf.ConnectionInfo | None]


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, else a kubeconfig (a developer's machine)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def build_registry(
    reconciler: Reconciler, *, login: Login = default_login
) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers bound to `reconciler` (no global state)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login(**kwargs)
        if info is not None:
            reconciler.client.use(info)
            reconciler.logged_in()
        return info

    @kopf.on.event(GROUP, VERSION, "proxyusers", registry=registry)
    def _user(type: str | None, body: kopf.Body, **_: Any) -> None:
        reconciler.note("ProxyUser", type, body)

    @kopf.on.event(GROUP, VERSION, "ipwhitelists", registry=registry)
    def _whitelist(type: str | None, body: kopf.Body, **_: Any) -> None:
        reconciler.note("IPWhitelist", type, body)

    @kopf.on.event("", "v1", "secrets", registry=registry)
    def _secret(type: str | None, body: kopf.Body, **_: Any) -> None:
        reconciler.note_secret(type, body)

    return registry
