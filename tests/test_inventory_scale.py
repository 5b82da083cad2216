"""The inventory at fleet scale: every lookup walks an index, old databases get them, `devices --json` streams.

Speed itself is shown by bench/inventory.py; these tests pin what makes it flat: the query plans
(EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL with sequential scans and sorts priced out,
so a plan shows an index exactly when one can serve the query).
"""

# ruff: noqa: F811 - the fixtures come from test_inventory; pytest passes them by the names imported

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_inventory import (  # noqa: F401 - fixtures
    PHONE,
    T0,
    anyio_backend,
    database,
    poll,
    postgres_server,
    postgres_url,
    running,
    sqlite_url,
)

from configserver.inventory import (
    SCHEMA_VERSION,
    database_url,
    device_history,
    devices_json,
    devices_table,
    list_devices,
    migrate_database,
    write_devices_json,
    write_devices_table,
)
from configserver.inventory._database import devices, polls
from configserver.inventory._queries import (
    devices_query,
    history_keys_query,
    history_query,
)


async def plan(url: str, query: Any) -> str:
    """The database's plan for `query`, as one text."""
    engine = create_async_engine(database_url(url))
    try:
        async with engine.connect() as connection:
            sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
            if engine.dialect.name == "sqlite":
                rows = await connection.execute(sa.text("EXPLAIN QUERY PLAN " + sql))
                return "\n".join(str(row[-1]) for row in rows)
            await connection.execute(sa.text("SET enable_seqscan = off"))
            await connection.execute(sa.text("SET enable_sort = off"))
            return "\n".join(str(row[0]) for row in await connection.execute(sa.text("EXPLAIN " + sql)))
    finally:
        await engine.dispose()


def uses(text: str, index: str) -> bool:
    """Whether the plan reads `index` (SQLite: `USING INDEX x`; PostgreSQL: `Index Scan [Backward] using x`,
    `Index Only Scan ...`, `Bitmap Index Scan on x`)."""
    return re.search(rf"INDEX {index}\b|Index (Only )?Scan (Backward )?using {index}\b|Bitmap Index Scan on {index}\b",
                     text) is not None


def searches_by(text: str, column: str) -> bool:
    """Whether the plan finds rows by `column` through some index (whichever serves it best)."""
    return re.search(rf"USING (COVERING )?INDEX \w+ \({column}=|Index Cond: \(+{column}\)?(::text)? =", text) is not None


def sorts(text: str) -> bool:
    """Whether the plan sorts rows itself (on PostgreSQL a sort priced out shows as `Sort`)."""
    return "TEMP B-TREE" in text or "Sort" in text.replace("Sort Key", "")


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "devices_last_seen"),
        ({"stale": 7 * 86400, "now": T0}, "devices_last_seen"),
        ({"since": 3600, "now": T0}, "devices_last_seen"),
        ({"model": "ip232"}, "devices_model"),
        ({"status": 403}, "devices_status"),
    ],
)
def test_every_devices_filter_walks_an_index_in_the_order_it_prints(
    database: str, filters: dict[str, Any], index: str,
) -> None:
    migrate_database(database)
    explained = asyncio.run(plan(database, devices_query(**filters)))
    assert uses(explained, index), explained
    assert not sorts(explained), explained


@pytest.mark.parametrize("spelling", [PHONE.upper(), "00:90:33:30:00:AF"])
def test_history_finds_the_device_and_its_polls_by_index(database: str, spelling: str) -> None:
    migrate_database(database)
    keys = asyncio.run(plan(database, history_keys_query(spelling)))
    assert "lower" not in keys.lower().replace("devices_", "")  # a stored key, not lower(hwid) per row
    assert searches_by(keys, "mac" if ":" in spelling else "hwid_key"), keys
    explained = asyncio.run(plan(database, history_query(["00-90-33-30-00-af"], 20)))
    assert uses(explained, "polls_device_time"), explained


# The schema as configserver created it before migration 2, in SQL both databases take.
VERSION_1 = [
    """CREATE TABLE devices (device VARCHAR(64) PRIMARY KEY, hwid VARCHAR(64), mac VARCHAR(64),
       model VARCHAR(64), first_seen DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
       status INTEGER NOT NULL, reason TEXT, path TEXT, client_ip VARCHAR(64), served_at DOUBLE PRECISION,
       template TEXT, script_sha256 VARCHAR(64), reported_at DOUBLE PRECISION, firmware TEXT, boot TEXT,
       version TEXT, local_ip TEXT)""",
    """CREATE TABLE polls (id {id} PRIMARY KEY, time DOUBLE PRECISION NOT NULL, device VARCHAR(64),
       hwid VARCHAR(64), mac VARCHAR(64), model VARCHAR(64), client_ip VARCHAR(64), path TEXT NOT NULL,
       status INTEGER NOT NULL, reason TEXT, detail TEXT, template TEXT, script_sha256 VARCHAR(64),
       decision VARCHAR(16), check_reported TEXT, check_digest VARCHAR(128), firmware TEXT,
       duration_ms FLOAT, query JSON NOT NULL)""",
    "CREATE INDEX polls_device_time ON polls (device, time)",
    "CREATE INDEX polls_time ON polls (time)",
    "CREATE TABLE inventory_schema (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)",
    "INSERT INTO inventory_schema VALUES (1, 0)",
    f"""INSERT INTO devices (device, hwid, mac, model, first_seen, last_seen, status, template)
       VALUES ('00-90-33-30-00-af', '{PHONE}', '00-90-33-30-00-af', 'IP232', {T0}, {T0}, 200, 'models/IP232.j2')""",
    f"""INSERT INTO polls (time, device, hwid, mac, model, path, status, decision, query)
       VALUES ({T0}, '00-90-33-30-00-af', '{PHONE}', '00-90-33-30-00-af', 'IP232', '/', 200, 'sent', '{{}}')""",
]


async def build_version_1(url: str) -> None:
    engine = create_async_engine(database_url(url))
    postgresql = engine.dialect.name == "postgresql"
    async with engine.begin() as connection:
        for statement in VERSION_1:
            await connection.execute(sa.text(statement.replace("{id}", "BIGSERIAL" if postgresql else "INTEGER")))
    await engine.dispose()


async def index_names(url: str, table: str) -> set[str]:
    engine = create_async_engine(database_url(url))
    async with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            query = f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}'"
        else:
            query = f"SELECT indexname FROM pg_indexes WHERE tablename = '{table}'"
        names = {row[0] for row in await connection.execute(sa.text(query))}
    await engine.dispose()
    return names


def test_a_database_of_version_1_gets_the_indexes_and_keeps_its_fleet(database: str) -> None:
    asyncio.run(build_version_1(database))
    assert migrate_database(database) == SCHEMA_VERSION

    names = asyncio.run(index_names(database, "devices"))
    assert {"devices_last_seen", "devices_status", "devices_model", "devices_hwid_key", "devices_mac"} <= names
    [phone] = list_devices(database)
    assert (phone.hwid, phone.template) == (PHONE, "models/IP232.j2")
    [first] = device_history(database, PHONE.upper())  # found through the hwid key filled in
    assert (first.decision, first.claimed, first.repeats) == ("sent", False, 0)


def test_the_steps_after_version_1_change_nothing_on_a_new_database(database: str) -> None:
    # Step 1 creates today's tables; the steps after it must find their work done, not fail.
    migrate_database(database)
    created = {name: asyncio.run(index_names(database, name)) for name in ("devices", "polls")}
    assert {index.name for index in devices.indexes} <= created["devices"]
    assert {index.name for index in polls.indexes} <= created["polls"]
    assert migrate_database(database) == SCHEMA_VERSION


@pytest.mark.anyio
async def test_devices_json_is_written_as_the_rows_arrive_and_reads_back_as_one_list(database: str) -> None:
    async with running(database, batch_size=50) as inventory:
        for n in range(120):
            inventory.record(poll(f"IP232-30-{n // 256:02x}-{n % 256:02x}", T0 + n))

    def stream() -> tuple[int, str]:
        out = io.StringIO()
        return write_devices_json(database, out, now=T0 + 200, since="1h"), out.getvalue()

    count, text = await asyncio.to_thread(stream)
    expected = devices_json(await asyncio.to_thread(list_devices, database, now=T0 + 200, since="1h"))
    assert count == 120 and json.loads(text) == expected
    assert text.count("\n") == 122  # "[", one line per device, "]"
    assert [device["time"] for device in expected] == sorted((int(T0 + n) for n in range(120)), reverse=True)


def test_devices_json_of_an_empty_fleet_is_an_empty_list(sqlite_url: str) -> None:
    migrate_database(sqlite_url)
    out = io.StringIO()
    assert write_devices_json(sqlite_url, out) == 0
    assert json.loads(out.getvalue()) == []



@pytest.mark.parametrize("filters", [{}, {"model": "IP1202"}, {"status": 404}])
def test_devices_table_streamed_is_the_table_of_the_list(database: str, filters: dict[str, Any]) -> None:
    async def record() -> None:
        async with running(database) as inventory:
            inventory.record(poll(PHONE, T0 - 60))
            inventory.record(poll("IP1202-35-fe-4d", T0 - 3600, status=403, reason="wrong CA\x1b[2J"))
            inventory.record(poll("IP232-30-00-b1", T0 - 10 * 86400, template="a/very/long/" + "x" * 60 + ".j2"))

    asyncio.run(record())
    out = io.StringIO()
    count = write_devices_table(database, out, now=T0, **filters)
    listed = list_devices(database, now=T0, **filters)
    assert out.getvalue() == devices_table(listed, now=T0)
    assert count == len(listed)
