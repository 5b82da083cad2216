"""Where the inventory lives: the `database` URL, the tables, and the migrations that build them.

A change to the schema is one function appended to MIGRATIONS (its place in the list is its
version), built from `create_tables`, `add_columns` and `create_indexes`: they skip what is
already there, so a step leaves the same schema whether the database was created by step 1 with
today's tables or walked every step since an older version.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateColumn, CreateIndex

from ..errors import ConfigserverError


class InventoryError(ConfigserverError):
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
    except (ArgumentError, ValueError):
        # not echoed: the text may hold a password
        raise InventoryError(
            "setting 'database': not a database URL; use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/NAME, "
            "with the characters @ : / # % ? in the password percent-encoded "
            "(python3 -c 'import urllib.parse; print(urllib.parse.quote(input(), safe=\"\"))')"
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


def open_sqlite_reader(url: URL) -> sa.Engine:
    """A blocking engine for reading a SQLite inventory (`url` from `database_url`) in bulk.

    `devices --json` reads a million rows: the async driver's hop to its thread and back costs
    a third more CPU per row than the plain driver, and a command has nothing else to do meanwhile.
    """
    engine = sa.create_engine(url.set(drivername="sqlite+pysqlite"), poolclass=sa.NullPool)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL: readers (the CLI) never block the writer. busy_timeout: several workers share the file.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    # SQLite's own 2 MB page cache, said once: an insert touches the hot end of each index
    # (bench/inventory.py audit, a fleet of 100,000 over 1,000,000 rows, 2 and 8 MB alternated
    # twice: 81-86 and 80-82 µs of CPU a poll; 32 MB wrote no faster either) and more cache
    # costs each worker its size.
    cursor.execute("PRAGMA cache_size=-2000")
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
    # The hwid as `history` looks it up (lower case): an index serves it, lower(hwid) could not.
    sa.Column("hwid_key", sa.String(64)),
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
    # Every filter of `configserver devices` walks one index in the order it prints (newest first).
    sa.Index("devices_last_seen", "last_seen", "device"),
    sa.Index("devices_status", "status", "last_seen", "device"),
    sa.Index("devices_hwid_key", "hwid_key"),
    sa.Index("devices_mac", "mac"),
)
sa.Index("devices_model", sa.func.lower(devices.c.model), devices.c.last_seen, devices.c.device)

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
    # hwid, MAC and model come from a certificate that named them but did not prove them
    # (expired, revoked, not matching the query, ...): the device's history, never its inventory.
    sa.Column("claimed", sa.Boolean, nullable=False, server_default=sa.false()),
    # A flood folded into this row: `repeats` more polls like it, the first at `repeats_since`.
    sa.Column("repeats", sa.Integer, nullable=False, server_default="0"),
    sa.Column("repeats_since", _Time),
    sa.Index("polls_device_time", "device", "time"),
    sa.Index("polls_time", "time"),
)

schema_versions = sa.Table(
    "inventory_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", _Time, nullable=False),
)


def create_tables(connection: Connection, *tables: sa.Table) -> None:
    """Create the tables (as `metadata` has them now, with their indexes) that are not there yet."""
    metadata.create_all(connection, tables=list(tables), checkfirst=True)


def add_columns(connection: Connection, table: sa.Table, *names: str) -> None:
    """ALTER TABLE ... ADD COLUMN for each of `names` (as `table` defines it) that is not there yet.

    A NOT NULL column needs a `server_default`, which also fills the rows already there.
    """
    present = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
    for name in names:
        if name not in present:
            definition = CreateColumn(table.c[name]).compile(dialect=connection.dialect)
            connection.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {definition}"))


def create_indexes(connection: Connection, *indexes: sa.Index) -> None:
    """Create the indexes that are not there yet (by name)."""
    for index in indexes:
        # IF NOT EXISTS, not checkfirst: SQLite's reflection cannot see an index on an expression
        connection.execute(CreateIndex(index, if_not_exists=True))


def _create_v1(connection: Connection) -> None:
    create_tables(connection, devices, polls)


def _v2_indexed_lookups_claims_and_floods(connection: Connection) -> None:
    # Every filter of `devices` and `history` on an index; refusals a certificate only claimed;
    # a flood of one device's polls as one counted row.
    add_columns(connection, devices, "hwid_key")
    add_columns(connection, polls, "claimed", "repeats", "repeats_since")
    connection.execute(
        devices.update()
        .where(devices.c.hwid_key.is_(None), devices.c.hwid.is_not(None))
        .values(hwid_key=sa.func.lower(devices.c.hwid))
    )
    names = ("devices_last_seen", "devices_status", "devices_model", "devices_hwid_key", "devices_mac")
    create_indexes(connection, *(index for index in devices.indexes if index.name in names))


def _v3_backups(connection: Connection) -> None:
    # Configuration backups, device facts and backup requests (configserver/backups/_tables.py).
    from ..backups._tables import (
        create_backup_tables,  # imported here: backups builds on this module
    )

    create_backup_tables(connection)


# The admin page's orders and problems (configserver/admin/_fleet.py): the fleet by hwid, page
# after page; the refused polls of the last day, without reading the day's served ones.
ADMIN_INDEXES = (
    sa.Index("devices_hwid_sort", devices.c.hwid_key, devices.c.device),
    sa.Index("polls_status_time", polls.c.status, polls.c.time),
)


def _v4_admin_page(connection: Connection) -> None:
    create_indexes(connection, *ADMIN_INDEXES)


def _v5_firmware(connection: Connection) -> None:
    # Firmware sent to each device, and halted rollouts (configserver/firmware/_tables.py).
    from ..firmware._tables import (
        create_firmware_tables,  # imported here: firmware builds on this module
    )

    create_firmware_tables(connection)


# Append-only: a change to the schema is a new step at the end of this list, and the steps
# before it stay as they are (never renumbered), so every database walks the same path.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _create_v1,
    _v2_indexed_lookups_claims_and_floods,
    _v3_backups,
    _v4_admin_page,
    _v5_firmware,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Several instances start at once against one PostgreSQL; one migrates, the others wait.
_MIGRATION_LOCK = 0x636F6E666967  # "config"


async def migrate(engine: AsyncEngine) -> int:
    """Bring the schema up to date, idempotently. Returns the version now in place.

    Raises SQLAlchemy's errors when the database cannot be reached, and InventoryError when it
    holds a newer schema than this version of configserver knows, or a version that is no number.
    """
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        else:
            # SQLite: take the write lock now, so two workers starting on a new file migrate one
            # after the other (and DDL is part of the transaction) instead of racing.
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
        return await connection.run_sync(_migrate)


def _migrate(connection: Connection) -> int:
    schema_versions.create(connection, checkfirst=True)
    current = schema_version(connection)
    if current > SCHEMA_VERSION:
        raise InventoryError(
            f"the inventory database has schema version {current}, newer than this configserver "
            f"knows ({SCHEMA_VERSION}); upgrade configserver"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version - 1](connection)
        connection.execute(sa.insert(schema_versions).values(version=version, applied_at=time.time()))
    return SCHEMA_VERSION


def schema_version(connection: Connection) -> int:
    """The newest version in `inventory_schema` (0 when empty). Raises InventoryError for a row
    that holds no version number (someone edited the table by hand)."""
    versions: list[int] = []
    for version in connection.execute(sa.select(schema_versions.c.version)).scalars():
        # whole numbers written as text (a table remade by hand) still count
        if isinstance(version, str) and version.strip().isdecimal() and version.isascii():
            version = int(version)
        if not isinstance(version, int) or isinstance(version, bool):
            raise InventoryError(
                f"the table inventory_schema holds {version!r} where a schema version number belongs; "
                f"it should list the versions 1 to {SCHEMA_VERSION} that were applied: correct or delete that row"
            )
        versions.append(version)
    return max(versions, default=0)


def explain(exc: BaseException, url: URL) -> str:
    """One line about a database error, in an admin's words.

    SQLAlchemy's messages run to many lines with the SQL; the first line of the driver's own
    message says more. A file error (no SQL error at all) means the client failed on one of its
    own files before talking to the server, which its message does not say.
    """
    own_file = _client_file_error(exc)
    if own_file is not None:
        what = own_file.strerror or type(own_file).__name__
        text = f"the database client cannot use its own file {own_file.filename} ({what}), before reaching the database"
        if url.get_backend_name() == "postgresql":
            text += (
                "; the PostgreSQL driver looks for client keys and certificates in $HOME/.postgresql: "
                "set HOME to a folder this user may read (the systemd unit sets it to the state folder), "
                "or name the files in the URL (?sslkey=...&sslcert=...&sslrootcert=...)"
            )
        return text
    original = getattr(exc, "orig", None) or exc
    first = str(original).splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first}"[:500] if first else type(original).__name__


def _client_file_error(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.filename:
            return current
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]
    return None
