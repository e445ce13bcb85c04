"""The reads behind ``/keys/query``, in one transaction.

The caller may already hold some users' keys from an earlier answer, with the
key version they were read at (see :mod:`~synapse_xsign_module.storage.versions`).
The transaction reads every queried user's current version first, and then
the keys of only those users whose version differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import attr
from sqlalchemy import Connection

from twisted.internet import defer

from synapse_xsign_module.storage.cross_signing import (
    MASTER,
    CurrentKeys,
    get_current_txn,
)
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import get_device_keys_txn
from synapse_xsign_module.storage.signatures import (
    VisibleSignatures,
    get_made_by_txn,
    get_own_txn,
)
from synapse_xsign_module.storage.versions import get_versions_txn


@attr.s(frozen=True, auto_attribs=True, slots=True)
class KeySnapshot:
    """What ``/keys/query`` needs about a set of local users.

    Attributes:
        versions: user -> key version, for the users that have one.
        read: the users whose keys were read here, with the devices read
            (an empty list: all of them). The other queried users are those
            the caller holds at their current version.
        device_keys: the read users' device -> stored key JSON.
        cross_signing: the read users' current keys, all three types (the
            caller shows a user-signing key to its owner alone).
        own_signatures: signatures the read users made over their own keys.
        requester_signatures: signatures the requester made over the keys of
            every queried user other than the requester.
    """

    versions: dict[str, int]
    read: dict[str, list[str]]
    device_keys: dict[str, dict[str, str]]
    cross_signing: CurrentKeys
    own_signatures: VisibleSignatures
    requester_signatures: VisibleSignatures

    def cacheable(self, user_id: str) -> bool:
        """Whether a read user's keys are complete and versioned."""
        return user_id in self.versions and not self.read.get(user_id)


def fetch_keys_txn(
    conn: Connection,
    query: dict[str, list[str]],
    requester_id: str | None,
    held: Mapping[str, int],
) -> KeySnapshot:
    """Read what the caller does not already hold at the current version.

    A constant number of statements for any number of users (per chunk of
    several hundred).

    Args:
        conn: the connection.
        query: user id -> device ids (an empty list: every device).
        requester_id: who asks; None sees no user-signing signatures.
        held: user id -> the key version of the keys the caller holds.
    """
    # The versions first: data read afterwards is at least as new.
    versions = get_versions_txn(conn, list(query))
    read = {
        u: devices
        for u, devices in query.items()
        if u not in held or held[u] != versions.get(u)
    }
    devices = get_device_keys_txn(conn, read) if read else {}
    cross = get_current_txn(conn, list(read)) if read else {}
    # Stored signatures only ever cover current keys (they go when either key
    # changes), so a user's are read whole.
    signed = [u for u in read if u in devices or MASTER in cross.get(u, {})]
    own = get_own_txn(conn, signed) if signed else {}
    by_requester = (
        get_made_by_txn(conn, requester_id, list(query)) if requester_id else {}
    )
    return KeySnapshot(versions, read, devices, cross, own, by_requester)


class QueryStore:
    """Read access for ``/keys/query``.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def fetch(
        self,
        query: dict[str, list[str]],
        requester_id: str | None,
        held: Mapping[str, int] | None = None,
    ) -> defer.Deferred[KeySnapshot]:
        """See :func:`fetch_keys_txn`."""
        return self._db.run_read(
            "query_keys", fetch_keys_txn, query, requester_id, held or {}
        )
