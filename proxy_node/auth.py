"""Method negotiation and RFC 1929 username/password checks.

Password hashes are slow on purpose, so a verified password is remembered as an HMAC under a
per-process random key, keyed by the stored hash: a changed password or a new policy never
matches a stale entry, and nothing reversible is kept. No IP-based caching: every connection
presents its credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Protocol

from proxy_node.wire import AuthMethod
from socks5_analytics.passwords import hash_password, verify_password
from socks5_analytics.policy import Policy, UserEntry

__all__ = ["Authenticator", "PolicyAuthenticator", "choose_method"]


def choose_method(offered: Iterable[int], acceptable: Iterable[AuthMethod]) -> AuthMethod:
    """The first acceptable method the client offered, or NO_ACCEPTABLE_METHODS."""
    offered = frozenset(offered)
    for method in acceptable:
        if method in offered:
            return method
    return AuthMethod.NO_ACCEPTABLE_METHODS


class Authenticator(Protocol):
    """Decides whether credentials are good."""

    @property
    def requires_auth(self) -> bool:
        """Whether clients must authenticate with username/password."""

    def recognized(self, username: bytes, password: bytes) -> bool | None:
        """The answer when it needs no slow hash; None otherwise."""

    def verification(self, username: bytes, password: bytes) -> tuple[asyncio.Future[bool], bool]:
        """The slow check (shared by identical concurrent logins), and whether this call
        started it."""

    async def verify(self, username: bytes, password: bytes) -> bool:
        """True when the user exists, is enabled and the password matches."""


class PolicyAuthenticator:
    """Checks credentials against the users of the current policy."""

    def __init__(self, policy: Policy) -> None:
        self._secret = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        # Unknown users still cost one hash check, so timing does not reveal who exists.
        self._decoy = hash_password(os.urandom(16).hex())
        self._users: dict[bytes, UserEntry] = {}
        self._pending: dict[tuple[bytes, str, bytes], asyncio.Future[bool]] = {}
        self._hashing: set[asyncio.Task[None]] = set()
        self.update(policy)

    @property
    def requires_auth(self) -> bool:
        """Users listed in the policy: authentication required."""
        return self._requires

    def update(self, policy: Policy) -> None:
        """Switch to a new policy's users; forget verifications of hashes that went away."""
        self._users = {user.username.encode(): user for user in policy.users}
        self._requires = policy.requires_auth
        live = {user.password_hash for user in policy.users}
        self._verified = {h: tag for h, tag in self._verified.items() if h in live}

    def user(self, username: str) -> UserEntry | None:
        """The policy entry of a user, if any."""
        return self._users.get(username.encode())

    def recognized(self, username: bytes, password: bytes) -> bool | None:
        """The answer without hashing, when this is the password verified before for this
        user's hash (compared in constant time). None: it must be hashed. That includes
        every wrong password: answered at once, it would tell a user who logged in before
        from an unknown one (who costs a decoy hash), so it costs a hash like theirs."""
        user = self._users.get(username)
        if user is None:
            return None
        remembered = self._verified.get(user.password_hash)
        if remembered is None:
            return None
        tag = hmac.new(self._secret, password, hashlib.sha256).digest()
        if not hmac.compare_digest(remembered, tag):
            return None
        return not user.disabled

    def verification(self, username: bytes, password: bytes) -> tuple[asyncio.Future[bool], bool]:
        """The slow check, shared by concurrent logins with the same credentials: (the
        result, whether this call started it)."""
        user = self._users.get(username)
        stored = user.password_hash if user is not None else self._decoy
        tag = hmac.new(self._secret, password, hashlib.sha256).digest()
        key = (username, stored, tag)
        pending = self._pending.get(key)
        if pending is not None:
            return pending, False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending[key] = future
        task = loop.create_task(self._hash(username, password, stored, tag, key, future))
        self._hashing.add(task)
        task.add_done_callback(self._hashing.discard)
        return future, True

    async def _hash(self, username: bytes, password: bytes, stored: str, tag: bytes,
                    key: tuple[bytes, str, bytes], future: asyncio.Future[bool]) -> None:
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                None, verify_password, password, stored)
            current = self._users.get(username)  # the policy may have changed meanwhile
            if ok and current is not None and current.password_hash == stored:
                self._verified[stored] = tag
                future.set_result(not current.disabled)
            else:
                future.set_result(False)
        except Exception as exc:  # a task's top: the waiting logins get the error
            future.set_exception(exc)
        finally:
            self._pending.pop(key, None)

    async def verify(self, username: bytes, password: bytes) -> bool:
        """Constant-time check; the slow hash runs in a worker thread, once per password."""
        known = self.recognized(username, password)
        if known is not None:
            return known
        future, _ = self.verification(username, password)
        return await asyncio.shield(future)
