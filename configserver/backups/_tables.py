"""The backup tables in the inventory's database, and the migration step that creates them.

They live beside the inventory's tables (same `database` setting, same migrations), so any
node of a cluster on one PostgreSQL takes any device's upload and every node sees it.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

_Time = sa.Double   # unix seconds, as the inventory keeps them
_Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")

# One row per stored version of a device's configuration, newest number highest.
backup_versions = sa.Table(
    "backup_versions",
    metadata,
    sa.Column("id", _Id, primary_key=True, autoincrement=True),
    # The inventory's key of the device: its MAC, "00-90-33-30-00-af".
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),   # 1, 2, 3... per device, never reused
    sa.Column("stored_at", _Time, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),      # bytes as uploaded
    sa.Column("lines", sa.Integer, nullable=False),     # meaningful lines
    sa.Column("lines_changed", sa.Integer),             # against the version before; NULL for the first
    sa.Column("digest", sa.String(64), nullable=False),  # SHA-256 of the meaningful lines
    sa.Column("content", sa.LargeBinary, nullable=False),  # the upload, zlib-compressed
    sa.UniqueConstraint("device", "number", name="backup_versions_device_number"),
)

# One row per device that ever uploaded: what the schedule and `--missing` need. `updated_at`
# moves with every upload, so nodes fetch only what changed since they last looked.
backup_devices = sa.Table(
    "backup_devices",
    metadata,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("hwid", sa.String(64), nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("first_upload_at", _Time, nullable=False),
    sa.Column("last_upload_at", _Time, nullable=False),
    sa.Column("last_stored_at", _Time),
    sa.Column("uploads", sa.Integer, nullable=False),
    sa.Column("updated_at", _Time, nullable=False),
    sa.Index("backup_devices_updated_at", "updated_at"),
    sa.Index("backup_devices_last_upload_at", "last_upload_at"),
)

# An admin's "back these up now": `device:<mac>`, `model:<model>` or `all`.
backup_requests = sa.Table(
    "backup_requests",
    metadata,
    sa.Column("target", sa.String(96), primary_key=True),
    sa.Column("requested_at", _Time, nullable=False),
)

# The device's own account of itself, one row per command it answered (x509, cmd0).
device_facts = sa.Table(
    "device_facts",
    metadata,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(16), primary_key=True),
    sa.Column("hwid", sa.String(64), nullable=False),
    sa.Column("reported_at", _Time, nullable=False),
    sa.Column("facts", sa.JSON, nullable=False),
)


def create_backup_tables(connection: Connection) -> None:
    """The migration step: create the backup tables (and their indexes) not there yet."""
    metadata.create_all(connection, checkfirst=True)
