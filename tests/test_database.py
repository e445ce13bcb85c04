"""Tests of the Database: thread pool, one transaction per run, retries."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    Table,
    Text,
    bindparam,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from twisted.internet import defer, reactor
from twisted.python import threadable
from twisted.trial import unittest

from synapse_xsign_module.config import DatabaseConfig
from synapse_xsign_module.storage.database import Database, is_retryable
from synapse_xsign_module.storage.schema import host_users, signatures
from synapse_xsign_module.storage.util import (
    RawStatement,
    any_of,
    closing_sent,
    commit_with_pipeline,
    commits_in_pipeline,
    insert_many,
    pg_bulk_insert_statement,
    pipelined,
    upsert,
)
from tests.utils import capture_logs, prepare_database, remove_sqlite, test_db_url

BUSY_TIMEOUT_MS = 1234


class _FakePgError(Exception):
    """A DB-API error carrying a SQLSTATE, as psycopg's errors do."""

    def __init__(self, msg: str, sqlstate: str | None = None) -> None:
        super().__init__(msg)
        self.sqlstate = sqlstate


class _FakePsycopg2Error(Exception):
    """A DB-API error carrying the SQLSTATE as ``pgcode``, as psycopg2's do."""

    def __init__(self, msg: str, pgcode: str) -> None:
        super().__init__(msg)
        self.pgcode = pgcode


def add_user(conn: Connection, user_id: str) -> None:
    """Insert one account row."""
    conn.execute(host_users.insert().values(user_id=user_id, created_ts=1))


def new_users(*ids: str) -> list[dict[str, Any]]:
    """Account rows to insert, one per id."""
    return [{"user_id": i, "created_ts": 1} for i in ids]


def user_ids(conn: Connection) -> list[str]:
    """Every account id, sorted."""
    return list(
        conn.execute(select(host_users.c.user_id).order_by("user_id")).scalars()
    )


def user_rows(conn: Connection) -> list[tuple[Any, ...]]:
    """(user id, created_ts, is_admin) of every host user, by user id."""
    t = host_users.c
    return [
        tuple(r)
        for r in conn.execute(
            select(t.user_id, t.created_ts, t.is_admin).order_by(t.user_id)
        )
    ]


class DatabaseTestCase(unittest.TestCase):
    """A migrated, empty database of the engine under test."""

    max_attempts = 5

    def setUp(self) -> None:
        self.url = test_db_url()
        self.config = DatabaseConfig(
            url=self.url,
            threadpool_size=3,
            sqlite_busy_timeout_ms=BUSY_TIMEOUT_MS,
            max_attempts=self.max_attempts,
        )
        self.db = prepare_database(self.config)
        self.addCleanup(self.db.close)
        if self.url.startswith("sqlite:///"):
            path = self.url[len("sqlite:///") :]
            self.addCleanup(remove_sqlite, path)

    @property
    def is_postgres(self) -> bool:
        """Whether the engine under test is PostgreSQL."""
        return self.db.engine_name == "postgresql"

    def require_pipeline(self) -> None:
        """Skip unless on PostgreSQL through psycopg's pipeline mode."""
        from synapse_xsign_module.storage.util import _can_pipeline

        if not self.is_postgres or not _can_pipeline(self.db.engine.dialect):
            raise unittest.SkipTest("needs psycopg's pipeline mode on PostgreSQL")

    async def all_users(self) -> list[str]:
        """Every account id, read in a transaction of its own."""
        result: list[str] = await self.db.run_read("users", user_ids)
        return result

    def raise_retryable(self, conn: Connection, sqlstate: str = "40001") -> None:
        """Fail the current transaction the way the database does under contention.

        On PostgreSQL a real error with the given SQLSTATE is raised by the
        server; on SQLite the "database is locked" error of the driver.
        """
        if self.is_postgres:
            name = {"40001": "serialization_failure", "40P01": "deadlock_detected"}[
                sqlstate
            ]
            conn.exec_driver_sql(
                f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{name}'; END $$"
            )
            raise AssertionError("the DO block did not raise")
        if sqlstate == "40001":
            raise OperationalError(
                "x", None, sqlite3.OperationalError("database is locked")
            )
        raise OperationalError("x", None, _FakePgError("deadlock", sqlstate))


class PreparedStatementsTest(DatabaseTestCase):
    """On PostgreSQL no statement is prepared on the server: each run is
    planned for its own parameters (no generic plan outlives the table sizes
    it was made for)."""

    async def test_statements_are_not_prepared(self) -> None:
        if not self.is_postgres:
            raise unittest.SkipTest("PostgreSQL only")
        ids = RawStatement(
            select(host_users.c.user_id).where(any_of(host_users.c.user_id, "users"))
        )

        def txn(conn: Connection) -> int:
            for _ in range(10):  # psycopg prepares by default after 5
                ids.rows(conn, {"users": ["@a:x", "@b:x"]})
                conn.execute(select(host_users.c.user_id)).all()
            prepared = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_prepared_statements"
            ).scalar_one()
            return int(prepared)

        self.assertEqual(await self.db.run("statements", txn), 0)


class RunTest(DatabaseTestCase):
    """Database.run: where the work runs and what one run commits."""

    async def test_run_returns_deferred_and_runs_off_the_reactor_thread(self) -> None:
        """run() returns a Deferred; the function runs in a pool thread with its args."""
        seen: dict[str, Any] = {}

        def fn(conn: Connection, a: int, b: int = 0) -> int:
            seen["io_thread"] = threadable.isInIOThread()
            seen["thread"] = threading.current_thread()
            seen["in_txn"] = conn.in_transaction()
            return a + b

        d = self.db.run("add", fn, 2, b=3)
        self.assertIsInstance(d, defer.Deferred)
        self.assertEqual(await d, 5)
        self.assertIs(seen["io_thread"], False)
        self.assertIsNot(seen["thread"], threading.main_thread())
        self.assertIs(seen["in_txn"], True)

    async def test_run_read_runs_off_the_reactor_thread(self) -> None:
        """run_read() also returns a Deferred and runs in the pool."""
        seen: list[bool] = []

        def fn(conn: Connection) -> str:
            seen.append(threadable.isInIOThread())
            return "ok"

        d = self.db.run_read("read", fn)
        self.assertIsInstance(d, defer.Deferred)
        self.assertEqual(await d, "ok")
        self.assertEqual(seen, [False])

    def test_run_in_thread_refuses_the_reactor_thread(self) -> None:
        """A transaction run directly on the reactor thread is refused."""
        self.assertTrue(threadable.isInIOThread())
        calls: list[int] = []
        with self.assertRaises(RuntimeError):
            self.db.run_in_thread("x", True, lambda conn: calls.append(1))
        self.assertEqual(calls, [])

    async def test_commit(self) -> None:
        """Everything a successful function writes is committed together."""

        def fn(conn: Connection) -> None:
            add_user(conn, "@a:x")
            add_user(conn, "@b:x")

        before = self.db.transactions
        await self.db.run("two", fn)
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x"])
        self.assertEqual(self.db.transactions, before + 2)

    async def test_exception_rolls_back_everything(self) -> None:
        """An exception undoes every write of the function and reaches the caller."""
        await self.db.run("seed", add_user, "@seed:x")
        attempts: list[int] = []

        def fn(conn: Connection) -> None:
            attempts.append(1)
            add_user(conn, "@a:x")
            add_user(conn, "@b:x")
            conn.execute(host_users.delete())
            raise ValueError("boom")

        with self.assertRaises(ValueError):
            await self.db.run("fails", fn)
        self.assertEqual(attempts, [1])
        self.assertEqual(await self.all_users(), ["@seed:x"])
        self.assertEqual(self.db.retries, 0)


class RetryTest(DatabaseTestCase):
    """Retries on serialization failure, deadlock and dropped connections."""

    def setUp(self) -> None:
        super().setUp()
        self.log = capture_logs(self, "synapse_xsign_module.storage.database")

    async def test_serialization_failure_is_retried(self) -> None:
        """A serialization failure on the first attempt is retried; only the retry commits."""
        attempts: list[int] = []

        def fn(conn: Connection) -> str:
            attempts.append(1)
            add_user(conn, f"@try{len(attempts)}:x")
            if len(attempts) == 1:
                self.raise_retryable(conn, "40001")
            return "done"

        self.assertEqual(await self.db.run("retry", fn), "done")
        self.assertEqual(len(attempts), 2)
        self.assertEqual(self.db.retries, 1)
        self.assertEqual(await self.all_users(), ["@try2:x"])
        warnings = [r for r in self.log if r.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 1)
        self.assertIn("retry", warnings[0].getMessage())
        self.assertIn("attempt 1 of 5", warnings[0].getMessage())

    async def test_deadlock_is_retried(self) -> None:
        """A deadlock (SQLSTATE 40P01) on the first attempt is retried."""
        attempts: list[int] = []

        def fn(conn: Connection) -> int:
            attempts.append(1)
            add_user(conn, f"@try{len(attempts)}:x")
            if len(attempts) == 1:
                self.raise_retryable(conn, "40P01")
            return len(attempts)

        self.assertEqual(await self.db.run("deadlock", fn), 2)
        self.assertEqual(self.db.retries, 1)
        self.assertEqual(await self.all_users(), ["@try2:x"])

    async def test_integrity_error_is_not_retried(self) -> None:
        """A unique violation fails at once, without a retry."""
        await self.db.run("seed", add_user, "@dup:x")
        attempts: list[int] = []

        def fn(conn: Connection) -> None:
            attempts.append(1)
            add_user(conn, "@new:x")
            add_user(conn, "@dup:x")

        with self.assertRaises(IntegrityError):
            await self.db.run("dup", fn)
        self.assertEqual(attempts, [1])
        self.assertEqual(self.db.retries, 0)
        self.assertEqual(await self.all_users(), ["@dup:x"])

    async def test_retryable_error_in_read_is_retried(self) -> None:
        """run_read retries like run."""
        attempts: list[int] = []

        def fn(conn: Connection) -> int:
            attempts.append(1)
            if len(attempts) == 1:
                self.raise_retryable(conn)
            return int(
                conn.execute(select(func.count()).select_from(host_users)).scalar_one()
            )

        self.assertEqual(await self.db.run_read("read", fn), 0)
        self.assertEqual(len(attempts), 2)

    async def test_dropped_connection_is_retried(self) -> None:
        """On PostgreSQL a connection killed mid-transaction is retried on a new one."""
        if not self.is_postgres:
            raise unittest.SkipTest("needs PostgreSQL (XSIGN_TEST_POSTGRES_URL)")
        pids: list[int] = []

        def fn(conn: Connection) -> str:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            pids.append(pid)
            add_user(conn, f"@try{len(pids)}:x")
            if len(pids) == 1:
                conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
            return "ok"

        self.assertEqual(await self.db.run("dropped", fn), "ok")
        self.assertEqual(len(pids), 2)
        self.assertNotEqual(pids[0], pids[1])
        self.assertEqual(self.db.retries, 1)
        self.assertEqual(await self.all_users(), ["@try2:x"])

    async def test_connection_dropped_in_a_pipeline_is_retried(self) -> None:
        """A connection killed inside a pipelined block (its COMMIT queued
        behind) is retried on a new one; nothing of the first attempt stays."""
        if not self.is_postgres:
            raise unittest.SkipTest("needs PostgreSQL (XSIGN_TEST_POSTGRES_URL)")
        attempts: list[int] = []
        commit_asked: list[int] = []
        kill = RawStatement(text("SELECT pg_terminate_backend(pg_backend_pid())"))

        @commits_in_pipeline
        def fn(conn: Connection) -> str:
            attempts.append(1)
            with pipelined(conn):
                insert_many(
                    conn,
                    host_users,
                    [{"user_id": f"@try{len(attempts)}:x", "created_ts": 1}],
                )
                if len(attempts) == 1:
                    kill.execute(conn, {})  # queued, like the writes
                commit_with_pipeline(conn)
                commit_asked.append(1)
            return "ok"

        self.assertEqual(await self.db.run("dropped", fn), "ok")
        self.assertEqual((len(attempts), len(commit_asked)), (2, 2))
        self.assertEqual(await self.all_users(), ["@try2:x"])

    async def test_connection_killed_between_transactions_is_replaced(self) -> None:
        """A kept connection that the server closed while idle is replaced."""
        if not self.is_postgres:
            raise unittest.SkipTest("needs PostgreSQL (XSIGN_TEST_POSTGRES_URL)")

        def pid(conn: Connection) -> int:
            value: int = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            return value

        # The writer and reader threads may differ: kill every kept connection.
        first = {await self.db.run("pid", pid) for _ in range(3)}
        with self.db.engine.connect() as other:
            for p in first:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(p)})")
            other.commit()
        self.assertEqual(
            await self.db.run("after", lambda conn: add_user(conn, "@k:x")), None
        )
        self.assertEqual(await self.all_users(), ["@k:x"])
        self.assertTrue(first.isdisjoint({await self.db.run("pid", pid)}))


class SqliteLockedBeginTest(DatabaseTestCase):
    """A write whose BEGIN IMMEDIATE finds the database locked is retried."""

    async def test_locked_begin_is_retried(self) -> None:
        if self.is_postgres:
            raise unittest.SkipTest("SQLite only")
        # Another process's writer holds the lock; our busy timeout is short.
        self.db.close()
        self.db = Database(
            DatabaseConfig(url=self.url, sqlite_busy_timeout_ms=20, max_attempts=8),
            reactor,
        )
        self.addCleanup(self.db.close)
        other = sqlite3.connect(self.url[len("sqlite:///") :], isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        reactor.callLater(0.15, other.execute, "COMMIT")
        await self.db.run("w", lambda conn: add_user(conn, "@late:x"))
        self.assertGreater(self.db.retries, 0)
        self.assertEqual(await self.all_users(), ["@late:x"])


class SqliteWriteLockWaitTest(DatabaseTestCase):
    """A writer waits for another process's write lock in short steps (SQLite's
    own busy handler sleeps up to tens of milliseconds at a time)."""

    async def test_waits_in_short_steps_then_writes(self) -> None:
        if self.is_postgres:
            raise unittest.SkipTest("SQLite only")
        from synapse_xsign_module.storage import database as database_module

        other = sqlite3.connect(
            self.url[len("sqlite:///") :], isolation_level=None, check_same_thread=False
        )
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # another process's writer
        waits: list[float] = []
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 6:
                other.execute("COMMIT")  # the other writer is done
            real_sleep(seconds)

        self.patch(database_module.time, "sleep", sleep)

        def write(conn: Connection) -> int:
            add_user(conn, "@waited:x")
            return int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())

        busy = await self.db.run("w", write)
        self.assertEqual(busy, BUSY_TIMEOUT_MS)  # SQLite's handler is back on
        self.assertEqual(waits[:5], [0.0001, 0.0002, 0.0005, 0.001, 0.002])
        self.assertEqual(waits[5:], [0.002] * (len(waits) - 5))
        self.assertEqual(self.db.retries, 0)
        self.assertEqual(await self.all_users(), ["@waited:x"])


class SqliteBusyErrorTest(unittest.TestCase):
    """Which SQLite errors mean "another connection holds the lock"."""

    def test_result_codes_and_messages(self) -> None:
        from synapse_xsign_module.storage.database import _is_busy

        def error(message: str, code: int | None) -> sqlite3.OperationalError:
            e = sqlite3.OperationalError(message)
            if code is not None:
                e.sqlite_errorcode = code  # type: ignore[attr-defined]
            return e

        self.assertTrue(_is_busy(error("database is locked", 5)))  # SQLITE_BUSY
        self.assertTrue(_is_busy(error("database is locked", 517)))  # _SNAPSHOT
        self.assertTrue(_is_busy(error("database is locked", 261)))  # _RECOVERY
        self.assertFalse(_is_busy(error("disk I/O error", 10)))
        self.assertFalse(_is_busy(error("database table is locked", 6)))
        # Python 3.10 gives no result code: the message tells.
        self.assertTrue(_is_busy(error("database is locked", None)))
        self.assertFalse(_is_busy(error("disk I/O error", None)))


class AnyOfTest(DatabaseTestCase):
    """storage.util.any_of: a whole list bound as one parameter."""

    async def test_matches_exactly_the_listed_values(self) -> None:
        stmt = select(host_users.c.user_id).where(any_of(host_users.c.user_id, "ids"))
        names = [f"@u{i}:x" for i in range(2000)] + ['@it\'s "quoted" \u00e9:x']

        def txn(conn: Connection) -> list[list[str]]:
            conn.execute(
                host_users.insert(), [{"user_id": n, "created_ts": 1} for n in names]
            )
            found = []
            for ids in ([], ["@nobody:x"], names[1:3] + ["@nobody:x"], names):
                found.append(sorted(conn.execute(stmt, {"ids": ids}).scalars()))
            return found

        empty, none, two, everyone = await self.db.run("any_of", txn)
        self.assertEqual((empty, none), ([], []))
        self.assertEqual(two, sorted(names[1:3]))
        self.assertEqual(everyone, sorted(names))


class RawStatementTest(DatabaseTestCase):
    """storage.util.RawStatement: the same rows as SQLAlchemy, from the driver."""

    async def test_rows_match_sqlalchemy(self) -> None:
        """Named parameters, a StringList and the statement's own literals are
        all bound; rows come back as plain tuples, in the transaction."""
        t = host_users.c
        stmt = (
            select(t.user_id, t.created_ts)
            .where(any_of(t.user_id, "ids"), t.created_ts >= bindparam("since"))
            .where(t.is_admin.is_(False), t.user_id != "@hidden:x")
            .order_by(t.user_id)
        )
        raw = RawStatement(stmt)
        rows = [
            {"user_id": n, "created_ts": ts, "is_admin": admin}
            for n, ts, admin in [
                ("@a:x", 5, False),
                ("@b:x", 1, False),
                ("@c:x", 9, True),
                ("@hidden:x", 9, False),
                ('@it\'s "q" \u00e9:x', 7, False),
            ]
        ]
        ids = [r["user_id"] for r in rows] + ["@nobody:x"]

        def txn(conn: Connection) -> tuple[list[Any], list[Any], list[Any]]:
            conn.execute(host_users.insert(), rows)
            # Twice: the second run uses the statement compiled by the first.
            first = raw.rows(conn, {"ids": ids, "since": 2})
            again = raw.rows(conn, {"ids": ids[:1], "since": 0})
            expected = [tuple(r) for r in conn.execute(stmt, {"ids": ids, "since": 2})]
            return first, again, expected

        first, again, expected = await self.db.run("raw", txn)
        self.assertEqual(first, expected)
        self.assertEqual(first, [("@a:x", 5), ('@it\'s "q" \u00e9:x', 7)])
        self.assertEqual(again, [("@a:x", 5)])
        self.assertTrue(all(type(r) is tuple for r in first))

    async def test_plain_parameters_in_any_order(self) -> None:
        """Parameters without conversions are bound by name whatever the order
        of the set, one used twice included, and keys the statement does not
        use are ignored."""
        t = host_users.c
        stmt = (
            select(t.user_id)
            .where(
                t.created_ts >= bindparam("lo"),
                t.created_ts < bindparam("hi"),
                t.user_id != bindparam("skip"),
                t.created_ts != bindparam("lo") + 1,
            )
            .order_by(t.user_id)
        )
        raw = RawStatement(stmt)
        one = RawStatement(select(t.user_id).where(t.user_id == bindparam("id")))

        def txn(conn: Connection) -> tuple[list[Any], list[Any], list[Any]]:
            conn.execute(
                host_users.insert(),
                [{"user_id": f"@u{i}:x", "created_ts": i} for i in range(8)],
            )
            params = {"unused": 0, "skip": "@u5:x", "hi": 7, "lo": 2}
            expected = [tuple(r) for r in conn.execute(stmt, params)]
            return raw.rows(conn, params), expected, one.rows(conn, {"id": "@u3:x"})

        got, expected, single = await self.db.run("raw", txn)
        self.assertEqual(got, expected)
        self.assertEqual(got, [("@u2:x",), ("@u4:x",), ("@u6:x",)])
        self.assertEqual(single, [("@u3:x",)])

    async def test_driver_errors_are_sqlalchemy_errors(self) -> None:
        """A failing statement raises SQLAlchemy's DBAPIError (what retries and
        dropping a broken connection look for), and the transaction rolls back."""
        missing = Table("xsign_no_such_table", MetaData(), Column("x", Text))
        raw = RawStatement(select(missing.c.x).where(missing.c.x == bindparam("x")))

        def txn(conn: Connection) -> None:
            add_user(conn, "@rolled-back:x")
            raw.rows(conn, {"x": "y"})

        with self.assertRaises(DBAPIError):
            await self.db.run("raw", txn)
        self.assertEqual(await self.db.run_read("ids", user_ids), [])

    async def test_sent_reads_fetched_afterwards(self) -> None:
        """Reads sent one after the other and fetched afterwards, inside a
        pipeline or not, give each its own rows, as the transaction sees them;
        a failing one raises SQLAlchemy's DBAPIError and rolls back."""
        t = host_users.c
        by_id = RawStatement(select(t.created_ts).where(t.user_id == bindparam("id")))
        count = RawStatement(select(func.count()).select_from(host_users))

        def txn(conn: Connection) -> list[list[Any]]:
            insert_many(conn, host_users, new_users("@a:x", "@b:x"))
            with pipelined(conn):
                first = by_id.send(conn, {"id": "@b:x"})
                second = count.send(conn, {})
                third = by_id.send(conn, {"id": "@nobody:x"})
                # One fetched in the block, the others after it.
                got = [second()]
            return [first(), *got, third()]

        got = await self.db.run("sent", txn)
        self.assertEqual(got[1:], [[(2,)], []])
        self.assertEqual(len(got[0]), 1)
        missing = Table("xsign_no_such_table", MetaData(), Column("x", Text))
        raw = RawStatement(select(missing.c.x))

        def failing(conn: Connection) -> None:
            add_user(conn, "@rolled-back:x")
            with pipelined(conn):
                fetch = raw.send(conn, {})
                fetch()

        with self.assertRaises(DBAPIError):
            await self.db.run("sent", failing)
        self.assertEqual(await self.db.run_read("ids", user_ids), ["@a:x", "@b:x"])

    async def test_unfetched_sent_reads_are_closed(self) -> None:
        """A read sent in a closing_sent block whose rows were never fetched
        (an error came first) has its cursor closed at the end of the block."""
        t = host_users.c
        every = RawStatement(select(t.user_id).order_by(t.user_id))
        left: dict[str, Any] = {}

        class Stop(Exception):
            pass

        def txn(conn: Connection) -> None:
            insert_many(conn, host_users, new_users("@a:x", "@b:x"))
            with closing_sent(conn):
                with pipelined(conn):
                    left["inside"] = every.send(conn, {})
                raise Stop()

        with self.assertRaises(Stop):
            await self.db.run("sent", txn)
        with self.assertRaises(DBAPIError):  # a closed cursor
            left["inside"]()

    async def test_execute_many_and_upsert(self) -> None:
        """execute_many binds each parameter set (only the INSERT's columns;
        the rest take their defaults); upsert replaces on conflict; a unique
        violation is SQLAlchemy's IntegrityError and rolls everything back;
        execute tells how many rows a statement changed."""
        t = host_users.c
        insert = RawStatement(
            host_users.insert(), column_keys=["user_id", "created_ts"]
        )
        rows = [{"user_id": f"@u{i}:x", "created_ts": i} for i in range(3)]

        def txn(conn: Connection) -> list[Any]:
            insert.execute_many(conn, rows)
            upsert(
                conn,
                host_users,
                [{"user_id": "@u1:x", "created_ts": 50, "is_admin": True}],
                ["user_id"],
                ["created_ts", "is_admin"],
            )
            return user_rows(conn)

        self.assertEqual(
            await self.db.run("many", txn),
            [("@u0:x", 0, False), ("@u1:x", 50, True), ("@u2:x", 2, False)],
        )

        def duplicate(conn: Connection) -> None:
            insert.execute_many(conn, [{"user_id": "@new:x", "created_ts": 1}])
            insert.execute_many(conn, rows[:1])

        with self.assertRaises(IntegrityError):
            await self.db.run("dup", duplicate)
        self.assertNotIn("@new:x", await self.db.run_read("ids", user_ids))

        delete_since = RawStatement(
            host_users.delete().where(t.created_ts >= bindparam("since"))
        )

        def delete(conn: Connection) -> tuple[int, int]:
            return (
                delete_since.execute(conn, {"since": 2}),
                delete_since.execute(conn, {"since": 2}),
            )

        self.assertEqual(await self.db.run("delete", delete), (2, 0))
        self.assertEqual(await self.db.run_read("ids", user_ids), ["@u0:x"])

    async def test_insert_many(self) -> None:
        """insert_many stores every row (one unnest statement on PostgreSQL);
        a key already stored fails the whole transaction, storing nothing."""
        t = host_users.c
        rows = [{"user_id": f"@m{i}:x", "created_ts": 2**40 + i} for i in range(3)]

        def ids_and_times(conn: Connection) -> list[Any]:
            return sorted(
                tuple(r) for r in conn.execute(select(t.user_id, t.created_ts))
            )

        await self.db.run("many", lambda conn: insert_many(conn, host_users, rows))
        self.assertEqual(
            await self.db.run_read("all", ids_and_times),
            [(r["user_id"], r["created_ts"]) for r in rows],
        )

        def clash(conn: Connection) -> None:
            insert_many(
                conn,
                host_users,
                [{"user_id": "@fresh:x", "created_ts": 1}, rows[1]],
            )

        with self.assertRaises(IntegrityError):
            await self.db.run("clash", clash)
        self.assertEqual(len(await self.db.run_read("all", ids_and_times)), 3)

    async def test_many_rows_never_cut_short(self) -> None:
        """A value longer than its column is refused (PostgreSQL) or kept whole
        (SQLite, which has no lengths), never cut to the column's length."""
        long_id = "@" + "x" * 300 + ":x"
        rows = [
            {"user_id": "@short:x", "created_ts": 1},
            {"user_id": long_id, "created_ts": 2},
        ]

        def ids(conn: Connection) -> list[str]:
            return [r[0] for r in conn.execute(select(host_users.c.user_id))]

        for write in (
            lambda conn: insert_many(conn, host_users, rows),
            lambda conn: upsert(conn, host_users, rows, ["user_id"], ["created_ts"]),
        ):
            try:
                await self.db.run("long", write)
            except DBAPIError:
                self.assertEqual(await self.db.run_read("ids", ids), [])
            else:
                self.assertIn(long_id, await self.db.run_read("ids", ids))
                await self.db.run(
                    "clear", lambda conn: conn.execute(host_users.delete())
                )

    async def test_upsert_of_many_rows(self) -> None:
        """Many rows in one upsert (one unnest statement on PostgreSQL): new
        rows inserted, existing ones updated, a key given twice keeps its last
        row, and values of every column type arrive intact."""
        odd = '@it\'s "q" \u00e9,{x}:x'

        def txn(conn: Connection) -> list[Any]:
            upsert(
                conn,
                host_users,
                [{"user_id": "@old:x", "created_ts": 1, "is_admin": False}],
                ["user_id"],
                ["created_ts", "is_admin"],
            )
            upsert(
                conn,
                host_users,
                [
                    {"user_id": "@old:x", "created_ts": 2**40, "is_admin": True},
                    {"user_id": odd, "created_ts": 3, "is_admin": False},
                    {"user_id": "@new:x", "created_ts": 4, "is_admin": False},
                    {"user_id": odd, "created_ts": 5, "is_admin": True},
                ],
                ["user_id"],
                ["created_ts", "is_admin"],
            )
            return user_rows(conn)

        self.assertEqual(
            sorted(await self.db.run("bulk", txn)),
            sorted([("@old:x", 2**40, True), (odd, 5, True), ("@new:x", 4, False)]),
        )

    async def test_columns_shared_by_every_row(self) -> None:
        """Columns with one value in every row (bound once on PostgreSQL) are
        stored in every row: text, a NULL, a boolean and a big integer, in an
        insert and in an upsert; rows identical in every column still run
        (and clash on their key)."""
        odd = '$it\'s "q" \u00e9,{x}'
        shared = {"password_hash": None, "is_admin": True, "created_ts": 2**40}

        def txn(conn: Connection) -> list[Any]:
            insert_many(
                conn, host_users, [{"user_id": f"@s{i}:x", **shared} for i in range(3)]
            )
            upsert(
                conn,
                host_users,
                [
                    {"user_id": u, "password_hash": odd, "created_ts": 7}
                    for u in ("@s1:x", "@s2:x", "@s3:x")
                ],
                ["user_id"],
                ["password_hash", "created_ts"],
            )
            rows = conn.execute(
                select(
                    host_users.c.user_id,
                    host_users.c.password_hash,
                    host_users.c.is_admin,
                    host_users.c.created_ts,
                ).order_by(host_users.c.user_id)
            )
            return [tuple(r) for r in rows]

        self.assertEqual(
            await self.db.run("shared", txn),
            [
                ("@s0:x", None, True, 2**40),
                ("@s1:x", odd, True, 7),
                ("@s2:x", odd, True, 7),
                ("@s3:x", odd, False, 7),
            ],
        )
        twice = new_users("@twin:x") * 2
        with self.assertRaises(IntegrityError):
            await self.db.run("twice", lambda c: insert_many(c, host_users, twice))
        self.assertNotIn("@twin:x", await self.db.run_read("ids", user_ids))


class PgBulkInsertStatementTest(unittest.TestCase):
    """The one statement that inserts many rows on PostgreSQL (no database)."""

    def test_shared_columns_bound_once(self) -> None:
        """PostgreSQL's bulk insert binds a column that every row shares as one
        value and the others as one array each, in the order the SQL reads
        them; rows alike in every column still leave one array to unnest."""
        rows = [
            {
                "target_user_id": "@a:x",
                "target_key_id": f"DEV{i}",
                "signer_user_id": "@a:x",
                "signer_key_id": "ed25519:K",
                "signature": f"sig{i}",
                "ts_added_ms": 5,
            }
            for i in range(500)
        ]
        sql, params = pg_bulk_insert_statement(signatures, rows)
        self.assertEqual(
            params,
            [
                "@a:x",
                "@a:x",
                "ed25519:K",
                5,
                [f"DEV{i}" for i in range(500)],
                [f"sig{i}" for i in range(500)],
            ],
        )
        self.assertIn(
            "SELECT %s::text, u.target_key_id, %s::text, %s::text, u.signature,"
            " %s::bigint FROM unnest(%s::text[], %s::text[])"
            " AS u(target_key_id, signature)",
            sql,
        )
        sql, params = pg_bulk_insert_statement(signatures, rows[:1] * 2)
        self.assertEqual(params[-1], ["@a:x", "@a:x"])
        self.assertEqual(sql.count("[]"), 1)

    def test_equal_values_of_other_types_are_not_shared(self) -> None:
        """``1 == True``, but a boolean bound for a bigint column is an error:
        values of two types stay an array."""
        rows = [
            {"user_id": "@a:x", "created_ts": 1},
            {"user_id": "@b:x", "created_ts": True},
        ]
        _, params = pg_bulk_insert_statement(host_users, rows)
        self.assertEqual(params, [["@a:x", "@b:x"], [1, True]])

    def test_upsert_keeps_the_last_row_of_a_key(self) -> None:
        """A key given twice keeps its last row; what is left may share
        every column, one of which stays an array."""
        rows = [
            {"user_id": "@a:x", "created_ts": 1},
            {"user_id": "@a:x", "created_ts": 2},
        ]
        sql, params = pg_bulk_insert_statement(
            host_users, rows, ("user_id",), ("created_ts",)
        )
        self.assertEqual(params, [2, ["@a:x"]])
        self.assertIn("ON CONFLICT (user_id) DO UPDATE SET created_ts", sql)


class PipelinedTest(DatabaseTestCase):
    """Writes inside pipelined(): sent at once on PostgreSQL, all or nothing."""

    async def test_writes_land(self) -> None:
        def txn(conn: Connection) -> bool:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x", "@b:x"))
                upsert(conn, host_users, new_users("@c:x"), ["user_id"], ["created_ts"])
                active = self.pipeline_active(conn)
            return active and not self.pipeline_active(conn)

        self.assertEqual(await self.db.run("pipe", txn), self.is_postgres)
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x", "@c:x"])

    async def test_failed_statement_rolls_everything_back(self) -> None:
        """A unique violation among pipelined inserts is SQLAlchemy's
        IntegrityError (not retried), and nothing of the transaction stays;
        the connection serves the next transaction."""

        def txn(conn: Connection) -> None:
            add_user(conn, "@before:x")
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                insert_many(conn, host_users, new_users("@a:x"))
                insert_many(conn, host_users, new_users("@after:x"))

        with self.assertRaises(IntegrityError):
            await self.db.run("pipe", txn)
        self.assertEqual(await self.all_users(), [])
        await self.db.run("ok", lambda conn: add_user(conn, "@next:x"))
        self.assertEqual(await self.all_users(), ["@next:x"])

    def test_only_psycopg_pipelines(self) -> None:
        from sqlalchemy.dialects import postgresql, sqlite

        from synapse_xsign_module.storage.util import _can_pipeline

        self.assertFalse(_can_pipeline(sqlite.dialect()))
        self.assertFalse(_can_pipeline(postgresql.pg8000.dialect()))
        psycopg_dialect = postgresql.psycopg.dialect()
        import psycopg

        self.assertEqual(
            _can_pipeline(psycopg_dialect), psycopg.Pipeline.is_supported()
        )

    @staticmethod
    def pipeline_active(conn: Connection) -> bool:
        if conn.dialect.name != "postgresql":
            return False
        from psycopg import pq

        status = conn.connection.driver_connection.pgconn.pipeline_status  # type: ignore[union-attr]
        return bool(status != pq.PipelineStatus.OFF)


def _round_trips(trace: str) -> int:
    """Times the client waited for the server in a libpq protocol trace: each
    turn from messages sent (F) to messages received (B)."""
    sides = [line.split("\t", 1)[0] for line in trace.splitlines() if line]
    return sum(1 for a, b in itertools.pairwise(sides) if (a, b) == ("F", "B"))


class RoundTripsTest(DatabaseTestCase):
    """On PostgreSQL a key-changing transaction sends its locks together with
    the read that follows them, and its writes together: BEGIN, locks + read,
    writes (with the COMMIT when the function is the transaction's own, see
    CommitWithPipelineTest; not here, where it is called from another)."""

    def setUp(self) -> None:
        super().setUp()
        self.require_pipeline()

    async def trips(self, fn: Any, read: bool = False) -> int:
        """Round trips of ``fn(conn)`` in a write transaction (COMMIT not
        included), or run as a read (autocommit on PostgreSQL)."""
        import tempfile

        from psycopg import pq

        def txn(conn: Connection) -> int:
            pgconn = conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
            with tempfile.TemporaryFile() as f:
                pgconn.trace(f.fileno())
                pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
                try:
                    fn(conn)
                finally:
                    pgconn.untrace()
                f.seek(0)
                return _round_trips(f.read().decode("utf-8", "replace"))

        run = self.db.run_read if read else self.db.run
        result: int = await run("trips", txn)
        return result

    async def test_keys_upload(self) -> None:
        from synapse_xsign_module.storage.device_keys import OneTimeKey, upload_txn

        dk = {"user_id": "@a:x", "device_id": "D", "algorithms": [], "keys": {}}
        otks = [OneTimeKey("signed_curve25519", f"k{i}", '"x"') for i in range(5)]
        self.assertEqual(
            await self.trips(lambda c: upload_txn(c, "@a:x", "D", dk, otks, [], 1)), 3
        )

    async def test_cross_signing_upload(self) -> None:
        from synapse_xsign_module.storage.cross_signing import (
            NewKey,
            replace_keys_txn,
        )

        expected: dict[str, str | None] = {
            "master": None,
            "self_signing": None,
            "user_signing": None,
        }
        new = {"master": NewKey("pub", '{"k":1}')}
        self.assertEqual(
            await self.trips(lambda c: replace_keys_txn(c, "@a:x", expected, new, 1)),
            3,
        )

    async def test_signatures_upload(self) -> None:
        from synapse_xsign_module.storage.signatures import (
            Basis,
            PendingSignature,
            store_signatures_txn,
        )

        signer = Basis("@a:x", "self_signing", "ssk", "{}")
        target = Basis("@a:x", "device", "D", "{}")
        pending = [
            PendingSignature("@a:x", "ed25519:ssk", "@a:x", "D", "sig", signer, target)
        ]
        versions: dict[str, int | None] = {"@a:x": None}
        self.assertEqual(
            await self.trips(lambda c: store_signatures_txn(c, pending, 1, versions)),
            3,
        )

    async def test_signature_context(self) -> None:
        """The four reads a signature upload is checked against (versions,
        cross-signing keys, devices, stored signatures) share one round trip."""
        from synapse_xsign_module.storage.signatures import load_context_txn

        def read(conn: Connection) -> None:
            load_context_txn(conn, "@a:x", ["@b:x"], ["D1", "D2"])

        self.assertEqual(await self.trips(read, read=True), 1)


class CommitWithPipelineTest(DatabaseTestCase):
    """A transaction function marked ``commits_in_pipeline`` sends its COMMIT
    with its last pipelined statements on PostgreSQL; elsewhere, or called
    from another transaction function, it commits at the end as usual."""

    def setUp(self) -> None:
        super().setUp()
        self.commit_status: list[str] = []

        def on_commit(conn: Connection) -> None:
            # What the driver's transaction was when SQLAlchemy committed.
            if self.is_postgres:
                info = conn.connection.driver_connection.info  # type: ignore[union-attr]
                self.commit_status.append(info.transaction_status.name)

        event.listen(self.db.engine, "commit", on_commit)
        self.addCleanup(event.remove, self.db.engine, "commit", on_commit)

    async def test_commit_goes_with_the_writes(self) -> None:
        """The COMMIT is among the block's statements; the transaction's own
        commit finds nothing left to do."""

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x", "@b:x"))
                commit_with_pipeline(conn)

        await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x"])
        if self.is_postgres:
            self.assertEqual(self.commit_status[0], "IDLE")

    async def test_not_from_inside_another_function(self) -> None:
        """Called from an unmarked transaction function, a marked one does not
        commit: what the outer one does after it is in the same transaction,
        and an error rolls both back."""

        @commits_in_pipeline
        def inner(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                commit_with_pipeline(conn)

        def outer(conn: Connection) -> None:
            inner(conn)
            add_user(conn, "@b:x")
            raise ValueError("after both")

        with self.assertRaises(ValueError):
            await self.db.run("outer", outer)
        self.assertEqual(await self.all_users(), [])

        def outer_ok(conn: Connection) -> None:
            inner(conn)
            add_user(conn, "@b:x")

        self.commit_status.clear()
        await self.db.run("outer", outer_ok)
        if self.is_postgres:
            self.assertEqual(self.commit_status, ["INTRANS"])
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x"])

    async def test_failed_statement_skips_the_commit(self) -> None:
        """A unique violation in a block asked to commit: nothing of the
        transaction stays, and the connection serves the next one."""

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                insert_many(conn, host_users, new_users("@a:x"))
                commit_with_pipeline(conn)

        with self.assertRaises(IntegrityError):
            await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), [])
        await self.db.run("ok", lambda conn: add_user(conn, "@next:x"))
        self.assertEqual(await self.all_users(), ["@next:x"])

    async def test_statement_after_the_commit_is_refused(self) -> None:
        """A statement run after the early COMMIT is a programming error:
        raised, and what it did is rolled back."""
        self.require_pipeline()

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                commit_with_pipeline(conn)
            add_user(conn, "@late:x")

        with self.assertRaises(RuntimeError):
            await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), ["@a:x"])

    async def test_statements_after_the_request_in_the_block_commit_with_it(
        self,
    ) -> None:
        """The COMMIT goes behind every statement of the block, those after
        commit_with_pipeline() included; a body that raises after it commits
        nothing."""

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                commit_with_pipeline(conn)
                insert_many(conn, host_users, new_users("@b:x"))

        await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x"])
        if self.is_postgres:
            self.assertEqual(self.commit_status[0], "IDLE")

        @commits_in_pipeline
        def fails(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@c:x"))
                commit_with_pipeline(conn)
                raise ValueError("after the request")

        with self.assertRaises(ValueError):
            await self.db.run("early", fails)
        self.assertEqual(await self.all_users(), ["@a:x", "@b:x"])

    async def test_error_after_the_commit_is_not_retried(self) -> None:
        """An error after the early COMMIT, even a retryable one, is raised as
        a programming error and not retried: what the COMMIT stored stays."""
        self.require_pipeline()
        attempts: list[int] = []

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            attempts.append(1)
            with pipelined(conn):
                insert_many(conn, host_users, new_users(f"@a{len(attempts)}:x"))
                commit_with_pipeline(conn)
            self.raise_retryable(conn)

        with self.assertRaises(RuntimeError):
            await self.db.run("early", txn)
        self.assertEqual(len(attempts), 1)
        self.assertEqual(await self.all_users(), ["@a1:x"])

    async def test_nested_block_is_refused(self) -> None:
        """Only an outermost block may end the transaction: statements of the
        outer one after the inner one would run after the COMMIT."""
        self.require_pipeline()

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            with pipelined(conn):
                insert_many(conn, host_users, new_users("@a:x"))
                with pipelined(conn):
                    commit_with_pipeline(conn)
                insert_many(conn, host_users, new_users("@b:x"))

        with self.assertRaises(RuntimeError):
            await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), [])

    async def test_outside_a_pipeline_is_refused(self) -> None:
        self.require_pipeline()

        @commits_in_pipeline
        def txn(conn: Connection) -> None:
            add_user(conn, "@a:x")
            commit_with_pipeline(conn)

        with self.assertRaises(RuntimeError):
            await self.db.run("early", txn)
        self.assertEqual(await self.all_users(), [])

    async def test_key_changes_commit_with_their_writes(self) -> None:
        """The three key-changing transactions end with their writes: on
        PostgreSQL the transaction's own commit has nothing left to do."""
        from synapse_xsign_module.storage.cross_signing import (
            NewKey,
            replace_keys_txn,
        )
        from synapse_xsign_module.storage.device_keys import OneTimeKey, upload_txn
        from synapse_xsign_module.storage.signatures import (
            Basis,
            PendingSignature,
            store_signatures_txn,
        )
        from synapse_xsign_module.storage.versions import get_versions_txn

        dk = {"user_id": "@a:x", "device_id": "D", "algorithms": [], "keys": {}}
        otks = [OneTimeKey("signed_curve25519", f"k{i}", '"x"') for i in range(5)]
        expected: dict[str, str | None] = {
            "master": None,
            "self_signing": None,
            "user_signing": None,
        }
        new = {"master": NewKey("pub", '{"k":1}')}
        await self.db.run("upload", upload_txn, "@a:x", "D", dk, otks, [], 1)
        await self.db.run("xsign", replace_keys_txn, "@a:x", expected, new, 1)
        if self.is_postgres:
            self.assertEqual(self.commit_status, ["IDLE", "IDLE"])
        signer = Basis("@a:x", "self_signing", "ssk", "{}")
        target = Basis("@a:x", "device", "D", "{}")
        pending = [
            PendingSignature("@a:x", "ed25519:ssk", "@a:x", "D", "sig", signer, target)
        ]
        # As read before the (here pretended) verification: unchanged since.
        versions: dict[str, int | None] = dict(
            await self.db.run_read("v", get_versions_txn, ["@a:x"])
        )
        self.commit_status.clear()
        await self.db.run("sigs", store_signatures_txn, pending, 1, versions)
        if self.is_postgres:
            self.assertEqual(self.commit_status, ["IDLE"])

        def stored(conn: Connection) -> tuple[int, ...]:
            return tuple(
                conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in (
                    "xsign_device_keys",
                    "xsign_one_time_keys",
                    "xsign_cross_signing_keys",
                    "xsign_signatures",
                )
            )

        self.assertEqual(await self.db.run_read("count", stored), (1, 5, 1, 1))


class ConnectionReuseTest(DatabaseTestCase):
    """Pool threads keep their connection between transactions."""

    async def test_connections_kept_then_closed(self) -> None:
        """Connections stay open between transactions; close() returns them all."""
        for _ in range(3):
            await self.db.run("w", lambda conn: None)
            await self.db.run_read("r", lambda conn: None)
        self.assertGreater(self.db.engine.pool.checkedout(), 0)  # type: ignore[attr-defined]
        self.db.close()
        self.assertEqual(self.db.engine.pool.checkedout(), 0)  # type: ignore[attr-defined]

    async def test_failed_read_leaves_connection_usable(self) -> None:
        """A read that ran a statement and then failed leaves its kept
        connection ready for the next read and the next write."""

        def read_then_fail(conn: Connection) -> None:
            conn.execute(select(func.count()).select_from(host_users)).scalar_one()
            raise ValueError("the caller's own error")

        def count(conn: Connection) -> int:
            return int(
                conn.execute(select(func.count()).select_from(host_users)).scalar_one()
            )

        for _ in range(2):  # the failing read may land on either pool thread
            with self.assertRaises(ValueError):
                await self.db.run_read("fails", read_then_fail)
        for i in range(4):
            self.assertEqual(await self.db.run_read("r", count), i)
            await self.db.run("w", add_user, f"@after{i}:x")
        self.assertEqual(len(await self.all_users()), 4)


class MaxAttemptsTest(DatabaseTestCase):
    """max_attempts bounds the retries."""

    max_attempts = 3

    def setUp(self) -> None:
        super().setUp()
        self.log = capture_logs(self, "synapse_xsign_module.storage.database")

    async def test_max_attempts_bounds_retries(self) -> None:
        """A function that always fails retryably runs max_attempts times, then fails."""
        attempts: list[int] = []

        def fn(conn: Connection) -> None:
            attempts.append(1)
            add_user(conn, f"@try{len(attempts)}:x")
            self.raise_retryable(conn)

        with self.assertRaises(DBAPIError) as cm:
            await self.db.run("always", fn)
        self.assertTrue(is_retryable(cm.exception))
        self.assertEqual(len(attempts), 3)
        self.assertEqual(self.db.retries, 2)
        self.assertEqual(await self.all_users(), [])

    async def test_single_attempt_means_no_retry(self) -> None:
        """With max_attempts = 1 a retryable error is raised at once."""
        self.db.max_attempts = 1
        attempts: list[int] = []

        def fn(conn: Connection) -> None:
            attempts.append(1)
            self.raise_retryable(conn)

        with self.assertRaises(DBAPIError):
            await self.db.run("once", fn)
        self.assertEqual(attempts, [1])
        self.assertEqual(self.db.retries, 0)


class IsRetryableTest(unittest.TestCase):
    """is_retryable on the errors drivers raise."""

    def test_not_a_database_error(self) -> None:
        """Exceptions that are not DB-API errors are never retried."""
        self.assertFalse(is_retryable(ValueError("database is locked")))
        self.assertFalse(is_retryable(RuntimeError("40001")))

    def test_sqlite_locked(self) -> None:
        """SQLite's "database is locked" is retried; other operational errors are not."""
        locked = OperationalError(
            "x", None, sqlite3.OperationalError("database is locked")
        )
        self.assertTrue(is_retryable(locked))
        no_table = OperationalError(
            "x", None, sqlite3.OperationalError("no such table: t")
        )
        self.assertFalse(is_retryable(no_table))

    def test_sqlstates(self) -> None:
        """40001, 40P01 and class 08 are retried; other SQLSTATEs are not."""
        for state in ("40001", "40P01", "08006", "08003"):
            self.assertTrue(
                is_retryable(DBAPIError("x", None, _FakePgError("e", state))), state
            )
        for other in ("23505", "42P01", "22P02", None):
            self.assertFalse(
                is_retryable(DBAPIError("x", None, _FakePgError("e", other))), other
            )

    def test_psycopg2_pgcode(self) -> None:
        """The SQLSTATE is also read from psycopg2's ``pgcode``."""
        err = DBAPIError("x", None, _FakePsycopg2Error("e", "40001"))
        self.assertTrue(is_retryable(err))
        err = DBAPIError("x", None, _FakePsycopg2Error("e", "23505"))
        self.assertFalse(is_retryable(err))

    def test_integrity_error(self) -> None:
        """A constraint violation is not retried."""
        err = IntegrityError(
            "x", None, sqlite3.IntegrityError("UNIQUE constraint failed")
        )
        self.assertFalse(is_retryable(err))

    def test_invalidated_connection(self) -> None:
        """An error that invalidated the connection is retried."""
        err = DBAPIError("x", None, Exception("gone"), connection_invalidated=True)
        self.assertTrue(is_retryable(err))

    def test_closed_connection_message(self) -> None:
        """An operational error saying the server closed the connection is retried."""
        err = OperationalError(
            "x", None, Exception("server closed the connection unexpectedly")
        )
        self.assertTrue(is_retryable(err))
        err = OperationalError("x", None, Exception("connection lost"))
        self.assertTrue(is_retryable(err))


class LifecycleTest(DatabaseTestCase):
    """Starting, closing, and the engine's connection settings."""

    async def test_close_stops_the_pool(self) -> None:
        """close() stops (and joins) the pool's threads and is safe to repeat."""
        threads: list[threading.Thread] = []
        await self.db.run("t", lambda conn: threads.append(threading.current_thread()))
        self.assertTrue(threads[0].is_alive())
        self.db.close()
        self.assertFalse(threads[0].is_alive())
        self.db.close()

    async def test_run_after_close(self) -> None:
        """A closed Database starts a fresh pool when used again."""
        await self.db.run("t", lambda conn: None)
        self.db.close()
        result = await self.db.run("t", lambda conn: 7)
        self.assertEqual(result, 7)

    def test_close_before_start(self) -> None:
        """close() on a Database that never ran anything is harmless."""
        db = Database(self.config, None)
        db.close()
        db.close()

    async def test_sqlite_wal_and_busy_timeout(self) -> None:
        """A SQLite file is in WAL mode with the configured busy timeout and foreign keys."""
        if self.is_postgres:
            raise unittest.SkipTest("SQLite only")

        def pragmas(conn: Connection) -> tuple[Any, Any, Any]:
            return (
                conn.exec_driver_sql("PRAGMA journal_mode").scalar_one(),
                conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one(),
                conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one(),
            )

        self.assertEqual(
            await self.db.run_read("pragmas", pragmas), ("wal", BUSY_TIMEOUT_MS, 1)
        )
        with self.db.engine.connect() as conn:
            self.assertEqual(pragmas(conn), ("wal", BUSY_TIMEOUT_MS, 1))

    async def test_postgres_read_committed(self) -> None:
        """PostgreSQL transactions run at READ COMMITTED."""
        if not self.is_postgres:
            raise unittest.SkipTest("PostgreSQL only")
        level = await self.db.run_read(
            "iso",
            lambda conn: conn.exec_driver_sql(
                "SHOW transaction_isolation"
            ).scalar_one(),
        )
        self.assertEqual(level, "read committed")

    async def test_postgres_reads_run_without_a_transaction(self) -> None:
        """On PostgreSQL a read runs in autocommit mode; a write is one transaction."""
        if not self.is_postgres:
            raise unittest.SkipTest("PostgreSQL only")

        def two_clocks(conn: Connection) -> tuple[Any, Any]:
            first = conn.exec_driver_sql("SELECT now()").scalar_one()
            conn.exec_driver_sql("SELECT pg_sleep(0.02)")
            return first, conn.exec_driver_sql("SELECT now()").scalar_one()

        for _ in range(2):  # the same thread switches back and forth
            a, b = await self.db.run_read("read", two_clocks)
            self.assertNotEqual(a, b)  # a transaction per statement
            a, b = await self.db.run("write", two_clocks)
            self.assertEqual(a, b)  # one transaction

    def test_describe_hides_password(self) -> None:
        """describe() renders the URL without its password."""
        db = Database(
            DatabaseConfig(url="postgresql+psycopg://xsign:s3cret@db.invalid/xsign"),
            None,
        )
        self.addCleanup(db.close)
        self.assertNotIn("s3cret", db.describe())
        self.assertEqual(
            db.describe(), "postgresql+psycopg://xsign:***@db.invalid/xsign"
        )
        self.assertEqual(db.engine_name, "postgresql")

    def test_bare_postgresql_url_uses_psycopg3(self) -> None:
        """A bare postgresql:// URL is served by the psycopg (3) driver."""
        db = Database(DatabaseConfig(url="postgresql://u@db.invalid/x"), None)
        self.addCleanup(db.close)
        self.assertEqual(db.engine.dialect.driver, "psycopg")
