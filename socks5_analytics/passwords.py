"""Password hashes for the policy file: scrypt, self-describing, never a plain password.

Format: `scrypt$N$r$p$<salt, base64>$<key, base64>`. The proxy, the operator and the
`hash-password` command all use this module, so the format lives in one place.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["PasswordHashError", "hash_password", "parse_hash", "verify_password"]

_DEFAULT_N = 2**14
_DEFAULT_R = 8
_DEFAULT_P = 1
_KEY_LEN = 32
_MAX_MEM = 128 * 1024 * 1024


class PasswordHashError(ValueError):
    """A password hash string is not in the `scrypt$N$r$p$salt$key` format."""


def hash_password(password: str, *, n: int = _DEFAULT_N, r: int = _DEFAULT_R,
                  p: int = _DEFAULT_P) -> str:
    """Hash a password with a fresh random salt."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=_KEY_LEN,
                         maxmem=_MAX_MEM)
    return "$".join(
        ["scrypt", str(n), str(r), str(p), _b64(salt), _b64(key)]
    )


def parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """Split a hash string into (N, r, p, salt, key); raise PasswordHashError if malformed."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise PasswordHashError("expected scrypt$N$r$p$salt$key")
    if not all(x.isascii() and x.isdigit() for x in parts[1:4]):
        raise PasswordHashError("scrypt N, r and p must be decimal integers")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError as exc:
        raise PasswordHashError(f"malformed scrypt parameters: {exc}") from exc
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise PasswordHashError("scrypt N must be a power of two, r in 1-64, p in 1-16")
    # OpenSSL needs 128*r*(N+p+1) bytes, plus slack: stay well under maxmem.
    if 128 * r * (n + p + 2) >= _MAX_MEM // 2 or not salt or len(key) < 16:
        raise PasswordHashError("scrypt parameters out of range")
    return n, r, p, salt, key


def verify_password(password: bytes, encoded: str) -> bool:
    """Check a password against a hash in constant time (slow by design: run off-loop)."""
    n, r, p, salt, key = parse_hash(encoded)
    try:
        candidate = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=len(key),
                                   maxmem=_MAX_MEM)
    except ValueError as exc:  # OpenSSL's own limits, e.g. memory
        raise PasswordHashError(f"scrypt parameters rejected: {exc}") from exc
    return hmac.compare_digest(candidate, key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
