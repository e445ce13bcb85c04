"""Device identity keys, one-time keys and fallback keys.

Functions ending in ``_txn`` run inside a transaction the caller owns, so that
other stores (the embedded host's logout, the admin API) can compose them into
one transaction. :class:`DeviceKeyStore` wraps them for the handlers.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import attr
from sqlalchemy import (
    Connection,
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)

from twisted.internet import defer

from synapse_xsign_module.errors import Codes, MatrixError
from synapse_xsign_module.jsonutil import canonical_json, signed_hash
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.schema import (
    device_keys,
    fallback_keys,
    one_time_keys,
    signatures,
)
from synapse_xsign_module.storage.util import (
    MAX_PARAMS,
    RawStatement,
    any_of,
    chunks,
    commit_with_pipeline,
    commits_in_pipeline,
    insert_many,
    lock_device,
    lock_users,
    pipelined,
    upsert,
)
from synapse_xsign_module.storage.versions import bump_txn

#: Unclaimed one-time keys kept per device and algorithm. Clients keep a
#: bounded number of private one-time keys and forget the oldest; a client that
#: keeps topping up (inside Synapse, /sync reports Synapse's own count, 0)
#: would otherwise leave keys here whose private half is gone. The oldest go.
MAX_UNCLAIMED_PER_ALGORITHM = 1000

#: user id -> device id -> key id -> key (a string or a key object)
ClaimResult = dict[str, dict[str, dict[str, Any]]]

logger = logging.getLogger(__name__)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class OneTimeKey:
    """A one-time or fallback key as uploaded.

    Attributes:
        algorithm: e.g. ``signed_curve25519``.
        key_id: the part after the colon.
        key_json: canonical JSON of the value (a string or an object).
    """

    algorithm: str
    key_id: str
    key_json: str


@attr.s(frozen=True, auto_attribs=True, slots=True)
class UploadResult:
    """What an upload changed.

    Attributes:
        device_keys_changed: the device's identity keys are new or different.
        one_time_key_counts: unclaimed one-time keys per algorithm afterwards.
    """

    device_keys_changed: bool
    one_time_key_counts: dict[str, int]


def _otk_equal(old_json: str, new_json: str) -> bool:
    """Same one-time key, ignoring a different signature on a signed key."""
    if old_json == new_json:
        return True
    old, new = json.loads(old_json), json.loads(new_json)
    if isinstance(old, dict) and isinstance(new, dict):
        old.pop("signatures", None)
        new.pop("signatures", None)
        return bool(old == new)
    return False


def delete_signatures_on_device_txn(
    conn: Connection, user_id: str, device_id: str
) -> None:
    """Drop every signature made over, or by, a device's keys."""
    _DELETE_SIGNATURES_OVER_OR_BY.execute(
        conn, {"user": user_id, "device": device_id, "key": f"ed25519:{device_id}"}
    )


def _drop_invalidated_signatures(
    conn: Connection,
    user_id: str,
    device_id: str,
    old_json: str | None,
    new: dict[str, Any],
    new_hash: str,
) -> None:
    """Delete the detached signatures that new device keys make invalid.

    Signatures over the device cover its keys without ``signatures`` and
    ``unsigned``; signatures by the device were made with its ed25519 key. A
    re-upload that changes neither keeps them. A device id seen for the first
    time drops any leftover signature (e.g. from a deleted device of that id).

    Args:
        new_hash: :func:`~synapse_xsign_module.jsonutil.signed_hash` of ``new``.
            The signed bytes are compared, not the parsed objects: ``1`` and
            ``true`` are equal in Python, and a signature over one does not
            hold over the other.
    """
    old = json.loads(old_json) if old_json is not None else None
    over = old is None or signed_hash(old) != new_hash
    key_id = f"ed25519:{device_id}"
    by = old is None or (old.get("keys") or {}).get(key_id) != (
        new.get("keys") or {}
    ).get(key_id)
    if over and by:
        delete_signatures_on_device_txn(conn, user_id, device_id)
    elif over:
        _DELETE_SIGNATURES_OVER.execute(conn, {"user": user_id, "key": device_id})
    elif by:
        _DELETE_SIGNATURES_BY.execute(conn, {"user": user_id, "key": key_id})


_DELETE_SIGNATURES_OVER_OR_BY = RawStatement(
    delete(signatures).where(
        or_(
            and_(
                signatures.c.target_user_id == bindparam("user"),
                signatures.c.target_key_id == bindparam("device"),
            ),
            and_(
                signatures.c.signer_user_id == bindparam("user"),
                signatures.c.signer_key_id == bindparam("key"),
            ),
        )
    )
)
_DELETE_SIGNATURES_OVER = RawStatement(
    delete(signatures).where(
        signatures.c.target_user_id == bindparam("user"),
        signatures.c.target_key_id == bindparam("key"),
    )
)
_DELETE_SIGNATURES_BY = RawStatement(
    delete(signatures).where(
        signatures.c.signer_user_id == bindparam("user"),
        signatures.c.signer_key_id == bindparam("key"),
    )
)


# Statements of the upload path, compiled once and run on the driver's cursor.
_OTK = one_time_keys.c

#: Everything an upload reads, in one statement (one round trip): the device's
#: stored keys (kind "d"), its stored one-time keys with the uploaded ids
#: ("o"), and its unclaimed one-time keys per algorithm ("c").
_UPLOAD_READ = RawStatement(
    union_all(
        select(
            literal_column("'d'"),
            device_keys.c.key_json,
            null(),
            null(),
        ).where(
            device_keys.c.user_id == bindparam("user"),
            device_keys.c.device_id == bindparam("device"),
        ),
        select(literal_column("'o'"), _OTK.algorithm, _OTK.key_id, _OTK.key_json).where(
            _OTK.user_id == bindparam("user"),
            _OTK.device_id == bindparam("device"),
            any_of(_OTK.key_id, "key_ids"),
        ),
        select(literal_column("'c'"), _OTK.algorithm, cast(func.count(), Text), null())
        .where(_OTK.user_id == bindparam("user"), _OTK.device_id == bindparam("device"))
        .group_by(_OTK.algorithm),
    )
)
_OTK_COUNTS = RawStatement(
    select(_OTK.algorithm, func.count())
    .where(_OTK.user_id == bindparam("user"), _OTK.device_id == bindparam("device"))
    .group_by(_OTK.algorithm)
)


@commits_in_pipeline
def upload_txn(
    conn: Connection,
    user_id: str,
    device_id: str,
    new_device_keys: dict[str, Any] | None,
    otks: list[OneTimeKey],
    fallbacks: list[OneTimeKey],
    now_ms: int,
) -> UploadResult:
    """Store a device's uploaded keys (the body of ``/keys/upload``).

    Raises:
        MatrixError: 400 when a one-time key id is re-used with other content;
            the transaction then rolls back and nothing is stored.
    """
    # Serialize a device's uploads before reading anything: two identical
    # uploads at once (a client retrying) would both see nothing stored and the
    # second insert would hit a unique key (500); and exclude the user's key
    # changes (a signature stored over the device's old keys meanwhile would
    # outlive them). SQLite's writers are serial.
    old_json: str | None = None
    existing: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    key_ids = sorted({k.key_id for k in otks})
    # On PostgreSQL, one pipeline for the whole: after BEGIN, the locks and
    # the read reach the server in one round trip, and the writes in another,
    # which ends the pipeline (the lock is held that much shorter).
    with pipelined(conn):
        lock_device(conn, user_id, device_id)
        rows = _UPLOAD_READ.rows(
            conn, {"user": user_id, "device": device_id, "key_ids": key_ids}
        )
        for kind, first, second, third in rows:
            if kind == "d":
                old_json = first
            elif kind == "o":
                existing[(first, second)] = third
            else:
                counts[first] = int(second)

        changed = False
        if new_device_keys is not None:
            new_json = canonical_json(new_device_keys)
            if old_json != new_json:
                changed = True
                new_hash = signed_hash(new_device_keys)
                upsert(
                    conn,
                    device_keys,
                    [
                        {
                            "user_id": user_id,
                            "device_id": device_id,
                            "key_json": new_json,
                            "ts_added_ms": now_ms,
                            "signed_hash": new_hash,
                        }
                    ],
                    ["user_id", "device_id"],
                    ["key_json", "ts_added_ms", "signed_hash"],
                )
                _drop_invalidated_signatures(
                    conn, user_id, device_id, old_json, new_device_keys, new_hash
                )

        if otks:
            to_insert: list[dict[str, Any]] = []
            seen: dict[tuple[str, str], str] = {}
            for k in otks:
                ident = (k.algorithm, k.key_id)
                old = existing.get(ident) or seen.get(ident)
                if old is not None:
                    if not _otk_equal(old, k.key_json):
                        raise MatrixError(
                            400,
                            Codes.INVALID_PARAM,
                            f"One time key {k.algorithm}:{k.key_id} already exists "
                            "with different content",
                        )
                    continue
                seen[ident] = k.key_json
                to_insert.append(
                    {
                        "user_id": user_id,
                        "device_id": device_id,
                        "algorithm": k.algorithm,
                        "key_id": k.key_id,
                        "key_json": k.key_json,
                        "ts_added_ms": now_ms,
                    }
                )
            if to_insert:
                insert_many(conn, one_time_keys, to_insert)
                # The count read above plus what this transaction added: uploads
                # of a device are serialized (lock_device), so no other upload adds
                # keys in between. Claims do not take that lock: one committed
                # meanwhile makes the count too high by what it took, which is as
                # stale as a count read just before that claim (the trimming
                # below counts again before it deletes anything).
                for algorithm, _ in seen:
                    counts[algorithm] = counts.get(algorithm, 0) + 1
        if changed:
            # Last: raising the version locks the user's version row until
            # the commit, and uploads of the user's other devices wait on it.
            bump_txn(conn, [user_id])
        most = max(counts.values(), default=0)
        over_cap = bool(otks) and most > MAX_UNCLAIMED_PER_ALGORITHM
        if not fallbacks and not over_cap:
            commit_with_pipeline(conn)  # nothing follows: the lock goes now

    for fb in fallbacks:
        old_fb = conn.execute(
            select(fallback_keys.c.key_id, fallback_keys.c.key_json).where(
                fallback_keys.c.user_id == user_id,
                fallback_keys.c.device_id == device_id,
                fallback_keys.c.algorithm == fb.algorithm,
            )
        ).first()
        if old_fb is not None and (old_fb.key_id, old_fb.key_json) == (
            fb.key_id,
            fb.key_json,
        ):
            continue  # identical: keep its used/unused state
        upsert(
            conn,
            fallback_keys,
            [
                {
                    "user_id": user_id,
                    "device_id": device_id,
                    "algorithm": fb.algorithm,
                    "key_id": fb.key_id,
                    "key_json": fb.key_json,
                    "used": False,
                }
            ],
            ["user_id", "device_id", "algorithm"],
            ["key_id", "key_json", "used"],
        )

    if over_cap:
        # Over the cap by the counts above: count again (a claim may have
        # taken keys meanwhile) before deleting any key.
        counts = count_one_time_keys_txn(conn, user_id, device_id)
        for algorithm, count in counts.items():
            if count > MAX_UNCLAIMED_PER_ALGORITHM:
                _drop_oldest_txn(
                    conn,
                    user_id,
                    device_id,
                    algorithm,
                    count - MAX_UNCLAIMED_PER_ALGORITHM,
                )
                counts[algorithm] = MAX_UNCLAIMED_PER_ALGORITHM
    return UploadResult(changed, counts)


def _drop_oldest_txn(
    conn: Connection, user_id: str, device_id: str, algorithm: str, n: int
) -> None:
    """Delete a device's ``n`` oldest unclaimed one-time keys of an algorithm."""
    otk = one_time_keys.c
    oldest = (
        select(otk.id)
        .where(
            otk.user_id == user_id,
            otk.device_id == device_id,
            otk.algorithm == algorithm,
        )
        .order_by(otk.id)
        .limit(n)
        .scalar_subquery()
    )
    conn.execute(delete(one_time_keys).where(one_time_keys.c.id.in_(oldest)))


def count_one_time_keys_txn(
    conn: Connection, user_id: str, device_id: str
) -> dict[str, int]:
    """Unclaimed one-time keys of a device, per algorithm."""
    rows = _OTK_COUNTS.rows(conn, {"user": user_id, "device": device_id})
    return {alg: int(n) for alg, n in rows}


#: A user asking for more devices than this reads all of the user's devices
#: by the primary key prefix (one parameter) and keeps the ones asked for,
#: instead of binding two parameters per device.
MANY_DEVICES = 32

_DK = device_keys.c
_KEYS_OF_USERS = RawStatement(
    select(_DK.user_id, _DK.device_id, _DK.key_json).where(any_of(_DK.user_id, "users"))
)
_KEYS_OF_USER = RawStatement(
    select(_DK.device_id, _DK.key_json).where(_DK.user_id == bindparam("user"))
)


class SignableDevice(NamedTuple):
    """A device's stored keys, as a signature upload compares them.

    Attributes:
        key_json: the keys' canonical JSON.
        signed_hash: :func:`~synapse_xsign_module.jsonutil.signed_hash` of
            them; None for a row written by a version before it was kept.
    """

    key_json: str
    signed_hash: str | None


_SIGNABLE_OF_USER = RawStatement(
    select(_DK.device_id, _DK.key_json, _DK.signed_hash).where(
        _DK.user_id == bindparam("user")
    )
)
_SIGNABLE = RawStatement(
    select(_DK.device_id, _DK.key_json, _DK.signed_hash).where(
        _DK.user_id == bindparam("user"), any_of(_DK.device_id, "devices")
    )
)


def send_signable_devices(
    conn: Connection, user_id: str, device_ids: list[str]
) -> Callable[[], dict[str, SignableDevice]]:
    """A user's stored device keys with their :attr:`SignableDevice.signed_hash`,
    read when the result is called (see
    :meth:`~synapse_xsign_module.storage.util.RawStatement.send`).

    Args:
        conn: the connection.
        user_id: whose devices.
        device_ids: which; those without keys are left out of the result.

    Returns:
        What reads device id -> its keys.
    """
    if not device_ids:
        return dict
    if len(device_ids) > MANY_DEVICES:
        # The list is one parameter either way; the prefix read is kept for
        # its speed when the user has about the devices asked for (a
        # self-signing key signing all of them): 500 of 500 devices took
        # 0.30 against 0.56 ms on SQLite, 0.62 against 0.89 on PostgreSQL.
        # The list lookup wins where the user has many more (500 of 3,000:
        # 0.63 against 1.89 ms, 1.30 against 3.64).
        wanted = set(device_ids)
        every = _SIGNABLE_OF_USER.send(conn, {"user": user_id})
        return lambda: {d: SignableDevice(kj, h) for d, kj, h in every() if d in wanted}
    some = _SIGNABLE.send(conn, {"user": user_id, "devices": sorted(set(device_ids))})
    return lambda: {d: SignableDevice(kj, h) for d, kj, h in some()}


def get_device_keys_txn(
    conn: Connection, query: dict[str, list[str]]
) -> dict[str, dict[str, str]]:
    """Stored device keys (canonical JSON) for users and devices.

    Args:
        conn: the connection.
        query: user id -> device ids; an empty list means every device.

    Returns:
        user id -> device id -> key JSON, for the devices that have keys.
    """
    result: dict[str, dict[str, str]] = defaultdict(dict)
    all_users = sorted(u for u, devs in query.items() if not devs)
    if all_users:
        for u, d, kj in _KEYS_OF_USERS.rows(conn, {"users": all_users}):
            result[u][d] = kj
    pairs: set[tuple[str, str]] = set()
    for user_id, devs in query.items():
        if len(devs) > MANY_DEVICES:
            wanted = set(devs)
            found = result[user_id]
            for d, kj in _KEYS_OF_USER.rows(conn, {"user": user_id}):
                if d in wanted:
                    found[d] = kj
        else:
            pairs.update((user_id, d) for d in devs)
    for part2 in chunks(sorted(pairs), MAX_PARAMS // 2):
        rows = conn.execute(
            select(_DK.user_id, _DK.device_id, _DK.key_json).where(
                tuple_(_DK.user_id, _DK.device_id).in_(list(part2))
            )
        )
        for u, d, kj in rows:
            result[u][d] = kj
    return {u: devs for u, devs in result.items() if devs}


def claim_txn(conn: Connection, claims: list[tuple[str, str, str]]) -> ClaimResult:
    """Hand out one key per (user, device, algorithm), oldest first.

    A claimed one-time key is deleted, so it is never handed out again: a
    concurrent claimer that loses the race for a key picks the next one. With
    no one-time key left, the fallback key is returned and marked used.

    Args:
        conn: the connection.
        claims: (user id, device id, algorithm) triples.

    Returns:
        user id -> device id -> ``algorithm:key_id`` -> key.
    """
    result: ClaimResult = {}
    remaining = sorted(set(claims))
    # Each round claims the oldest key of every remaining triple. A triple whose
    # key a concurrent transaction took meanwhile goes round again; a triple
    # with no one-time key left gets its fallback key.
    for _ in range(50):
        if not remaining:
            break
        wanted = _oldest_one_time_keys(conn, remaining)
        got: set[tuple[str, str, str]] = set()
        for part_ids in chunks(sorted(wanted), MAX_PARAMS):
            rows = conn.execute(
                delete(one_time_keys)
                .where(one_time_keys.c.id.in_(list(part_ids)))
                .returning(
                    one_time_keys.c.user_id,
                    one_time_keys.c.device_id,
                    one_time_keys.c.algorithm,
                    one_time_keys.c.key_id,
                    one_time_keys.c.key_json,
                )
            )
            got |= _add_claimed(result, rows)
        with_candidates = set(wanted.values())
        _claim_fallbacks(conn, sorted(set(remaining) - with_candidates), result)
        remaining = sorted(with_candidates - got)
    if remaining:
        # Never leave a device out of the answer: its fallback key, if any.
        logger.warning("Claims still contended after 50 rounds: %s", remaining)
        _claim_fallbacks(conn, remaining, result)
    return result


# The oldest unclaimed key of each (user, device, algorithm) triple, in one
# statement: for each triple an index seek on xsign_otk_claim_idx with LIMIT 1,
# whatever the number of keys a device holds. The triples are bound as one
# value (arrays on PostgreSQL, a JSON array on SQLite). On PostgreSQL the key
# is locked, skipping keys other claims hold: concurrent claims of the same
# devices each take a different key at once, where they all used to aim at the
# same oldest key and all but one went round again (under load, more than 50
# rounds, and a device was left out of the answer).
_OLDEST_PG = text(
    "SELECT o.id, t.u, t.d, t.a"
    " FROM unnest(CAST(:users AS TEXT[]), CAST(:devices AS TEXT[]),"
    " CAST(:algorithms AS TEXT[])) AS t(u, d, a)"
    " CROSS JOIN LATERAL (SELECT id FROM xsign_one_time_keys"
    " WHERE user_id = t.u AND device_id = t.d AND algorithm = t.a"
    " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) AS o"
)
_OLDEST_SQLITE = text(
    "SELECT (SELECT id FROM xsign_one_time_keys"
    " WHERE user_id = t.u AND device_id = t.d AND algorithm = t.a"
    " ORDER BY id LIMIT 1) AS id, t.u, t.d, t.a"
    " FROM (SELECT json_extract(value, '$[0]') AS u,"
    " json_extract(value, '$[1]') AS d, json_extract(value, '$[2]') AS a"
    " FROM json_each(:triples)) AS t"
)


def _oldest_one_time_keys(
    conn: Connection, triples: list[tuple[str, str, str]]
) -> dict[int, tuple[str, str, str]]:
    """Row id of the oldest one-time key of each triple that has one."""
    if not triples:
        return {}
    if conn.dialect.name == "postgresql":
        users, devices, algorithms = (list(col) for col in zip(*triples, strict=True))
        rows = conn.execute(
            _OLDEST_PG, {"users": users, "devices": devices, "algorithms": algorithms}
        )
    else:
        rows = conn.execute(_OLDEST_SQLITE, {"triples": json.dumps(triples)})
    return {key_id: (u, d, a) for key_id, u, d, a in rows if key_id is not None}


def _add_claimed(result: ClaimResult, rows: Any) -> set[tuple[str, str, str]]:
    """Put claimed (user, device, algorithm, key id, key JSON) rows in ``result``.

    Returns:
        The (user, device, algorithm) triples that got a key.
    """
    got = set()
    for u, d, alg, kid, kjson in rows:
        result.setdefault(u, {}).setdefault(d, {})[f"{alg}:{kid}"] = json.loads(kjson)
        got.add((u, d, alg))
    return got


def _claim_fallbacks(
    conn: Connection, triples: list[tuple[str, str, str]], result: ClaimResult
) -> None:
    for part in chunks(triples, MAX_PARAMS // 3):
        rows = conn.execute(
            update(fallback_keys)
            .where(
                tuple_(
                    fallback_keys.c.user_id,
                    fallback_keys.c.device_id,
                    fallback_keys.c.algorithm,
                ).in_(list(part))
            )
            .values(used=True)
            .returning(
                fallback_keys.c.user_id,
                fallback_keys.c.device_id,
                fallback_keys.c.algorithm,
                fallback_keys.c.key_id,
                fallback_keys.c.key_json,
            )
        )
        _add_claimed(result, rows)


def delete_device_txn(conn: Connection, user_id: str, device_id: str) -> bool:
    """Remove a device's keys, one-time keys, fallback keys and signatures.

    Returns:
        Whether the device had any key (identity, one-time or fallback).
    """
    lock_users(conn, [user_id])
    removed = 0
    for table in (device_keys, one_time_keys, fallback_keys):
        removed += conn.execute(
            delete(table).where(
                table.c.user_id == user_id, table.c.device_id == device_id
            )
        ).rowcount
    delete_signatures_on_device_txn(conn, user_id, device_id)
    bump_txn(conn, [user_id])
    return removed > 0


def device_ids_with_keys_txn(conn: Connection, user_id: str) -> set[str]:
    """Ids of the user's devices that have identity keys."""
    return set(
        conn.execute(
            select(device_keys.c.device_id).where(device_keys.c.user_id == user_id)
        ).scalars()
    )


class DeviceKeyStore:
    """Device key storage for the handlers; each call is one transaction.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def upload(
        self,
        user_id: str,
        device_id: str,
        new_device_keys: dict[str, Any] | None,
        otks: list[OneTimeKey],
        fallbacks: list[OneTimeKey],
        now_ms: int,
    ) -> defer.Deferred[UploadResult]:
        """See :func:`upload_txn`."""
        return self._db.run(
            "upload_keys",
            upload_txn,
            user_id,
            device_id,
            new_device_keys,
            otks,
            fallbacks,
            now_ms,
        )

    def claim(self, claims: list[tuple[str, str, str]]) -> defer.Deferred[ClaimResult]:
        """See :func:`claim_txn`."""
        return self._db.run("claim_keys", claim_txn, claims)
