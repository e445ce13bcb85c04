"""Shape checks shared by the handlers: each failure is a 400 Matrix error."""

from __future__ import annotations

import functools
import re
from typing import Any, TypeGuard

from synapse_xsign_module.errors import bad_json

# A user id: "@" localpart ":" server name (which may carry a port).
_USER_ID_RE = re.compile(
    r"^@[^:\s]+:([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$"
)


@functools.lru_cache(maxsize=65536)
def server_of(user_id: str) -> str | None:
    """The server name of a user id, or None if it is not a valid user id.

    Remembered: the same user ids come back in request after request (a
    ``/keys/query`` of hundreds of users checks every one).
    """
    if len(user_id) > 255 or not _USER_ID_RE.match(user_id):
        return None
    return user_id.split(":", 1)[1]


def require_dict(value: Any, name: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else 400 ``M_BAD_JSON`` naming it."""
    if not isinstance(value, dict):
        raise bad_json(f"'{name}' must be a JSON object")
    return value


def require_str(value: Any, name: str) -> str:
    """``value`` if it is a string, else 400 ``M_BAD_JSON`` naming it."""
    if not isinstance(value, str):
        raise bad_json(f"'{name}' must be a string")
    return value


def require_str_list(value: Any, name: str) -> list[str]:
    """``value`` if it is a list of strings, else 400 ``M_BAD_JSON``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_json(f"'{name}' must be a list of strings")
    return value


def require_str_map(value: Any, name: str) -> dict[str, str]:
    """``value`` if it maps strings to strings, else 400 ``M_BAD_JSON``."""
    obj = require_dict(value, name)
    if not all(isinstance(v, str) for v in obj.values()):
        raise bad_json(f"'{name}' values must be strings")
    return obj


def is_signatures(value: Any) -> TypeGuard[dict[str, dict[str, str]]]:
    """Whether ``value`` is a signatures map (user -> key id -> string)."""
    if not isinstance(value, dict):
        return False
    for sigs in value.values():
        if not isinstance(sigs, dict):
            return False
        for sig in sigs.values():
            if not isinstance(sig, str):
                return False
    return True


def require_signatures(value: Any, name: str) -> dict[str, dict[str, str]]:
    """``value`` if it is a signatures map (user -> key id -> string)."""
    if is_signatures(value):
        return value
    obj = require_dict(value, name)
    for user, sigs in obj.items():
        require_str_map(sigs, f"{name}.{user}")
    return obj
