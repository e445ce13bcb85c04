"""Small SQL helpers shared by the stores."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

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
