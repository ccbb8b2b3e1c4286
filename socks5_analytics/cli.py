"""The `socks5-analytics` command: one subcommand per process.

Every subcommand takes `--config FILE` and reads `.env` and `S5A_*` variables; the few flags
here override both. A bad configuration prints the key and the problem and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from socks5_analytics import __version__
from socks5_analytics.config import ConfigError, Settings, load_settings
from socks5_analytics.runtime import follow_stack_parent

__all__ = ["main", "parse_command"]

EXIT_CONFIG = 2


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")


def _run_proxy(args: argparse.Namespace, settings: Settings) -> int:
    from proxy_node.main import run

    return run(settings)


def _proxy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    proxy: dict[str, Any] = {}
    if args.listen is not None:
        proxy["listen"] = args.listen
    if args.policy is not None:
        proxy["policy_file"] = args.policy
    if args.collector is not None:
        proxy["events"] = {"collectors": args.collector}
    if args.metrics_listen is not None:
        proxy["metrics_listen"] = args.metrics_listen
    return {"proxy": proxy} if proxy else {}


def _run_collector(args: argparse.Namespace, settings: Settings) -> int:
    from collector.main import run

    return run(settings)


def _collector_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _database_overrides(args)
    collector: dict[str, Any] = {}
    if args.listen is not None:
        collector["listen"] = args.listen
    if args.metrics_listen is not None:
        collector["metrics_listen"] = args.metrics_listen
    if collector:
        overrides["collector"] = collector
    return overrides


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from socks5_analytics.storage.errors import StorageError
    from socks5_analytics.storage.migrate import migrate_command

    try:
        print(migrate_command(settings.database, action=args.action, revision=args.revision))
    except StorageError as exc:
        print(f"socks5-analytics migrate: {exc}", file=sys.stderr)
        return 1
    return 0


def _database_overrides(args: argparse.Namespace) -> dict[str, Any]:
    if args.database_url is None:
        return {}
    return {"database": {"url": args.database_url}}


def _run_stack(args: argparse.Namespace, settings: Settings) -> int:
    from socks5_analytics.stack import run

    return run(settings, args.config)


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    from api.server import run

    return run(settings)


def _api_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _database_overrides(args)
    if args.listen is not None:
        overrides["api"] = {"listen": args.listen}
    return overrides


def _hash_password(args: argparse.Namespace, settings: Settings) -> int:
    from socks5_analytics.passwords import hash_password

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _run_operator(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: kopf and aiohttp are only needed by this subcommand.
    from socks5_operator.main import run

    try:
        return int(run(settings))
    except ConfigError as exc:
        print(f"socks5-analytics operator: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _operator_overrides(args: argparse.Namespace) -> dict[str, Any]:
    operator: dict[str, Any] = {}
    if args.namespace is not None:
        operator["namespace"] = args.namespace
    if args.all_namespaces:
        operator["cluster_wide"] = True
    return {"operator": operator} if operator else {}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socks5-analytics",
        description="A SOCKS5 proxy that records every connection and serves analytics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stack = commands.add_parser(
        "up", help="the whole stack on this machine: database, collector, API, proxy"
    )
    _add_config(stack)
    stack.add_argument("--database-url", metavar="URL",
                       help="PostgreSQL URL (default: an embedded server)")
    stack.set_defaults(handler=_run_stack, overrides=_database_overrides)

    proxy = commands.add_parser("proxy", help="run a SOCKS5 proxy node")
    _add_config(proxy)
    proxy.add_argument("--listen", metavar="H:P", help="SOCKS5 listen address (127.0.0.1:1080)")
    proxy.add_argument("--policy", metavar="FILE", help="policy file (users, whitelist, limits)")
    proxy.add_argument("--collector", metavar="H:P[,H:P...]",
                       help="collector addresses; events stream there over gRPC")
    proxy.add_argument("--metrics-listen", metavar="H:P",
                       help="Prometheus /metrics address (127.0.0.1:9101; off: none)")
    proxy.set_defaults(handler=_run_proxy, overrides=_proxy_overrides)

    collector = commands.add_parser(
        "collector",
        help="run the gRPC collector that stores the proxies' events in PostgreSQL",
        description="Without a database URL, uses the embedded server's database.",
    )
    _add_config(collector)
    collector.add_argument("--listen", metavar="H:P",
                           help="gRPC listen address (127.0.0.1:50051)")
    collector.add_argument("--database-url", metavar="URL", help="postgresql://user@host/db")
    collector.add_argument("--metrics-listen", metavar="H:P",
                           help="Prometheus /metrics address (127.0.0.1:9102; off: none)")
    collector.set_defaults(handler=_run_collector, overrides=_collector_overrides)

    migrate = commands.add_parser(
        "migrate",
        help="upgrade (to the newest by default) or downgrade the database schema",
        description="Without a database URL, migrates the embedded server's database.",
    )
    _add_config(migrate)
    migrate.add_argument("--database-url", metavar="URL", help="postgresql://user@host/db")
    migrate.add_argument("action", nargs="?", choices=("upgrade", "downgrade"),
                         default="upgrade", help="upgrade (default) or downgrade")
    migrate.add_argument("revision", nargs="?", metavar="REV",
                         help="target revision (upgrade: head by default; downgrade: "
                         "required, `base` removes the schema)")
    migrate.set_defaults(handler=_migrate, overrides=_database_overrides)

    api = commands.add_parser(
        "api", help="run the stats API and the dashboard",
        description="Without a database URL, uses the embedded server's database.",
    )
    _add_config(api)
    api.add_argument("--listen", metavar="H:P", help="HTTP listen address (127.0.0.1:8080)")
    api.add_argument("--database-url", metavar="URL", help="postgresql://user@host/db")
    api.set_defaults(handler=_run_api, overrides=_api_overrides)

    hashing = commands.add_parser(
        "hash-password", help="read a password on stdin, print its hash for the policy file"
    )
    _add_config(hashing)
    hashing.set_defaults(handler=_hash_password, overrides=lambda _args: {})

    operator = commands.add_parser(
        "operator", help="run the Kubernetes operator (ProxyUser, IPWhitelist -> policy Secret)",
        description="Watches ProxyUser and IPWhitelist resources and renders the proxies' "
        "policy into one Secret. Logs in with the pod's service account, else a kubeconfig.",
    )
    _add_config(operator)
    operator.add_argument("--namespace", metavar="NS",
                          help="namespace to watch and write the policy Secret to "
                          "(default: the pod's own)")
    operator.add_argument("--all-namespaces", action="store_true",
                          help="watch the resources in every namespace")
    operator.set_defaults(handler=_run_operator, overrides=_operator_overrides)
    return parser


def parse_command(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    """Parse a command line and load its configuration without running it.

    Raises SystemExit (argparse) for a bad command line and ConfigError for a bad
    configuration; tests/deploy feeds the container commands through it.
    """
    args = _build_parser().parse_args(argv)
    overrides: Callable[[argparse.Namespace], dict[str, Any]] = args.overrides
    return args, load_settings(args.config, **overrides(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the configuration, run the subcommand."""
    args = _build_parser().parse_args(argv)
    overrides: Callable[[argparse.Namespace], dict[str, Any]] = args.overrides
    try:
        settings = load_settings(args.config, **overrides(args))
    except ConfigError as exc:
        print(f"socks5-analytics {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    follow_stack_parent()
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        return handler(args, settings)
    except ConfigError as exc:  # found when a component starts (a file it cannot use)
        print(f"socks5-analytics {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
