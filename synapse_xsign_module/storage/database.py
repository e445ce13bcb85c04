"""The Database: one transaction per unit of work, run in a dedicated thread pool.

Every store method hands a function ``fn(conn, *args)`` to :meth:`Database.run`.
It runs in the database thread pool (never on the reactor thread) inside one
transaction, and is retried a bounded number of times when the database reports
a serialization failure or deadlock (PostgreSQL ``40001`` / ``40P01``), a
locked database (SQLite) or a dropped connection. ``fn`` must therefore be safe
to run again from the start.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool

from twisted.internet import defer, threads
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from synapse_xsign_module.config import DatabaseConfig
from synapse_xsign_module.errors import ConfigError
from synapse_xsign_module.metrics import DB_RETRIES, DB_TRANSACTIONS
from synapse_xsign_module.storage.util import COMMITTED_EARLY, MAY_COMMIT_EARLY

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

#: Runs a function in a thread pool and returns an awaitable of its result. The
#: embedded host uses Twisted's deferToThreadPool; inside Synapse the module uses
#: ``ModuleApi.defer_to_threadpool`` so that Synapse's log contexts stay right.
PoolRunner = Callable[[ThreadPool, Callable[[], T]], Awaitable[T]]


#: Connections beyond one per pool thread (each thread keeps its own): for
#: migrations and other work outside the pool.
SPARE_CONNECTIONS = 2


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed transaction may be retried from the start.

    Args:
        exc: the exception the transaction raised.

    Returns:
        True for serialization failures, deadlocks, a locked SQLite database
        and connections that dropped; False for everything else.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    if sqlstate is not None and str(sqlstate).startswith("08"):
        # connection_exception class: the server went away mid-transaction.
        return True
    if isinstance(exc, OperationalError):
        text = str(orig).lower()
        return (
            "database is locked" in text
            or "server closed the connection" in text
            or "connection" in text
            and ("closed" in text or "lost" in text or "terminat" in text)
        )
    return False


def create_db_engine(config: DatabaseConfig) -> Engine:
    """Build the SQLAlchemy engine for a database URL.

    SQLite files get WAL mode, a busy timeout and foreign keys; write
    transactions start with ``BEGIN IMMEDIATE`` so that two writers queue on the
    busy timeout instead of failing to upgrade a read lock. A missing parent
    directory of the SQLite file is created.

    Args:
        config: the database section of the configuration.

    Returns:
        The engine.
    """
    url = make_url(config.url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        in_memory = database in ("", ":memory:")
        if not in_memory:
            parent = os.path.dirname(os.path.abspath(database))
            os.makedirs(parent, exist_ok=True)
        busy_s = config.sqlite_busy_timeout_ms / 1000.0
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": busy_s},
        }
        if in_memory:
            kwargs["poolclass"] = StaticPool
        else:
            kwargs["pool_size"] = config.threads() + 1  # + the writer thread
            kwargs["max_overflow"] = SPARE_CONNECTIONS
        engine = create_engine(url, **kwargs)
        _setup_sqlite(engine, config.sqlite_busy_timeout_ms, wal=not in_memory)
        return engine

    if url.get_backend_name() == "postgresql" and url.get_driver_name() in (
        "psycopg2",
        "",
    ):
        # A bare postgresql:// URL means psycopg 3, the driver we ship with.
        url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() == "psycopg":
        # Every statement planned for its own parameters, as psycopg 2 (and
        # Synapse) do: psycopg 3 otherwise prepares a statement on the server
        # after 5 runs, and PostgreSQL may then keep one generic plan for it.
        # A plan made while a table was nearly empty stays in use as the table
        # grows (until an ANALYZE): W3 of the benchmark fell to half its speed
        # after W1 and W2 had filled the tables, the server process waiting on
        # the database. The same arrays of 1 or 500 user ids also share one
        # generic plan. Planning each time measured within the noise.
        connect_args["prepare_threshold"] = None
    try:
        engine = create_engine(
            url,
            pool_size=config.threads(),
            max_overflow=SPARE_CONNECTIONS,
            pool_pre_ping=True,
            isolation_level="READ COMMITTED",
            connect_args=connect_args,
        )
    except ImportError as e:
        raise ConfigError(
            "database.url",
            f"this URL needs a driver that is not installed ({e.name}); "
            "install 'synapse_xsign_module[postgres]'",
        ) from e
    if engine.dialect.driver == "psycopg":
        _setup_psycopg(engine)
    return engine


def _setup_psycopg(engine: Engine) -> None:
    """Send list parameters (arrays) in PostgreSQL's binary format.

    In the text format, psycopg escapes every element of an array with a
    regular expression: for the 50 one-time keys of one ``/keys/upload``, whose
    JSON is full of quotes, that cost more CPU than everything else the
    request does. Binary array elements are sent as they are.
    """
    from psycopg.types.array import ListBinaryDumper

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.adapters.register_dumper(list, ListBinaryDumper)


def _setup_sqlite(engine: Engine, busy_timeout_ms: int, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if wal:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("xsign_write", True)
        statement = "BEGIN IMMEDIATE" if write else "BEGIN"
        # Straight to the driver: this runs for every transaction, and going
        # through SQLAlchemy's statement machinery costs more than the BEGIN.
        driver: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        try:
            if write:
                _begin_immediate(driver, busy_timeout_ms)
            else:
                driver.execute(statement)
        except sqlite3.Error as e:
            # Wrapped as SQLAlchemy would, so that "database is locked" retries.
            raise OperationalError(statement, None, e) from e


#: Seconds between attempts to take SQLite's write lock while another
#: process's writer holds it: short, as its transactions are.
_WRITE_LOCK_WAITS = (0.0001, 0.0002, 0.0005, 0.001, 0.002)


#: SQLITE_BUSY, the primary result code of every "busy" error (extended codes
#: such as SQLITE_BUSY_SNAPSHOT carry it in their low byte).
_SQLITE_BUSY = 5


def _is_busy(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite answered "busy": the lock is held by another connection.

    From the result code where Python gives it (3.11+), else from the message.
    """
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _begin_immediate(driver: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """``BEGIN IMMEDIATE``, waiting for the write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms... between
    attempts, so a writer that found another process's writer at work (with
    ``--workers``, a transaction of about a millisecond) slept up to tens of
    milliseconds after the lock was free: sqlite-2 W1's p99 was twice
    sqlite-1's. Here the handler is off while the lock is sought, and the
    attempts come every 0.1 to 2 ms, for at most ``busy_timeout_ms``; then the
    "database is locked" error is raised (and the transaction retried).
    """
    driver.execute("PRAGMA busy_timeout=0")
    try:
        deadline: float | None = None
        attempt = 0
        while True:
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + busy_timeout_ms / 1000.0
                if now >= deadline:
                    raise
                wait = _WRITE_LOCK_WAITS[min(attempt, len(_WRITE_LOCK_WAITS) - 1)]
                attempt += 1
                time.sleep(min(wait, deadline - now))
    finally:
        driver.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


def _name(fn: Callable[..., Any]) -> str:
    """A transaction function's name, for an error."""
    return str(getattr(fn, "__name__", fn))


def _run_checked(
    conn: Connection,
    fn: Callable[Concatenate[Connection, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn`` as its transaction's function. If it committed early
    (:func:`commit_with_pipeline`), check that nothing ran after the COMMIT.

    A statement run after it would have started a transaction of its own,
    committed apart from the rest: a programming error, made loud here (what
    ran after the COMMIT is rolled back). So is an error raised after the
    COMMIT, which is not retried: what the COMMIT stored stays.
    """
    # The dict itself: Connection.info raises once the connection is invalid.
    info = conn.info
    info[COMMITTED_EARLY] = False
    info[MAY_COMMIT_EARLY] = getattr(fn, "xsign_commits_in_pipeline", False)
    try:
        result = fn(conn, *args, **kwargs)
    except Exception as e:
        if info.get(COMMITTED_EARLY):
            raise RuntimeError(
                f"{_name(fn)!r} failed after its commit_with_pipeline(): what "
                "came before is stored"
            ) from e
        raise
    finally:
        info[MAY_COMMIT_EARLY] = False
    if info[COMMITTED_EARLY]:
        from psycopg.pq import TransactionStatus  # only psycopg commits early

        driver: Any = conn.connection.driver_connection
        if driver.info.transaction_status != TransactionStatus.IDLE:
            raise RuntimeError(
                f"{_name(fn)!r} ran statements after its commit_with_pipeline()"
            )
    return result


class Database:
    """SQL access for the module: transactions in a dedicated thread pool.

    Args:
        config: the database section of the configuration.
        reactor: the reactor that results are delivered to.
        runner: how to run a function in the pool; defaults to
            :func:`twisted.internet.threads.deferToThreadPool`.
        engine: an existing engine (tests); built from ``config`` if omitted.
    """

    def __init__(
        self,
        config: DatabaseConfig,
        reactor: Any,
        runner: PoolRunner[Any] | None = None,
        engine: Engine | None = None,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self.engine = engine or create_db_engine(config)
        self._pool = ThreadPool(
            minthreads=1, maxthreads=config.threads(), name="xsign-db"
        )
        # SQLite has one writer at a time: queue this process's writers on one
        # thread (first come, first served) rather than on the busy timeout.
        self._write_pool: ThreadPool | None = (
            ThreadPool(minthreads=1, maxthreads=1, name="xsign-db-write")
            if self.engine.dialect.name == "sqlite"
            else None
        )
        self._runner: PoolRunner[Any] = runner or self._default_runner
        self._started = False
        self._shutdown_trigger: Any = None
        self.max_attempts = config.max_attempts
        #: Counters for the metrics endpoint and tests.
        self.retries = 0
        self.transactions = 0
        self._lock = threading.Lock()
        # Each pool thread keeps its connection between transactions (checking
        # one out of SQLAlchemy's pool for every transaction costs more than a
        # small transaction). An in-memory SQLite database is one connection
        # shared by every thread (StaticPool): there, connect per transaction.
        self._persistent = not isinstance(self.engine.pool, StaticPool)
        self._autocommit_reads = self.engine.dialect.name == "postgresql"
        self._local = threading.local()
        self._open: set[Connection] = set()

    @property
    def reactor(self) -> Any:
        """The reactor the transactions answer on (None for command-line use)."""
        return self._reactor

    @property
    def engine_name(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def describe(self) -> str:
        """The database URL with any password hidden, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def start(self) -> None:
        """Start the thread pool and stop it when the reactor shuts down."""
        if self._started:
            return
        if self._pool.joined:
            # Stopped by close(): a ThreadPool cannot be restarted.
            self._pool = ThreadPool(
                minthreads=1, maxthreads=self._config.threads(), name="xsign-db"
            )
            if self._write_pool is not None:
                self._write_pool = ThreadPool(
                    minthreads=1, maxthreads=1, name="xsign-db-write"
                )
        self._pool.start()
        if self._write_pool is not None:
            self._write_pool.start()
        self._started = True
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self.close
        )

    def close(self) -> None:
        """Stop the thread pool and close every pooled connection."""
        if self._started:
            self._started = False
            self._pool.stop()
            if self._write_pool is not None:
                self._write_pool.stop()
            if self._shutdown_trigger is not None:
                try:
                    self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                except (ValueError, KeyError):
                    pass  # already fired: we are being called by it
                self._shutdown_trigger = None
        # The pool threads have stopped: nothing uses their connections now.
        with self._lock:
            kept, self._open = list(self._open), set()
        for conn in kept:
            self._close_quietly(conn)
        self.engine.dispose()

    @staticmethod
    def _close_quietly(conn: Connection) -> None:
        try:
            conn.close()
        except Exception as e:  # a dead connection may fail to close
            logger.debug("Closing a database connection failed: %s", e)

    def _thread_connection(self) -> Connection:
        """This thread's connection, opened on first use or after a failure."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect()
            self._local.conn = conn
            self._local.mode = None
            with self._lock:
                self._open.add(conn)
        return conn

    def _drop_thread_connection(self, conn: Connection) -> None:
        """Forget and close a connection after a database error."""
        self._local.conn = None
        with self._lock:
            self._open.discard(conn)
        self._close_quietly(conn)

    def _transaction(
        self,
        write: bool,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn`` once inside one transaction; commit or roll back."""
        if not self._persistent:
            with self.engine.connect() as conn:
                conn.execution_options(xsign_write=write)
                with conn.begin():
                    return _run_checked(conn, fn, *args, **kwargs)
        conn = self._thread_connection()
        try:
            if self._autocommit_reads:
                # At READ COMMITTED every statement reads its own snapshot, so a
                # reading transaction gains nothing from BEGIN/COMMIT but two
                # round trips: reads run in autocommit mode instead.
                mode = "READ COMMITTED" if write else "AUTOCOMMIT"
                if self._local.mode != mode:
                    conn.execution_options(isolation_level=mode)
                    self._local.mode = mode
            conn.execution_options(xsign_write=write)
            with conn.begin():
                return _run_checked(conn, fn, *args, **kwargs)
        except DBAPIError:
            # The connection may be broken: the next attempt opens another.
            self._drop_thread_connection(conn)
            raise

    def _default_runner(self, pool: ThreadPool, fn: Callable[[], T]) -> Awaitable[T]:
        return threads.deferToThreadPool(self._reactor, pool, fn)

    def run(
        self,
        desc: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Run ``fn(conn, *args, **kwargs)`` as one write transaction.

        Args:
            desc: a short name for logs.
            fn: the unit of work; it may run more than once.
            *args: passed to ``fn``.
            **kwargs: passed to ``fn``.

        Returns:
            A Deferred firing with what ``fn`` returned.
        """
        return self._run(desc, True, fn, *args, **kwargs)

    def run_read(
        self,
        desc: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Like :meth:`run`, for a transaction that only reads.

        On PostgreSQL it runs in autocommit mode (no BEGIN/COMMIT round trips):
        at READ COMMITTED each statement sees what was committed when it
        started, in a transaction or not. On SQLite it is one read transaction
        (one snapshot for all its statements).
        """
        return self._run(desc, False, fn, *args, **kwargs)

    def _run(
        self,
        desc: str,
        write: bool,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        if not self._started:
            self.start()

        def work() -> T:
            return self.run_in_thread(desc, write, fn, *args, **kwargs)

        pool = (
            self._write_pool if write and self._write_pool is not None else self._pool
        )
        return defer.ensureDeferred(self._await(pool, work))

    async def _await(self, pool: ThreadPool, work: Callable[[], T]) -> T:
        result: T = await self._runner(pool, work)
        return result

    def run_in_thread(
        self,
        desc: str,
        write: bool,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run one transaction with retries in the calling thread.

        Used by :meth:`run` from the pool, and directly by command-line tools
        that have no reactor. Refuses to run on the reactor thread.
        """
        if threadable.isInIOThread() and self._reactor is not None:
            raise RuntimeError(f"SQL transaction {desc!r} on the reactor thread")
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._transaction(write, fn, *args, **kwargs)
                with self._lock:
                    self.transactions += 1
                DB_TRANSACTIONS.labels(desc).inc()
                return result
            except Exception as e:
                if attempt >= self.max_attempts or not is_retryable(e):
                    raise
                with self._lock:
                    self.retries += 1
                DB_RETRIES.labels(desc).inc()
                delay = min(0.5, 0.01 * (2 ** (attempt - 1))) * (0.5 + random.random())
                logger.warning(
                    "Transaction %s failed (attempt %d of %d), retrying in %.3fs: %s",
                    desc,
                    attempt,
                    self.max_attempts,
                    delay,
                    e,
                )
                time.sleep(delay)
