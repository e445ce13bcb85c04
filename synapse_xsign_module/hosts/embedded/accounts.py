"""Accounts of the embedded host: users, devices and hashed access tokens."""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from typing import TypeVar

import attr
from sqlalchemy import Connection, delete, func, select, update

from twisted.internet import defer

from synapse_xsign_module.hosts.embedded.token_cache import TokenCache
from synapse_xsign_module.storage.batching import BatchedReader
from synapse_xsign_module.storage.cross_signing import (
    current_public_keys_txn,
    reset_txn,
)
from synapse_xsign_module.storage.database import Database
from synapse_xsign_module.storage.device_keys import (
    delete_device_txn,
    device_ids_with_keys_txn,
)
from synapse_xsign_module.storage.schema import (
    host_access_tokens,
    host_devices,
    host_users,
)
from synapse_xsign_module.storage.util import RawStatement, any_of

T = TypeVar("T")


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which an access token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random access token."""
    return "xst_" + secrets.token_urlsafe(32)


def new_device_id() -> str:
    """A fresh random device id (ten upper-case letters, like Synapse's)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(secrets.choice(alphabet) for _ in range(10))


@attr.s(frozen=True, auto_attribs=True, slots=True)
class User:
    """An account of the embedded host."""

    user_id: str
    password_hash: str | None
    is_admin: bool
    deactivated: bool
    created_ts: int


@attr.s(frozen=True, auto_attribs=True, slots=True)
class TokenInfo:
    """Who an access token belongs to."""

    user_id: str
    device_id: str | None


class DeviceIdInUse(Exception):
    """The requested device id equals one of the user's cross-signing keys."""


def _get_user_txn(conn: Connection, user_id: str) -> User | None:
    row = conn.execute(
        select(host_users).where(host_users.c.user_id == user_id)
    ).first()
    if row is None:
        return None
    return User(
        row.user_id,
        row.password_hash,
        bool(row.is_admin),
        bool(row.deactivated),
        row.created_ts,
    )


_NAMED_DEVICES = select(
    host_devices.c.user_id, host_devices.c.device_id, host_devices.c.display_name
).where(
    any_of(host_devices.c.user_id, "users"), host_devices.c.display_name.is_not(None)
)

_TOKENS = RawStatement(
    select(
        host_access_tokens.c.token_hash,
        host_access_tokens.c.user_id,
        host_access_tokens.c.device_id,
    )
    .join(host_users, host_users.c.user_id == host_access_tokens.c.user_id)
    .where(
        any_of(host_access_tokens.c.token_hash, "digests"),
        host_users.c.deactivated.is_(False),
    )
)


def _get_tokens_txn(
    conn: Connection, digests: list[str]
) -> dict[str, TokenInfo | None]:
    """The live tokens among ``digests`` (hashed tokens) and whose they are;
    unknown ones and those of deactivated accounts are left out."""
    return {
        digest: TokenInfo(user_id, device_id)
        for digest, user_id, device_id in _TOKENS.rows(conn, {"digests": digests})
    }


def _delete_device_txn(conn: Connection, user_id: str, device_id: str) -> None:
    conn.execute(
        delete(host_access_tokens).where(
            host_access_tokens.c.user_id == user_id,
            host_access_tokens.c.device_id == device_id,
        )
    )
    conn.execute(
        delete(host_devices).where(
            host_devices.c.user_id == user_id, host_devices.c.device_id == device_id
        )
    )
    delete_device_txn(conn, user_id, device_id)


def upsert_user_txn(
    conn: Connection,
    user_id: str,
    now_ms: int,
    password_hash: str | None = None,
    is_admin: bool | None = None,
    deactivated: bool | None = None,
) -> tuple[User, bool]:
    """Create an account or update the given fields of an existing one.

    Deactivating revokes every token and removes every device with its keys.

    Returns:
        The account afterwards, and whether it was created.
    """
    existing = _get_user_txn(conn, user_id)
    if existing is None:
        conn.execute(
            host_users.insert().values(
                user_id=user_id,
                password_hash=password_hash,
                is_admin=bool(is_admin),
                deactivated=bool(deactivated),
                created_ts=now_ms,
            )
        )
    else:
        values: dict[str, object] = {}
        if password_hash is not None:
            values["password_hash"] = password_hash
        if is_admin is not None:
            values["is_admin"] = is_admin
        if deactivated is not None:
            values["deactivated"] = deactivated
        if values:
            conn.execute(
                update(host_users)
                .where(host_users.c.user_id == user_id)
                .values(**values)
            )
    if deactivated:
        devices = set(
            conn.execute(
                select(host_devices.c.device_id).where(
                    host_devices.c.user_id == user_id
                )
            ).scalars()
        )
        for device_id in sorted(devices | device_ids_with_keys_txn(conn, user_id)):
            _delete_device_txn(conn, user_id, device_id)
        reset_txn(conn, user_id, now_ms)
        conn.execute(
            delete(host_access_tokens).where(host_access_tokens.c.user_id == user_id)
        )
    user = _get_user_txn(conn, user_id)
    assert user is not None
    return user, existing is None


_HD = host_devices.c
_DEVICES_OF_USERS = RawStatement(
    select(_HD.user_id, _HD.device_id).where(any_of(_HD.user_id, "users"))
)


def _device_ids_txn(conn: Connection, user_ids: list[str]) -> dict[str, set[str]]:
    """The device ids of some users (users without devices are left out)."""
    result: dict[str, set[str]] = defaultdict(set)
    for user_id, device_id in _DEVICES_OF_USERS.rows(conn, {"users": user_ids}):
        result[user_id].add(device_id)
    return result


class AccountStore:
    """Storage for the embedded host's accounts; each call is one transaction.

    Args:
        db: the module's database.
        token_cache: where verified tokens are remembered (None: nowhere). Every
            method that revokes tokens clears it.
    """

    def __init__(
        self, db: Database, token_cache: TokenCache[TokenInfo] | None = None
    ) -> None:
        self._db = db
        self.token_cache = token_cache
        # Every upload of cross-signing keys reads them (no key may be named
        # like a device); concurrent uploads share the read.
        self._device_ids: BatchedReader[str, set[str]] = BatchedReader(
            db, "get_device_ids", _device_ids_txn, set
        )
        # Every request whose token is not in the cache reads it: concurrent
        # requests (many clients each making its first request, or coming
        # back after token_cache_ms) share the read.
        self._tokens: BatchedReader[str, TokenInfo | None] = BatchedReader(
            db, "get_token", _get_tokens_txn, lambda: None
        )

    def get_user(self, user_id: str) -> defer.Deferred[User | None]:
        """The account, or None."""
        return self._db.run_read("get_user", _get_user_txn, user_id)

    def upsert_user(
        self,
        user_id: str,
        now_ms: int,
        password_hash: str | None = None,
        is_admin: bool | None = None,
        deactivated: bool | None = None,
    ) -> defer.Deferred[tuple[User, bool]]:
        """Create an account or update the given fields of an existing one.

        Deactivating revokes every token and removes every device with its keys.

        Returns:
            The account afterwards, and whether it was created.
        """

        d = self._db.run(
            "upsert_user",
            upsert_user_txn,
            user_id,
            now_ms,
            password_hash,
            is_admin,
            deactivated,
        )
        if deactivated:
            d.addCallback(self._revoked)
        return d

    def list_users(
        self, offset: int, limit: int
    ) -> defer.Deferred[tuple[list[User], int]]:
        """A page of accounts ordered by user id, and the total count."""

        def txn(conn: Connection) -> tuple[list[User], int]:
            total = conn.execute(
                select(func.count()).select_from(host_users)
            ).scalar_one()
            rows = conn.execute(
                select(host_users)
                .order_by(host_users.c.user_id)
                .offset(offset)
                .limit(limit)
            )
            users = [
                User(
                    r.user_id,
                    r.password_hash,
                    bool(r.is_admin),
                    bool(r.deactivated),
                    r.created_ts,
                )
                for r in rows
            ]
            return users, int(total)

        return self._db.run_read("list_users", txn)

    def login(
        self,
        user_id: str,
        device_id: str | None,
        display_name: str | None,
        now_ms: int,
    ) -> defer.Deferred[tuple[str, str]]:
        """Make (or reuse) a device and issue an access token for it.

        Logging in again to an existing device revokes its older tokens. The
        new token goes into the token cache: a client's first request after
        logging in (typically its ``/keys/upload``) needs no token read.

        Returns:
            (access token, device id).

        Raises:
            DeviceIdInUse: ``device_id`` is one of the user's cross-signing keys.
        """
        token = new_token()
        digest = hash_token(token)
        cache = self.token_cache
        generation = cache.generation if cache is not None else 0

        def txn(conn: Connection) -> tuple[str, bool, bool]:
            dev = device_id or new_device_id()
            if dev in current_public_keys_txn(conn, user_id):
                raise DeviceIdInUse(dev)
            exists = conn.execute(
                select(host_devices.c.device_id).where(
                    host_devices.c.user_id == user_id, host_devices.c.device_id == dev
                )
            ).first()
            if exists is None:
                conn.execute(
                    host_devices.insert().values(
                        user_id=user_id,
                        device_id=dev,
                        display_name=display_name,
                        created_ts=now_ms,
                    )
                )
            else:
                conn.execute(
                    delete(host_access_tokens).where(
                        host_access_tokens.c.user_id == user_id,
                        host_access_tokens.c.device_id == dev,
                    )
                )
                if display_name is not None:
                    conn.execute(
                        update(host_devices)
                        .where(
                            host_devices.c.user_id == user_id,
                            host_devices.c.device_id == dev,
                        )
                        .values(display_name=display_name)
                    )
            conn.execute(
                host_access_tokens.insert().values(
                    token_hash=digest,
                    user_id=user_id,
                    device_id=dev,
                    created_ts=now_ms,
                )
            )
            # What a token read would say of it: refused if the account was
            # deactivated since the caller looked.
            active = conn.execute(
                select(host_users.c.user_id).where(
                    host_users.c.user_id == user_id,
                    host_users.c.deactivated.is_(False),
                )
            ).first()
            return dev, exists is not None, active is not None

        def done(result: tuple[str, bool, bool]) -> tuple[str, str]:
            dev, revoked, active = result
            if cache is not None:
                # Cleared meanwhile (a revocation here): this login's view of
                # the account may predate it, so its token is not remembered.
                unchanged = cache.generation == generation
                if revoked:
                    cache.clear()  # the device's older tokens
                if unchanged and active:
                    cache.put(digest, TokenInfo(user_id, dev), cache.generation)
            return token, dev

        return self._db.run("login", txn).addCallback(done)

    async def get_token(self, token: str) -> TokenInfo | None:
        """Who a token belongs to; None if unknown, revoked or deactivated."""
        digest = hash_token(token)
        cache = self.token_cache
        generation = 0
        if cache is not None:
            cached = cache.get(digest)
            if cached is not None:
                return cached
            generation = cache.generation
        info = await self._tokens.get(digest)
        if cache is not None and info is not None:
            cache.put(digest, info, generation)
        return info

    def _revoked(self, result: T) -> T:
        """Clear the token cache after a transaction that may revoke tokens."""
        if self.token_cache is not None:
            self.token_cache.clear()
        return result

    def logout(self, token: str) -> defer.Deferred[None]:
        """Revoke a token and delete its device with the device's keys."""

        def txn(conn: Connection) -> None:
            row = conn.execute(
                select(
                    host_access_tokens.c.user_id, host_access_tokens.c.device_id
                ).where(host_access_tokens.c.token_hash == hash_token(token))
            ).first()
            if row is None:
                return
            if row.device_id is not None:
                _delete_device_txn(conn, row.user_id, row.device_id)
            conn.execute(
                delete(host_access_tokens).where(
                    host_access_tokens.c.token_hash == hash_token(token)
                )
            )

        return self._db.run("logout", txn).addCallback(self._revoked)

    def device_ids(self, user_id: str) -> defer.Deferred[set[str]]:
        """The user's devices (read together with other callers'; the set is
        shared with callers asking for the same user: read-only)."""
        return self._device_ids.get(user_id)

    def display_names(
        self, user_devices: dict[str, list[str]]
    ) -> defer.Deferred[dict[str, dict[str, str]]]:
        """Display names of devices that have one."""

        def txn(conn: Connection) -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = defaultdict(dict)
            wanted = {(u, d) for u, ds in user_devices.items() for d in ds}
            if not wanted:
                return {}
            rows = conn.execute(
                _NAMED_DEVICES, {"users": sorted({u for u, _ in wanted})}
            )
            for u, dev, name in rows:
                if (u, dev) in wanted:
                    out[u][dev] = name
            return dict(out)

        return self._db.run_read("display_names", txn)
