"""Canonical JSON helpers."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Encode ``value`` as Matrix canonical JSON text (sorted keys, compact)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def strip_signatures(obj: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a signed object without ``signatures`` and ``unsigned``."""
    return {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
