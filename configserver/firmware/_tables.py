"""The firmware tables in the inventory's database, and the migration step that creates them.

They live beside the inventory's `devices` table (which keeps the build each device last
reported), so every node of a cluster on one PostgreSQL sees the same sends and the same halts.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

_Time = sa.Double   # unix seconds, as the inventory keeps them

# One row per device and kind (prot, boot): the build it was last sent, and since when. A
# device sent the same build again (it has not taken it yet) keeps its `first_sent_at`, so a
# device that keeps coming back with the old build is seen failing once `watch` has passed.
firmware_sent = sa.Table(
    "firmware_sent",
    metadata,
    sa.Column("device", sa.String(64), primary_key=True),   # the inventory's key: the MAC
    sa.Column("kind", sa.String(8), primary_key=True),       # "prot" or "boot"
    sa.Column("hwid", sa.String(64), nullable=False),
    sa.Column("model", sa.String(64), nullable=False),       # casefolded
    sa.Column("build", sa.String(64), nullable=False),
    sa.Column("wave", sa.Integer),
    sa.Column("first_sent_at", _Time, nullable=False),
    sa.Column("last_sent_at", _Time, nullable=False),
    sa.Column("sends", sa.Integer, nullable=False),
    sa.Index("firmware_sent_target", "model", "kind", "build"),
)

# One row per target that was ever halted. `state` is "halted" until an admin resumes it;
# failures are counted again from `changed_at` of the resume.
firmware_rollouts = sa.Table(
    "firmware_rollouts",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),     # casefolded
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("build", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),       # "halted" | "resumed"
    sa.Column("changed_at", _Time, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),       # when it was halted
    sa.Column("threshold", sa.Integer, nullable=False),
    sa.Column("by", sa.String(64), nullable=False),          # "watch" or the admin command
)


def create_firmware_tables(connection: Connection) -> None:
    """The migration step: create both tables and their indexes where they are missing."""
    metadata.create_all(connection, checkfirst=True)
