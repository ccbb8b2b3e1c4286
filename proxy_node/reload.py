"""Live policy reload: watch the policy file, apply a valid new version, keep the old on error.

The file is polled (a stat per interval; its content hashed only when the stat changes),
which also catches the atomic symlink swap Kubernetes uses for mounted Secrets and works on
every filesystem. SIGHUP forces a check. A bad file is refused with a log line naming the
problem, once per distinct content, and the policy in force stays.

Other sources (the Kubernetes Secret watch, proxy_node/secret_watch.py) hand their text to
`offer`: the same parsing, the same refusal, and one "current version" for all of them, so
whichever source sees a change first applies it and the others' copy is then a no-op.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from socks5_analytics.policy import Policy, PolicyError, parse_policy

__all__ = ["PolicyWatcher"]


class PolicyWatcher:
    """Calls `apply(policy)` whenever the file holds a new valid policy."""

    def __init__(self, path: Path | None, *, current: Policy, interval: float,
                 apply: Callable[[Policy], None], log: Any) -> None:
        self.path = path
        self.interval = interval
        self.apply = apply
        self.log = log
        self.version = current.version
        self._signature: tuple[int, int, int] | None = self._stat()
        self._refused: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self, *, force: bool = False) -> None:
        """Reload if the file changed (or always, with `force`)."""
        if self.path is None:
            return
        signature = self._stat()
        if signature == self._signature and not force:
            return
        self._signature = signature
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            self.log.error("policy file unreadable; keeping the policy in force",
                           path=str(self.path), error=exc.strerror,
                           policy_version=self.version)
            return
        self.offer(text, str(self.path))

    def offer(self, text: str, source: str) -> bool:
        """Parse `text` (from `source`: a path, a Secret) and apply it if it is a new version.

        A bad document is refused with a log line (once per distinct text) and the policy in
        force stays. Returns whether a new policy was applied.
        """
        try:
            if not text.strip():
                # Caught between truncate and write (an in-place rewrite): applying it would
                # drop every user, i.e. switch authentication off. Write `{}` to mean it.
                what = "the file" if source == str(self.path) else "the document"
                raise PolicyError(f"{source}: {what} is empty (a partial write?)")
            policy = parse_policy(text, source=source)
        except PolicyError as exc:
            if self._refused != text:
                self._refused = text
                self.log.error("policy refused; keeping the policy in force", error=str(exc),
                               policy_version=self.version, source=source)
            return False
        self._refused = None
        if policy.version == self.version:
            return False
        self.version = policy.version
        self.apply(policy)
        return True
