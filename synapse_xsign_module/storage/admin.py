"""Reads and changes behind the operators' admin API."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, distinct, func, select

from twisted.internet import defer

from synapse_xsign_module.storage.cross_signing import get_current_txn, reset_txn
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import delete_device_txn
from synapse_xsign_module.storage.schema import (
    cross_signing_keys,
    device_keys,
    fallback_keys,
    one_time_keys,
    replacement_grants,
    signatures,
)

JsonDict = dict[str, Any]


def user_keys_txn(conn: Connection, user_id: str) -> JsonDict | None:
    """Everything the module holds for one user, or None if it holds nothing."""
    dk = device_keys.c
    devices: JsonDict = {}
    for device_id, key_json, ts in conn.execute(
        select(dk.device_id, dk.key_json, dk.ts_added_ms)
        .where(dk.user_id == user_id)
        .order_by(dk.device_id)
    ):
        obj = json.loads(key_json)
        keys = obj.get("keys") if isinstance(obj.get("keys"), dict) else {}
        devices[device_id] = {
            "device_id": device_id,
            "key_ids": sorted(keys),
            "algorithms": obj.get("algorithms", []),
            "uploaded_ts": ts,
            "one_time_key_counts": {},
            "fallback_keys": {},
            "signatures_made": 0,
            "signatures_received": 0,
        }
    otk = one_time_keys.c
    for device_id, algorithm, count in conn.execute(
        select(otk.device_id, otk.algorithm, func.count())
        .where(otk.user_id == user_id)
        .group_by(otk.device_id, otk.algorithm)
    ):
        entry = devices.setdefault(device_id, _empty_device(device_id))
        entry["one_time_key_counts"][algorithm] = int(count)
    fb = fallback_keys.c
    for device_id, algorithm, key_id, used in conn.execute(
        select(fb.device_id, fb.algorithm, fb.key_id, fb.used).where(
            fb.user_id == user_id
        )
    ):
        entry = devices.setdefault(device_id, _empty_device(device_id))
        entry["fallback_keys"][algorithm] = {"key_id": key_id, "used": bool(used)}

    current = get_current_txn(conn, [user_id]).get(user_id, {})
    s = signatures.c
    made: dict[str, int] = defaultdict(int)
    for key_id, count in conn.execute(
        select(s.signer_key_id, func.count())
        .where(s.signer_user_id == user_id)
        .group_by(s.signer_key_id)
    ):
        made[key_id] = int(count)
    received: dict[str, int] = defaultdict(int)
    for key_id, count in conn.execute(
        select(s.target_key_id, func.count())
        .where(s.target_user_id == user_id)
        .group_by(s.target_key_id)
    ):
        received[key_id] = int(count)
    for device_id, entry in devices.items():
        entry["signatures_made"] = made.get(f"ed25519:{device_id}", 0)
        entry["signatures_received"] = received.get(device_id, 0)

    cross: JsonDict = {}
    for key_type in ("master", "self_signing", "user_signing"):
        key = current.get(key_type)
        cross[key_type] = (
            None
            if key is None
            else {
                "public_key": key.public_key,
                "uploaded_ts": key.uploaded_ts,
                "signatures_made": made.get(f"ed25519:{key.public_key}", 0),
                "signatures_received": received.get(key.public_key, 0),
            }
        )
    grant = conn.execute(
        select(replacement_grants).where(replacement_grants.c.user_id == user_id)
    ).first()
    if not devices and not current and grant is None:
        return None
    return {
        "user_id": user_id,
        "devices": list(devices.values()),
        "cross_signing": cross,
        "replacement_window": None
        if grant is None
        else {
            "updatable_without_uia_before_ms": grant.expires_ts,
            "granted_by": grant.granted_by,
            "granted_ts": grant.granted_ts,
        },
    }


def _empty_device(device_id: str) -> JsonDict:
    return {
        "device_id": device_id,
        "key_ids": [],
        "algorithms": [],
        "uploaded_ts": None,
        "one_time_key_counts": {},
        "fallback_keys": {},
        "signatures_made": 0,
        "signatures_received": 0,
    }


def history_txn(
    conn: Connection, user_id: str, offset: int, limit: int
) -> tuple[list[JsonDict], int]:
    """A page of every cross-signing key the user ever had, oldest first."""
    c = cross_signing_keys.c
    total = conn.execute(
        select(func.count()).select_from(cross_signing_keys).where(c.user_id == user_id)
    ).scalar_one()
    rows = conn.execute(
        select(
            c.id,
            c.key_type,
            c.public_key,
            c.key_json,
            c.uploaded_ts,
            c.replaced_ts,
            c.replaced_reason,
        )
        .where(c.user_id == user_id)
        .order_by(c.id)
        .offset(offset)
        .limit(limit)
    )
    keys = [
        {
            "key_type": r.key_type,
            "public_key": r.public_key,
            "uploaded_ts": r.uploaded_ts,
            "replaced_ts": r.replaced_ts,
            "replaced_reason": r.replaced_reason,
            "current": r.replaced_ts is None,
            "key": json.loads(r.key_json),
        }
        for r in rows
    ]
    return keys, int(total)


def stats_txn(conn: Connection) -> JsonDict:
    """Counts over the whole module."""
    c = cross_signing_keys.c
    return {
        "users_with_cross_signing": conn.execute(
            select(func.count(distinct(c.user_id))).where(
                c.replaced_ts.is_(None), c.key_type == "master"
            )
        ).scalar_one(),
        "devices_with_keys": conn.execute(
            select(func.count()).select_from(device_keys)
        ).scalar_one(),
        "signatures": conn.execute(
            select(func.count()).select_from(signatures)
        ).scalar_one(),
        "unclaimed_one_time_keys": conn.execute(
            select(func.count()).select_from(one_time_keys)
        ).scalar_one(),
    }


class AdminStore:
    """Storage for the admin API; each call is one transaction.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def user_keys(self, user_id: str) -> defer.Deferred[JsonDict | None]:
        """See :func:`user_keys_txn`."""
        return self._db.run_read("admin_user_keys", user_keys_txn, user_id)

    def history(
        self, user_id: str, offset: int, limit: int
    ) -> defer.Deferred[tuple[list[JsonDict], int]]:
        """See :func:`history_txn`."""
        return self._db.run_read("admin_history", history_txn, user_id, offset, limit)

    def stats(self) -> defer.Deferred[JsonDict]:
        """See :func:`stats_txn`."""
        return self._db.run_read("admin_stats", stats_txn)

    def reset_cross_signing(self, user_id: str, now_ms: int) -> defer.Deferred[int]:
        """Retire the user's current cross-signing keys; see :func:`reset_txn`."""
        return self._db.run("admin_reset_cross_signing", reset_txn, user_id, now_ms)

    def delete_device_keys(self, user_id: str, device_id: str) -> defer.Deferred[bool]:
        """Remove one device's keys; True if it had any key at all."""

        return self._db.run(
            "admin_delete_device_keys", delete_device_txn, user_id, device_id
        )
