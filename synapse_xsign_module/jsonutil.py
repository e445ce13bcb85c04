"""Canonical JSON helpers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# One encoder of each kind, built once: json.dumps() with options builds a new
# JSONEncoder on every call, which costs more than encoding a small key.
_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def canonical_json(value: Any) -> str:
    """Encode ``value`` as Matrix canonical JSON text (sorted keys, compact)."""
    return _CANONICAL.encode(value)


def compact_json(value: Any) -> str:
    """Encode ``value`` as compact JSON text, keys in their given order."""
    return _COMPACT.encode(value)


def body_hash(body: dict[str, Any]) -> str:
    """SHA-256 of a request body's canonical JSON, without its ``auth``."""
    rest = {k: v for k, v in body.items() if k != "auth"}
    return hashlib.sha256(canonical_json(rest).encode("utf-8")).hexdigest()


def strip_signatures(obj: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a signed object without ``signatures`` and ``unsigned``."""
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}


_MISSING = object()


def equal_apart_from_signatures(obj: dict[str, Any], stripped: dict[str, Any]) -> bool:
    """Whether ``strip_signatures(obj) == stripped``, without making the copy.

    Args:
        obj: a signed object.
        stripped: an object without ``signatures`` and ``unsigned``.
    """
    kept = len(obj) - ("signatures" in obj) - ("unsigned" in obj)
    if kept != len(stripped):
        return False
    for key, value in stripped.items():
        if obj.get(key, _MISSING) != value:
            return False
    return True
