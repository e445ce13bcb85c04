"""Per-user key versions: a counter that changes whenever a user's keys do.

What a version covers is everything anyone may see of a user's *own* keys:
their device keys, their current cross-signing keys and the signatures they
made over them (self-signing key over devices, devices over the master key).
Every transaction that changes any of those calls :func:`bump_txn` for the
user, so the new version becomes visible together with the new data, in every
process that shares the database.

Signatures other users made over the user's master key (with their user-signing
keys) are not covered: each is visible to its signer alone, and is always read
afresh for the requester.

A reader that reads a version *before* the data it describes can never pair an
old version with newer data in a way that goes stale: at worst the data is newer
than the version, and the next read sees a newer version and reads again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlalchemy import Connection, bindparam, select, text

from synapse_xsign_module.storage.schema import key_versions
from synapse_xsign_module.storage.util import RawStatement, StringList, any_of

_BUMP_SQLITE = RawStatement(
    text(
        "INSERT INTO xsign_key_versions (user_id, version)"
        " SELECT value, 1 FROM json_each(:users) WHERE true"
        " ON CONFLICT (user_id) DO UPDATE"
        " SET version = xsign_key_versions.version + 1"
    ).bindparams(bindparam("users", type_=StringList()))
)
_BUMP_POSTGRES = RawStatement(
    text(
        "INSERT INTO xsign_key_versions (user_id, version)"
        " SELECT u, 1 FROM unnest(:users) AS u"
        " ON CONFLICT (user_id) DO UPDATE"
        " SET version = xsign_key_versions.version + 1"
    ).bindparams(bindparam("users", type_=StringList()))
)

_V = key_versions.c
_VERSIONS_OF = RawStatement(
    select(_V.user_id, _V.version).where(any_of(_V.user_id, "users"))
)


def bump_txn(conn: Connection, user_ids: Iterable[str]) -> None:
    """Raise the key version of each user, inside the changing transaction.

    Args:
        conn: the connection of the transaction that changes the users' keys.
        user_ids: whose keys it changes.
    """
    users = sorted(set(user_ids))
    if not users:
        return
    stmt = _BUMP_POSTGRES if conn.dialect.name == "postgresql" else _BUMP_SQLITE
    stmt.execute(conn, {"users": users})


def get_versions_txn(conn: Connection, user_ids: list[str]) -> dict[str, int]:
    """The current key version of each user that has one.

    A user with no row has never had keys stored since versions exist (or was
    never given one): such a user must not be cached.
    """
    return send_versions(conn, user_ids)()


def send_versions(
    conn: Connection, user_ids: list[str]
) -> Callable[[], dict[str, int]]:
    """:func:`get_versions_txn` sent now and read when the result is called
    (see :meth:`~synapse_xsign_module.storage.util.RawStatement.send`)."""
    if not user_ids:
        return dict
    fetch = _VERSIONS_OF.send(conn, {"users": sorted(set(user_ids))})
    return lambda: dict(fetch())
