"""Binding Synapse's UIA sessions to one request body, used once.

Synapse's user-interactive auth checks only the endpoint of a session, and a
completed session stays valid for 48 hours, so on its own it would let one
password entry authorise any later key replacement. The Synapse host records
the body that started each session and allows a completed session exactly once,
for that body.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, select, update

from twisted.internet import defer

from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.schema import uia_sessions

#: ``completed`` value of a session that has authorised its request.
USED = "used"
#: ``method`` value marking rows that bind Synapse's sessions.
SYNAPSE = "synapse"


def insert_session_txn(
    conn: Connection,
    session_id: str,
    user_id: str,
    method: str,
    uri: str,
    body_hash: str,
    now_ms: int,
    lifetime_ms: int,
) -> None:
    """Record a new UIA session (and forget expired ones)."""
    conn.execute(delete(uia_sessions).where(uia_sessions.c.expires_ts < now_ms))
    conn.execute(
        uia_sessions.insert().values(
            session_id=session_id,
            user_id=user_id,
            method=method,
            uri=uri,
            body_hash=body_hash,
            completed="[]",
            created_ts=now_ms,
            expires_ts=now_ms + lifetime_ms,
        )
    )


class BindingMismatch(Exception):
    """The session belongs to another user or body, or was used already."""


def bind_txn(
    conn: Connection,
    session_id: str,
    user_id: str,
    uri: str,
    body_hash: str,
    now_ms: int,
    lifetime_ms: int,
) -> None:
    """Remember the body that a session was started (or continued) with.

    Raises:
        BindingMismatch: the session is known with another user or body.
    """
    row = conn.execute(
        select(uia_sessions).where(uia_sessions.c.session_id == session_id)
    ).first()
    if row is None:
        insert_session_txn(
            conn, session_id, user_id, SYNAPSE, uri, body_hash, now_ms, lifetime_ms
        )
    elif row.user_id != user_id or row.body_hash != body_hash:
        raise BindingMismatch(session_id)


def use_txn(
    conn: Connection,
    session_id: str,
    user_id: str,
    uri: str,
    body_hash: str,
    now_ms: int,
    lifetime_ms: int,
) -> None:
    """Spend a completed session on this request.

    Raises:
        BindingMismatch: the session was started for another user or body, or
            has already authorised a request.
    """
    row = conn.execute(
        select(uia_sessions).where(uia_sessions.c.session_id == session_id)
    ).first()
    if row is None:
        bind_txn(conn, session_id, user_id, uri, body_hash, now_ms, lifetime_ms)
    elif row.user_id != user_id or row.body_hash != body_hash or row.completed == USED:
        raise BindingMismatch(session_id)
    conn.execute(
        update(uia_sessions)
        .where(uia_sessions.c.session_id == session_id)
        .values(completed=USED)
    )


class UIABindingStore:
    """Storage of the bindings; each call is one transaction.

    Args:
        db: the module's database.
        lifetime_ms: how long a binding is kept (Synapse's session lifetime).
    """

    def __init__(self, db: Database, lifetime_ms: int = 48 * 3600 * 1000) -> None:
        self._db = db
        self._lifetime = lifetime_ms

    def bind(
        self, session_id: str, user_id: str, uri: str, body_hash: str, now_ms: int
    ) -> defer.Deferred[None]:
        """See :func:`bind_txn`."""
        return self._db.run(
            "uia_bind",
            bind_txn,
            session_id,
            user_id,
            uri,
            body_hash,
            now_ms,
            self._lifetime,
        )

    def use(
        self, session_id: str, user_id: str, uri: str, body_hash: str, now_ms: int
    ) -> defer.Deferred[None]:
        """See :func:`use_txn`."""
        return self._db.run(
            "uia_use",
            use_txn,
            session_id,
            user_id,
            uri,
            body_hash,
            now_ms,
            self._lifetime,
        )
