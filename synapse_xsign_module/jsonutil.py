"""Canonical JSON helpers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

# One encoder of each kind, built once: json.dumps() with options builds a new
# JSONEncoder on every call, which costs more than encoding a small key.
_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _has_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere (a loop per
    container: most items are strings, and a call for each would cost more
    than the test)."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return kind is float
    for item in items:
        kind = type(item)
        if kind is float:
            return True
        if (kind is dict or kind is list or kind is tuple) and _has_float(item):
            return True
    return False


def _sorted_dumps(value: Any) -> bytes | None:
    """orjson's bytes with sorted keys, or None where it refuses ``value``."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return None


def _fast_canonical(value: Any) -> bytes | None:
    """Canonical JSON bytes from orjson, or None where only the standard
    encoder's are sure to be right.

    For JSON values without floats orjson writes the same bytes as
    :data:`_CANONICAL` (keys sorted by code point, the same escapes, UTF-8),
    several times faster. Floats are written differently (``1e16`` against
    ``1e+16``); whatever orjson refuses (a lone surrogate, an integer beyond 64
    bits, a key that is not a string, nesting past its limit) is left to the
    standard encoder too, which then behaves as it always did.
    """
    try:
        if _has_float(value):
            return None
    except RecursionError:
        return None
    return _sorted_dumps(value)


def canonical_json(value: Any) -> str:
    """Encode ``value`` as Matrix canonical JSON text (sorted keys, compact)."""
    fast = _fast_canonical(value)
    return fast.decode("utf-8") if fast is not None else _CANONICAL.encode(value)


def _standard_bytes(value: Any) -> bytes:
    """Canonical JSON bytes from the standard encoder."""
    return _CANONICAL.encode(value).encode("utf-8")


def canonical_bytes(value: Any) -> bytes:
    """``canonical_json(value)`` as UTF-8, what a signature covers."""
    fast = _fast_canonical(value)
    return fast if fast is not None else _standard_bytes(value)


def _load_without_floats(text: str) -> Any:
    """orjson's parse of ``text``, or None if it refuses it or the value holds
    a float (orjson reads an integer beyond 64 bits as one too)."""
    try:
        value = orjson.loads(text)
        return None if _has_float(value) else value
    except (orjson.JSONDecodeError, RecursionError):
        return None


def signed_content(text: str) -> tuple[Any, bytes]:
    """A stored signed object's JSON text parsed without its ``signatures``
    and ``unsigned``, and the canonical bytes a signature over it covers:
    ``strip_signatures(json.loads(text))`` and its :func:`canonical_bytes`,
    with the value looked at for floats once rather than twice."""
    value = _load_without_floats(text)
    if value is None:
        obj = strip_signatures(json.loads(text))
        return obj, _standard_bytes(obj)
    obj = strip_signatures(value)
    fast = _sorted_dumps(obj)  # no float: looked at as it was parsed
    return obj, fast if fast is not None else _standard_bytes(obj)


def compact_json(value: Any) -> str:
    """Encode ``value`` as compact JSON text, keys in their given order."""
    return _COMPACT.encode(value)


def body_hash(body: dict[str, Any]) -> str:
    """SHA-256 of a request body's canonical JSON, without its ``auth``."""
    rest = {k: v for k, v in body.items() if k != "auth"}
    return hashlib.sha256(canonical_bytes(rest)).hexdigest()


def signed_digest(signed: bytes) -> str:
    """SHA-256 (hex) of the bytes a signature covers: what a stored key keeps
    so that an uploaded copy can be compared with it without parsing the
    stored JSON (see :func:`signed_hash`)."""
    return hashlib.sha256(signed).hexdigest()


def signed_hash(obj: dict[str, Any]) -> str:
    """:func:`signed_digest` of a signed object's canonical JSON without its
    ``signatures`` and ``unsigned``: equal for two objects exactly when a
    signature over one covers the other."""
    return signed_digest(canonical_bytes(strip_signatures(obj)))


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
