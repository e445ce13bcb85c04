"""per-user key versions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 11:40:00.000000

Adds ``xsign_key_versions`` and gives every user who already has device keys,
cross-signing keys or signatures a first version, so that caches keyed by it
are valid for existing data from the start.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "xsign_key_versions",
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="xsign_key_versions_pkey"),
    )
    op.execute(
        "INSERT INTO xsign_key_versions (user_id, version)"
        " SELECT user_id, 1 FROM ("
        " SELECT user_id FROM xsign_device_keys"
        " UNION SELECT user_id FROM xsign_cross_signing_keys"
        " UNION SELECT target_user_id FROM xsign_signatures"
        ") AS users"
    )


def downgrade() -> None:
    op.drop_table("xsign_key_versions")
