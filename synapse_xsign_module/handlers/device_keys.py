"""``/keys/upload``, ``/keys/query`` and ``/keys/claim``."""

from __future__ import annotations

import logging
from json.encoder import encode_basestring
from typing import Any, NoReturn

from synapse_xsign_module.clock import Clock
from synapse_xsign_module.errors import Codes, MatrixError, bad_json
from synapse_xsign_module.handlers.query_cache import UserKeysCache
from synapse_xsign_module.handlers.user_keys import (
    UserKeys,
    build_user_keys,
    with_requester_signatures,
    without_deleted_devices,
)
from synapse_xsign_module.handlers.validation import (
    is_signatures,
    require_dict,
    require_signatures,
    require_str,
    require_str_list,
    require_str_map,
    server_of,
)
from synapse_xsign_module.host import Host, HostDevices, Requester
from synapse_xsign_module.http.base import JsonDict, JsonWithRaw, RawJson
from synapse_xsign_module.jsonutil import canonical_json
from synapse_xsign_module.storage.device_keys import DeviceKeyStore, OneTimeKey
from synapse_xsign_module.storage.query import QueryStore

logger = logging.getLogger(__name__)

#: Longest algorithm, key id or device id stored.
MAX_ID_LENGTH = 255

#: Listed in every ``one_time_key_counts``, as 0 when the device has none.
DEFAULT_OTK_ALGORITHM = "signed_curve25519"


def remote_failure(server: str) -> JsonDict:
    """The ``failures`` entry for a server this module cannot reach."""
    return {
        "status": 503,
        "errcode": Codes.UNRECOGNIZED,
        "error": f"Keys of users on {server} are not served by this server "
        "(no federation)",
    }


def _parse_key_map(value: Any, name: str) -> list[OneTimeKey]:
    """Parse ``one_time_keys`` / ``fallback_keys``: ``alg:id`` -> key.

    An upload carries dozens of keys: each is checked by a fast path that builds
    no error text, and a key that fails it is checked again by the helpers that
    name what is wrong.
    """
    keys = require_dict(value, name)
    out = []
    for full_id, key in keys.items():
        algorithm, colon, key_id = full_id.partition(":")
        if not colon or ":" in key_id:
            raise bad_json(
                f"Invalid {name} key '{full_id}'. Expected \"<algorithm>:<key_id>\"."
            )
        if not algorithm or not key_id:
            raise bad_json(f"Invalid {name} key '{full_id}': empty algorithm or id")
        if len(algorithm) > MAX_ID_LENGTH or len(key_id) > MAX_ID_LENGTH:
            raise bad_json(
                f"Invalid {name} key: algorithm and key id are at most "
                f"{MAX_ID_LENGTH} characters"
            )
        if isinstance(key, dict):
            if not (
                isinstance(key.get("key"), str)
                and is_signatures(key.get("signatures", _NO_SIGNATURES))
                and isinstance(key.get("fallback", False), bool)
            ):
                _explain_bad_key(key, f"{name}.{full_id}")
        elif not isinstance(key, str):
            raise bad_json(f"'{name}.{full_id}' must be a string or a key object")
        out.append(OneTimeKey(algorithm, key_id, canonical_json(key)))
    return out


_NO_SIGNATURES: dict[str, Any] = {}


def _explain_bad_key(key: dict[str, Any], name: str) -> NoReturn:
    """Raise the 400 naming what is wrong with a one-time or fallback key.

    Called only for a key the fast path refused: the helpers accept exactly
    what it accepts, so when ``key`` and ``signatures`` pass them, ``fallback``
    is what is wrong.
    """
    require_str(key.get("key"), f"{name}.key")
    if "signatures" in key:
        require_signatures(key["signatures"], f"{name}.signatures")
    raise bad_json(f"'{name}.fallback' must be a boolean")


def parse_device_keys(value: Any, requester: Requester) -> dict[str, Any]:
    """Check a ``DeviceKeys`` object from ``/keys/upload``.

    Only the structure is checked: the spec puts the self-signature on the
    device, and existing clients' test suites upload placeholder signatures.
    """
    dk = require_dict(value, "device_keys")
    user_id = require_str(dk.get("user_id"), "device_keys.user_id")
    device_id = require_str(dk.get("device_id"), "device_keys.device_id")
    require_str_list(dk.get("algorithms"), "device_keys.algorithms")
    require_str_map(dk.get("keys"), "device_keys.keys")
    require_signatures(dk.get("signatures"), "device_keys.signatures")
    if user_id != requester.user_id:
        raise bad_json(
            "Provided `user_id` in `device_keys` does not match that of the "
            "authenticated user"
        )
    if device_id != requester.device_id:
        raise bad_json(
            "Provided `device_id` in `device_keys` does not match that of the "
            "authenticated user device"
        )
    # "unsigned" is the server's to fill in (display name); a client's own is
    # not kept, so that every stored object can be served with ours appended.
    return {k: v for k, v in dk.items() if k != "unsigned"}


class DeviceKeysHandler:
    """Device identity keys, one-time keys and fallback keys, and key queries.

    Args:
        host: the homeserver host.
        store: device key storage.
        query_store: the reads behind ``/keys/query``.
        clock: the clock.
        cache: users' keys kept between queries; none kept if omitted.
    """

    def __init__(
        self,
        host: Host,
        store: DeviceKeyStore,
        query_store: QueryStore,
        clock: Clock,
        cache: UserKeysCache | None = None,
    ) -> None:
        self._host = host
        self._store = store
        self._query_store = query_store
        self._clock = clock
        self._cache = cache if cache is not None else UserKeysCache(0)

    async def upload(self, requester: Requester, body: JsonDict) -> JsonDict:
        """Handle ``POST /keys/upload``.

        Args:
            requester: the caller; the token must belong to a device.
            body: the request body.

        Returns:
            ``{"one_time_key_counts": {...}}``.
        """
        if requester.device_id is None:
            raise MatrixError(
                400,
                Codes.UNKNOWN,
                "To upload keys, you must pass device_id when authenticating",
            )
        device_keys = None
        if "device_keys" in body:
            device_keys = parse_device_keys(body["device_keys"], requester)
        otks = (
            _parse_key_map(body["one_time_keys"], "one_time_keys")
            if body.get("one_time_keys") is not None
            else []
        )
        fallbacks = (
            _parse_key_map(body["fallback_keys"], "fallback_keys")
            if body.get("fallback_keys") is not None
            else []
        )
        algorithms = [k.algorithm for k in fallbacks]
        if len(set(algorithms)) != len(algorithms):
            raise bad_json("'fallback_keys' may hold only one key per algorithm")

        result = await self._store.upload(
            requester.user_id,
            requester.device_id,
            device_keys,
            otks,
            fallbacks,
            self._clock.time_msec(),
        )
        if result.device_keys_changed:
            self._host.notify_device_update(requester.user_id, [requester.device_id])
        counts = dict(result.one_time_key_counts)
        counts.setdefault(DEFAULT_OTK_ALGORITHM, 0)
        return {"one_time_key_counts": counts}

    async def query(self, requester: Requester, body: JsonDict) -> JsonDict:
        """Handle ``POST /keys/query``.

        Args:
            requester: the caller.
            body: ``{"device_keys": {user: [device, ...]}, "timeout": ms}``.

        Returns:
            ``device_keys``, ``master_keys``, ``self_signing_keys``,
            ``user_signing_keys`` and ``failures``, each an object.
        """
        if "device_keys" not in body:
            raise MatrixError(
                400, Codes.BAD_JSON, "'device_keys' must be a JSON object"
            )
        raw = require_dict(body["device_keys"], "device_keys")
        for devices in raw.values():
            if not isinstance(devices, list) or not all(
                isinstance(d, str) for d in devices
            ):
                raise bad_json("'device_keys' values must be a list of strings")
        timeout = body.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
        ):
            raise bad_json("'timeout' must be a number of milliseconds")

        local: dict[str, list[str]] = {}
        failures: JsonDict = {}
        for user_id, devices in raw.items():
            server = server_of(user_id)
            if server is None:
                continue  # not a user id: ignored
            if server == self._host.server_name:
                local[user_id] = list(dict.fromkeys(devices))
            else:
                failures[server] = remote_failure(server)

        users = await self._user_keys(local, requester.user_id)
        # Asked about the devices served and those whose signatures the master
        # keys carry (the host may have deleted either).
        devices = await self._host.get_devices(
            {
                u: list(keys.devices)
                for u, keys in users.items()
                if keys.devices or keys.master_signatures
            }
        )
        return self._render_query(requester, local, users, devices, failures)

    async def _user_keys(
        self, local: dict[str, list[str]], requester_id: str
    ) -> dict[str, UserKeys]:
        """Every queried local user's keys, from the cache where it holds
        them at their current version, else read (and then cached).

        A user asked for some devices only gets just those devices."""
        cache = self._cache
        held = cache.held(list(local))
        snap = await self._query_store.fetch(
            local, requester_id, {u: k.version for u, k in held.items() if k.version}
        )
        users: dict[str, UserKeys] = {}
        for user_id, wanted in local.items():
            keys = held.get(user_id) if user_id not in snap.read else None
            if keys is None:
                keys = build_user_keys(snap, user_id)
                if snap.cacheable(user_id):
                    cache.put(user_id, keys)
            elif wanted:
                keys = keys.only_devices(wanted)
            users[user_id] = with_requester_signatures(
                keys, user_id, snap.requester_signatures
            )
        cache.used([u for u in local if u not in snap.read], len(snap.read))
        return users

    @staticmethod
    def _render_query(
        requester: Requester,
        local: dict[str, list[str]],
        users: dict[str, UserKeys],
        devices: HostDevices,
        failures: JsonDict,
    ) -> JsonDict:
        # Each section's JSON text is built here directly (no dict of hundreds
        # of users for the encoder to walk again).
        device_keys: list[str] = []
        master_keys: list[str] = []
        self_signing_keys: list[str] = []
        user_signing_keys: list[str] = []
        for user_id in local:
            keys = users[user_id]
            user = encode_basestring(user_id)
            existing = (
                devices.existing.get(user_id, set())
                if devices.existing is not None
                else None
            )
            names = devices.names.get(user_id)
            devices_out: list[str] = []
            for device_id, fragment in keys.devices.items():
                if existing is not None and device_id not in existing:
                    continue  # deleted in the host: never served
                # Stored without "unsigned" (see parse_device_keys).
                name = names.get(device_id) if names else None
                if name is None:
                    devices_out.append(fragment + _NO_UNSIGNED)
                else:
                    devices_out.append(
                        f'{fragment},"unsigned":{{"device_display_name":'
                        f"{encode_basestring(name)}}}}}"
                    )
            device_keys.append(f"{user}:{{{','.join(devices_out)}}}")

            if existing is not None:
                keys = without_deleted_devices(keys, user_id, existing)
            if keys.master_json is not None:
                master_keys.append(f"{user}:{keys.master_json}")
            if keys.self_signing_json is not None:
                self_signing_keys.append(f"{user}:{keys.self_signing_json}")
            if keys.user_signing_json is not None and user_id == requester.user_id:
                user_signing_keys.append(f"{user}:{keys.user_signing_json}")
        return JsonWithRaw(
            {
                "device_keys": _raw_object(device_keys),
                "master_keys": _raw_object(master_keys),
                "self_signing_keys": _raw_object(self_signing_keys),
                "user_signing_keys": _raw_object(user_signing_keys),
                "failures": failures,
            }
        )

    async def claim(self, requester: Requester, body: JsonDict) -> JsonDict:
        """Handle ``POST /keys/claim``.

        Args:
            requester: the caller.
            body: ``{"one_time_keys": {user: {device: algorithm}}}``.

        Returns:
            ``{"one_time_keys": {...}, "failures": {...}}``.
        """
        if "one_time_keys" not in body:
            raise bad_json("'one_time_keys' must be a JSON object")
        raw = require_dict(body["one_time_keys"], "one_time_keys")
        claims: list[tuple[str, str, str]] = []
        failures: JsonDict = {}
        for user_id, devices in raw.items():
            devices = require_dict(devices, f"one_time_keys.{user_id}")
            for device_id, algorithm in devices.items():
                require_str(algorithm, f"one_time_keys.{user_id}.{device_id}")
            server = server_of(user_id)
            if server is None:
                continue
            if server != self._host.server_name:
                failures[server] = remote_failure(server)
                continue
            claims.extend((user_id, d, a) for d, a in devices.items())
        claimed = await self._store.claim(claims) if claims else {}
        return {"one_time_keys": claimed, "failures": failures}


#: The end of a served device key without a display name.
_NO_UNSIGNED = ',"unsigned":{}}'


def _raw_object(members: list[str]) -> RawJson:
    """A JSON object from its members' text (``"key":value`` each)."""
    return RawJson("{" + ",".join(members) + "}")
