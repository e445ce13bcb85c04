"""Tests of the module's configuration parsing."""

from __future__ import annotations

import sys
from typing import Any

from twisted.trial import unittest

from synapse_xsign_module import XSignModule
from synapse_xsign_module import config as config_module
from synapse_xsign_module.config import (
    DEFAULT_DATABASE_URL,
    DatabaseConfig,
    EmbeddedConfig,
    UIAConfig,
    XSignConfig,
    parse_config,
)
from synapse_xsign_module.errors import ConfigError

_MISSING = object()


def _restore_module(name: str, saved: Any) -> None:
    if saved is _MISSING:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = saved


class ParseConfigDefaultsTest(unittest.TestCase):
    """Defaults and the full set of options."""

    def test_none_gives_defaults(self) -> None:
        """``None`` parses to the documented defaults."""
        config = parse_config(None)
        self.assertEqual(config, XSignConfig())
        self.assertEqual(config.database.url, DEFAULT_DATABASE_URL)
        self.assertIsNone(config.database.threadpool_size)
        self.assertEqual(config.database.sqlite_busy_timeout_ms, 5000)
        self.assertEqual(config.database.max_attempts, 5)
        self.assertEqual(config.max_request_body_size, 8 * 1024 * 1024)
        self.assertEqual(config.uia.session_timeout_ms, 600000)
        self.assertIs(config.uia.allow_dummy, False)
        self.assertEqual(config.replacement_window_ms, 600000)
        self.assertEqual(config.embedded.server_name, "localhost")
        self.assertEqual(config.embedded.bind_address, "127.0.0.1")
        self.assertEqual(config.embedded.port, 8008)
        self.assertIs(config.embedded.x_forwarded, False)
        self.assertIs(config.embedded.access_log, True)

    def test_empty_mapping_and_empty_sections_give_defaults(self) -> None:
        """An empty mapping, and sections left empty (YAML null), are all defaults."""
        self.assertEqual(parse_config({}), XSignConfig())
        self.assertEqual(
            parse_config({"database": None, "uia": None, "embedded": None}),
            XSignConfig(),
        )
        self.assertEqual(parse_config({"database": {}}), XSignConfig())

    def test_null_option_means_default(self) -> None:
        """An option set to null keeps its default value."""
        config = parse_config({"database": {"threadpool_size": None}, "uia": {}})
        self.assertIsNone(config.database.threadpool_size)
        self.assertEqual(config.database.threads(), 2)  # SQLite

    def test_every_option_parsed(self) -> None:
        """Every option in every section is read into the frozen config."""
        raw: dict[str, Any] = {
            "database": {
                "url": "postgresql+psycopg://u:p@db.example:5432/xsign",
                "threadpool_size": 3,
                "sqlite_busy_timeout_ms": 1234,
                "max_attempts": 7,
            },
            "max_request_body_size": 4096,
            "uia": {"session_timeout_ms": 60000, "allow_dummy": True},
            "replacement_window_ms": 99000,
            "key_query_cache_mb": 5,
            "verification_processes": 3,
            "embedded": {
                "server_name": "example.org",
                "bind_address": "0.0.0.0",
                "port": 9009,
                "x_forwarded": True,
                "access_log": False,
                "token_cache_ms": 0,
                "gc_thresholds": [5000, 20, 30],
            },
        }
        config = parse_config(raw)
        self.assertEqual(
            config,
            XSignConfig(
                database=DatabaseConfig(
                    url="postgresql+psycopg://u:p@db.example:5432/xsign",
                    threadpool_size=3,
                    sqlite_busy_timeout_ms=1234,
                    max_attempts=7,
                ),
                max_request_body_size=4096,
                uia=UIAConfig(session_timeout_ms=60000, allow_dummy=True),
                replacement_window_ms=99000,
                key_query_cache_mb=5,
                verification_processes=3,
                embedded=EmbeddedConfig(
                    server_name="example.org",
                    bind_address="0.0.0.0",
                    port=9009,
                    x_forwarded=True,
                    access_log=False,
                    token_cache_ms=0,
                    gc_thresholds=(5000, 20, 30),
                ),
            ),
        )

    def test_config_is_frozen(self) -> None:
        """The parsed config cannot be modified."""
        config = parse_config({})
        with self.assertRaises(AttributeError):
            config.max_request_body_size = 1  # type: ignore[misc]
        with self.assertRaises(AttributeError):
            config.database.url = "sqlite://"  # type: ignore[misc]

    def test_sqlite_and_postgresql_urls_accepted(self) -> None:
        """SQLite file/memory URLs and PostgreSQL URLs are accepted as given."""
        for url in (
            "sqlite:///data/x.db",
            "sqlite://",
            "postgresql://localhost/x",
            "postgresql+psycopg://u@h/x",
        ):
            self.assertEqual(parse_config({"database": {"url": url}}).database.url, url)

    def test_port_bounds_accepted(self) -> None:
        """Ports 0 (any free port) and 65535 are within range."""
        self.assertEqual(parse_config({"embedded": {"port": 0}}).embedded.port, 0)
        self.assertEqual(
            parse_config({"embedded": {"port": 65535}}).embedded.port, 65535
        )


class ParseConfigErrorsTest(unittest.TestCase):
    """Every invalid value is a ConfigError naming the offending key."""

    def assert_error(self, raw: Any, key: str) -> ConfigError:
        """Parsing ``raw`` raises ConfigError whose ``key`` is ``key``."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(raw)
        self.assertEqual(cm.exception.key, key)
        self.assertTrue(str(cm.exception).startswith(f"{key}: "), str(cm.exception))
        error: ConfigError = cm.exception
        return error

    def test_unknown_top_level_key(self) -> None:
        """An unknown top-level option is refused and named, listing known ones."""
        err = self.assert_error({"bogus": 1}, "bogus")
        self.assertIn("unknown option", err.message)
        self.assertIn("database", err.message)

    def test_unknown_section_keys(self) -> None:
        """Unknown options inside sections are named by their dotted path."""
        self.assert_error({"database": {"urll": "sqlite://"}}, "database.urll")
        self.assert_error({"uia": {"foo": True}}, "uia.foo")
        self.assert_error({"embedded": {"listen": 1}}, "embedded.listen")

    def test_string_for_int(self) -> None:
        """A string where an integer is wanted is refused, naming the key."""
        err = self.assert_error(
            {"database": {"threadpool_size": "4"}}, "database.threadpool_size"
        )
        self.assertIn("int", err.message)
        self.assertIn("str", err.message)
        self.assert_error({"max_request_body_size": "1M"}, "max_request_body_size")
        self.assert_error({"embedded": {"port": "8008"}}, "embedded.port")

    def test_bool_for_int(self) -> None:
        """A boolean where an integer is wanted is refused although bool is an int."""
        err = self.assert_error(
            {"database": {"max_attempts": True}}, "database.max_attempts"
        )
        self.assertIn("boolean", err.message)
        self.assert_error({"replacement_window_ms": True}, "replacement_window_ms")
        self.assert_error(
            {"uia": {"session_timeout_ms": False}}, "uia.session_timeout_ms"
        )

    def test_float_for_int(self) -> None:
        """A float where an integer is wanted is refused."""
        self.assert_error(
            {"database": {"sqlite_busy_timeout_ms": 1.5}},
            "database.sqlite_busy_timeout_ms",
        )

    def test_int_for_bool(self) -> None:
        """An integer (even 0 or 1) where a boolean is wanted is refused."""
        self.assert_error({"uia": {"allow_dummy": 1}}, "uia.allow_dummy")
        self.assert_error({"embedded": {"x_forwarded": 0}}, "embedded.x_forwarded")
        self.assert_error({"embedded": {"access_log": "yes"}}, "embedded.access_log")

    def test_wrong_type_for_string(self) -> None:
        """A non-string where a string is wanted is refused."""
        self.assert_error({"database": {"url": 5}}, "database.url")
        self.assert_error(
            {"embedded": {"bind_address": ["::"]}}, "embedded.bind_address"
        )
        self.assert_error({"embedded": {"server_name": 1}}, "embedded.server_name")

    def test_list_for_section(self) -> None:
        """A list (or scalar) where a section mapping is wanted is refused."""
        self.assert_error({"database": ["sqlite://"]}, "database")
        self.assert_error({"uia": []}, "uia")
        self.assert_error({"embedded": "localhost"}, "embedded")

    def test_top_level_not_a_mapping(self) -> None:
        """A whole config that is not a mapping is refused as ``config``."""
        self.assert_error(["database"], "config")
        self.assert_error("database: {}", "config")

    def test_non_string_option_name(self) -> None:
        """A non-string option name (YAML ``1: x``) is refused, naming the section."""
        self.assert_error({"database": {1: "x"}}, "database")

    def test_gc_thresholds(self) -> None:
        """Three positive integers, or null for Python's own; anything else is
        refused, naming the option."""
        emb = parse_config({"embedded": {"gc_thresholds": None}}).embedded
        self.assertIsNone(emb.gc_thresholds)
        self.assertEqual(parse_config({}).embedded.gc_thresholds, (100_000, 50, 1000))
        for bad in ([1, 2], [1, 2, 0], [1, 2, True], "1,2,3", [1, 2, 3.5]):
            self.assert_error(
                {"embedded": {"gc_thresholds": bad}}, "embedded.gc_thresholds"
            )

    def test_non_positive_numbers(self) -> None:
        """Zero and negative sizes, timeouts and counts are refused."""
        cases = [
            ({"database": {"threadpool_size": 0}}, "database.threadpool_size"),
            ({"database": {"threadpool_size": -1}}, "database.threadpool_size"),
            (
                {"database": {"sqlite_busy_timeout_ms": 0}},
                "database.sqlite_busy_timeout_ms",
            ),
            ({"database": {"max_attempts": 0}}, "database.max_attempts"),
            ({"max_request_body_size": 0}, "max_request_body_size"),
            ({"max_request_body_size": -5}, "max_request_body_size"),
            ({"uia": {"session_timeout_ms": -1}}, "uia.session_timeout_ms"),
            ({"replacement_window_ms": 0}, "replacement_window_ms"),
            ({"embedded": {"token_cache_ms": -1}}, "embedded.token_cache_ms"),
            ({"key_query_cache_mb": -1}, "key_query_cache_mb"),
            ({"verification_processes": -1}, "verification_processes"),
        ]
        for raw, key in cases:
            err = self.assert_error(raw, key)
            self.assertIn("positive", err.message)

    def test_verification_processes_default_depends_on_the_host(self) -> None:
        """Unset (or null): one per usable core for each embedded server
        process, at most twice the cores in all over the --workers processes
        (at least one each); none under Synapse or on one core; a number,
        including 0, is taken as it is."""
        cases = [
            # cores, workers, embedded default (at most 2 x cores in all)
            (4, 1, 4),
            (4, 2, 4),
            (4, 3, 2),
            (2, 2, 2),
            (2, 3, 1),
            (32, 32, 2),
            (2, 9, 1),
            (1, 1, 0),
        ]
        for cores, workers, embedded in cases:
            self.patch(config_module, "usable_cores", lambda c=cores: c)
            for raw in ({}, {"verification_processes": None}):
                config = parse_config(raw)
                self.assertEqual(
                    config.verification_processes_for(True, workers),
                    embedded,
                    (cores, workers),
                )
                self.assertEqual(config.verification_processes_for(False, workers), 0)
            for n in (0, 2):
                config = parse_config({"verification_processes": n})
                self.assertEqual(config.verification_processes_for(True, workers), n)
                self.assertEqual(config.verification_processes_for(False), n)
        self.assert_error({"verification_processes": True}, "verification_processes")
        self.assert_error({"verification_processes": "2"}, "verification_processes")

    def test_usable_cores_follow_the_affinity(self) -> None:
        self.patch(config_module.os, "sched_getaffinity", lambda pid: {0, 3, 5})
        self.assertEqual(config_module.usable_cores(), 3)

    def test_bad_database_url_scheme(self) -> None:
        """Database URLs other than sqlite and postgresql are refused."""
        for url in (
            "mysql://u@h/db",
            "http://example.org",
            "",
            "/var/lib/x.db",
            "sqlite3:///x.db",
            "postgresqlx://h/x",
        ):
            err = self.assert_error({"database": {"url": url}}, "database.url")
            self.assertIn("sqlite", err.message)

    def test_port_out_of_range(self) -> None:
        """Ports below 0 or above 65535 are refused."""
        for port in (-1, 65536, 100000):
            self.assert_error({"embedded": {"port": port}}, "embedded.port")

    def test_bad_server_name(self) -> None:
        """Empty server names and names with '@', '/' or spaces are refused."""
        for name in ("", "@example.org", "a/b", "exa mple"):
            self.assert_error(
                {"embedded": {"server_name": name}}, "embedded.server_name"
            )


class XSignModuleParseConfigTest(unittest.TestCase):
    """The module class's ``parse_config`` as Synapse calls it."""

    def test_parses_valid_config(self) -> None:
        """A valid block parses to the same frozen config as parse_config."""
        raw = {"database": {"url": "sqlite:///x.db"}, "max_request_body_size": 10}
        self.assertEqual(XSignModule.parse_config(raw), parse_config(raw))

    def test_error_names_key_without_synapse(self) -> None:
        """Without Synapse installed, the module's ConfigError naming the key escapes."""
        # Make the import of Synapse's ConfigError fail even if Synapse happens
        # to be installed: a None entry in sys.modules blocks an import.
        saved = sys.modules.get("synapse", _MISSING)
        sys.modules["synapse"] = None  # type: ignore[assignment]
        self.addCleanup(_restore_module, "synapse", saved)
        with self.assertRaises(ConfigError) as cm:
            XSignModule.parse_config({"database": {"urll": "sqlite://"}})
        self.assertEqual(cm.exception.key, "database.urll")
        with self.assertRaises(ConfigError) as cm:
            XSignModule.parse_config({"embedded": {"port": True}})
        self.assertEqual(cm.exception.key, "embedded.port")


class ThreadDefaultsTest(unittest.TestCase):
    """The thread-pool size depends on the engine unless configured."""

    def test_engine_defaults(self) -> None:
        """2 threads on SQLite, 10 on PostgreSQL, the configured value otherwise."""
        sqlite = parse_config({"database": {"url": "sqlite:///x.db"}}).database
        pg = parse_config({"database": {"url": "postgresql://u@h/db"}}).database
        set_ = parse_config(
            {"database": {"url": "sqlite:///x.db", "threadpool_size": 7}}
        )
        self.assertEqual((sqlite.threads(), pg.threads()), (2, 10))
        self.assertEqual(set_.database.threads(), 7)
