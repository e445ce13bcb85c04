"""Applying the Alembic migrations shipped inside the package."""

from __future__ import annotations

import logging
import os

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from synapse_xsign_module.storage.schema import VERSION_TABLE

logger = logging.getLogger(__name__)

#: Advisory lock key held while migrating (PostgreSQL).
MIGRATION_LOCK = 0x78736967

MIGRATIONS_DIR = os.path.join(os.path.dirname(__file__), "migrations")


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    return cfg


def head_revision() -> str:
    """The newest migration shipped with this version of the module."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the database schema up to ``revision``.

    Args:
        engine: the module's engine.
        revision: target revision; the newest by default.

    Returns:
        The revision the database is at afterwards.
    """
    before = current_revision(engine)
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several processes (Synapse workers, --workers) may start at once:
            # one migrates, the others wait and then find nothing to do.
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK}
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    after = current_revision(engine)
    if before != after:
        logger.info("Database schema migrated from %s to %s", before, after)
    assert after is not None
    return after
