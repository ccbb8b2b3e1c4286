"""An embedded PostgreSQL server: a data folder and a `postgres` process of our own.

`socks5-analytics up` uses it when no database URL is configured, and the tests use it for
a throwaway server. The binaries come from the `pgserver` wheel (PostgreSQL 16, installed
by pip with the project, so a fresh machine needs nothing else), else from an explicit
`bin_dir`, else from the system's PostgreSQL (`/usr/lib/postgresql/*/bin`, `pg_ctl` on PATH).
Only the binaries are borrowed: the server's life (initdb, start, stop) is managed here.

PostgreSQL refuses to run as root, so when we are root every server command runs as an
unprivileged user instead (`postgres` when it exists, else `nobody`), which then owns the
data folder; the folder and the binaries must be reachable by that user.

The server listens on 127.0.0.1 only, on a free port chosen at each start, with no Unix
socket (nothing to clash with a system server's /var/run/postgresql) and trust
authentication for the `postgres` role: it is a loopback-only developer database.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from types import TracebackType

from socks5_analytics.storage.errors import EmbeddedServerError

__all__ = ["EmbeddedPostgres", "default_data_dir", "find_bin_dir"]

_APP_NAME = "socks5-analytics"
_SUPERUSER = "postgres"
_START_ATTEMPTS = 5
# What we add to postgresql.conf once, after initdb.
_BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "logging_collector": "off",
}
# A throwaway server (tests, benchmarks' scratch) trades crash safety for speed.
_NON_DURABLE_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


def default_data_dir() -> Path:
    """Where the embedded server keeps its data when none is configured.

    The user's data directory (XDG) normally; as root, /var/lib/socks5-analytics, because
    the unprivileged user the server then runs as cannot reach into /root.
    """
    if os.geteuid() == 0:
        return Path("/var/lib") / _APP_NAME / "postgresql"
    import platformdirs

    return Path(platformdirs.user_data_dir(_APP_NAME)) / "postgresql"


def _system_bin_dirs() -> list[Path]:
    found: list[tuple[int, Path]] = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if candidate.parent.name.isdigit():
            found.append((int(candidate.parent.name), candidate))
    dirs = [path for _, path in sorted(found, reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    return dirs


def find_bin_dir(explicit: Path | None = None) -> Path:
    """The folder holding `initdb`, `pg_ctl` and `postgres` to run the embedded server with."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    else:
        spec = importlib.util.find_spec("pgserver")
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(Path(location) / "pginstall" / "bin")
        candidates.extend(_system_bin_dirs())
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    if explicit is not None:
        raise EmbeddedServerError(f"{explicit} has no initdb, pg_ctl and postgres")
    raise EmbeddedServerError(
        "no PostgreSQL binaries found: install the project's dependencies (the pgserver "
        "wheel), or the system's PostgreSQL server, or set database.embedded_bin_dir, or "
        "set database.url to use an existing server"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _traversable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may traverse every folder from / down to `path`."""
    groups = {account.pw_gid}
    groups.update(entry.gr_gid for entry in grp.getgrall() if account.pw_name in entry.gr_mem)
    for folder in [path, *path.parents]:
        info = folder.stat()
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, started and stopped by this object.

    Blocking: `start()` runs initdb the first time (about half a second) and waits until
    the server accepts connections. In async code use `async with`, which runs both in a
    worker thread. A server already running in `data_dir` is used, not started twice: while
    the command that started it still runs (`socks5-analytics up`, with `api` or `migrate`
    run beside it), that command stops it, not this object; left by a command that is gone
    (a crash, a SIGKILL), it is adopted and stopped by this object like its own.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        bin_dir: Path | None = None,
        run_as: str | None = None,
        durable: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.log_file = self.data_dir / "postgresql.log"
        self.bin_dir = find_bin_dir(bin_dir)
        self.durable = durable
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.owner_file = self.data_dir / "owner.pid"
        self.owned = False  # whether stop() stops the server (we started or adopted it)
        self._account = self._choose_account(run_as)

    @staticmethod
    def _choose_account(run_as: str | None) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            if run_as is not None and run_as != pwd.getpwuid(os.geteuid()).pw_name:
                raise EmbeddedServerError("run_as needs root (the server runs as yourself)")
            return None
        names = [run_as] if run_as is not None else [_SUPERUSER, "nobody"]
        for name in names:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise EmbeddedServerError(
            f"running as root, but no user {' or '.join(names)} exists to run PostgreSQL as"
        )

    @property
    def dsn(self) -> str:
        """The connection URL of the running server (database `postgres`)."""
        if self.port is None:
            raise EmbeddedServerError("the embedded server is not running")
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        """The connection URL of another database on the running server."""
        return self.dsn.rsplit("/", 1)[0] + "/" + database

    # -- running the server's tools -------------------------------------------------------

    def _run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / tool), *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        user = group = None
        extra_groups: list[int] | None = None
        if self._account is not None:
            user, group, extra_groups = self._account.pw_uid, self._account.pw_gid, []
            env["HOME"] = str(self.data_dir)
        try:
            return subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.data_dir,
                timeout=timeout,
                check=False,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedServerError(f"cannot run {command[0]}: {exc}") from exc

    def _check_reachable(self) -> None:
        if self._account is None:
            return
        for path, what in ((self.bin_dir, "PostgreSQL binaries"), (self.data_dir, "data folder")):
            if not _traversable_by(path, self._account):
                raise EmbeddedServerError(
                    f"the {what} at {path} cannot be reached by user {self._account.pw_name}, "
                    "whom PostgreSQL runs as under root: choose a folder outside /root "
                    "(database.embedded_data_dir, database.embedded_bin_dir)"
                )

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            os.chown(self.data_dir, self._account.pw_uid, self._account.pw_gid)
            self.data_dir.chmod(0o700)
        self._check_reachable()
        if (self.pgdata / "PG_VERSION").is_file():
            return
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a previous initdb died half-way
        args = ["-D", str(self.pgdata), "-U", _SUPERUSER, "--auth=trust", "-E", "UTF8",
                "--locale=C"]
        if not self.durable:
            args.append("--no-sync")
        result = self._run("initdb", *args, timeout=self.start_timeout)
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed in {self.pgdata}:\n{result.stderr}")
        settings = dict(_BASE_SETTINGS)
        if not self.durable:
            settings.update(_NON_DURABLE_SETTINGS)
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with (self.pgdata / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\n# added by socks5-analytics' embedded server\n{lines}")

    def _running_port(self) -> int | None:
        """The port of a server already running in our data folder, if there is one."""
        if not (self.pgdata / "postmaster.pid").is_file():
            return None
        status = self._run("pg_ctl", "status", "-D", str(self.pgdata), timeout=30)
        if status.returncode != 0:
            return None
        lines = (self.pgdata / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        return int(lines[3]) if len(lines) > 3 and re.fullmatch(r"\d+", lines[3]) else None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        """Initialise the data folder if needed, start the server, return its URL."""
        self._prepare_data_dir()
        running = self._running_port()
        if running is not None:
            self.port = running
            owner = self._owner()
            self.owned = owner is None or not _alive(owner)
            if self.owned:
                self._claim()
            return self.dsn
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            port = _free_port(self.host)
            result = self._run(
                "pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log_file), "-w",
                "-t", str(int(self.start_timeout)), "-o", f"-p {port}",
                timeout=self.start_timeout + 10,
            )
            if result.returncode == 0:
                self.port = port
                self.owned = True
                self._claim()
                return self.dsn
            last_error = result.stderr + self._log_tail()
            if not _port_in_use(self.host, port):
                break  # not a lost race for the port: retrying will not help
        raise EmbeddedServerError(f"PostgreSQL did not start in {self.pgdata}:\n{last_error}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _owner(self) -> int | None:
        """The process id of the command that runs the server, if it said so."""
        try:
            text = self.owner_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def _claim(self) -> None:
        with contextlib.suppress(OSError):
            self.owner_file.write_text(f"{os.getpid()}\n", encoding="ascii")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended, data is kept); a server that
        another live command runs is only let go."""
        if self.port is None:
            return
        if not self.owned:
            self.port = None
            return
        result = self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w",
                           "-t", "60", timeout=70)
        if result.returncode != 0 and self._running_port() is not None:
            result = self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "immediate",
                               "-w", timeout=70)
            if result.returncode != 0:
                raise EmbeddedServerError(f"PostgreSQL did not stop:\n{result.stderr}")
        self.port = None
        self.owned = False
        with contextlib.suppress(OSError):
            self.owner_file.unlink()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedPostgres:
        import asyncio

        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.stop)
