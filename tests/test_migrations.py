"""Tests of the Alembic migrations and the ``synapse-xsign migrate`` command."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, Table, inspect, text
from sqlalchemy.exc import IntegrityError

from twisted.trial import unittest

from synapse_xsign_module.config import DatabaseConfig
from synapse_xsign_module.hosts.embedded import cli
from synapse_xsign_module.storage import migrate
from synapse_xsign_module.storage.database import create_db_engine
from synapse_xsign_module.storage.schema import (
    VERSION_TABLE,
    cross_signing_keys,
    metadata,
)
from tests.utils import (
    drop_all,
    expected_signed_hash,
    postgres_url,
    restore_root_logging,
)


def schema_diff(engine: Engine, target: MetaData = metadata) -> list[Any]:
    """Alembic's autogenerate diff between the live database and ``target``."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(ctx, target))


def table_names(engine: Engine) -> set[str]:
    """The tables that exist in the database."""
    return set(inspect(engine).get_table_names())


class FreshDatabaseMixin:
    """A fresh, empty database per test: a SQLite file or the emptied PostgreSQL."""

    def make_fresh_engine(self: Any) -> Engine:
        """An engine over an empty database; cleaned up (and re-migrated) after."""
        url = postgres_url()
        if url is not None:
            drop_all(url)
            engine = create_db_engine(DatabaseConfig(url=url))
            self.addCleanup(_remigrate, url)
        else:
            tmp = tempfile.mkdtemp(prefix="xsign-mig-")
            self.addCleanup(shutil.rmtree, tmp, True)
            engine = create_db_engine(
                DatabaseConfig(url=f"sqlite:///{os.path.join(tmp, 'm.db')}")
            )
        self.addCleanup(engine.dispose)
        return engine


def _remigrate(url: str) -> None:
    """Leave the shared PostgreSQL database migrated for the other tests."""
    engine = create_db_engine(DatabaseConfig(url=url))
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()


class MigrationTest(FreshDatabaseMixin, unittest.TestCase):
    """Applying the packaged migrations to a fresh database."""

    def test_fresh_database_has_no_revision(self) -> None:
        """An empty database reports no revision and has no module tables."""
        engine = self.make_fresh_engine()
        self.assertIsNone(migrate.current_revision(engine))
        self.assertEqual(
            table_names(engine) & {t.name for t in metadata.sorted_tables}, set()
        )

    def test_upgrade_yields_exactly_the_schema(self) -> None:
        """Upgrading to head gives exactly the tables, columns and indexes of schema.py."""
        engine = self.make_fresh_engine()
        self.assertEqual(migrate.upgrade(engine), migrate.head_revision())
        self.assertEqual(schema_diff(engine), [])
        self.assertTrue(
            {t.name for t in metadata.sorted_tables} | {VERSION_TABLE}
            <= table_names(engine)
        )

    def test_schema_diff_detects_a_difference(self) -> None:
        """The comparison used above does report a schema that differs."""
        engine = self.make_fresh_engine()
        migrate.upgrade(engine)
        extra = MetaData()
        for table in metadata.sorted_tables:
            table.to_metadata(extra)
        Table("xsign_not_migrated", extra, Column("id", Integer, primary_key=True))
        diff = schema_diff(engine, extra)
        self.assertEqual(len(diff), 1, diff)
        self.assertEqual(diff[0][0], "add_table")
        self.assertEqual(diff[0][1].name, "xsign_not_migrated")

    def test_current_revision_is_head(self) -> None:
        """After the upgrade the recorded revision is the newest shipped one."""
        engine = self.make_fresh_engine()
        head = migrate.head_revision()
        self.assertEqual(head, "0003")
        migrate.upgrade(engine)
        self.assertEqual(migrate.current_revision(engine), head)
        with engine.connect() as conn:
            stored = conn.execute(
                text(f"SELECT version_num FROM {VERSION_TABLE}")
            ).scalar_one()
        self.assertEqual(stored, head)

    def test_upgrade_is_idempotent(self) -> None:
        """Upgrading again changes nothing and keeps the data."""
        engine = self.make_fresh_engine()
        first = migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO xsign_host_users (user_id, created_ts)"
                    " VALUES ('@a:x', 1)"
                )
            )
        self.assertEqual(migrate.upgrade(engine), first)
        self.assertEqual(migrate.upgrade(engine), first)
        self.assertEqual(schema_diff(engine), [])
        with engine.connect() as conn:
            versions = conn.execute(text(f"SELECT * FROM {VERSION_TABLE}")).all()
            users = conn.execute(
                text("SELECT user_id, is_admin, deactivated FROM xsign_host_users")
            ).all()
        self.assertEqual(len(versions), 1)
        self.assertEqual(
            [(u[0], bool(u[1]), bool(u[2])) for u in users], [("@a:x", False, False)]
        )

    def test_downgrade_to_base_removes_every_table(self) -> None:
        """The initial migration's downgrade drops every table it created."""
        engine = self.make_fresh_engine()
        migrate.upgrade(engine)
        cfg = migrate.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        self.assertIsNone(migrate.current_revision(engine))
        self.assertEqual(
            table_names(engine) & {t.name for t in metadata.sorted_tables}, set()
        )
        migrate.upgrade(engine)
        self.assertEqual(schema_diff(engine), [])

    def test_partial_unique_index_keeps_one_current_key(self) -> None:
        """The migrated schema allows one current key per user and type, any history."""
        engine = self.make_fresh_engine()
        migrate.upgrade(engine)
        row = {
            "user_id": "@a:x",
            "key_type": "master",
            "key_json": "{}",
            "uploaded_ts": 1,
        }
        with engine.begin() as conn:
            conn.execute(
                cross_signing_keys.insert(),
                [
                    {**row, "public_key": "old1", "replaced_ts": 2},
                    {**row, "public_key": "old2", "replaced_ts": 3},
                    {**row, "public_key": "cur", "replaced_ts": None},
                ],
            )
        with self.assertRaises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(
                    cross_signing_keys.insert(),
                    {**row, "public_key": "second-current", "replaced_ts": None},
                )

    def test_key_versions_given_to_users_with_keys(self) -> None:
        """Migrating a database with keys gives each of their owners a key
        version (and nobody else), so cached answers are valid from the start."""
        engine = self.make_fresh_engine()
        migrate.upgrade(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO xsign_device_keys"
                    " (user_id, device_id, key_json, ts_added_ms)"
                    " VALUES ('@dev:x', 'D', '{}', 1)"
                )
            )
            conn.execute(
                cross_signing_keys.insert(),
                {
                    "user_id": "@cs:x",
                    "key_type": "master",
                    "public_key": "p",
                    "key_json": "{}",
                    "uploaded_ts": 1,
                },
            )
            conn.execute(
                text(
                    "INSERT INTO xsign_host_users (user_id, created_ts)"
                    " VALUES ('@nokeys:x', 1)"
                )
            )
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT user_id, version FROM xsign_key_versions")
            ).all()
        self.assertEqual(sorted(map(tuple, rows)), [("@cs:x", 1), ("@dev:x", 1)])

    def test_device_keys_get_their_signed_hash(self) -> None:
        """Migrating device keys stored before 0003 fills in the hash of what a
        signature over each covers, across several batches."""
        engine = self.make_fresh_engine()
        migrate.upgrade(engine, "0002")
        stored = {}
        for i in range(2_100):  # three batches of the migration's 1,000
            device_id = f"D{i:05d}"
            keys = {
                "device_id": device_id,
                "keys": {f"ed25519:{device_id}": f"key{i}"},
                "user_id": "@a:x",
                "signatures": {"@a:x": {f"ed25519:{device_id}": f"sig{i}"}},
            }
            if i % 2:
                keys["unsigned"] = {"device_display_name": "phone"}
            if i % 3 == 0:  # signed bytes are UTF-8, stored text escapes it
                keys["org.example.label"] = f"caf\u00e9 \u2615 {i}"
            stored[device_id] = keys
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO xsign_device_keys"
                    " (user_id, device_id, key_json, ts_added_ms)"
                    " VALUES ('@a:x', :d, :j, 1)"
                ),
                [{"d": d, "j": json.dumps(k)} for d, k in stored.items()],
            )
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = dict(
                conn.execute(
                    text("SELECT device_id, signed_hash FROM xsign_device_keys")
                ).all()
            )
        expected = {d: expected_signed_hash(keys) for d, keys in stored.items()}
        self.assertEqual(rows, expected)
        cfg = migrate.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        columns = {c["name"] for c in inspect(engine).get_columns("xsign_device_keys")}
        self.assertNotIn("signed_hash", columns)

    def test_alembic_env_refuses_to_run_without_connection(self) -> None:
        """The migrations refuse the plain alembic command line (no connection given)."""
        cfg = migrate.alembic_config()
        with self.assertRaises(RuntimeError) as cm:
            command.upgrade(cfg, "head")
        self.assertIn("synapse-xsign migrate", str(cm.exception))


class MigrateCommandTest(unittest.TestCase):
    """``synapse-xsign migrate`` on a fresh SQLite file."""

    def setUp(self) -> None:
        restore_root_logging(self)
        self.tmp = tempfile.mkdtemp(prefix="xsign-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def write_config(self, body: str) -> str:
        """Write a YAML config file; returns its path."""
        path = os.path.join(self.tmp, "config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        return path

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        """Run the CLI in-process; returns (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_migrate_fresh_sqlite_file(self) -> None:
        """``migrate`` creates the file (and its directory) and brings it to head."""
        db_path = os.path.join(self.tmp, "sub", "dir", "xsign.db")
        path = self.write_config(f"database:\n  url: sqlite:///{db_path}\n")
        code, out, _ = self.run_cli("--config", path, "migrate")
        self.assertEqual(code, 0)
        head = migrate.head_revision()
        self.assertIn(f"schema at revision {head}", out)
        self.assertIn(db_path, out)
        self.assertTrue(os.path.exists(db_path))
        engine = create_db_engine(DatabaseConfig(url=f"sqlite:///{db_path}"))
        self.addCleanup(engine.dispose)
        self.assertEqual(migrate.current_revision(engine), head)
        self.assertEqual(schema_diff(engine), [])

    def test_migrate_twice(self) -> None:
        """Running ``migrate`` on an up-to-date database succeeds and changes nothing."""
        db_path = os.path.join(self.tmp, "xsign.db")
        path = self.write_config(f"database:\n  url: sqlite:///{db_path}\n")
        self.assertEqual(self.run_cli("--config", path, "migrate")[0], 0)
        code, out, _ = self.run_cli("--config", path, "migrate")
        self.assertEqual(code, 0)
        self.assertIn(f"schema at revision {migrate.head_revision()}", out)

    def test_migrate_bad_config(self) -> None:
        """An invalid config is reported with its key and exit status 2."""
        path = self.write_config("database:\n  urll: sqlite:///x.db\n")
        code, _, err = self.run_cli("--config", path, "migrate")
        self.assertEqual(code, 2)
        self.assertIn("configuration error: database.urll", err)

    def test_migrate_missing_config_file(self) -> None:
        """A config file that cannot be read is a configuration error, status 2."""
        missing = os.path.join(self.tmp, "nope.yaml")
        code, _, err = self.run_cli("--config", missing, "migrate")
        self.assertEqual(code, 2)
        self.assertIn("--config", err)
        self.assertIn(missing, err)
