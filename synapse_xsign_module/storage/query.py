"""The reads behind ``/keys/query``, in one transaction."""

from __future__ import annotations

import attr
from sqlalchemy import Connection

from twisted.internet import defer

from synapse_xsign_module.storage.cross_signing import (
    MASTER,
    CurrentKeys,
    get_visible_current_txn,
)
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import get_device_keys_txn
from synapse_xsign_module.storage.signatures import VisibleSignatures, get_visible_txn


@attr.s(frozen=True, auto_attribs=True, slots=True)
class KeySnapshot:
    """Everything ``/keys/query`` needs about a set of local users.

    Attributes:
        device_keys: user -> device -> stored key JSON.
        cross_signing: user -> key type -> current key (user-signing keys
            only the requester's own).
        signatures: visible detached signatures over those devices and master keys.
    """

    device_keys: dict[str, dict[str, str]]
    cross_signing: CurrentKeys
    signatures: VisibleSignatures


def fetch_keys_txn(
    conn: Connection, query: dict[str, list[str]], requester_id: str | None
) -> KeySnapshot:
    """Read device keys, cross-signing keys and visible signatures.

    A constant number of statements for any number of users (per chunk of
    several hundred).
    """
    devices = get_device_keys_txn(conn, query)
    cross = get_visible_current_txn(conn, list(query), requester_id)
    # Signatures over these users' keys: stored signatures only ever cover
    # current keys (they go when either key changes), so a user's are read
    # whole; those over devices not asked for are simply not used.
    users = [u for u in query if u in devices or MASTER in cross.get(u, {})]
    sigs = get_visible_txn(conn, users, requester_id) if users else {}
    return KeySnapshot(devices, cross, sigs)


class QueryStore:
    """Read access for ``/keys/query``.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def fetch(
        self, query: dict[str, list[str]], requester_id: str | None
    ) -> defer.Deferred[KeySnapshot]:
        """See :func:`fetch_keys_txn`."""
        return self._db.run_read("query_keys", fetch_keys_txn, query, requester_id)
