"""Dockerfile.proxy and Dockerfile.api against the application and the packaging.

hadolint lints them; the rest reads their final stage (ENTRYPOINT, CMD, ENV, EXPOSE,
HEALTHCHECK, USER, labels) and checks it with the real command line and configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_facts import (
    DOCKERFILES,
    ENTRY_POINT,
    ROOT,
    WILDCARD_HOSTS,
    compose,
    dockerfile_of,
    dockerignore_rules,
    exec_form,
    healthcheck_command,
    in_build_context,
    load_command,
    parse_dockerfile,
    probed_url,
    pyproject,
    run_tool,
    served_addresses,
    tool,
)

from socks5_analytics import __version__

OCI_LABELS = ("title", "description", "version", "revision", "licenses")


def test_hadolint_is_clean() -> None:
    # Every rule, at every level, and no inline `# hadolint ignore=` escape hatch. (Its
    # --require-label would want labels on the builder stage too; they are checked below.)
    result = run_tool(tool("hadolint"), "--no-color", "--failure-threshold=style",
                      "--disable-ignore-pragma", *DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def commands_of(dockerfile: str) -> set[str]:
    """The subcommands an image runs: its CMD and every compose service built from it."""
    _args, stages = parse_dockerfile(ROOT / dockerfile)
    cmd = stages[-1].last("CMD")
    assert cmd is not None
    found = {exec_form(cmd)[0]}
    for service in compose()["services"].values():
        if dockerfile_of(service) == dockerfile:
            found.add(service["command"][0])
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_entrypoint_and_cmd_are_a_real_command(dockerfile: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    _args, stages = parse_dockerfile(ROOT / dockerfile)
    final = stages[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert exec_form(entrypoint) == [ENTRY_POINT]
    assert ENTRY_POINT in pyproject()["project"]["scripts"]
    env = final.env()
    s5a = {k: v for k, v in env.items() if k.startswith("S5A_")}
    args, _settings = load_command(exec_form(cmd), s5a, where=f"{dockerfile} CMD",
                                  monkeypatch=monkeypatch, cwd=tmp_path)
    assert args.command == {"Dockerfile.proxy": "proxy", "Dockerfile.api": "api"}[dockerfile]
    assert env["PATH"].startswith("/opt/venv/bin:"), "the entry point comes from the venv"
    for name in env:
        assert not any(word in name for word in ("PASSWORD", "TOKEN", "SECRET", "DATABASE")), (
            f"{dockerfile}: {name} bakes a secret or a deployment's address into the image")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_expose_and_healthcheck_match_the_listen_ports(
        dockerfile: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _args, stages = parse_dockerfile(ROOT / dockerfile)
    final = stages[-1]
    env = {k: v for k, v in final.env().items() if k.startswith("S5A_")}
    served: dict[str, set[int]] = {}
    for command in sorted(commands_of(dockerfile)):
        _a, settings = load_command([command], env, where=f"{dockerfile}: {command}",
                                    monkeypatch=monkeypatch, cwd=tmp_path)
        addresses = served_addresses(command, settings)
        for role, (host, port) in addresses.items():
            assert host in WILDCARD_HOSTS, f"{dockerfile}: `{command}` {role} on {host}:{port}"
        served[command] = {port for _host, port in addresses.values()}
        if command == exec_form(final.last("CMD") or "[]")[0]:
            metrics_port = addresses["metrics"][1]
    exposed = {int(port) for args in final.all("EXPOSE") for port in args.split()}
    assert exposed == set().union(*served.values()), f"{dockerfile}: EXPOSE {sorted(exposed)}"
    check = final.last("HEALTHCHECK")
    assert check is not None and "--start-period=" in check
    probe = healthcheck_command(check)
    assert probe is not None and probe[0] == "python", "the slim image has no curl"
    host, port, _path = probed_url(probe)
    assert (host, port) == ("127.0.0.1", metrics_port)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_stage_is_slim_non_root_and_labelled(dockerfile: str) -> None:
    global_args, stages = parse_dockerfile(ROOT / dockerfile)
    assert len(stages) == 2
    builder, runtime = stages
    assert builder.name == "builder" and "slim" not in builder.base, "the builder has compilers"
    assert runtime.base.endswith("-slim-bookworm"), runtime.base
    assert global_args["PYTHON_VERSION"] == pyproject()["project"]["requires-python"].lstrip(
        ">="), "the images run the Python the project is tested on"
    user = runtime.last("USER")
    assert user is not None and user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0
    run_lines = " ".join(runtime.all("RUN"))
    assert "from=builder" in run_lines and "--no-index" in run_lines, "wheels only, offline"
    assert not [a for a in runtime.all("COPY") if "--from=builder" in a], (
        "the wheels come through a bind mount, so no wheel file stays in a layer")
    args = dict(a.partition("=")[::2] for a in runtime.all("ARG"))
    assert args["VERSION"] == __version__ == pyproject()["project"]["version"]
    labels = " ".join(runtime.all("LABEL"))
    for name in OCI_LABELS:
        assert f"org.opencontainers.image.{name}=" in labels


def test_both_images_build_the_same_wheel_the_same_way() -> None:
    (_a, (proxy_builder, _r)), (_b, (api_builder, _s)) = (
        parse_dockerfile(ROOT / name) for name in DOCKERFILES)
    assert proxy_builder == api_builder


def _packaged_sources() -> list[Path]:
    """Every file `pip wheel .` reads: pyproject, the readme, packages and data files."""
    config = pyproject()
    setuptools = config["tool"]["setuptools"]
    files = [ROOT / "pyproject.toml", ROOT / config["project"]["readme"]]
    find = setuptools["packages"]["find"]
    roots = [path for where in find.get("where", ["."]) for path in (ROOT / where).iterdir()
             if path.is_dir() and (path / "__init__.py").is_file()
             and any(Path(path.name).match(pattern) for pattern in find["include"])]
    roots += [ROOT / folder for folder in setuptools.get("package-dir", {}).values()]
    for root in roots:
        files += [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for sources in setuptools.get("data-files", {}).values():
        for pattern in sources:
            files += list(ROOT.glob(pattern))
    return files


def test_dockerignore_sends_what_the_wheel_needs_and_nothing_private() -> None:
    rules = dockerignore_rules()
    sources = _packaged_sources()
    assert any(p.name == "env.py" for p in sources) and len(sources) > 50
    missing = [str(p.relative_to(ROOT)) for p in sources
               if not in_build_context(str(p.relative_to(ROOT)), rules)]
    assert missing == [], f".dockerignore leaves out files the wheel needs: {missing[:10]}"
    for private in (".env", "api/.env", ".env.local", ".git/config", ".venv/bin/python",
                    "tests/conftest.py", "bench/run.py", "var/spool/batch",
                    "socks5_analytics/__pycache__/cli.cpython-311.pyc",
                    "socks5_proxy_analytics.egg-info/PKG-INFO", "docker-compose.yml"):
        assert not in_build_context(private, rules), f"{private} would reach the builder"
