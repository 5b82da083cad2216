"""Where the inventory lives: the `database` URL, the tables, and the migrations that build them."""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


class InventoryError(Exception):
    """The inventory cannot do what was asked; the text says what to fix (often the `database` setting)."""


_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def database_url(database: str) -> URL:
    """Turn the `database` setting into the URL of an async driver.

    Takes `sqlite:///PATH` or `postgresql://USER:PASSWORD@HOST:PORT/NAME` (and the explicit
    `sqlite+aiosqlite` / `postgresql+asyncpg` forms). Raises InventoryError naming the setting for
    anything else.
    """
    try:
        url = make_url(database)
    except ArgumentError:
        raise InventoryError(
            f"setting 'database': {database!r} is not a database URL; "
            "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/NAME"
        ) from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise InventoryError(
            f"setting 'database': {url.drivername}:// is not supported; "
            "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/NAME"
        )
    if driver.startswith("sqlite") and not url.database:
        raise InventoryError("setting 'database': sqlite:/// needs a file, e.g. sqlite:///configserver.db")
    return url.set(drivername=driver)


def describe(url: URL) -> str:
    """The URL as it may appear in logs and messages: never with its password."""
    return url.render_as_string(hide_password=True)


def open_engine(url: URL) -> AsyncEngine:
    """An engine for `url` (from `database_url`). Connects nothing yet."""
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, pool_pre_ping=True)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,  # connections die with a restarted server; find out before using one
        # A server that is down must fail fast so polls queue and the writer backs off, and a
        # hung server must not hold the writer forever.
        connect_args={"timeout": 5, "command_timeout": 30},
    )


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL: readers (the CLI) never block the writer. busy_timeout: several workers share the file.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


metadata = sa.MetaData()

# Unix seconds as floats throughout: they are what polls carry and what the discovery JSON shows.
_Time = sa.Double

devices = sa.Table(
    "devices",
    metadata,
    # The device's MAC when known ("00-90-33-30-00-af"), else its lower-case hwid.
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("hwid", sa.String(64)),
    sa.Column("mac", sa.String(64)),
    sa.Column("model", sa.String(64)),
    sa.Column("first_seen", _Time, nullable=False),
    sa.Column("last_seen", _Time, nullable=False),
    # Of the newest poll, served or refused.
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("path", sa.Text),
    sa.Column("client_ip", sa.String(64)),
    # Of the newest poll that was answered with a script.
    sa.Column("served_at", _Time),
    sa.Column("template", sa.Text),
    sa.Column("script_sha256", sa.String(64)),
    # What the device last said about itself (untrusted).
    sa.Column("reported_at", _Time),
    sa.Column("firmware", sa.Text),
    sa.Column("boot", sa.Text),
    sa.Column("version", sa.Text),
    sa.Column("local_ip", sa.Text),
)

polls = sa.Table(
    "polls",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", _Time, nullable=False),
    sa.Column("device", sa.String(64)),  # devices.device; NULL when the poll showed no identity
    sa.Column("hwid", sa.String(64)),
    sa.Column("mac", sa.String(64)),
    sa.Column("model", sa.String(64)),
    sa.Column("client_ip", sa.String(64)),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Column("template", sa.Text),
    sa.Column("script_sha256", sa.String(64)),
    sa.Column("decision", sa.String(16)),
    sa.Column("check_reported", sa.Text),
    sa.Column("check_digest", sa.String(128)),
    sa.Column("firmware", sa.Text),
    sa.Column("duration_ms", sa.Float),
    sa.Column("query", sa.JSON, nullable=False),  # the device's own query arguments, untrusted
    sa.Index("polls_device_time", "device", "time"),
    sa.Index("polls_time", "time"),
)

schema_versions = sa.Table(
    "inventory_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", _Time, nullable=False),
)


def _create_v1(connection: Connection) -> None:
    metadata.create_all(connection, tables=[devices, polls], checkfirst=True)


# Append-only: a change to the schema is a new step (ALTER TABLE ...) at the end of this list,
# and the steps before it stay as they are, so every database walks the same path.
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1]
SCHEMA_VERSION = len(MIGRATIONS)

# Several instances start at once against one PostgreSQL; one migrates, the others wait.
_MIGRATION_LOCK = 0x636F6E666967  # "config"


async def migrate(engine: AsyncEngine) -> int:
    """Bring the schema up to date, idempotently. Returns the version now in place.

    Raises SQLAlchemy's errors when the database cannot be reached, and InventoryError when it
    holds a newer schema than this version of configserver knows.
    """
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        return await connection.run_sync(_migrate)


def _migrate(connection: Connection) -> int:
    schema_versions.create(connection, checkfirst=True)
    current = connection.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise InventoryError(
            f"the inventory database has schema version {current}, newer than this configserver "
            f"knows ({SCHEMA_VERSION}); upgrade configserver"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version - 1](connection)
        connection.execute(sa.insert(schema_versions).values(version=version, applied_at=time.time()))
    return SCHEMA_VERSION
