"""ed25519 keys and signatures over canonical JSON.

A signature covers the canonical JSON of an object without its ``signatures``
and ``unsigned`` (the spec's "Signing JSON"). :func:`signed_bytes` makes those
bytes once per object, so that the same bytes serve both to compare an uploaded
object with the stored one and to verify every signature on it; the check itself
is one libsodium call (PyNaCl, the library signedjson uses), which runs without
the GIL.
"""

from __future__ import annotations

import binascii
import functools
import threading
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from synapse_xsign_module.jsonutil import (
    canonical_bytes,
    signed_content,
    strip_signatures,
)

try:  # PyNaCl's compiled libsodium binding; the public API is the fallback.
    from nacl._sodium import ffi as _sodium_ffi
    from nacl._sodium import lib as _sodium_lib
except ImportError:  # pragma: no cover - a PyNaCl without it
    _sodium_ffi = _sodium_lib = None

ED25519 = "ed25519"


def _decode(value: str, size: int) -> bytes | None:
    """``size`` bytes from unpadded base64; None if it is not that."""
    try:
        raw = decode_base64(value)
    except (binascii.Error, ValueError, TypeError):
        return None
    return raw if len(raw) == size else None


def is_ed25519_public_key(value: str) -> bool:
    """Whether ``value`` is a 32-byte key in canonical unpadded base64."""
    raw = _decode(value, 32)
    return raw is not None and encode_base64(raw) == value


def signed_bytes(obj: dict[str, Any]) -> bytes:
    """The bytes a signature over ``obj`` covers (UTF-8 canonical JSON)."""
    return canonical_bytes(strip_signatures(obj))


@functools.lru_cache(maxsize=8192)
def stored_content(stored_json: str) -> tuple[dict[str, Any], bytes]:
    """A stored key without ``signatures`` and ``unsigned``, parsed, and its
    :func:`signed_bytes`; remembered by its JSON text. Callers must not change
    the object."""
    return signed_content(stored_json)


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: str) -> VerifyKey | None:
    """A verify key from unpadded base64 (remembered); None if not a key."""
    raw = _decode(public_key, 32)
    return VerifyKey(raw) if raw is not None else None


_buffers = threading.local()


def _sodium_verify(message: bytes, signature: bytes, key: VerifyKey) -> bool:
    """libsodium's ``crypto_sign_open`` through PyNaCl's own binding, with an
    output buffer kept per thread: what ``VerifyKey.verify`` does, without
    its per-call wrapping (which holds the GIL)."""
    signed = signature + message
    size = len(signed)
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _buffers.buf = _sodium_ffi.new("unsigned char[]", max(size, 4096))
        _buffers.out_len = _sodium_ffi.new("unsigned long long *")
    result: int = _sodium_lib.crypto_sign_open(
        buf, _buffers.out_len, signed, size, bytes(key)
    )
    return result == 0


def verify_signature(message: bytes, signature: str, public_key: str) -> bool:
    """Whether ``signature`` (unpadded base64) by ``public_key`` covers ``message``.

    Args:
        message: the signed bytes, from :func:`signed_bytes`.
        signature: the ed25519 signature in unpadded base64.
        public_key: the ed25519 public key in unpadded base64.
    """
    key = _verify_key(public_key)
    raw = _decode(signature, 64)
    if key is None or raw is None:
        return False
    if _sodium_lib is not None:
        return _sodium_verify(message, raw, key)
    try:
        key.verify(message, raw)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def signature_of(obj: dict[str, Any], user_id: str, key_id: str) -> str | None:
    """The signature ``obj`` carries by ``user_id``'s key ``key_id``, if any."""
    sigs = obj.get("signatures")
    mine = sigs.get(user_id) if isinstance(sigs, dict) else None
    sig = mine.get(key_id) if isinstance(mine, dict) else None
    return sig if isinstance(sig, str) else None


def has_valid_signature(
    obj: dict[str, Any], user_id: str, key_id: str, public_key: str
) -> bool:
    """Whether ``obj`` carries a valid signature by ``user_id``'s key ``key_id``.

    Args:
        obj: the signed object (``signatures`` and ``unsigned`` are ignored
            for the signed content, as the spec says).
        user_id: the signing entity.
        key_id: ``ed25519:<...>``, the signature's key id.
        public_key: the public key to verify with.
    """
    sig = signature_of(obj, user_id, key_id)
    if sig is None:
        return False
    return verify_signature(signed_bytes(obj), sig, public_key)
