"""Small SQL helpers shared by the stores."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    ColumnElement,
    Connection,
    Dialect,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeEngine

T = TypeVar("T")

#: Largest number of bound parameters put into one statement.
MAX_PARAMS = 900


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Split ``items`` into consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def upsert(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    key_columns: list[str],
    update_columns: list[str],
) -> None:
    """Insert rows, replacing the listed columns where the key already exists.

    Args:
        conn: the connection of the current transaction.
        table: the table.
        rows: the rows, all with the same keys (in the same order).
        key_columns: the columns of the unique key that conflicts.
        update_columns: the columns to overwrite on conflict.
    """
    _write_many(conn, table, rows, tuple(key_columns), tuple(update_columns))


def insert_many(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert rows, all with the same keys (in the same order); a key already
    there is an IntegrityError, and the transaction rolls back."""
    _write_many(conn, table, rows, (), ())


def _write_many(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    key_columns: tuple[str, ...],
    update_columns: tuple[str, ...],
) -> None:
    """Insert (with ``key_columns``: upsert) rows: one unnest statement on
    PostgreSQL, else one statement compiled once and run by the driver's
    executemany (no new VALUES list per call, no per-row work in SQLAlchemy)."""
    if not rows:
        return
    if len(rows) > 1 and conn.dialect.name == "postgresql":
        _pg_bulk_insert(conn, table, rows, key_columns, update_columns)
        return
    _insert_statement(
        conn.dialect.name, table, tuple(rows[0]), key_columns, update_columns
    ).execute_many(conn, rows)


@functools.lru_cache(maxsize=64)
def _insert_statement(
    dialect_name: str,
    table: Table,
    columns: tuple[str, ...],
    key_columns: tuple[str, ...],
    update_columns: tuple[str, ...],
) -> RawStatement:
    if not key_columns:
        return RawStatement(table.insert(), column_keys=columns)
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    return RawStatement(
        stmt.on_conflict_do_update(
            index_elements=list(key_columns),
            set_={c: stmt.excluded[c] for c in update_columns},
        ),
        column_keys=columns,
    )


def _pg_bulk_insert(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    key_columns: tuple[str, ...],
    update_columns: tuple[str, ...],
) -> None:
    """Many rows in one PostgreSQL statement (see
    :func:`pg_bulk_insert_statement`). Run as one statement per row, 500
    signatures (or 50 one-time keys) cost PostgreSQL as many executions,
    each with its own index updates and planning; this is one.
    """
    sql, params = pg_bulk_insert_statement(table, rows, key_columns, update_columns)
    with _driver_cursor(conn, sql, params) as cursor:
        cursor.execute(sql, params)


def pg_bulk_insert_statement(
    table: Table,
    rows: list[dict[str, Any]],
    key_columns: tuple[str, ...] = (),
    update_columns: tuple[str, ...] = (),
) -> tuple[str, list[Any]]:
    """The SQL and parameters that insert ``rows`` in one PostgreSQL statement.

    Each column is bound as one array, expanded by ``unnest``; a column
    with the same value (of the same type) in every row, such as the signer,
    the target user and the time of many signatures by one key, is bound
    once instead. Every array element costs psycopg and PostgreSQL work on
    its way in.

    Args:
        table: the table.
        rows: at least one row, all with the same keys (in the same order).
        key_columns: for an upsert, the columns of the unique key that
            conflicts. A key given twice keeps its last row (as one statement
            per row would): one ``ON CONFLICT DO UPDATE`` may not touch a row
            twice.
        update_columns: for an upsert, the columns replaced on a conflict.

    Returns:
        The SQL (psycopg's ``%s`` placeholders) and its parameters.
    """
    if key_columns:
        rows = list({tuple(row[k] for k in key_columns): row for row in rows}.values())
    columns = tuple(rows[0])
    first = rows[0]
    shared = [c for c in columns if _same_in_every_row(rows, c, first[c])]
    if len(shared) == len(columns):
        # One row (or rows alike, with no key): unnest needs an array.
        shared.pop(0)
    shared_set = frozenset(shared)
    sql = _pg_bulk_insert_sql(table, columns, shared_set, key_columns, update_columns)
    params: list[Any] = [first[c] for c in columns if c in shared_set]
    params += [[row[c] for row in rows] for c in columns if c not in shared_set]
    return sql, params


def _same_in_every_row(rows: list[dict[str, Any]], column: str, value: Any) -> bool:
    """Whether every row has ``value`` in ``column``, of the same type
    (``1 == True``, but ``true::bigint`` is an error)."""
    kind = type(value)
    return all(type(v) is kind and v == value for v in (r[column] for r in rows))


def _pg_type(column_type: TypeEngine[Any]) -> str:
    """The unbounded PostgreSQL type a column's values are cast to.

    Never ``varchar(n)``: an explicit cast to ``varchar(n)`` cuts a longer
    value short without an error, whereas the INSERT's own assignment to the
    column refuses it.
    """
    if isinstance(column_type, Boolean):
        return "boolean"
    if isinstance(column_type, BigInteger):
        return "bigint"
    if isinstance(column_type, Integer):
        return "integer"
    if isinstance(column_type, String):  # Text is a String
        return "text"
    raise TypeError(f"no bulk insert type for {column_type!r}")


@functools.lru_cache(maxsize=256)
def _pg_bulk_insert_sql(
    table: Table,
    columns: tuple[str, ...],
    shared: frozenset[str],
    key_columns: tuple[str, ...],
    update_columns: tuple[str, ...],
) -> str:
    """The bulk insert: the ``shared`` columns as scalar parameters (first,
    in column order), then the others as arrays expanded by ``unnest``."""
    spread = [c for c in columns if c not in shared]
    picks = ", ".join(
        f"%s::{_pg_type(table.c[c].type)}" if c in shared else f"u.{c}" for c in columns
    )
    arrays = ", ".join(f"%s::{_pg_type(table.c[c].type)}[]" for c in spread)
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)})"
        f" SELECT {picks} FROM unnest({arrays}) AS u({', '.join(spread)})"
    )
    if not key_columns:
        return sql
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in update_columns)
    return f"{sql} ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET {sets}"


class _RawCompiled(NamedTuple):
    sql: str
    #: Parameter names in order for a positional driver (SQLite), else None.
    order: tuple[str, ...] | None
    processors: dict[str, Any]
    constants: dict[str, Any]
    #: For a statement with neither conversions nor constants: the driver's
    #: parameters from a parameter set (for a positional driver, the values
    #: picked in order in one C call; else the set itself).
    pick: Callable[[dict[str, Any]], Any] | None


def _as_given(params: dict[str, Any]) -> dict[str, Any]:
    return params


def _single(name: str) -> Callable[[dict[str, Any]], tuple[Any]]:
    return lambda params: (params[name],)


class RawStatement:
    """A prebuilt statement run straight on the driver's cursor.

    SQLAlchemy compiles the statement once per dialect (the SQL it would send
    itself, casts included); each run binds the parameters and applies the
    bind types' conversions (a :class:`StringList` becomes JSON text on
    SQLite). :meth:`rows` fetches every row as a plain tuple,
    :meth:`execute` runs a statement that returns none, and
    :meth:`execute_many` runs it once per parameter set. For
    hundreds of rows this skips SQLAlchemy's per-row work (parameter sets in,
    result rows out), which costs several times what the driver does. Rows
    get no result conversions: only for columns the driver returns as they
    are stored (text and integers).

    Args:
        stmt: the statement; its bound parameters are all named.
        column_keys: for an INSERT, the columns each parameter set gives.
    """

    def __init__(self, stmt: Any, column_keys: Sequence[str] | None = None) -> None:
        self._stmt = stmt
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._compiled: dict[str, _RawCompiled] = {}

    def _compile(self, dialect: Dialect) -> _RawCompiled:
        compiled = self._stmt.compile(dialect=dialect, column_keys=self._column_keys)
        processors = {}
        constants = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                if processor is not None:
                    processors[name] = processor
            else:
                # A literal of the statement (e.g. a key type), bound anonymously.
                value = bind.effective_value
                constants[name] = processor(value) if processor else value
        order = tuple(compiled.positiontup) if compiled.positional else None
        pick: Callable[[dict[str, Any]], Any] | None = None
        if not processors and not constants:
            if order is None:
                pick = _as_given
            elif len(order) > 1:
                pick = operator.itemgetter(*order)
            elif order:
                pick = _single(order[0])
        entry = _RawCompiled(compiled.string, order, processors, constants, pick)
        self._compiled[dialect.name] = entry
        return entry

    def _entry(self, conn: Connection) -> _RawCompiled:
        entry = self._compiled.get(conn.dialect.name)
        return entry if entry is not None else self._compile(conn.dialect)

    @staticmethod
    def _bind(entry: _RawCompiled, params: dict[str, Any]) -> Any:
        if entry.pick is not None:
            return entry.pick(params)
        values = dict(entry.constants)
        for k, v in params.items():
            processor = entry.processors.get(k)
            values[k] = processor(v) if processor is not None else v
        if entry.order is None:
            return values
        return tuple(values[k] for k in entry.order)

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """Run the statement in ``conn``'s transaction; every row as a tuple."""
        return self.send(conn, params)()

    def send(self, conn: Connection, params: dict[str, Any]) -> Callable[[], list[Any]]:
        """Run the statement, and return what fetches its rows (once).

        Inside :func:`pipelined`, the statement is only queued. Reads sent
        one after the other in a block and fetched after it reach the server
        together with the block's end and cost one round trip in all, where
        :meth:`rows` called in turn waits for each answer before sending the
        next statement (fetching inside the block also waits, for the answers
        up to the one fetched). The server still runs them in the order sent.
        Elsewhere the statement starts when this returns, but SQLite makes
        the rows as they are fetched: write nothing in between that the read
        must not see.

        The cursor is closed when its rows are fetched; inside
        :func:`closing_sent`, also when they are not (an error in between).
        """
        entry = self._entry(conn)
        bound = self._bind(entry, params)
        driver_error = conn.dialect.loaded_dbapi.Error
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        sent = conn.info.get(_SENT)
        if sent is not None:
            sent.append(cursor)
        try:
            cursor.execute(entry.sql, bound)
        except BaseException as e:
            cursor.close()
            if isinstance(e, driver_error):
                raise _sqlalchemy_error(conn, entry.sql, bound, e) from e
            raise

        def fetch() -> list[Any]:
            try:
                rows: list[Any] = cursor.fetchall()
            except driver_error as e:
                raise _sqlalchemy_error(conn, entry.sql, bound, e) from e
            finally:
                cursor.close()
            return rows

        return fetch

    def execute(self, conn: Connection, params: dict[str, Any]) -> int:
        """Run a statement that returns no rows; the number of rows it changed."""
        entry = self._entry(conn)
        bound = self._bind(entry, params)
        with _driver_cursor(conn, entry.sql, bound) as cursor:
            cursor.execute(entry.sql, bound)
            count: int = cursor.rowcount
        return count

    def execute_many(self, conn: Connection, params: list[dict[str, Any]]) -> None:
        """Run the statement once for each parameter set, in ``conn``'s
        transaction (the driver's ``executemany``)."""
        if params:
            entry = self._entry(conn)
            bound = [self._bind(entry, p) for p in params]
            with _driver_cursor(conn, entry.sql, bound) as cursor:
                cursor.executemany(entry.sql, bound)


@contextlib.contextmanager
def _driver_cursor(conn: Connection, sql: str, bound: Any) -> Iterator[Any]:
    """A cursor of ``conn``'s driver connection, closed afterwards; a driver
    error raised inside is re-raised as SQLAlchemy's (retries and dropping a
    broken connection look for its exception classes)."""
    driver_error = conn.dialect.loaded_dbapi.Error
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    except driver_error as e:
        raise _sqlalchemy_error(conn, sql, bound, e) from e
    finally:
        cursor.close()


def _sqlalchemy_error(
    conn: Connection, sql: str, bound: Any, error: Exception
) -> StatementError:
    """A driver error as SQLAlchemy's exception (retries and dropping a broken
    connection look for its classes)."""
    return DBAPIError.instance(
        sql, bound, error, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
    )


@functools.lru_cache(maxsize=8)
def _can_pipeline(dialect: Dialect) -> bool:
    """psycopg 3 over a libpq with pipeline mode (libpq 14 or newer)."""
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return False
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


#: ``Connection.info`` keys: the innermost :func:`pipelined` block now open
#: (a :class:`_Block`); the running transaction function may commit early
#: (:func:`commits_in_pipeline`); it did.
_BLOCK = "xsign_pipeline_block"
MAY_COMMIT_EARLY = "xsign_may_commit_early"
COMMITTED_EARLY = "xsign_committed_early"

F = TypeVar("F", bound=Callable[..., Any])


def commits_in_pipeline(fn: F) -> F:
    """Mark a transaction function that may end its transaction with its last
    pipelined statements (:func:`commit_with_pipeline`).

    It does so only when it is the transaction's own function, the one given
    to :meth:`Database.run`; called from inside another transaction function,
    its transaction commits at the end as usual.
    """
    fn.xsign_commits_in_pipeline = True  # type: ignore[attr-defined]
    return fn


class _Block:
    """An open :func:`pipelined` block: whether it is inside another one, and
    whether it is to end the transaction."""

    __slots__ = ("nested", "commit")

    def __init__(self, nested: bool) -> None:
        self.nested = nested
        self.commit = False


#: ``Connection.info`` key: the cursors :meth:`RawStatement.send` opened in
#: the innermost :func:`closing_sent` block.
_SENT = "xsign_sent_cursors"


@contextlib.contextmanager
def closing_sent(conn: Connection) -> Iterator[None]:
    """Close, at the end of the block, every cursor that
    :meth:`RawStatement.send` opened inside it and whose rows were not fetched
    (an error came between): not left to the garbage collector, holding a
    statement open on the connection (on SQLite, its read snapshot too).
    """
    # The dict itself: Connection.info raises once the connection is invalid.
    info = conn.info
    outer = info.get(_SENT)
    mine: list[Any] = []
    info[_SENT] = mine
    try:
        yield
    finally:
        info[_SENT] = outer
        for cursor in mine:
            with contextlib.suppress(Exception):
                cursor.close()


@contextlib.contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, send the statements run inside without waiting for each
    one's answer (psycopg's pipeline mode): they reach the server in one go,
    and the answers are read once at the end of the block.

    For statements whose results the block does not use (inserts, updates,
    deletes): a lock held across them is held for one round trip instead of
    one per statement. A read inside the block whose rows are fetched there
    sends what is queued and waits for the answers up to its own: a lock
    statement and the reads behind it cost one round trip. Reads sent with
    :meth:`RawStatement.send` and fetched after the block are answered at its
    end, with no round trip of their own. Such reads must be
    :class:`RawStatement`'s: SQLAlchemy's own result handling looks for the
    rows before they have arrived, and finds none. An error of any
    statement is raised at the end of the block at the latest, as
    SQLAlchemy's exception like every driver error here; the transaction
    then rolls back. Inside the block a statement's
    row count is not known yet (:meth:`RawStatement.execute` returns -1).
    A block may end its transaction (:func:`commit_with_pipeline`).
    Elsewhere (SQLite, another PostgreSQL driver, a libpq without pipeline
    mode) it does nothing.
    """
    if not _can_pipeline(conn.dialect):
        yield
        return
    driver: Any = conn.connection.driver_connection
    driver_error = conn.dialect.loaded_dbapi.Error
    # The dict itself: Connection.info raises once the connection is invalid.
    info = conn.info
    outer = info.get(_BLOCK)
    block = info[_BLOCK] = _Block(nested=outer is not None)
    committed = False
    try:
        with driver.pipeline():
            yield
            if block.commit:
                driver.execute("COMMIT", prepare=False)
                committed = True
    except driver_error as e:
        raise DBAPIError.instance(
            "(pipelined statements)", None, e, driver_error, dialect=conn.dialect
        ) from e
    finally:
        info[_BLOCK] = outer
    if committed:
        info[COMMITTED_EARLY] = True


def commit_with_pipeline(conn: Connection) -> None:
    """Have the :func:`pipelined` block this is called in end the transaction,
    when nothing is to run in the transaction after the block.

    On PostgreSQL, in a function marked :func:`commits_in_pipeline` run as the
    transaction's own function, a COMMIT is queued behind every statement of
    the block once its body has finished without an error: it reaches the
    server with them, one round trip fewer, and the locks they took are
    released as soon as the server has run them, rather than once this thread
    has had their answers and sent a COMMIT of its own (in a busy process,
    after waiting for the GIL meanwhile). A body that raises, or a statement
    that fails, leaves the transaction to roll back as always. The
    transaction's own commit then has nothing left to do; :class:`Database`
    checks that no statement ran after the block. Elsewhere (SQLite, another
    driver, a function called from another one, a read run without a
    transaction) it does nothing: the transaction commits at its end.

    Raises:
        RuntimeError: when it would commit, but is outside a
            :func:`pipelined` block or in one inside another.
    """
    if not conn.info.get(MAY_COMMIT_EARLY) or not _can_pipeline(conn.dialect):
        return
    block = conn.info.get(_BLOCK)
    if block is None or block.nested:
        raise RuntimeError(
            "commit_with_pipeline() outside an outermost pipelined() block"
        )
    driver: Any = conn.connection.driver_connection
    if driver.autocommit:  # run as a read: no transaction to end
        return
    conn.info[MAY_COMMIT_EARLY] = False
    block.commit = True


def lock_users(
    conn: Connection, user_ids: Iterable[str], shared: Iterable[str] = ()
) -> None:
    """Serialize key changes per user for the rest of the transaction.

    On PostgreSQL this takes transaction-scoped advisory locks, in a fixed
    order so that two transactions never deadlock on them. SQLite write
    transactions (``BEGIN IMMEDIATE``) are already serialized.

    A user's lock is taken exclusively, or in shared mode for the users in
    ``shared`` (and not in ``user_ids``): a transaction that only relies on
    such a user's keys staying as they are, and changes nothing that a
    shared holder could also change, lets other such transactions run
    beside it, while every exclusive holder (a key change) waits for it.

    Called inside :func:`pipelined` together with the reads that follow it,
    the lock and those reads reach PostgreSQL in one round trip (after the
    transaction's BEGIN, which psycopg sends on its own): a pipeline's
    statements run in order, so the reads start (and take their snapshot)
    once the lock is held.

    Args:
        conn: the connection of the current transaction.
        user_ids: users whose keys the transaction reads and then changes.
        shared: users whose keys it only reads, and must hold until the end.
    """
    if conn.dialect.name != "postgresql":
        return
    exclusive = set(user_ids)
    readers = set(shared) - exclusive
    if not readers:
        if exclusive:
            _LOCK_USERS.execute(conn, {"users": sorted(exclusive)})
        return
    users = sorted(exclusive | readers)
    _LOCK_USERS_MIXED.execute(
        conn, {"users": users, "shared": [u in readers for u in users]}
    )


def lock_device(conn: Connection, user_id: str, device_id: str) -> None:
    """Serialize the uploads of one device, and every upload against the
    user's key changes, for the rest of the transaction.

    On PostgreSQL: the user's lock (:func:`lock_users`) in shared mode, then
    an exclusive lock on the device, in one statement. Uploads for different
    devices of one user (a client's several sessions signing in at once) no
    longer wait for each other; an upload and a change that takes the user's
    lock exclusively (cross-signing keys, its own signatures, the admin API) still
    exclude each other. (A signature store over the user's master key by
    another user holds the user's lock shared too, and goes on beside the
    upload.) The shared lock comes first, always: a device lock
    held while waiting behind a queued exclusive request could deadlock. On
    SQLite, writers are serial anyway. Like :func:`lock_users`, it may be
    pipelined with the reads that follow it.
    """
    if conn.dialect.name != "postgresql":
        return
    _LOCK_DEVICE.execute(conn, {"user": user_id, "device": f"{user_id}\n{device_id}"})


class StringList(TypeDecorator[list[str]]):
    """A list of strings bound as one parameter: a JSON array on SQLite, an
    array on PostgreSQL (see :func:`any_of`)."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(Text))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.dumps(list(value))


class _AnyOf(ColumnElement[bool]):
    """``column`` equals one of the strings in a :class:`StringList` parameter."""

    inherit_cache = True
    type = Boolean()
    # A condition in itself: SQLite needs no "= 1" after it.
    _is_implicitly_boolean = True

    def __init__(self, column: ColumnElement[Any], param: BindParameter[Any]) -> None:
        self.column = column
        self.param = param

    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("param", InternalTraversal.dp_clauseelement),
    ]


@compiles(_AnyOf, "postgresql")
def _any_of_pg(element: _AnyOf, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"{column} = ANY({compiler.process(element.param, **kw)})"


@compiles(_AnyOf)
def _any_of_sqlite(element: _AnyOf, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    param = compiler.process(element.param, **kw)
    return f"{column} IN (SELECT value FROM json_each({param}))"


def any_of(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``column IN (...)`` with the whole list bound as one parameter ``name``.

    A statement built with it compiles once for any length of list, and the
    list is passed to the driver as one value: no per-element work in
    SQLAlchemy, which otherwise costs more than the query for long lists.
    """
    return _AnyOf(column, bindparam(name, type_=StringList()))


#: Seeds of the advisory lock keys (hashtextextended): a user's lock, taken
#: exclusively by lock_users and shared by lock_device, must be the same key.
_USER_LOCK_SEED = 7349
_DEVICE_LOCK_SEED = 7350

# The user's lock shared, then the device's: MATERIALIZED makes PostgreSQL
# take the first before it evaluates the second.
_LOCK_DEVICE = RawStatement(
    text(
        "WITH u AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared("
        f"hashtextextended(:user, {_USER_LOCK_SEED})) AS x)"
        " SELECT pg_advisory_xact_lock("
        f"hashtextextended(:device, {_DEVICE_LOCK_SEED})) FROM u"
    )
)

# Runs on every key-changing transaction: prebuilt, on the driver's cursor.
_LOCK_USERS = RawStatement(
    text(
        "SELECT pg_advisory_xact_lock(k) FROM ("
        f" SELECT hashtextextended(u, {_USER_LOCK_SEED}) AS k FROM unnest(:users) AS u"
        " ORDER BY 1) AS s"
    ).bindparams(bindparam("users", type_=StringList()))
)

# Each user's lock in its own mode, in the same order as _LOCK_USERS. Two
# users whose keys collide share one lock, exclusive if either needs it.
_LOCK_USERS_MIXED = RawStatement(
    text(
        "SELECT CASE WHEN s THEN pg_advisory_xact_lock_shared(k)"
        " ELSE pg_advisory_xact_lock(k) END FROM ("
        f" SELECT hashtextextended(u, {_USER_LOCK_SEED}) AS k, bool_and(s) AS s"
        " FROM unnest(:users, :shared) AS t(u, s) GROUP BY 1 ORDER BY 1) AS x"
    ).bindparams(
        bindparam("users", type_=StringList()),
        bindparam("shared", type_=postgresql.ARRAY(Boolean)),
    )
)
