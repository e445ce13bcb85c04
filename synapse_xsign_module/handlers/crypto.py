"""ed25519 keys and signatures over JSON, through signedjson."""

from __future__ import annotations

import binascii
from typing import Any

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64, encode_base64

ED25519 = "ed25519"


def is_ed25519_public_key(value: str) -> bool:
    """Whether ``value`` is a 32-byte key in canonical unpadded base64."""
    try:
        raw = decode_base64(value)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and encode_base64(raw) == value


def verify_key_for(key_id: str, public_key: str) -> Any:
    """A signedjson verify key named ``key_id`` (``ed25519:<version>``).

    Args:
        key_id: the key id under which signatures are filed.
        public_key: unpadded base64 ed25519 public key.
    """
    return decode_verify_key_bytes(key_id, decode_base64(public_key))


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
    sigs = obj.get("signatures")
    if not isinstance(sigs, dict):
        return False
    mine = sigs.get(user_id)
    if not isinstance(mine, dict) or not isinstance(mine.get(key_id), str):
        return False
    try:
        # signedjson checks exactly the signature filed under the key's id.
        verify_signed_json(obj, user_id, verify_key_for(key_id, public_key))
    except (SignatureVerifyException, binascii.Error, ValueError, TypeError):
        return False
    return True
