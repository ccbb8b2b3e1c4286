"""PolicyAuthenticator: which logins cost a password hash (the timing a client can see)."""

from __future__ import annotations

import pytest

from proxy_node import auth
from socks5_analytics.passwords import hash_password
from socks5_analytics.policy import Policy, UserEntry

ALICE_HASH = hash_password("right")


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The passwords the slow hash was run for, in order."""
    seen: list[bytes] = []
    real = auth.verify_password

    def counting(password: bytes, stored: str) -> bool:
        seen.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return seen


def _authenticator(*, disabled: bool = False) -> auth.PolicyAuthenticator:
    return auth.PolicyAuthenticator(Policy(users=[
        UserEntry(username="alice", password_hash=ALICE_HASH, disabled=disabled)]))


@pytest.mark.parametrize(("username", "password", "ok", "hashed"), [
    (b"alice", b"right", True, False),    # the remembered password: no hash
    (b"alice", b"wrong", False, True),    # a wrong one costs a hash, as for anyone
    (b"mallory", b"right", False, True),  # an unknown user costs the decoy hash
])
async def test_after_a_good_login_only_that_password_skips_the_hash(
        hashes: list[bytes], username: bytes, password: bytes, ok: bool, hashed: bool) -> None:
    authenticator = _authenticator()
    assert await authenticator.verify(b"alice", b"right")
    assert hashes == [b"right"]
    hashes.clear()
    assert await authenticator.verify(username, password) is ok
    assert hashes == ([password] if hashed else [])


async def test_a_wrong_password_is_never_remembered(hashes: list[bytes]) -> None:
    authenticator = _authenticator()
    for _ in range(2):
        assert not await authenticator.verify(b"alice", b"wrong")
    assert hashes == [b"wrong", b"wrong"]
    assert authenticator.recognized(b"alice", b"wrong") is None


async def test_a_disabled_user_is_refused_with_the_right_password(hashes: list[bytes]) -> None:
    authenticator = _authenticator(disabled=True)
    assert not await authenticator.verify(b"alice", b"right")
    assert not await authenticator.verify(b"alice", b"right")
    assert authenticator.recognized(b"alice", b"wrong") is None
