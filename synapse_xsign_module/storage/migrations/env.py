"""Alembic environment: migrations run on a connection handed in by the module."""

from __future__ import annotations

from alembic import context

from synapse_xsign_module.storage.schema import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "synapse-xsign migrations run through 'synapse-xsign migrate', "
        "not the alembic command line"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
