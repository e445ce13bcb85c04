"""The operators' admin API: inspect and repair users' keys.

Every call is made by a server admin (checked by the HTTP layer on every
request) and every change is logged with the admin's user id.
"""

from __future__ import annotations

import logging
from typing import Any

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.config import XSignConfig
from synapse_xsign_module.errors import bad_json, invalid_param, not_found
from synapse_xsign_module.handlers.validation import server_of
from synapse_xsign_module.host import Host
from synapse_xsign_module.http.base import JsonDict
from synapse_xsign_module.storage.admin import AdminStore
from synapse_xsign_module.storage.cross_signing import CrossSigningStore

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def parse_page(args: dict[bytes, list[bytes]]) -> tuple[int, int]:
    """``from`` and ``limit`` query parameters.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` for values that are not
            non-negative integers, or a zero limit.
    """

    def one(name: bytes, default: int) -> int:
        values = args.get(name)
        if not values:
            return default
        try:
            value = int(values[0].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise invalid_param(f"'{name.decode()}' must be an integer") from None
        if not 0 <= value <= 2**53:
            raise invalid_param(f"'{name.decode()}' must be between 0 and 2^53")
        return value

    offset = one(b"from", 0)
    limit = min(one(b"limit", DEFAULT_LIMIT), MAX_LIMIT)
    if limit == 0:
        raise invalid_param("'limit' must be positive")
    return offset, limit


def page_body(key: str, items: list[Any], offset: int, total: int) -> JsonDict:
    """A paginated list body with ``total`` and, if more remain, ``next_token``."""
    body: JsonDict = {key: items, "total": total}
    if offset + len(items) < total:
        body["next_token"] = str(offset + len(items))
    return body


class AdminHandler:
    """The admin operations.

    Args:
        host: the homeserver host.
        config: the module configuration.
        store: admin reads and repairs.
        cross_signing_store: for the replacement window.
        clock: the clock.
        schema_version: returns the current schema revision.
        engine_name: ``sqlite`` or ``postgresql``.
    """

    def __init__(
        self,
        host: Host,
        config: XSignConfig,
        store: AdminStore,
        cross_signing_store: CrossSigningStore,
        clock: Clock,
        schema_version: Any,
        engine_name: str,
    ) -> None:
        self._host = host
        self._config = config
        self._store = store
        self._cs_store = cross_signing_store
        self._clock = clock
        self._schema_version = schema_version
        self._engine_name = engine_name
        #: Extra facts for ``stats`` (e.g. whether the key paths are shadowed).
        self.status: JsonDict = {}

    async def _require_user(self, user_id: str, data: Any = None) -> None:
        """404 unless the user is local and known to the host or the module."""
        if server_of(user_id) != self._host.server_name:
            raise not_found(f"{user_id} is not a local user")
        if data is None and not await self._host.user_exists(user_id):
            raise not_found(f"Unknown user {user_id}")

    async def user_keys(self, user_id: str) -> JsonDict:
        """``GET users/{user_id}/keys``."""
        data = await self._store.user_keys(user_id)
        await self._require_user(user_id, data)
        if data is None:
            return {
                "user_id": user_id,
                "devices": [],
                "cross_signing": {
                    "master": None,
                    "self_signing": None,
                    "user_signing": None,
                },
                "replacement_window": None,
            }
        window = data.get("replacement_window")
        if (
            window
            and window["updatable_without_uia_before_ms"] <= self._clock.time_msec()
        ):
            data["replacement_window"] = None  # expired: not open
        return data

    async def history(self, user_id: str, offset: int, limit: int) -> JsonDict:
        """``GET users/{user_id}/cross_signing/history``."""
        keys, total = await self._store.history(user_id, offset, limit)
        await self._require_user(user_id, keys or None)
        return page_body("keys", keys, offset, total)

    async def allow_replacement(self, admin: str, user_id: str) -> JsonDict:
        """``POST users/{user_id}/_allow_cross_signing_replacement_without_uia``."""
        now = self._clock.time_msec()
        expires = now + self._config.replacement_window_ms
        if not await self._cs_store.set_grant(user_id, expires, admin, now):
            raise not_found("User has no master cross-signing key")
        logger.info(
            "Admin %s allowed %s to replace cross-signing keys without UIA until %d",
            admin,
            user_id,
            expires,
        )
        return {"updatable_without_uia_before_ms": expires}

    async def reset_cross_signing(self, admin: str, user_id: str) -> JsonDict:
        """``DELETE users/{user_id}/cross_signing``."""
        data = await self._store.user_keys(user_id)
        await self._require_user(user_id, data)
        removed = await self._store.reset_cross_signing(
            user_id, self._clock.time_msec()
        )
        logger.info(
            "Admin %s reset the cross-signing identity of %s (%d keys retired)",
            admin,
            user_id,
            removed,
        )
        public = [
            key["public_key"]
            for kt, key in (data or {}).get("cross_signing", {}).items()
            if key is not None and kt != "user_signing"
        ]
        if public:
            self._host.notify_device_update(user_id, public)
        return {"retired_keys": removed}

    async def delete_device_keys(
        self, admin: str, user_id: str, device_id: str
    ) -> JsonDict:
        """``DELETE users/{user_id}/devices/{device_id}/keys``."""
        await self._require_user(user_id, await self._store.user_keys(user_id))
        if not await self._store.delete_device_keys(user_id, device_id):
            raise not_found(f"Device {device_id} of {user_id} has no keys")
        logger.info(
            "Admin %s removed the keys of device %s of %s", admin, device_id, user_id
        )
        self._host.notify_device_update(user_id, [device_id])
        return {}

    async def stats(self) -> JsonDict:
        """``GET stats``."""
        body = dict(await self._store.stats())
        body["schema_version"] = self._schema_version()
        body["database_engine"] = self._engine_name
        body.update(self.status)
        return body


def require_json_bool(body: JsonDict, name: str) -> bool | None:
    """An optional boolean field of an admin request body."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_json(f"'{name}' must be a boolean")
    return value
