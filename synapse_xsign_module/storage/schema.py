"""The module's SQL schema, as SQLAlchemy Core tables.

Alembic migrations (``storage/migrations``) own the live schema; a test checks
that applying every migration yields exactly these tables.

Times are integer milliseconds since the epoch. JSON objects are stored as
canonical JSON text, so an identical object is an identical string.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

#: The table where Alembic records the schema revision.
VERSION_TABLE = "xsign_alembic_version"

metadata = MetaData()

# --- keys served to clients -------------------------------------------------

# The identity keys of a device, exactly as uploaded (canonical JSON).
# ``signed_hash`` is the SHA-256 (hex) of the bytes a signature over the device
# covers (jsonutil.signed_hash): a signature upload compares the uploaded copy
# with it rather than parsing ``key_json``. NULL only in a row written by a
# version before migration 0003 (a process not yet upgraded): read as unknown.
device_keys = Table(
    "xsign_device_keys",
    metadata,
    Column("user_id", String(255), nullable=False),
    Column("device_id", String(255), nullable=False),
    Column("key_json", Text, nullable=False),
    Column("ts_added_ms", BigInteger, nullable=False),
    Column("signed_hash", String(64), nullable=True),
    PrimaryKeyConstraint("user_id", "device_id", name="xsign_device_keys_pkey"),
)

# Unclaimed one-time keys. ``id`` orders them: claims take the oldest first.
one_time_keys = Table(
    "xsign_one_time_keys",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("device_id", String(255), nullable=False),
    Column("algorithm", String(255), nullable=False),
    Column("key_id", String(255), nullable=False),
    Column("key_json", Text, nullable=False),
    Column("ts_added_ms", BigInteger, nullable=False),
    UniqueConstraint(
        "user_id", "device_id", "algorithm", "key_id", name="xsign_otk_unique"
    ),
)
Index(
    "xsign_otk_claim_idx",
    one_time_keys.c.user_id,
    one_time_keys.c.device_id,
    one_time_keys.c.algorithm,
    one_time_keys.c.id,
)

# At most one fallback key per device and algorithm.
fallback_keys = Table(
    "xsign_fallback_keys",
    metadata,
    Column("user_id", String(255), nullable=False),
    Column("device_id", String(255), nullable=False),
    Column("algorithm", String(255), nullable=False),
    Column("key_id", String(255), nullable=False),
    Column("key_json", Text, nullable=False),
    Column("used", Boolean, nullable=False, server_default=text("false")),
    PrimaryKeyConstraint(
        "user_id", "device_id", "algorithm", name="xsign_fallback_keys_pkey"
    ),
)

# Every cross-signing key a user ever had. The current key of a (user, type) is
# the row whose ``replaced_ts`` is NULL; a partial unique index keeps it single.
# Old rows stay for audit; a public key may appear again in a later row.
cross_signing_keys = Table(
    "xsign_cross_signing_keys",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("key_type", String(32), nullable=False),
    Column("public_key", String(255), nullable=False),
    Column("key_json", Text, nullable=False),
    Column("uploaded_ts", BigInteger, nullable=False),
    Column("replaced_ts", BigInteger, nullable=True),
    Column("replaced_reason", String(32), nullable=True),
)
Index(
    "xsign_cross_signing_current_idx",
    cross_signing_keys.c.user_id,
    cross_signing_keys.c.key_type,
    unique=True,
    sqlite_where=cross_signing_keys.c.replaced_ts.is_(None),
    postgresql_where=cross_signing_keys.c.replaced_ts.is_(None),
)
Index(
    "xsign_cross_signing_history_idx",
    cross_signing_keys.c.user_id,
    cross_signing_keys.c.id,
)

# Detached signatures uploaded through /keys/signatures/upload. One row per
# (signer, signing key, target user, target key): re-signing replaces. Rows are
# deleted when the signing key or the target key is replaced or removed, so
# every stored row is servable.
signatures = Table(
    "xsign_signatures",
    metadata,
    Column("signer_user_id", String(255), nullable=False),
    # "ed25519:" + a device id or public key.
    Column("signer_key_id", String(300), nullable=False),
    Column("target_user_id", String(255), nullable=False),
    Column("target_key_id", String(255), nullable=False),
    Column("signature", Text, nullable=False),
    Column("ts_added_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint(
        "target_user_id",
        "target_key_id",
        "signer_user_id",
        "signer_key_id",
        name="xsign_signatures_pkey",
    ),
)
Index(
    "xsign_signatures_signer_idx",
    signatures.c.signer_user_id,
    signatures.c.signer_key_id,
)

# A counter per user, raised in every transaction that changes what anyone
# may see of the user's own keys: device keys, cross-signing keys and the
# signatures the user made over them (see storage/versions.py). Rows are
# never deleted, so a counter never goes back to a value seen before.
key_versions = Table(
    "xsign_key_versions",
    metadata,
    Column("user_id", String(255), nullable=False),
    Column("version", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", name="xsign_key_versions_pkey"),
)

# Admin-granted windows in which a user may replace the master key without UIA.
replacement_grants = Table(
    "xsign_replacement_grants",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("expires_ts", BigInteger, nullable=False),
    Column("granted_by", String(255), nullable=False),
    Column("granted_ts", BigInteger, nullable=False),
)

# --- user-interactive auth (embedded host) ----------------------------------

uia_sessions = Table(
    "xsign_uia_sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("method", String(16), nullable=False),
    Column("uri", Text, nullable=False),
    Column("body_hash", String(64), nullable=False),
    Column("completed", Text, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    Column("expires_ts", BigInteger, nullable=False),
)
Index("xsign_uia_sessions_expiry_idx", uia_sessions.c.expires_ts)

# --- embedded host accounts ---------------------------------------------------

host_users = Table(
    "xsign_host_users",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("password_hash", Text, nullable=True),
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    Column("deactivated", Boolean, nullable=False, server_default=text("false")),
    Column("created_ts", BigInteger, nullable=False),
)

host_devices = Table(
    "xsign_host_devices",
    metadata,
    Column("user_id", String(255), nullable=False),
    Column("device_id", String(255), nullable=False),
    Column("display_name", Text, nullable=True),
    Column("created_ts", BigInteger, nullable=False),
    PrimaryKeyConstraint("user_id", "device_id", name="xsign_host_devices_pkey"),
)

# Access tokens are stored as SHA-256 digests; the token itself is never kept.
host_access_tokens = Table(
    "xsign_host_access_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("device_id", String(255), nullable=True),
    Column("created_ts", BigInteger, nullable=False),
)
Index(
    "xsign_host_access_tokens_device_idx",
    host_access_tokens.c.user_id,
    host_access_tokens.c.device_id,
)
