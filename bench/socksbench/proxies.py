"""The SOCKS5 servers under test: how to check, configure, start and stop each.

Every server listens on 127.0.0.1 only, runs in its own session (so we can
signal its whole process group by id), and is started fresh for each run so
that runs are independent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from .netutil import LOOPBACK, free_port, wait_listening

REPO = Path(__file__).resolve().parent.parent.parent
VENV_BIN = REPO / ".venv" / "bin"
LAUNCHER = Path(__file__).resolve().parent / "pproxy_launcher.py"

# One account for every server, so RFC 1929 messages are identical in size.
# Dante checks it against the system password database (see SystemUser).
USER = "socksbench"
PASSWORD = "secret"


@dataclass
class Proxy(ABC):
    """A SOCKS5 implementation under test."""

    name: str
    description: str = ""
    is_ours: bool = False

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why this server cannot run here (None if it can)."""

    @abstractmethod
    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        """argv that starts it on 127.0.0.1:port, writing any config into workdir."""

    def auth_unavailable(self) -> str | None:
        """Why the username/password variant cannot run (None if it can)."""
        return None

    def version(self) -> str:
        """Human-readable version, for the report."""
        return "?"

    def cleanup(self) -> None:  # noqa: B027 - optional hook, most servers change nothing
        """Undo machine-wide changes made for this server (after all runs)."""


def _first_line(argv: list[str]) -> str:
    """First output line of a version command, or '?' if it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def _dpkg_version(package: str) -> str:
    """Installed Debian package version."""
    return _first_line(["dpkg-query", "-W", "-f=${Version}", package])


class SystemUser:
    """A throwaway system account, because Dante's `username` method checks
    /etc/shadow (via crypt) and has no password file of its own."""

    def __init__(self) -> None:
        self.created = False

    def ensure(self) -> str | None:
        """Create the account if missing; returns a reason if that is impossible."""
        if subprocess.run(["id", USER], capture_output=True, check=False).returncode == 0:
            return None
        if os.geteuid() != 0 or not shutil.which("useradd"):
            return "needs root and useradd to create the system user Dante authenticates"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )
        subprocess.run(["chpasswd"], input=f"{USER}:{PASSWORD}\n", text=True, check=True)
        self.created = True
        return None

    def remove(self) -> None:
        """Delete the account again if this process created it."""
        if self.created:
            subprocess.run(["userdel", USER], check=False)
            self.created = False


@dataclass
class Dante(Proxy):
    """Debian's dante-server: multi-process C server."""

    system_user: SystemUser = field(default_factory=SystemUser)

    def unavailable(self) -> str | None:
        if not shutil.which("danted"):
            return "danted not found: apt-get install dante-server"
        if os.geteuid() != 0:
            return "danted needs root here (user.privileged: root)"
        return None

    def auth_unavailable(self) -> str | None:
        return self.system_user.ensure()

    def cleanup(self) -> None:
        self.system_user.remove()

    def version(self) -> str:
        return f"dante-server {_dpkg_version('dante-server')}"

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        conf = workdir / "danted.conf"
        conf.write_text(
            f"logoutput: {workdir / 'danted.log'}\n"
            f"internal: {LOOPBACK} port = {port}\n"
            # "lo" gives Dante both loopback addresses for outgoing connections
            "external: lo\n"
            "clientmethod: none\n"
            f"socksmethod: {'username' if auth else 'none'}\n"
            "user.privileged: root\n"
            "user.unprivileged: nobody\n"
            "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
            "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        )
        return ["danted", "-f", str(conf), "-p", str(workdir / "danted.pid")]


@dataclass
class Microsocks(Proxy):
    """Debian's microsocks: tiny thread-per-connection C server."""

    def unavailable(self) -> str | None:
        if shutil.which("microsocks"):
            return None
        return "microsocks not found: apt-get install microsocks"

    def version(self) -> str:
        return f"microsocks {_dpkg_version('microsocks')}"

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        argv = ["microsocks", "-i", LOOPBACK, "-p", str(port)]
        return argv + (["-u", USER, "-P", PASSWORD] if auth else [])


@dataclass
class Pproxy(Proxy):
    """pproxy from PyPI, on asyncio's default loop or on uvloop."""

    loop: str = "asyncio"

    def unavailable(self) -> str | None:
        probe = subprocess.run(
            [sys.executable, "-c", "import pproxy"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            return f"pproxy not importable: {sys.executable} -m pip install pproxy"
        return None

    def version(self) -> str:
        probe = "import importlib.metadata as m; print(m.version('pproxy'))"
        ver = _first_line([sys.executable, "-c", probe])
        return f"pproxy {ver} ({self.loop})"

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        uri = f"socks5://{LOOPBACK}:{port}" + (f"#{USER}:{PASSWORD}" if auth else "")
        return [sys.executable, str(LAUNCHER), f"--loop={self.loop}", "-l", uri]


@dataclass
class Ours(Proxy):
    """This project's proxy, with the jsonl event sink on (as in production)."""

    workers: int = 1
    _hash: str | None = None

    def _cli(self) -> Path:
        return VENV_BIN / "socks5-analytics"

    def unavailable(self) -> str | None:
        cli = self._cli()
        if not cli.exists():
            return f"{cli} missing: pip install -e . in the project venv"
        probe = subprocess.run(
            [str(cli), "proxy", "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode != 0:
            return f"`socks5-analytics proxy --help` failed: {probe.stderr.strip()[-300:]}"
        return None

    def auth_unavailable(self) -> str | None:
        try:
            self._password_hash()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"`socks5-analytics hash-password` failed: {exc}"
        return None

    def version(self) -> str:
        return _first_line([str(self._cli()), "--version"])

    def _password_hash(self) -> str:
        """Hash PASSWORD with the project's own CLI (policy files hold hashes only)."""
        if self._hash is None:
            proc = subprocess.run(
                [str(self._cli()), "hash-password"],
                input=PASSWORD,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            self._hash = proc.stdout.strip().splitlines()[-1]
        return self._hash

    def command(self, port: int, auth: bool, workdir: Path) -> list[str]:
        config = workdir / "ours.yaml"
        config.write_text(
            "proxy:\n"
            f'  listen: "{LOOPBACK}:{port}"\n'
            f"  policy_file: {self._write_policy(auth, workdir)}\n"
            f"  workers: {self.workers}\n"
            '  metrics_listen: "127.0.0.1:0"\n'
            "  events:\n"
            "    sink: jsonl\n"
            f"    path: {workdir / 'events.jsonl'}\n"
            "log:\n"
            "  level: warning\n"
        )
        argv = [str(self._cli()), "proxy", "--listen", f"{LOOPBACK}:{port}"]
        return [*argv, "--config", str(config)]

    def _write_policy(self, auth: bool, workdir: Path) -> Path:
        """Policy file: loopback destinations allowed, plus the user for the auth variant.

        The proxy blocks private and loopback destinations by default (an
        SSRF guard), and the benchmark target is on loopback, so a policy
        file is needed even without authentication.
        """
        text = "destinations:\n  block_private: false\n"
        if auth:
            text += f'users:\n  - username: {USER}\n    password_hash: "{self._password_hash()}"\n'
        policy = workdir / "policy.yaml"
        policy.write_text(text)
        return policy


def all_proxies(ours_workers: int = 1) -> list[Proxy]:
    """Every server the harness knows, peers first."""
    return [
        Dante("dante", "Dante, multi-process C"),
        Microsocks("microsocks", "microsocks, thread per connection C"),
        Pproxy("pproxy", "pproxy on asyncio's default loop", loop="asyncio"),
        Pproxy("pproxy-uvloop", "pproxy on uvloop", loop="uvloop"),
        Ours(
            "ours",
            "socks5-analytics proxy, jsonl event sink on",
            is_ours=True,
            workers=ours_workers,
        ),
    ]


@dataclass
class Running:
    """A started server process (the root of its process tree)."""

    proxy: Proxy
    port: int
    auth: bool
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group (ours only), then SIGKILL after 10 s.

        The group is signalled even if the leader already exited, so that no
        forked helper (Dante's children) outlives the run.
        """
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self) -> str:
        """Last lines of the server's output, for error messages."""
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return ""


def start(proxy: Proxy, auth: bool, workdir: Path, startup_timeout: float = 20.0) -> Running:
    """Start `proxy` on a free loopback port and wait until it accepts connections."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = proxy.command(port, auth, workdir)
    log = workdir / "stdout.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=workdir,
        )
    running = Running(proxy, port, auth, proc, log)
    if not wait_listening(port, startup_timeout) or not running.alive():
        running.stop()
        raise RuntimeError(f"{proxy.name} did not start: {running.log_tail()}")
    return running
