"""device keys remember the hash of what a signature over them covers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 14:10:00.000000

Adds ``xsign_device_keys.signed_hash`` and fills it in for the keys already
stored, a thousand rows at a time in key order. A row that a process not yet
upgraded writes later keeps NULL, which the code reads as unknown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: Rows read and updated per statement.
BATCH = 1000

_keys = sa.table(
    "xsign_device_keys",
    sa.column("user_id", sa.String),
    sa.column("device_id", sa.String),
    sa.column("key_json", sa.Text),
    sa.column("signed_hash", sa.String),
)


def _signed_hash(key_json: str) -> str:
    """SHA-256 (hex) of the canonical JSON of stored device keys without
    ``signatures`` and ``unsigned``.

    Written out here rather than imported, so that this revision keeps
    computing what it computed when it was written: the code's own
    ``jsonutil.signed_hash`` must give the same, which the migration tests
    check, but may change how it gets there. Stored keys hold no floats.
    """
    obj: dict[str, Any] = json.loads(key_json)
    signed = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    text = json.dumps(signed, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def upgrade() -> None:
    op.add_column(
        "xsign_device_keys",
        sa.Column("signed_hash", sa.String(length=64), nullable=True),
    )
    conn = op.get_bind()
    update = (
        _keys.update()
        .where(
            _keys.c.user_id == sa.bindparam("u"),
            _keys.c.device_id == sa.bindparam("d"),
        )
        .values(signed_hash=sa.bindparam("h"))
    )
    after: tuple[str, str] | None = None
    while True:
        query = sa.select(_keys.c.user_id, _keys.c.device_id, _keys.c.key_json)
        if after is not None:
            query = query.where(sa.tuple_(_keys.c.user_id, _keys.c.device_id) > after)
        rows = conn.execute(
            query.order_by(_keys.c.user_id, _keys.c.device_id).limit(BATCH)
        ).all()
        if not rows:
            return
        conn.execute(
            update,
            [{"u": u, "d": d, "h": _signed_hash(kj)} for u, d, kj in rows],
        )
        after = (rows[-1][0], rows[-1][1])


def downgrade() -> None:
    with op.batch_alter_table("xsign_device_keys") as batch:
        batch.drop_column("signed_hash")
