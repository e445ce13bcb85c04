"""Cross-signing keys (master, self-signing, user-signing) and their history.

Each (user, key type) has at most one current key: the row whose
``replaced_ts`` is NULL. Replacing a key closes its row and opens a new one, and
deletes every detached signature made by or over the old key, so that nothing
stale is ever served. Replacing the master key with a different public key also
retires the SSK and USK it had signed, unless new ones come in the same upload.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import attr
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    literal_column,
    null,
    or_,
    select,
    union_all,
    update,
)

from twisted.internet import defer

from synapse_xsign_module.storage.batching import BatchedReader
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.schema import (
    cross_signing_keys,
    device_keys,
    replacement_grants,
    signatures,
)
from synapse_xsign_module.storage.util import (
    RawStatement,
    any_of,
    commit_with_pipeline,
    commits_in_pipeline,
    insert_many,
    lock_users,
    pipelined,
)
from synapse_xsign_module.storage.versions import bump_txn

MASTER = "master"
SELF_SIGNING = "self_signing"
USER_SIGNING = "user_signing"
KEY_TYPES = (MASTER, SELF_SIGNING, USER_SIGNING)


class StoredKey(NamedTuple):
    """A current cross-signing key (a named tuple: many are built per query).

    Attributes:
        key_type: ``master``, ``self_signing`` or ``user_signing``.
        public_key: unpadded base64 ed25519 public key.
        key_json: the uploaded object as canonical JSON.
        uploaded_ts: when it was uploaded (ms).
    """

    key_type: str
    public_key: str
    key_json: str
    uploaded_ts: int


@attr.s(frozen=True, auto_attribs=True, slots=True)
class NewKey:
    """A key about to be stored.

    Attributes:
        public_key: unpadded base64 ed25519 public key.
        key: the uploaded object.
    """

    public_key: str
    key_json: str


class IdentityChanged(Exception):
    """The user's stored keys changed since the caller read them."""


class KeyIdInUse(Exception):
    """A new cross-signing public key equals one of the user's device ids."""


_CK = cross_signing_keys.c
_CURRENT_OF_USERS = RawStatement(
    select(
        _CK.user_id, _CK.key_type, _CK.public_key, _CK.key_json, _CK.uploaded_ts
    ).where(any_of(_CK.user_id, "users"), _CK.replaced_ts.is_(None))
)
_RG = replacement_grants.c
_DK = device_keys.c
#: The current keys (kind "k") and the replacement window's expiry ("g") of
#: some users, in one statement.
_STATES_OF_USERS = RawStatement(
    union_all(
        select(
            _CK.user_id,
            literal_column("'k'"),
            _CK.key_type,
            _CK.public_key,
            _CK.key_json,
            _CK.uploaded_ts,
        ).where(any_of(_CK.user_id, "users"), _CK.replaced_ts.is_(None)),
        select(
            _RG.user_id, literal_column("'g'"), null(), null(), null(), _RG.expires_ts
        ).where(any_of(_RG.user_id, "users")),
    )
)
#: What an upload of cross-signing keys decides on, in one statement (one round
#: trip): the user's current keys (kind "k"), the replacement window's expiry
#: ("g") and which of the given ids name one of the user's devices ("d").
_STATE = RawStatement(
    union_all(
        select(
            literal_column("'k'"),
            _CK.key_type,
            _CK.public_key,
            _CK.key_json,
            _CK.uploaded_ts,
        ).where(_CK.user_id == bindparam("user"), _CK.replaced_ts.is_(None)),
        select(literal_column("'g'"), null(), null(), null(), _RG.expires_ts).where(
            _RG.user_id == bindparam("user")
        ),
        select(literal_column("'d'"), _DK.device_id, null(), null(), null()).where(
            _DK.user_id == bindparam("user"), any_of(_DK.device_id, "ids")
        ),
    )
)


class KeyState(NamedTuple):
    """What :func:`get_state_txn` read of one user.

    Attributes:
        keys: key type -> current key.
        grant_expiry: when the replacement window closes (ms), if one is open
            or was opened.
        device_ids_named: those of the asked-for ids that are device ids of the
            user with stored keys.
    """

    keys: dict[str, StoredKey]
    grant_expiry: int | None
    device_ids_named: set[str]


def get_state_txn(
    conn: Connection, user_id: str, device_ids: list[str] | None = None
) -> KeyState:
    """A user's keys and replacement window, in one statement.

    Args:
        conn: the connection.
        user_id: the user.
        device_ids: ids to look for among the user's devices with keys (the
            public keys of cross-signing keys about to be stored).

    Returns:
        The current keys, the window's expiry, and which of ``device_ids``
        are device ids of the user.
    """
    keys: dict[str, StoredKey] = {}
    grant_expiry: int | None = None
    named: set[str] = set()
    rows = _STATE.rows(conn, {"user": user_id, "ids": sorted(set(device_ids or ()))})
    for kind, first, public_key, key_json, ts in rows:
        if kind == "k":
            keys[first] = StoredKey(first, public_key, key_json, ts)
        elif kind == "g":
            grant_expiry = ts
        else:
            named.add(first)
    return KeyState(keys, grant_expiry, named)


#: user id -> key type -> current key
CurrentKeys = dict[str, dict[str, StoredKey]]

#: A user's current keys (key type -> key) and replacement-window expiry.
UploadState = tuple[dict[str, StoredKey], int | None]


def get_states_txn(conn: Connection, user_ids: list[str]) -> dict[str, UploadState]:
    """The current keys and replacement-window expiry of some users, in one
    statement (users with neither are left out)."""
    keys: CurrentKeys = defaultdict(dict)
    expiry: dict[str, int] = {}
    for user, kind, key_type, public_key, key_json, ts in _STATES_OF_USERS.rows(
        conn, {"users": sorted(set(user_ids))}
    ):
        if kind == "k":
            keys[user][key_type] = StoredKey(key_type, public_key, key_json, ts)
        else:
            expiry[user] = ts
    return {user: (keys.get(user, {}), expiry.get(user)) for user in {*keys, *expiry}}


def get_current_txn(conn: Connection, user_ids: list[str]) -> CurrentKeys:
    """The current cross-signing keys of some users."""
    return send_current(conn, user_ids)()


def send_current(conn: Connection, user_ids: list[str]) -> Callable[[], CurrentKeys]:
    """:func:`get_current_txn` sent now and read when the result is called
    (see :meth:`~synapse_xsign_module.storage.util.RawStatement.send`)."""
    fetch = _CURRENT_OF_USERS.send(conn, {"users": sorted(set(user_ids))})

    def read() -> CurrentKeys:
        result: CurrentKeys = defaultdict(dict)
        for u, kt, pub, kj, ts in fetch():
            result[u][kt] = StoredKey(kt, pub, kj, ts)
        return dict(result)

    return read


def _retire_txn(
    conn: Connection, user_id: str, old: StoredKey, now_ms: int, reason: str
) -> None:
    c = cross_signing_keys.c
    conn.execute(
        update(cross_signing_keys)
        .where(
            c.user_id == user_id, c.key_type == old.key_type, c.replaced_ts.is_(None)
        )
        .values(replaced_ts=now_ms, replaced_reason=reason)
    )
    s = signatures.c
    conn.execute(
        delete(signatures).where(
            or_(
                and_(
                    s.signer_user_id == user_id,
                    s.signer_key_id == f"ed25519:{old.public_key}",
                ),
                and_(s.target_user_id == user_id, s.target_key_id == old.public_key),
            )
        )
    )


@commits_in_pipeline
def replace_keys_txn(
    conn: Connection,
    user_id: str,
    expected: dict[str, str | None],
    new_keys: dict[str, NewKey],
    now_ms: int,
) -> None:
    """Store a set of new cross-signing keys atomically.

    Args:
        conn: the connection.
        user_id: the owner.
        expected: key type -> canonical JSON of the current key (or None) that
            the caller based its decision (UIA, signature checks) on.
        new_keys: key type -> the new key.
        now_ms: the time.

    Raises:
        IdentityChanged: another upload changed the keys meanwhile; nothing
            was stored.
        KeyIdInUse: a new public key is the id of one of the user's devices
            with keys; nothing was stored.
    """
    # On PostgreSQL, one pipeline for the whole: after BEGIN, the lock and the
    # read reach the server in one round trip, and the writes in another.
    with pipelined(conn):
        lock_users(conn, [user_id])
        state = get_state_txn(conn, user_id, [k.public_key for k in new_keys.values()])
        current = state.keys
        for kt in KEY_TYPES:
            have = current.get(kt)
            if (have.key_json if have else None) != expected.get(kt):
                raise IdentityChanged(user_id)
        if state.device_ids_named:
            raise KeyIdInUse(user_id)

        old_master = current.get(MASTER)
        new_master = new_keys.get(MASTER)
        master_changed = (
            new_master is not None
            and old_master is not None
            and old_master.public_key != new_master.public_key
        )
        changed = False
        rows = []
        # Only writes from here: they and the pipeline's end are one round trip.
        for kt in KEY_TYPES:
            old = current.get(kt)
            new = new_keys.get(kt)
            if new is not None:
                if old is not None and old.key_json == new.key_json:
                    continue
                changed = True
                if old is not None:
                    _retire_txn(conn, user_id, old, now_ms, "replaced")
                rows.append(
                    {
                        "user_id": user_id,
                        "key_type": kt,
                        "public_key": new.public_key,
                        "key_json": new.key_json,
                        "uploaded_ts": now_ms,
                    }
                )
            elif old is not None and master_changed:
                # The old SSK/USK was signed by the old master: it no longer chains.
                changed = True
                _retire_txn(conn, user_id, old, now_ms, "master_replaced")
        # After every retirement: a key type has one current row at a time.
        insert_many(conn, cross_signing_keys, rows)
        if changed:
            bump_txn(conn, [user_id])
        if (
            new_master is not None
            and (old_master is None or old_master.key_json != new_master.key_json)
            and state.grant_expiry is not None
        ):
            # A new master closes the admin-granted replacement window.
            _delete_grant_txn(conn, user_id)
        commit_with_pipeline(conn)  # nothing follows: the lock goes now


def reset_txn(conn: Connection, user_id: str, now_ms: int) -> int:
    """Retire every current cross-signing key of a user (admin reset).

    Returns:
        How many keys were retired.
    """
    lock_users(conn, [user_id])
    current = get_current_txn(conn, [user_id]).get(user_id, {})
    for old in current.values():
        _retire_txn(conn, user_id, old, now_ms, "reset")
    if current:
        bump_txn(conn, [user_id])
    _delete_grant_txn(conn, user_id)
    return len(current)


def _delete_grant_txn(conn: Connection, user_id: str) -> None:
    """Close the user's replacement window, if one is open."""
    conn.execute(
        delete(replacement_grants).where(replacement_grants.c.user_id == user_id)
    )


def set_grant_txn(
    conn: Connection, user_id: str, expires_ts: int, granted_by: str, now_ms: int
) -> bool:
    """Open (or extend) the replacement window; False when there is no master.

    The user is locked as for an upload: an upload of a new master closes the
    window, and must not miss one opened while it ran.
    """
    lock_users(conn, [user_id])
    current = get_current_txn(conn, [user_id]).get(user_id, {})
    if MASTER not in current:
        return False
    _delete_grant_txn(conn, user_id)
    conn.execute(
        replacement_grants.insert().values(
            user_id=user_id,
            expires_ts=expires_ts,
            granted_by=granted_by,
            granted_ts=now_ms,
        )
    )
    return True


def current_public_keys_txn(conn: Connection, user_id: str) -> set[str]:
    """Public keys of the user's current cross-signing keys."""
    c = cross_signing_keys.c
    return set(
        conn.execute(
            select(c.public_key).where(c.user_id == user_id, c.replaced_ts.is_(None))
        ).scalars()
    )


class CrossSigningStore:
    """Cross-signing key storage; each call is one transaction.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database, share_reads: bool = True) -> None:
        self._db = db
        # Every upload of cross-signing keys starts with this read; concurrent
        # uploads share it where the host allows (Host.shares_reads).
        self._states: BatchedReader[str, UploadState] = BatchedReader(
            db,
            "get_cross_signing_state",
            get_states_txn,
            lambda: ({}, None),
            shared=share_reads,
        )

    def get_current(self, user_ids: list[str]) -> defer.Deferred[CurrentKeys]:
        """See :func:`get_current_txn`."""
        return self._db.run_read("get_cross_signing_keys", get_current_txn, user_ids)

    def get_state(self, user_id: str) -> defer.Deferred[UploadState]:
        """The user's current keys and replacement-window expiry.

        Read together with other uploads' (see :class:`BatchedReader`); the
        value is shared with callers asking for the same user: read-only.
        """
        return self._states.get(user_id)

    def replace_keys(
        self,
        user_id: str,
        expected: dict[str, str | None],
        new_keys: dict[str, NewKey],
        now_ms: int,
    ) -> defer.Deferred[None]:
        """See :func:`replace_keys_txn`."""
        return self._db.run(
            "replace_cross_signing_keys",
            replace_keys_txn,
            user_id,
            expected,
            new_keys,
            now_ms,
        )

    def set_grant(
        self, user_id: str, expires_ts: int, granted_by: str, now_ms: int
    ) -> defer.Deferred[bool]:
        """See :func:`set_grant_txn`."""
        return self._db.run(
            "set_replacement_grant",
            set_grant_txn,
            user_id,
            expires_ts,
            granted_by,
            now_ms,
        )
