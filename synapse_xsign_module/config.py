"""The module's configuration: one frozen object parsed from the ``config:`` mapping.

The same mapping is read from ``homeserver.yaml`` (Synapse host) and from the
embedded host's YAML file. Unknown keys and values of the wrong type are rejected
with a :class:`~synapse_xsign_module.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import attr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from synapse_xsign_module.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///data/synapse-xsign.db"

_T = TypeVar("_T")


@attr.s(frozen=True, auto_attribs=True, slots=True)
class DatabaseConfig:
    """Where and how the module keeps its tables.

    Attributes:
        url: SQLAlchemy URL; ``sqlite:///path`` or ``postgresql+psycopg://...``.
        threadpool_size: threads (and pooled connections) for SQL; None means
            the engine's default (see :meth:`threads`).
        sqlite_busy_timeout_ms: how long SQLite waits on a locked database.
        max_attempts: attempts per transaction on serialization failure,
            deadlock or a dropped connection.
    """

    url: str = DEFAULT_DATABASE_URL
    threadpool_size: int | None = None
    sqlite_busy_timeout_ms: int = 5000
    max_attempts: int = 5

    def threads(self) -> int:
        """The thread-pool size in effect.

        SQLite defaults to 2: more threads only contend for Python's GIL
        (measured: W3 +18%, W6 +29% against 10), and its writes get one thread
        of their own anyway. PostgreSQL defaults to 10.
        """
        if self.threadpool_size is not None:
            return self.threadpool_size
        return 2 if self.url.startswith("sqlite") else 10


@attr.s(frozen=True, auto_attribs=True, slots=True)
class UIAConfig:
    """User-interactive auth as run by the embedded host.

    Attributes:
        session_timeout_ms: lifetime of a UIA session.
        allow_dummy: offer ``m.login.dummy`` as an alternative flow.
    """

    session_timeout_ms: int = 10 * 60 * 1000
    allow_dummy: bool = False


@attr.s(frozen=True, auto_attribs=True, slots=True)
class EmbeddedConfig:
    """Settings used only by the embedded (standalone) host.

    Attributes:
        server_name: the Matrix server name of local users.
        bind_address: address to listen on.
        port: TCP port to listen on.
        x_forwarded: trust ``X-Forwarded-For`` for the client address in the log.
        access_log: write one line per request.
        metrics_port: serve Prometheus metrics at ``/metrics`` on this port
            (None: not served).
        metrics_bind_address: address of the metrics listener.
        token_cache_ms: how long a verified access token is remembered (0: not
            at all). A token revoked by another process (``--workers``) keeps
            working here for at most this long.
        gc_thresholds: the cyclic garbage collector's three generation
            thresholds (``gc.set_threshold``); None keeps Python's.
    """

    server_name: str = "localhost"
    bind_address: str = "127.0.0.1"
    port: int = 8008
    x_forwarded: bool = False
    access_log: bool = True
    metrics_port: int | None = None
    metrics_bind_address: str = "127.0.0.1"
    token_cache_ms: int = 2000
    gc_thresholds: tuple[int, int, int] | None = (100_000, 50, 1000)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class XSignConfig:
    """The whole module configuration.

    Attributes:
        database: see :class:`DatabaseConfig`.
        max_request_body_size: largest request body accepted, in bytes.
        uia: see :class:`UIAConfig`.
        replacement_window_ms: length of the admin-granted window in which a
            user may replace the master key without UIA.
        key_query_cache_mb: how many megabytes of users' rendered keys each
            process keeps for ``/keys/query``; 0 keeps none.
        verification_processes: worker processes that check the signatures of
            large ``/keys/signatures/upload`` batches; 0 checks them in threads
            of the server process; None means the host's default (see
            :meth:`verification_processes_for`).
        embedded: see :class:`EmbeddedConfig`.
    """

    database: DatabaseConfig = DatabaseConfig()
    max_request_body_size: int = 8 * 1024 * 1024
    uia: UIAConfig = UIAConfig()
    replacement_window_ms: int = 10 * 60 * 1000
    key_query_cache_mb: int = 64
    verification_processes: int | None = None
    embedded: EmbeddedConfig = EmbeddedConfig()

    def verification_processes_for(self, embedded: bool, workers: int = 1) -> int:
        """The verification processes in effect, per server process.

        By default the embedded host starts one per core (none on a single
        core): with 8 uploads of 500 signatures in flight (W4), they verified
        about 16% more signatures per second, with a p99 a fifth lower, than
        threads, which wait for the GIL after every signature. The cores are
        those this process may run on (its CPU affinity, which container
        limits by cpuset set). With ``workers`` server processes each still
        gets one per core, but all together get at most twice the cores: one
        process's batch can then use every core while the others are idle
        (``run --workers 2`` on 2 cores: W4 +11% to +15% against one each), and a
        machine with many cores and many workers does not start hundreds.
        Under Synapse the default is none, to leave Synapse's process alone
        unless the operator asks.

        Args:
            embedded: whether the embedded host runs the module.
            workers: server processes sharing the machine (``--workers``).
        """
        if self.verification_processes is not None:
            return self.verification_processes
        cores = usable_cores()
        if not embedded or cores < 2:
            return 0
        return max(1, min(cores, 2 * cores // max(1, workers)))


def usable_cores() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _section(raw: Any, key: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a mapping")
    for name in raw:
        if not isinstance(name, str):
            raise ConfigError(key, f"option names must be strings, got {name!r}")
    return raw


def _check_known(section: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for name in section:
        if name not in known:
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(
                path, f"unknown option (known: {', '.join(sorted(known))})"
            )


def _get(
    section: Mapping[str, Any], prefix: str, name: str, kind: type[_T], default: _T
) -> _T:
    path = f"{prefix}.{name}" if prefix else name
    if name not in section or section[name] is None:
        return default
    value = section[name]
    # bool is a subclass of int: refuse it where a number is wanted.
    if kind is int and isinstance(value, bool):
        raise ConfigError(path, "must be an integer, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(
            path, f"must be of type {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _gc_thresholds(
    section: Mapping[str, Any], default: tuple[int, int, int] | None
) -> tuple[int, int, int] | None:
    if "gc_thresholds" not in section:
        return default
    value = section["gc_thresholds"]
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(v > 0 for v in value)
    ):
        raise ConfigError(
            "embedded.gc_thresholds",
            "must be a list of three positive integers, or null",
        )
    return (value[0], value[1], value[2])


def _metrics_port(section: Mapping[str, Any]) -> int | None:
    value = section.get("metrics_port")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError("embedded.metrics_port", "must be an integer port or null")
    if not 0 <= value <= 65535:
        raise ConfigError("embedded.metrics_port", "must be between 0 and 65535")
    return value


def _optional_positive(path: str, value: int | None) -> int | None:
    return None if value is None else _positive(path, value)


def _optional_non_negative(path: str, value: int | None) -> int | None:
    return None if value is None else _non_negative(path, value)


def _positive(path: str, value: int) -> int:
    if value <= 0:
        raise ConfigError(path, "must be a positive integer")
    return value


def _non_negative(path: str, value: int) -> int:
    if value < 0:
        raise ConfigError(path, "must be zero or a positive integer")
    return value


def parse_config(raw: Mapping[str, Any] | None) -> XSignConfig:
    """Parse and validate the module's ``config:`` mapping.

    Args:
        raw: the mapping as loaded from YAML (``None`` means all defaults).

    Returns:
        The frozen configuration.

    Raises:
        ConfigError: an unknown key or a value of the wrong type or range.
    """
    top = _section(raw, "config")
    _check_known(
        top,
        "",
        {
            "database",
            "max_request_body_size",
            "uia",
            "replacement_window_ms",
            "key_query_cache_mb",
            "verification_processes",
            "embedded",
        },
    )

    db_raw = _section(top.get("database"), "database")
    _check_known(
        db_raw,
        "database",
        {"url", "threadpool_size", "sqlite_busy_timeout_ms", "max_attempts"},
    )
    d = DatabaseConfig()
    url = _get(db_raw, "database", "url", str, d.url)
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ConfigError(
            "database.url",
            f"not a database URL: {url!r} (use sqlite:///path or postgresql://...)",
        ) from None
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            "database.url", "only sqlite:// and postgresql:// URLs are supported"
        )
    database = DatabaseConfig(
        url=url,
        threadpool_size=_optional_positive(
            "database.threadpool_size",
            _get(db_raw, "database", "threadpool_size", int, d.threadpool_size),
        ),
        sqlite_busy_timeout_ms=_positive(
            "database.sqlite_busy_timeout_ms",
            _get(
                db_raw,
                "database",
                "sqlite_busy_timeout_ms",
                int,
                d.sqlite_busy_timeout_ms,
            ),
        ),
        max_attempts=_positive(
            "database.max_attempts",
            _get(db_raw, "database", "max_attempts", int, d.max_attempts),
        ),
    )

    uia_raw = _section(top.get("uia"), "uia")
    _check_known(uia_raw, "uia", {"session_timeout_ms", "allow_dummy"})
    u = UIAConfig()
    uia = UIAConfig(
        session_timeout_ms=_positive(
            "uia.session_timeout_ms",
            _get(uia_raw, "uia", "session_timeout_ms", int, u.session_timeout_ms),
        ),
        allow_dummy=_get(uia_raw, "uia", "allow_dummy", bool, u.allow_dummy),
    )

    emb_raw = _section(top.get("embedded"), "embedded")
    _check_known(
        emb_raw,
        "embedded",
        {
            "server_name",
            "bind_address",
            "port",
            "x_forwarded",
            "access_log",
            "metrics_port",
            "metrics_bind_address",
            "token_cache_ms",
            "gc_thresholds",
        },
    )
    e = EmbeddedConfig()
    port = _get(emb_raw, "embedded", "port", int, e.port)
    if not 0 <= port <= 65535:
        raise ConfigError("embedded.port", "must be between 0 and 65535")
    server_name = _get(emb_raw, "embedded", "server_name", str, e.server_name)
    if not server_name or any(c in server_name for c in "@/ \t"):
        raise ConfigError("embedded.server_name", "must be a valid server name")
    embedded = EmbeddedConfig(
        server_name=server_name,
        bind_address=_get(emb_raw, "embedded", "bind_address", str, e.bind_address),
        port=port,
        x_forwarded=_get(emb_raw, "embedded", "x_forwarded", bool, e.x_forwarded),
        access_log=_get(emb_raw, "embedded", "access_log", bool, e.access_log),
        metrics_port=_metrics_port(emb_raw),
        metrics_bind_address=_get(
            emb_raw, "embedded", "metrics_bind_address", str, e.metrics_bind_address
        ),
        token_cache_ms=_non_negative(
            "embedded.token_cache_ms",
            _get(emb_raw, "embedded", "token_cache_ms", int, e.token_cache_ms),
        ),
        gc_thresholds=_gc_thresholds(emb_raw, e.gc_thresholds),
    )

    c = XSignConfig()
    return XSignConfig(
        database=database,
        max_request_body_size=_positive(
            "max_request_body_size",
            _get(top, "", "max_request_body_size", int, c.max_request_body_size),
        ),
        uia=uia,
        replacement_window_ms=_positive(
            "replacement_window_ms",
            _get(top, "", "replacement_window_ms", int, c.replacement_window_ms),
        ),
        key_query_cache_mb=_non_negative(
            "key_query_cache_mb",
            _get(top, "", "key_query_cache_mb", int, c.key_query_cache_mb),
        ),
        verification_processes=_optional_non_negative(
            "verification_processes",
            _get(top, "", "verification_processes", int, c.verification_processes),
        ),
        embedded=embedded,
    )
