"""Detached signatures uploaded through ``/keys/signatures/upload``.

A row is addressed by (target user, target key id, signer user, signer key id):
signing the same target with the same key again replaces the signature.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, select

from twisted.internet import defer

from synapse_xsign_module.storage.cross_signing import (
    CurrentKeys,
    get_current_txn,
    send_current,
)
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import (
    SignableDevice,
    get_device_keys_txn,
    send_signable_devices,
)
from synapse_xsign_module.storage.schema import signatures
from synapse_xsign_module.storage.util import (
    RawStatement,
    any_of,
    closing_sent,
    commit_with_pipeline,
    commits_in_pipeline,
    lock_users,
    pipelined,
    upsert,
)
from synapse_xsign_module.storage.versions import (
    bump_txn,
    get_versions_txn,
    send_versions,
)

#: (target user, target key id) -> list of (signer user, signer key id, signature)
VisibleSignatures = dict[tuple[str, str], list[tuple[str, str, str]]]


class Basis(NamedTuple):
    """What a signature was checked against; it must still hold when stored.

    Attributes:
        user_id: whose key it is.
        kind: ``device`` or a cross-signing key type.
        ident: the device id, or the cross-signing public key.
        key_json: the key's canonical JSON when it was read.
    """

    user_id: str
    kind: str
    ident: str
    key_json: str


class PendingSignature(NamedTuple):
    """A verified signature waiting to be stored.

    Attributes:
        signer_user_id: who signed.
        signer_key_id: ``ed25519:<ssk/usk public key>`` or ``ed25519:<device id>``.
        target_user_id: whose key was signed.
        target_key_id: the device id or the master public key.
        signature: unpadded base64 signature.
        signer: the signing key as verified.
        target: the signed key as verified.
    """

    signer_user_id: str
    signer_key_id: str
    target_user_id: str
    target_key_id: str
    signature: str
    signer: Basis
    target: Basis


def _versions_unchanged(
    conn: Connection, users: set[str], versions: dict[str, int | None]
) -> bool:
    """Whether every user in ``users`` still has the key version given in
    ``versions``.

    A user missing from ``versions`` (not read) counts as changed. A user read
    with no version row (None) and still without one is unchanged: version
    rows are never deleted, and every key change writes one.
    """
    if not users <= versions.keys():
        return False
    current = get_versions_txn(conn, list(users))
    return all(current.get(u) == versions[u] for u in users)


def _stale_signatures(
    conn: Connection, pending: list[PendingSignature], bases: list[Basis]
) -> list[int]:
    """Indexes of the signatures whose signing or signed key is no longer the
    one they were verified against (every key read again)."""
    cross = get_current_txn(conn, [b.user_id for b in bases if b.kind != "device"])
    device_query: dict[str, list[str]] = defaultdict(list)
    for b in bases:
        if b.kind == "device":
            device_query[b.user_id].append(b.ident)
    devices = get_device_keys_txn(conn, dict(device_query)) if device_query else {}
    return [
        i
        for i, p in enumerate(pending)
        if not (
            _basis_holds(p.signer, cross, devices)  # type: ignore[arg-type]
            and _basis_holds(p.target, cross, devices)  # type: ignore[arg-type]
        )
    ]


def _basis_holds(
    basis: Basis,
    cross: dict[str, dict[str, object]],
    devices: dict[str, dict[str, str]],
) -> bool:
    if basis.kind == "device":
        return devices.get(basis.user_id, {}).get(basis.ident) == basis.key_json
    key = cross.get(basis.user_id, {}).get(basis.kind)
    return key is not None and getattr(key, "key_json", None) == basis.key_json


def _exclusive_users(pending: list[PendingSignature]) -> set[str]:
    """The users whose lock a store takes exclusively: the signers (two
    uploads by one user may write the same rows, and would deadlock on them
    in different orders), the users whose key version it raises (signatures
    of their own keys), and any user with a device among its keys (an upload
    of that device, under the user's lock shared, could change it). The
    others, users whose master key another user signs, change their
    cross-signing keys only under their lock held exclusively: a shared lock
    keeps those keys, and lets several users' signatures over one master key
    be stored at once."""
    users = {p.signer_user_id for p in pending}
    users.update(
        b.user_id for p in pending for b in (p.signer, p.target) if b.kind == "device"
    )
    return users


@commits_in_pipeline
def store_signatures_txn(
    conn: Connection,
    pending: list[PendingSignature],
    now_ms: int,
    versions: dict[str, int | None],
) -> list[int]:
    """Store verified signatures whose keys did not change since verification.

    Args:
        conn: the connection.
        pending: the signatures.
        now_ms: the time.
        versions: the key versions of the users whose keys were read for the
            verification (:class:`SignatureContext`), read before those keys.
            When every user of ``pending`` still has the same version, no key
            has changed since, and the keys are not read again.

    Returns:
        Indexes into ``pending`` of signatures not stored because the signing
        or the signed key changed meanwhile.
    """
    if not pending:
        return []
    bases = [b for p in pending for b in (p.signer, p.target)]
    users = {b.user_id for b in bases}
    # On PostgreSQL, one pipeline: after BEGIN, the locks and the version read
    # reach the server in one round trip, the writes in another.
    with pipelined(conn):
        lock_users(conn, _exclusive_users(pending), shared=users)
        if _versions_unchanged(conn, users, versions):
            _write_signatures(conn, pending, set(), now_ms)
            commit_with_pipeline(conn)  # nothing follows: the locks go now
            return []
    # A key changed since the verification: read every key again (outside a
    # pipeline, where SQLAlchemy's own reads see no rows), store what holds.
    stale = _stale_signatures(conn, pending, bases)
    with pipelined(conn):
        _write_signatures(conn, pending, set(stale), now_ms)
        commit_with_pipeline(conn)
    return stale


def _write_signatures(
    conn: Connection, pending: list[PendingSignature], stale: set[int], now_ms: int
) -> None:
    """Store the signatures of ``pending`` but those at the ``stale`` indexes,
    and raise the key versions of the users whose own keys they sign."""
    rows = {}
    for i, p in enumerate(pending):
        if i in stale:
            continue
        rows[(p.target_user_id, p.target_key_id, p.signer_user_id, p.signer_key_id)] = {
            "target_user_id": p.target_user_id,
            "target_key_id": p.target_key_id,
            "signer_user_id": p.signer_user_id,
            "signer_key_id": p.signer_key_id,
            "signature": p.signature,
            "ts_added_ms": now_ms,
        }
    upsert(
        conn,
        signatures,
        list(rows.values()),
        ["target_user_id", "target_key_id", "signer_user_id", "signer_key_id"],
        ["signature", "ts_added_ms"],
    )
    # Signatures over other users' keys are not part of their versions.
    bump_txn(conn, {t for t, _, s, _ in rows if s == t})


def get_own_txn(conn: Connection, user_ids: list[str]) -> VisibleSignatures:
    """The stored signatures users made over their own keys (the self-signing
    key over devices, devices over the master key): everyone may see them.

    Only current keys carry stored signatures: they are deleted when either
    key changes.

    Args:
        conn: the connection.
        user_ids: whose keys.

    Returns:
        The signatures, grouped by target (user id, device id or master public
        key).
    """
    result: VisibleSignatures = defaultdict(list)
    for tu, tk, su, sk, sig in _OWN_SIGNATURES.rows(
        conn, {"users": sorted(set(user_ids))}
    ):
        result[(tu, tk)].append((su, sk, sig))
    return dict(result)


def get_made_by_txn(
    conn: Connection, signer_id: str, user_ids: list[str]
) -> VisibleSignatures:
    """The stored signatures one user made over other users' keys (with the
    user-signing key, over master keys): only that user may see them.

    Args:
        conn: the connection.
        signer_id: who made them.
        user_ids: whose keys; ``signer_id`` itself is left out.

    Returns:
        Like :func:`get_own_txn`.
    """
    others = sorted(set(user_ids) - {signer_id})
    if not others:
        return {}
    result: VisibleSignatures = defaultdict(list)
    for tu, tk, sk, sig in _SIGNED_BY.rows(
        conn, {"signer": signer_id, "users": others}
    ):
        result[(tu, tk)].append((signer_id, sk, sig))
    return dict(result)


_S = signatures.c
_SIGNATURE_COLUMNS = (
    _S.target_user_id,
    _S.target_key_id,
    _S.signer_user_id,
    _S.signer_key_id,
    _S.signature,
)
# Signatures a user made over their own keys: seen by everyone.
_OWN_SIGNATURES = RawStatement(
    select(*_SIGNATURE_COLUMNS).where(
        any_of(_S.target_user_id, "users"), _S.signer_user_id == _S.target_user_id
    )
)


#: (target user, target key id, signer key id) -> signature
OwnSignatures = dict[tuple[str, str, str], str]

_SIGNED_BY = RawStatement(
    select(_S.target_user_id, _S.target_key_id, _S.signer_key_id, _S.signature).where(
        _S.signer_user_id == bindparam("signer"), any_of(_S.target_user_id, "users")
    )
)


class SignatureContext(NamedTuple):
    """What a signature upload is checked against (:func:`load_context_txn`).

    Attributes:
        cross: the current cross-signing keys of the uploader and the other
            users.
        devices: those of the uploader's devices that have keys (device id ->
            their stored keys).
        stored: the stored signatures the uploader made over those users' keys.
        versions: the key version of the uploader and of each other user (None
            for a user with none), read before everything else.
    """

    cross: CurrentKeys
    devices: dict[str, SignableDevice]
    stored: OwnSignatures
    versions: dict[str, int | None]


def load_context_txn(
    conn: Connection, user_id: str, other_users: list[str], device_ids: list[str]
) -> SignatureContext:
    """What a signature upload is checked against.

    Args:
        conn: the connection.
        user_id: the uploader.
        other_users: the other users whose keys are signed.
        device_ids: the uploader's devices the upload mentions (signed or
            signing); only these are read.
    """
    # First: a key that changes after this read changes its user's version,
    # so that the store can tell whether what follows is still current. On
    # PostgreSQL the four reads are sent together and their answers read at
    # the end of the pipeline, in one round trip; the server still runs them
    # in this order.
    users = [user_id, *other_users]
    with closing_sent(conn):
        with pipelined(conn):
            found = send_versions(conn, users)
            cross = send_current(conn, users)
            devices = send_signable_devices(conn, user_id, device_ids)
            stored = _SIGNED_BY.send(
                conn, {"signer": user_id, "users": sorted(set(users))}
            )
        version_of = found()
        return SignatureContext(
            cross(),
            devices(),
            {(tu, tk, sk): sig for tu, tk, sk, sig in stored()},
            {u: version_of.get(u) for u in users},
        )


class SignatureStore:
    """Signature storage; each call is one transaction.

    Args:
        db: the module's database.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def load_context(
        self, user_id: str, other_users: list[str], device_ids: list[str]
    ) -> defer.Deferred[SignatureContext]:
        """See :func:`load_context_txn`."""
        return self._db.run_read(
            "signature_context", load_context_txn, user_id, other_users, device_ids
        )

    def store(
        self,
        pending: list[PendingSignature],
        now_ms: int,
        versions: dict[str, int | None],
    ) -> defer.Deferred[list[int]]:
        """See :func:`store_signatures_txn`."""
        return self._db.run(
            "store_signatures", store_signatures_txn, pending, now_ms, versions
        )
