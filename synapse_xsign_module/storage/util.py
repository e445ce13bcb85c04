"""Small SQL helpers shared by the stores."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    Connection,
    Dialect,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
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
        rows: the rows, all with the same keys.
        key_columns: the columns of the unique key that conflicts.
        update_columns: the columns to overwrite on conflict.
    """
    if not rows:
        return
    # One statement object per shape (SQLAlchemy caches its compiled form),
    # executed for many rows: SQLAlchemy batches them (insertmanyvalues /
    # executemany) instead of compiling a new VALUES list.
    conn.execute(
        _upsert_statement(
            conn.dialect.name, table, tuple(key_columns), tuple(update_columns)
        ),
        rows,
    )


@functools.lru_cache(maxsize=64)
def _upsert_statement(
    dialect_name: str,
    table: Table,
    key_columns: tuple[str, ...],
    update_columns: tuple[str, ...],
) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    return stmt.on_conflict_do_update(
        index_elements=list(key_columns),
        set_={c: stmt.excluded[c] for c in update_columns},
    )


class _RawCompiled(NamedTuple):
    sql: str
    #: Parameter names in order for a positional driver (SQLite), else None.
    order: tuple[str, ...] | None
    processors: dict[str, Any]
    constants: dict[str, Any]


class RawSelect:
    """A prebuilt SELECT whose rows come straight from the driver's cursor.

    SQLAlchemy compiles the statement once per dialect (the SQL it would send
    itself, casts included); each run binds the parameters, applies the bind
    types' conversions (a :class:`StringList` becomes JSON text on SQLite) and
    fetches every row as a plain tuple. For reads of hundreds of rows this
    skips SQLAlchemy's per-row result machinery, which costs several times
    what the driver does. Only for columns the driver returns as they are
    stored (text and integers): no result conversions are applied.

    Args:
        stmt: the statement; its bound parameters are all named.
    """

    def __init__(self, stmt: Any) -> None:
        self._stmt = stmt
        self._compiled: dict[str, _RawCompiled] = {}

    def _compile(self, dialect: Dialect) -> _RawCompiled:
        compiled = self._stmt.compile(dialect=dialect)
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
        entry = _RawCompiled(compiled.string, order, processors, constants)
        self._compiled[dialect.name] = entry
        return entry

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """Run the statement in ``conn``'s transaction; every row as a tuple."""
        entry = self._compiled.get(conn.dialect.name)
        if entry is None:
            entry = self._compile(conn.dialect)
        sql, order, processors, constants = entry
        values = dict(constants)
        for k, v in params.items():
            processor = processors.get(k)
            values[k] = processor(v) if processor is not None else v
        bound: Any = tuple(values[k] for k in order) if order is not None else values
        driver_error = conn.dialect.loaded_dbapi.Error
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, bound)
            rows: list[Any] = cursor.fetchall()
        except driver_error as e:
            # Wrapped as SQLAlchemy would: retries and dropping a broken
            # connection look for its exception classes.
            raise DBAPIError.instance(
                sql, bound, e, driver_error, dialect=conn.dialect
            ) from e
        finally:
            cursor.close()
        return rows


def lock_users(conn: Connection, user_ids: Iterable[str]) -> None:
    """Serialize key changes per user for the rest of the transaction.

    On PostgreSQL this takes transaction-scoped advisory locks, in a fixed
    order so that two transactions never deadlock on them. SQLite write
    transactions (``BEGIN IMMEDIATE``) are already serialized.

    Args:
        conn: the connection of the current transaction.
        user_ids: users whose keys the transaction reads and then changes.
    """
    users = sorted(set(user_ids))
    if not users or conn.dialect.name != "postgresql":
        return
    conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(k) FROM ("
            " SELECT hashtextextended(u, 7349) AS k FROM unnest(:users) AS u"
            " ORDER BY 1) AS s"
        ).bindparams(bindparam("users", type_=postgresql.ARRAY(postgresql.TEXT))),
        {"users": users},
    )


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
