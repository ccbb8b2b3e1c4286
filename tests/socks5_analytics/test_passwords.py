"""Unit tests for `socks5_analytics.passwords`: the `scrypt$N$r$p$salt$key` hash format."""

from __future__ import annotations

import base64

import pytest

from socks5_analytics.passwords import (
    PasswordHashError,
    hash_password,
    parse_hash,
    verify_password,
)

FAST = {"n": 2**4, "r": 8, "p": 1}  # far below the default cost: these are unit tests

SALT = base64.b64encode(b"s" * 16).decode()
KEY = base64.b64encode(b"k" * 32).decode()


def _encoded(n: object = 16, r: object = 8, p: object = 1, salt: str = SALT,
             key: str = KEY) -> str:
    return f"scrypt${n}${r}${p}${salt}${key}"


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("correct horse battery staple", id="ascii"),
        pytest.param("", id="empty"),
        pytest.param("pässwörd-密码-🔑", id="non-ascii"),
        pytest.param("x" * 1000, id="long"),
        pytest.param("with$dollar", id="separator-in-password"),
    ],
)
def test_round_trip(password: str) -> None:
    encoded = hash_password(password, **FAST)
    assert verify_password(password.encode("utf-8"), encoded)


def test_wrong_password_fails() -> None:
    encoded = hash_password("s3cret", **FAST)
    assert not verify_password(b"s3creT", encoded)
    assert not verify_password(b"s3cret ", encoded)
    assert not verify_password(b"", encoded)
    assert not verify_password("s3cret".encode("utf-16"), encoded)


def test_format() -> None:
    encoded = hash_password("pw", n=2**5, r=4, p=2)
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "32", "4", "2")
    assert len(base64.b64decode(salt, validate=True)) == 16
    assert len(base64.b64decode(key, validate=True)) == 32
    assert parse_hash(encoded) == (
        32, 4, 2, base64.b64decode(salt), base64.b64decode(key)
    )
    assert verify_password(b"pw", encoded)


def test_default_cost() -> None:
    n, r, p, salt, key = parse_hash(hash_password("pw"))
    assert (n, r, p) == (2**14, 8, 1)
    assert len(salt) == 16
    assert len(key) == 32


def test_hashes_are_salted() -> None:
    first = hash_password("same password", **FAST)
    second = hash_password("same password", **FAST)
    assert first != second
    assert parse_hash(first)[3] != parse_hash(second)[3]
    assert verify_password(b"same password", first)
    assert verify_password(b"same password", second)


def test_verify_uses_the_parameters_in_the_hash() -> None:
    # A hash made with other parameters still verifies: N, r and p travel with it.
    for n, r, p in [(2**1, 1, 1), (2**6, 2, 3), (2**4, 16, 1)]:
        encoded = hash_password("pw", n=n, r=r, p=p)
        assert parse_hash(encoded)[:3] == (n, r, p)
        assert verify_password(b"pw", encoded)


def test_tampered_key_fails() -> None:
    encoded = hash_password("pw", **FAST)
    parts = encoded.split("$")
    key = bytearray(base64.b64decode(parts[5]))
    key[0] ^= 0x01
    parts[5] = base64.b64encode(bytes(key)).decode()
    assert not verify_password(b"pw", "$".join(parts))


def test_longer_stored_key_is_compared_at_its_length() -> None:
    # A key of another length than ours (e.g. 64 bytes from another tool) is derived at
    # that length, not truncated or padded.
    import hashlib

    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"pw", salt=salt, n=16, r=8, p=1, dklen=64)
    encoded = _encoded(salt=base64.b64encode(salt).decode(), key=base64.b64encode(key).decode())
    assert verify_password(b"pw", encoded)
    assert not verify_password(b"px", encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param("", id="empty"),
        pytest.param("hunter2", id="plain-password"),
        pytest.param(_encoded().replace("scrypt", "bcrypt", 1), id="other-scheme"),
        pytest.param(_encoded().replace("scrypt", "SCRYPT", 1), id="scheme-case"),
        pytest.param("$2b$12$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz012", id="bcrypt"),
        pytest.param(_encoded().rsplit("$", 1)[0], id="five-fields"),
        pytest.param(_encoded() + "$extra", id="seven-fields"),
        pytest.param(_encoded(n="x"), id="n-not-int"),
        pytest.param(_encoded(r="8.0"), id="r-float"),
        pytest.param(_encoded(p=""), id="p-empty"),
        pytest.param(_encoded(n="0x10"), id="n-hex"),
        pytest.param(_encoded(n=0), id="n-zero"),
        pytest.param(_encoded(n=1), id="n-one"),
        pytest.param(_encoded(n=-16), id="n-negative"),
        pytest.param(_encoded(n=24), id="n-not-power-of-two"),
        pytest.param(_encoded(n=2**64), id="n-huge"),
        pytest.param(_encoded(r=0), id="r-zero"),
        pytest.param(_encoded(r=65), id="r-too-big"),
        pytest.param(_encoded(p=0), id="p-zero"),
        pytest.param(_encoded(p=17), id="p-too-big"),
        pytest.param(_encoded(n=2**20), id="memory-too-big"),
        pytest.param(_encoded(salt=""), id="salt-empty"),
        pytest.param(_encoded(salt="not base64!"), id="salt-not-base64"),
        pytest.param(_encoded(salt=SALT.rstrip("=")), id="salt-bad-padding"),
        pytest.param(_encoded(key=""), id="key-empty"),
        pytest.param(_encoded(key=base64.b64encode(b"k" * 15).decode()), id="key-too-short"),
        pytest.param(_encoded(key="@@@@"), id="key-not-base64"),
    ],
)
def test_malformed_hash(encoded: str) -> None:
    with pytest.raises(PasswordHashError):
        parse_hash(encoded)
    # verify_password must reject it the same way, not with some other exception.
    with pytest.raises(PasswordHashError):
        verify_password(b"pw", encoded)


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        pytest.param(2**17, 8, 1, id="n-2**17-r8"),
        pytest.param(2**16, 16, 1, id="n-2**16-r16"),
        pytest.param(2**10, 64, 2, id="n-2**10-r64-p2"),
    ],
)
def test_parameters_at_the_memory_limit(n: int, r: int, p: int) -> None:
    # Whatever parse_hash accepts, verify_password must be able to compute; parameters it
    # cannot compute must be rejected as PasswordHashError, not leak hashlib's ValueError.
    encoded = _encoded(n=n, r=r, p=p)
    try:
        parse_hash(encoded)
    except PasswordHashError:
        with pytest.raises(PasswordHashError):
            verify_password(b"pw", encoded)
    else:
        assert verify_password(b"pw", encoded) is False


def test_password_hash_error_is_a_value_error() -> None:
    assert issubclass(PasswordHashError, ValueError)
