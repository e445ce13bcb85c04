"""Password hashing for the embedded host (scrypt, from the standard library)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

_N = 2**14
_R = 8
_P = 1
_DKLEN = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _dummy_hash() -> str:
    return f"scrypt${_N}${_R}${_P}${_b64(b'x' * 16)}${_b64(b'y' * _DKLEN)}"


def hash_password(password: str) -> str:
    """Hash a password for storage.

    Args:
        password: the clear-text password.

    Returns:
        ``scrypt$N$r$p$salt$hash`` with base64 salt and hash.
    """
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN
    )
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def check_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password`.

    Args:
        password: the clear-text candidate.
        stored: the stored hash, or None for an account without a password.

    Returns:
        True on a match; False otherwise (including malformed hashes).
    """
    if not stored:
        # Spend the same work as a real check, so that timing does not tell
        # whether an account exists.
        stored = _dummy_hash()
        password = ""
        real = False
    else:
        real = True
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected) and real
