"""Test harness: databases, an in-memory client for the embedded host, real keys."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from canonicaljson import encode_canonical_json
from signedjson.key import encode_verify_key_base64, generate_signing_key
from signedjson.sign import sign_json
from sqlalchemy import text

from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.resource import Resource

from synapse_xsign_module.config import DatabaseConfig, XSignConfig, parse_config
from synapse_xsign_module.hosts.embedded import passwords
from synapse_xsign_module.hosts.embedded.host import EmbeddedHost
from synapse_xsign_module.storage import migrate
from synapse_xsign_module.storage.database import Database, create_db_engine
from synapse_xsign_module.storage.schema import VERSION_TABLE, metadata

#: Environment variable naming the PostgreSQL database the suite runs against.
POSTGRES_ENV = "XSIGN_TEST_POSTGRES_URL"

SERVER_NAME = "test.local"
PASSWORD = "correct horse battery staple"

_migrated: set[str] = set()


def postgres_url() -> str | None:
    """The PostgreSQL URL given to the suite, if any."""
    return os.environ.get(POSTGRES_ENV) or None


def test_db_url() -> str:
    """The URL the suite runs against: PostgreSQL when given, else a SQLite file."""
    url = postgres_url()
    if url:
        return url
    fd, path = tempfile.mkstemp(prefix="xsign-test-", suffix=".db")
    os.close(fd)
    return f"sqlite:///{path}"


def make_config(db_url: str, **overrides: Any) -> XSignConfig:
    """A config for tests: the given database and a small thread pool."""
    raw: dict[str, Any] = {
        "database": {"url": db_url, "threadpool_size": 4},
        "embedded": {"server_name": SERVER_NAME},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_config(raw)


def prepare_database(config: DatabaseConfig) -> Database:
    """A migrated, empty database (tables truncated on PostgreSQL)."""
    db = Database(config, reactor)
    if config.url not in _migrated or db.engine_name == "sqlite":
        migrate.upgrade(db.engine)
        _migrated.add(config.url)
    if db.engine_name == "postgresql":
        names = ", ".join(t.name for t in metadata.sorted_tables)
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
    return db


def drop_all(url: str) -> None:
    """Remove every table of the module (and the Alembic version table)."""
    engine = create_db_engine(DatabaseConfig(url=url))
    with engine.begin() as conn:
        metadata.drop_all(conn)
        conn.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    engine.dispose()
    _migrated.discard(url)


#: How long a request may take before a test fails, in seconds.
REQUEST_TIMEOUT = 60.0


class _Flusher:
    """Flushes a StubTreq's in-memory connections while requests are pending.

    One LoopingCall per client, however many requests are in flight, so that
    concurrent requests do not each spin the reactor.
    """

    def __init__(self, stub: StubTreq) -> None:
        self._stub = stub
        self._pending = 0
        self._running = False
        self._sleep: Any = None
        self._wake: defer.Deferred[None] = defer.Deferred()

    async def _flush_while_pending(self) -> None:
        try:
            while self._pending:
                self._stub.flush()
                if not self._pending:
                    break  # the flush finished the last request
                self._wake = defer.Deferred()
                self._sleep = reactor.callLater(  # type: ignore[attr-defined]
                    0.001, self._wake.callback, None
                )
                await self._wake
        finally:
            self._running = False

    def _stop_sleeping(self) -> None:
        """Leave no delayed call behind once nothing is pending."""
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
            self._wake.callback(None)

    async def wait(self, d: defer.Deferred[Any]) -> Any:
        box: list[Any] = []
        done: defer.Deferred[None] = defer.Deferred()

        def finished(result: Any) -> None:
            box.append(result)
            if not done.called:
                done.callback(None)

        d.addBoth(finished)
        self._pending += 1
        if not self._running:
            self._running = True
            defer.ensureDeferred(self._flush_while_pending())
        timer = reactor.callLater(  # type: ignore[attr-defined]
            REQUEST_TIMEOUT,
            lambda: (
                done.called or done.errback(AssertionError("request did not complete"))
            ),
        )
        try:
            await done
        finally:
            if timer.active():
                timer.cancel()
            self._pending -= 1
            if self._pending == 0:
                self._stop_sleeping()
        result = box[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result


async def pump(d: defer.Deferred[Any], stub: StubTreq | None = None) -> Any:
    """Wait for ``d`` while the real reactor runs (and ``stub`` is flushed)."""
    if stub is None:
        box: list[Any] = []
        d.addBoth(box.append)
        while not box:
            await deferLater(reactor, 0.001, lambda: None)
        if hasattr(box[0], "raiseException"):
            box[0].raiseException()
        return box[0]
    flusher = _FLUSHERS.get(id(stub))
    if flusher is None:
        flusher = _FLUSHERS[id(stub)] = _Flusher(stub)
    return await flusher.wait(d)


_FLUSHERS: dict[int, _Flusher] = {}


class _ListHandler(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def capture_logs(case: unittest.TestCase, name: str) -> list[logging.LogRecord]:
    """Collect every record of logger ``name`` for the rest of the test."""
    handler = _ListHandler()
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    case.addCleanup(logger.setLevel, level)
    case.addCleanup(logger.removeHandler, handler)
    return handler.records


def restore_root_logging(case: unittest.TestCase) -> None:
    """Undo, after the test, what the CLI does to stdlib logging's root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def restore() -> None:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)

    case.addCleanup(restore)


class Response:
    """A finished response: status, headers and the parsed JSON body."""

    def __init__(self, code: int, headers: Any, raw: bytes) -> None:
        self.code = code
        self.headers = headers
        self.raw = raw
        try:
            self.json: Any = json.loads(raw) if raw else None
        except ValueError:
            self.json = None

    def header(self, name: str) -> str | None:
        """One response header, or None."""
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.raw[:300]!r}>"


class Client:
    """Calls a resource tree in memory through treq's StubTreq."""

    def __init__(self, root: Resource) -> None:
        self.stub = StubTreq(root)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        query_token: bool = False,
    ) -> Response:
        """Make a request and wait for the whole response."""
        url = "http://test.local" + path
        hdrs = dict(headers or {})
        if token is not None:
            if query_token:
                sep = "&" if "?" in url else "?"
                url += f"{sep}access_token={quote(token)}"
            else:
                hdrs["Authorization"] = f"Bearer {token}"
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode("utf-8")
            hdrs.setdefault("Content-Type", "application/json")
        resp = await pump(
            self.stub.request(
                method,
                url,
                data=data,
                headers={k: [v] for k, v in hdrs.items()},
            ),
            self.stub,
        )
        content = await pump(self.stub.content(resp), self.stub)
        return Response(resp.code, resp.headers, content)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        """POST JSON."""
        return await self.request(
            "POST", path, body=body if body is not None else {}, **kw
        )

    async def get(self, path: str, **kw: Any) -> Response:
        """GET."""
        return await self.request("GET", path, **kw)


class HostTestCase(unittest.TestCase):
    """A test case with a running embedded host over a real database.

    The database is PostgreSQL when ``XSIGN_TEST_POSTGRES_URL`` is set, else a
    temporary SQLite file. SQL runs in real thread pools.
    """

    config_overrides: dict[str, Any] = {}

    def setUp(self) -> None:
        self.patch(passwords, "_N", 2**4)  # fast hashing in tests only
        self.db_url = test_db_url()
        self.config = make_config(self.db_url, **self.config_overrides)
        self.db = prepare_database(self.config.database)
        self.host = EmbeddedHost(self.config, reactor, db=self.db)
        self.service = self.host.service
        self.service.start()
        self.host.mount()
        self.client = Client(self.host.root)
        self.addCleanup(self.service.stop)
        if self.db_url.startswith("sqlite:///"):
            path = self.db_url[len("sqlite:///") :]
            self.addCleanup(remove_sqlite, path)

    async def make_user(
        self, localpart: str, admin: bool = False, password: str = PASSWORD
    ) -> str:
        """Create an account; returns its user id."""
        user_id = f"@{localpart}:{SERVER_NAME}"
        await self.host.accounts.upsert_user(
            user_id,
            self.service.clock.time_msec(),
            password_hash=passwords.hash_password(password),
            is_admin=admin,
        )
        return user_id

    async def login(
        self, user_id: str, device_id: str | None = None, password: str = PASSWORD
    ) -> tuple[str, str]:
        """Log in over HTTP; returns (access token, device id)."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        resp = await self.client.post("/_matrix/client/v3/login", body)
        assert resp.code == 200, resp
        return resp.json["access_token"], resp.json["device_id"]

    async def user_with_device(
        self, localpart: str, device_id: str | None = None, admin: bool = False
    ) -> TestUser:
        """A user logged in on one device."""
        user_id = await self.make_user(localpart, admin=admin)
        token, device = await self.login(user_id, device_id)
        return TestUser(user_id, device, token)


def remove_sqlite(path: str) -> None:
    """Delete a SQLite file with its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


class TestUser:
    """A logged-in test user with real keys.

    Attributes:
        user_id: the user.
        device_id: the device logged in.
        token: its access token.
        device_key: the device's ed25519 signing key (version = device id).
        master, self_signing, user_signing: cross-signing signing keys, once made.
    """

    def __init__(self, user_id: str, device_id: str, token: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.token = token
        self.device_key = generate_signing_key(device_id)
        self.master: Any = None
        self.self_signing: Any = None
        self.user_signing: Any = None
        self._device_keys: tuple[Any, dict[str, Any]] | None = None

    def device_keys(self, extra_keys: dict[str, str] | None = None) -> dict[str, Any]:
        """This device's identity keys, signed by the device's own key.

        The same object (a fresh copy) each time, until ``device_key`` changes
        or ``extra_keys`` are asked for.
        """
        if extra_keys:
            return make_device_keys(
                self.user_id, self.device_id, self.device_key, extra_keys
            )
        if self._device_keys is None or self._device_keys[0] is not self.device_key:
            made = make_device_keys(self.user_id, self.device_id, self.device_key)
            self._device_keys = (self.device_key, made)
        return copy.deepcopy(self._device_keys[1])

    def make_cross_signing(self) -> dict[str, Any]:
        """New master, SSK and USK; returns the upload body (no auth)."""
        self.master = new_signing_key()
        self.self_signing = new_signing_key()
        self.user_signing = new_signing_key()
        return {
            "master_key": cross_signing_key(self.user_id, "master", self.master),
            "self_signing_key": cross_signing_key(
                self.user_id, "self_signing", self.self_signing, self.master
            ),
            "user_signing_key": cross_signing_key(
                self.user_id, "user_signing", self.user_signing, self.master
            ),
        }


def signed_key(user: TestUser, fallback: bool = False) -> dict[str, Any]:
    """A fresh ``signed_curve25519`` key object signed by the user's device key."""
    obj: dict[str, Any] = {"key": public_key(generate_signing_key("k"))}
    if fallback:
        obj["fallback"] = True
    return sign_json(obj, user.user_id, user.device_key)


def new_signing_key() -> Any:
    """An ed25519 signing key whose version is its own public key."""
    key = generate_signing_key("tmp")
    key.version = encode_verify_key_base64(key.verify_key)
    return key


def public_key(key: Any) -> str:
    """Unpadded base64 public key of a signing key."""
    return str(encode_verify_key_base64(key.verify_key))


def cross_signing_key(
    user_id: str, usage: str, key: Any, signed_by: Any = None
) -> dict[str, Any]:
    """A CrossSigningKey object, signed by ``signed_by`` when given."""
    pub = public_key(key)
    obj: dict[str, Any] = {
        "user_id": user_id,
        "usage": [usage],
        "keys": {f"ed25519:{pub}": pub},
    }
    if signed_by is not None:
        obj = sign_json(obj, user_id, signed_by)
    return obj


def make_device_keys(
    user_id: str,
    device_id: str,
    device_key: Any,
    extra_keys: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A DeviceKeys object signed by the device's own ed25519 key."""
    curve = public_key(generate_signing_key("c"))  # any 32 bytes will do
    obj: dict[str, Any] = {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            f"ed25519:{device_id}": public_key(device_key),
            f"curve25519:{device_id}": curve,
            **(extra_keys or {}),
        },
    }
    return sign_json(obj, user_id, device_key)


def expected_signed_hash(signed: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON a signature over ``signed`` covers,
    made with canonicaljson (as signedjson signs), not the module."""
    unsigned = {k: v for k, v in signed.items() if k not in ("signatures", "unsigned")}
    return hashlib.sha256(encode_canonical_json(unsigned)).hexdigest()


def hold_in_other_transaction(
    case: unittest.TestCase, engine: Any, lock: Callable[[Any], Any]
) -> Any:
    """An open transaction of another connection that has run ``lock(conn)``
    (e.g. taken advisory locks); the caller ends it."""
    conn = engine.connect()
    case.addCleanup(conn.close)
    tx = conn.begin()
    lock(conn)
    return tx


async def result_once_released(
    case: unittest.TestCase, engine: Any, pending: Any, tx: Any
) -> Any:
    """Assert that ``pending`` waits on one advisory lock (PostgreSQL), then
    end ``tx``, which holds it, and return what ``pending`` gives."""
    case.assertEqual(await _advisory_waiters(engine), 1)
    case.assertFalse(pending.called)
    tx.rollback()
    return await pending


async def _advisory_waiters(engine: Any) -> int:
    """Poll PostgreSQL (up to 5 s) until a transaction waits for an advisory
    lock in the current database; returns how many wait then."""
    from twisted.internet import reactor as _reactor
    from twisted.internet.task import deferLater

    def waiting(conn: Any) -> int:
        return int(
            conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks"
                " WHERE locktype = 'advisory' AND NOT granted AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).scalar_one()
        )

    with engine.connect() as probe:
        for _ in range(500):
            if waiting(probe):
                break
            await deferLater(_reactor, 0.01, lambda: None)
        return waiting(probe)
