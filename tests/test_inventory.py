"""The inventory and audit: every poll recorded without slowing it, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from ports import free_port
from postgres import PostgresServer
from sqlalchemy.ext.asyncio import create_async_engine

from configserver.inventory import (
    SCHEMA_VERSION,
    Inventory,
    InventoryError,
    database_url,
    device_history,
    devices_json,
    devices_table,
    history_table,
    list_devices,
    migrate_database,
    parse_duration,
)
from configserver.outcome import Outcome

# Short waits so the tests see batches, retries and backoff in fractions of a second.
FAST = {"flush_interval": 0.02, "retry_first": 0.05, "retry_max": 0.2}

T0 = float(int(time.time()))  # recent: the writer's own retention keeps anything of the last 90 days
PHONE = "IP232-30-00-af"
GATEWAY = "IP1202-35-fe-4d"
VER = "13r1 dvl IP232[13.A127], Bootcode[113454], Hardware[300] "


def poll(
    hwid: str | None = PHONE,
    at: float = T0,
    *,
    status: int = 200,
    reason: str | None = None,
    template: str | None = "models/IP232.j2",
    query: dict[str, str] | None = None,
    client_ip: str | None = "198.51.100.7",
) -> Outcome:
    """A poll as the app records it: served (with a script hash) unless a reason is given."""
    served = reason is None and status == 200
    tail = hwid.split("-", 1)[1].lower() if hwid else None
    return Outcome(
        time=at, client_ip=client_ip, path="/update/", status=status, reason=reason,
        hwid=hwid, mac=f"00-90-33-{tail}" if tail else None, model=hwid.split("-")[0] if hwid else None,
        template=template if served else None, script_sha256=("ab" * 32) if served else None,
        query={"PROT": "13A127", "BOOT": "113454", "ver": VER, "ip": "10.0.0.5"} if query is None else query,
        duration_ms=1.5, decision="sent" if served else None,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.create()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.empty_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'inventory.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    """The same behaviour on both backends."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param])


@asynccontextmanager
async def running(url: str, **options: float) -> AsyncIterator[Inventory]:
    inventory = Inventory(url, **{**FAST, **options})
    await inventory.start()
    try:
        yield inventory
    finally:
        await inventory.close()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def reading(url: str) -> AsyncIterator[Inventory]:
    """An inventory that is only asked, never started (as the CLI uses it)."""
    inventory = Inventory(url)
    try:
        yield inventory
    finally:
        await inventory.close()


async def sql(url: str, query: str) -> list[tuple]:
    """Ask the database directly, as an admin would."""
    engine = create_async_engine(database_url(url))
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in await connection.execute(sa.text(query))]
    finally:
        await engine.dispose()


async def count_polls(url: str) -> int:
    return (await sql(url, "SELECT count(*) FROM polls"))[0][0]


# -- recording and asking, on both backends ---------------------------------------------------


@pytest.mark.anyio
async def test_served_and_refused_polls_show_up_in_devices_and_history(database: str) -> None:
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0))
        inventory.record(poll(PHONE, T0 + 60, status=403, reason="certificate expired"))
        inventory.record(poll(GATEWAY, T0 + 30, template="models/IP1202.j2", query={"PROT": "12A100"}))
        await eventually(lambda: inventory.stats()["written"] == 3)
        found = await inventory.devices(now=T0 + 120)
        history = await inventory.history(PHONE)

    assert [d.hwid for d in found] == [PHONE, GATEWAY]  # most recently seen first
    phone = found[0]
    assert (phone.first_seen, phone.last_seen) == (T0, T0 + 60)
    assert (phone.status, phone.reason) == (403, "certificate expired")
    assert (phone.template, phone.script_sha256) == ("models/IP232.j2", "ab" * 32)
    assert (phone.firmware, phone.boot, phone.local_ip) == ("13A127", "113454", "10.0.0.5")
    assert (phone.mac, phone.model, phone.client_ip) == ("00-90-33-30-00-af", "IP232", "198.51.100.7")
    assert found[1].firmware == "12A100"

    assert [(p.time, p.status, p.reason) for p in history] == [(T0 + 60, 403, "certificate expired"), (T0, 200, None)]
    assert history[1].decision == "sent" and history[1].template == "models/IP232.j2"
    assert history[1].query["ver"] == VER and history[1].firmware == "13A127"
    assert inventory.stats() == {"queued": 0, "written": 3, "folded": 0, "dropped": 0, "failures": 0, "rejected": 0}


@pytest.mark.anyio
async def test_newest_poll_wins_even_when_written_out_of_order(database: str) -> None:
    # Two batches, the newer poll first: what another instance writing late looks like.
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0 + 100, status=404, reason="no configuration", query={"PROT": "13B200"}))
        await eventually(lambda: inventory.stats()["written"] == 1)
        inventory.record(poll(PHONE, T0, query={"PROT": "13A127"}))
        await eventually(lambda: inventory.stats()["written"] == 2)
        [phone] = await inventory.devices()

    assert (phone.first_seen, phone.last_seen) == (T0, T0 + 100)
    assert (phone.status, phone.reason) == (404, "no configuration")
    assert phone.firmware == "13B200"  # reported later, kept
    assert phone.template == "models/IP232.j2"  # the only script it was ever served


@pytest.mark.anyio
async def test_a_device_identity_follows_its_newest_poll_and_only_that(database: str) -> None:
    first = dataclasses.replace(poll(PHONE, T0), model="IP0", hwid="IP0-30-00-af")   # before a CN fix
    fixed = poll(PHONE, T0 + 60)
    late = dataclasses.replace(poll(PHONE, T0 + 30), model="IP999")                   # an older poll, written last
    nameless = dataclasses.replace(poll(PHONE, T0 + 90), hwid=None, model=None)       # known by its MAC alone
    async with running(database) as inventory:
        for n, record in enumerate((first, fixed, late, nameless), start=1):
            inventory.record(record)
            await eventually(lambda n=n: inventory.stats()["written"] == n)   # one batch each, in this order
        [phone] = await inventory.devices()
        by_model = await inventory.devices(model="ip232")
        by_old_model = await inventory.devices(model="IP0")
        [newest, *_] = await inventory.history(PHONE)

    assert (phone.hwid, phone.model, phone.mac) == (PHONE, "IP232", "00-90-33-30-00-af")
    assert phone.last_seen == T0 + 90 and newest.time == T0 + 90
    assert [d.hwid for d in by_model] == [PHONE] and by_old_model == []   # the model's index follows the row


@pytest.mark.anyio
async def test_template_and_firmware_survive_polls_that_do_not_report_them(database: str) -> None:
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0))
        inventory.record(poll(PHONE, T0 + 1, status=500, reason="configuration error", query={}))
        await eventually(lambda: inventory.stats()["written"] == 2)
        [phone] = await inventory.devices()

    assert (phone.status, phone.reason, phone.last_seen) == (500, "configuration error", T0 + 1)
    assert (phone.template, phone.served_at, phone.firmware) == ("models/IP232.j2", T0, "13A127")


@pytest.mark.anyio
async def test_untrusted_query_text_is_stored_bounded_and_harmless(database: str) -> None:
    hostile = {
        "PROT": "13\x00A127",          # PostgreSQL refuses NUL in text
        "ver": "\udcff" + "x" * 5000,   # lone surrogate, far too long
        **{f"k{i}": "v" for i in range(200)},
    }
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0, query=hostile))
        await eventually(lambda: inventory.stats()["written"] == 1)
        [phone] = await inventory.devices()
        [stored] = await inventory.history(PHONE)

    assert phone.firmware == "13\ufffdA127"
    assert len(stored.query) == 64 and len(stored.query["ver"]) == 1024
    assert inventory.stats()["rejected"] == 0


@pytest.mark.anyio
async def test_refusal_without_identity_is_audited_but_adds_no_device(database: str) -> None:
    async with running(database) as inventory:
        inventory.record(poll(None, T0, status=403, reason="untrusted proxy", query={"hwid": "IP232-30-00-af"}))
        await eventually(lambda: inventory.stats()["written"] == 1)
        assert await inventory.devices() == []
        assert await inventory.history(PHONE) == []  # the device's own claim proves nothing
    assert await count_polls(database) == 1


@pytest.mark.anyio
async def test_retention_deletes_only_polls_older_than_the_retention_period(database: str) -> None:
    async with running(database, retention_days=1000) as inventory:
        for days_ago in (200, 91, 89, 1):
            inventory.record(poll(PHONE, T0 - days_ago * 86400))
    async with reading(database) as inventory:
        assert inventory.retention_days == 90
        assert await inventory.purge(now=T0) == 2
        history = await inventory.history(PHONE)
        [phone] = await inventory.devices()
    assert [round((T0 - p.time) / 86400) for p in history] == [1, 89]
    assert phone.first_seen == T0 - 200 * 86400  # the inventory remembers the device


@pytest.mark.anyio
async def test_migrations_are_recorded_and_run_once(database: str) -> None:
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0))
        await eventually(lambda: inventory.stats()["written"] == 1)  # so the writer has migrated
        assert await inventory.migrate() == SCHEMA_VERSION
    assert await sql(database, "SELECT version FROM inventory_schema") == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


@pytest.mark.anyio
async def test_many_polls_are_written_in_batches(database: str) -> None:
    async with running(database, batch_size=50) as inventory:
        for n in range(1000):
            inventory.record(poll(f"IP232-30-{n // 256:02x}-{n % 256:02x}", T0 + n))
    assert inventory.stats()["written"] == 1000
    async with reading(database) as inventory:
        assert len(await inventory.devices()) == 1000


@pytest.mark.anyio
async def test_a_batch_bound_once_writes_the_rows_sqlalchemy_would(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer binds each batch's rows as tuples, converted as SQLAlchemy converts them: the
    driver gets the statements and parameters SQLAlchemy gives it when it binds every row itself
    (as it does for named parameters, see _Compiled), and the same rows land."""
    from configserver.inventory import _recorder

    sent: list[tuple[str, list[tuple]]] = []

    def seen(connection, cursor, statement, parameters, context, executemany):   # noqa: ARG001
        if statement.startswith(("INSERT INTO polls", "INSERT INTO devices")):
            sent.append((statement, [tuple(row) for row in parameters] if executemany else [tuple(parameters)]))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", seen)
    request_cleanup = lambda: sa.event.remove(sa.engine.Engine, "before_cursor_execute", seen)  # noqa: E731

    batch = [
        poll(PHONE, T0),
        poll(PHONE, T0 + 1, status=403, reason="wrong CA"),                       # the same device again: merged
        dataclasses.replace(poll(GATEWAY, T0 + 2, status=403, reason="revoked"), claimed=True),
        poll(None, T0 + 3, status=403, reason="untrusted proxy", query={}),       # no identity, no device
        poll("IP232-30-00-b0", T0 + 4, query={"PROT": "13\x00A1", "ver": "\u00e9t\u00e9", "ip": ""}),
        dataclasses.replace(poll("IP232-30-00-b1", T0 + 5), detail="d\u00e9tail\x00", duration_ms=0, check_reported="7"),
    ] + [poll("IP232-30-00-b2", T0 + 10 + n / 100) for n in range(12)]           # a flood: one counted row
    columns = ", ".join(c for c in (
        "time device hwid mac model client_ip path status reason detail template script_sha256 decision "
        "check_reported check_digest firmware duration_ms query claimed repeats repeats_since").split())

    async def written() -> tuple[list[tuple], list[tuple], list[tuple[str, list[tuple]]]]:
        sent.clear()
        async with running(database) as inventory:
            for record in batch:
                inventory.record(record)
        assert inventory.stats()["written"] == len(batch) and inventory.stats()["rejected"] == 0
        stored = (await sql(database, f"SELECT {columns} FROM polls ORDER BY time"),
                  await sql(database, "SELECT * FROM devices ORDER BY device"),
                  list(sent))
        engine = create_async_engine(database_url(database))
        async with engine.begin() as connection:
            await connection.execute(sa.text("DELETE FROM polls"))
            await connection.execute(sa.text("DELETE FROM devices"))
        await engine.dispose()
        return stored

    try:
        bound = await written()
        monkeypatch.setattr(_recorder._Compiled, "of", classmethod(lambda cls, *args: None))
        assert await written() == bound
    finally:
        request_cleanup()
    polls, devices, statements = bound
    assert [statement.split(" (")[0] for statement, _ in statements] == ["INSERT INTO polls", "INSERT INTO devices"]
    assert "RETURNING" not in statements[0][0]
    assert len(polls) == 7 and polls[-1][-2] == 11 and [row[0] for row in devices] == [
        "00-90-33-30-00-af", "00-90-33-30-00-b0", "00-90-33-30-00-b1", "00-90-33-30-00-b2"]


def test_a_statement_is_bound_by_position_or_left_to_sqlalchemy() -> None:
    from sqlalchemy.dialects.postgresql import asyncpg, psycopg2
    from sqlalchemy.dialects.sqlite import aiosqlite

    from configserver.inventory._recorder import _Compiled

    table = sa.Table("t", sa.MetaData(), sa.Column("a", sa.Integer), sa.Column("b", sa.JSON), sa.Column("c", sa.Text))
    one = _Compiled.of(sa.insert(table), table, ["a"], aiosqlite.dialect())
    assert one is not None and one.parameters([{"a": 1}, {"a": 2}]) == [(1,), (2,)]
    for dialect, sql in ((aiosqlite.dialect(), "INSERT INTO t (a, b, c) VALUES (?, ?, ?)"),
                         (asyncpg.dialect(), "INSERT INTO t (a, b, c) VALUES ($1::INTEGER, $2::JSON, $3::VARCHAR)")):
        compiled = _Compiled.of(sa.insert(table), table, ["c", "b", "a"], dialect)
        assert compiled is not None and compiled.sql == sql
        assert compiled.parameters([{"c": "x", "b": {"k": "\u00e9"}, "a": 3}]) == [(3, '{"k": "\\u00e9"}', "x")]
    assert _Compiled.of(sa.insert(table), table, ["a", "b"], psycopg2.dialect()) is None   # named: SQLAlchemy binds
    assert _Compiled.of(sa.insert(table), table, ["a", "z"], aiosqlite.dialect()) is None  # not a column
    defaulted = sa.Table("d", sa.MetaData(), sa.Column("a", sa.Integer), sa.Column("n", sa.Integer, default=5))
    assert _Compiled.of(sa.insert(defaulted), defaulted, ["a"], aiosqlite.dialect()) is None  # SQLAlchemy adds n


@pytest.mark.anyio
async def test_rows_of_other_columns_are_bound_by_their_own_statement(sqlite_url: str) -> None:
    from configserver.inventory._recorder import _INSERT_POLLS
    from configserver.inventory._database import polls
    from configserver.inventory._rows import poll_row

    inventory = Inventory(sqlite_url)
    await inventory.migrate()
    full = poll_row(dataclasses.replace(poll(PHONE, T0), detail="the detail"))
    fewer = {key: value for key, value in full.items() if key != "detail"}
    async with inventory._engine.begin() as connection:
        await inventory._execute(connection, _INSERT_POLLS, polls, [fewer])
        await inventory._execute(connection, _INSERT_POLLS, polls, [full])
    await inventory.close()
    assert await sql(sqlite_url, "SELECT detail FROM polls ORDER BY id") == [(None,), ("the detail",)]


# -- several instances, a database that goes away ----------------------------------------------


@pytest.mark.anyio
async def test_two_instances_on_one_postgresql_share_one_inventory(postgres_url: str) -> None:
    one = Inventory(postgres_url, **FAST, batch_size=7)
    two = Inventory(postgres_url, **FAST, batch_size=7)
    await asyncio.gather(one.start(), two.start())  # both migrate the empty database at once
    hwids = [f"IP232-30-00-{n:02x}" for n in range(5)]
    for n in range(300):
        writer = one if n % 2 else two
        status, reason = (403, "certificate expired") if n % 3 == 0 else (200, None)
        writer.record(poll(hwids[n % 5], T0 + n, status=status, reason=reason))
        if n % 20 == 0:
            await asyncio.sleep(0.01)  # let both writers run at the same time
    await asyncio.gather(one.close(), two.close())

    assert one.stats()["written"] + two.stats()["written"] == 300
    assert one.stats()["rejected"] == two.stats()["rejected"] == 0
    async with reading(postgres_url) as inventory:
        found = {d.hwid: d for d in await inventory.devices()}
    for index, hwid in enumerate(hwids):
        times = [n for n in range(300) if n % 5 == index]
        last = max(times)
        assert (found[hwid].first_seen, found[hwid].last_seen) == (T0 + min(times), T0 + last)
        assert found[hwid].status == (403 if last % 3 == 0 else 200)
    assert await count_polls(postgres_url) == 300


@pytest.mark.anyio
async def test_polls_recorded_while_postgresql_is_down_are_written_when_it_is_back(
    postgres_server: PostgresServer, postgres_url: str,
) -> None:
    async with running(postgres_url) as inventory:
        for n in range(20):
            inventory.record(poll(PHONE, T0 + n))
        await eventually(lambda: inventory.stats()["written"] == 20)

        postgres_server.stop()
        try:
            slowest = 0.0
            for n in range(20, 220):
                started = time.perf_counter()
                inventory.record(poll(GATEWAY if n % 2 else PHONE, T0 + n))
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.002)
            await eventually(lambda: inventory.stats()["failures"] >= 2)
            assert inventory.stats()["written"] == 20
            assert inventory.stats()["queued"] == 200
        finally:
            postgres_server.start()
        await eventually(lambda: inventory.stats()["written"] == 220)

    assert slowest < 0.05  # a queue append, whatever the database does
    assert inventory.stats()["dropped"] == 0
    assert await count_polls(postgres_url) == 220
    async with reading(postgres_url) as inventory:
        assert {d.hwid: d.last_seen for d in await inventory.devices()} == {GATEWAY: T0 + 219, PHONE: T0 + 218}


@pytest.mark.anyio
async def test_start_does_not_wait_for_a_database_that_is_down() -> None:
    inventory = Inventory(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", **FAST)
    started = time.perf_counter()
    await inventory.start()
    assert time.perf_counter() - started < 0.5
    for n in range(10):
        inventory.record(poll(PHONE, T0 + n))
    await eventually(lambda: inventory.stats()["failures"] >= 2)

    started = time.perf_counter()
    await inventory.close(timeout=0.3)
    assert time.perf_counter() - started < 2
    assert inventory.stats() | {"failures": 0} == {
        "queued": 0, "written": 0, "folded": 0, "dropped": 10, "failures": 0, "rejected": 0,
    }


@pytest.mark.anyio
async def test_full_queue_folds_new_polls_into_counted_rows_and_drops_only_beyond(sqlite_url: str) -> None:
    inventory = Inventory(sqlite_url, queue_size=10, **FAST)
    for n in range(25):  # not started yet: nothing drains the queue
        inventory.record(poll(PHONE, T0 + n))
    for n in range(11):  # as many other devices as the overflow still holds (9), and two more
        inventory.record(poll(f"IP232-30-01-{n:02x}", T0 + 100))
    assert inventory.stats()["queued"] == 25 + 9 and inventory.stats()["dropped"] == 2
    await inventory.start()
    await inventory.close()
    assert inventory.stats() == {
        "queued": 0, "written": 34, "folded": 14, "dropped": 2, "failures": 0, "rejected": 0,
    }
    async with reading(sqlite_url) as inventory:
        kept = await inventory.history(PHONE, limit=100)
        assert len(await inventory.devices()) == 1 + 9
    # the first ten one by one, the fifteen after them as one row: the newest, counting the rest
    assert [(p.time, p.repeats, p.repeats_since) for p in kept] == [(T0 + 24, 14, T0 + 10)] + [
        (T0 + n, 0, None) for n in reversed(range(10))
    ]


@pytest.mark.anyio
async def test_a_row_the_database_refuses_costs_only_that_row(postgres_url: str) -> None:
    async with running(postgres_url) as inventory:
        bad = dataclasses.replace(poll(GATEWAY, T0 + 1), status=2**40)  # PostgreSQL's integer refuses it
        for record in (poll(PHONE, T0), bad, poll(PHONE, T0 + 2)):
            inventory.record(record)
        await eventually(lambda: inventory.stats()["written"] + inventory.stats()["rejected"] == 3)
    assert inventory.stats()["rejected"] == 1
    async with reading(postgres_url) as inventory:
        assert [p.time for p in await inventory.history(PHONE)] == [T0 + 2, T0]


@pytest.mark.anyio
async def test_record_never_raises_even_for_garbage(sqlite_url: str) -> None:
    async with running(sqlite_url) as inventory:
        inventory.record("not a poll")  # type: ignore[arg-type]
        inventory.record(poll(PHONE, T0))
        await eventually(lambda: inventory.stats()["written"] == 1)
    assert inventory.stats()["rejected"] == 1
    inventory.record(poll(PHONE, T0))  # after close: counted, not raised
    assert inventory.stats()["dropped"] == 1


@pytest.mark.anyio
async def test_polls_recorded_from_other_threads_all_arrive(sqlite_url: str) -> None:
    async with running(sqlite_url, batch_size=25) as inventory:
        def poll_a_lot(first: int) -> None:
            for n in range(first, first + 250):
                inventory.record(poll(PHONE, T0 + n))

        threads = [threading.Thread(target=poll_a_lot, args=(i * 250,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert inventory.stats()["written"] == 1000


@pytest.mark.anyio
async def test_writer_purges_old_polls_in_the_background(sqlite_url: str) -> None:
    async with running(sqlite_url, retention_days=1, retention_interval=0.05) as inventory:
        inventory.record(poll(PHONE, time.time() - 2 * 86400))
        inventory.record(poll(PHONE, time.time()))
        await eventually(lambda: inventory.stats()["written"] == 2)
        for _ in range(100):
            if len(await inventory.history(PHONE)) == 1:
                break
            await asyncio.sleep(0.02)
        assert [p.time > time.time() - 60 for p in await inventory.history(PHONE)] == [True]


def test_sqlite_database_runs_in_wal_mode(sqlite_url: str, tmp_path: Path) -> None:
    migrate_database(sqlite_url)
    with sqlite3.connect(tmp_path / "inventory.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_app_polls_land_in_the_inventory(site, pki, sqlite_url: str) -> None:
    from driving import call, terminator_headers

    site.write("templates/models/IP232.j2", "# script for {{ device.hwid }}\n")
    app = site.app()
    inventory = Inventory(sqlite_url, **FAST)
    app.recorders.append(inventory.record)
    assert call(app, "/update/", terminator_headers(pki.phone), query="PROT=13A127&ver=x").status == 200
    assert call(app, "/update/", terminator_headers(pki.unrelated)).status == 403

    async def write() -> None:
        await inventory.start()
        await inventory.close()

    asyncio.run(write())
    [phone] = list_devices(sqlite_url)
    assert (phone.hwid, phone.status, phone.firmware, phone.template) == (PHONE, 200, "13A127", "models/IP232.j2")
    assert phone.script_sha256 is not None
    assert inventory.stats()["written"] == 2  # the refusal is audited too


# -- asking the inventory ---------------------------------------------------------------------


@pytest.fixture
def fleet(sqlite_url: str) -> str:
    """Three devices: a phone that just polled, a refused gateway, a phone silent for 10 days."""
    async def record() -> None:
        async with running(sqlite_url) as inventory:
            inventory.record(poll(PHONE, T0 - 60))
            inventory.record(poll(GATEWAY, T0 - 3600, status=403, reason="wrong CA", query={"PROT": "12\x1b[2J"}))
            inventory.record(poll("IP232-30-00-b1", T0 - 10 * 86400))

    asyncio.run(record())
    return sqlite_url


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, [PHONE, GATEWAY, "IP232-30-00-b1"]),
        ({"model": "ip232"}, [PHONE, "IP232-30-00-b1"]),
        ({"since": "30m"}, [PHONE]),
        ({"since": "2h"}, [PHONE, GATEWAY]),
        ({"status": 403}, [GATEWAY]),
        ({"stale": "7d"}, ["IP232-30-00-b1"]),
        ({"stale": "30m", "since": "2w"}, [GATEWAY, "IP232-30-00-b1"]),
        ({"model": "IP1202", "stale": "2h"}, []),
    ],
)
def test_devices_are_filtered_by_model_time_and_status(fleet: str, filters: dict, expected: list[str]) -> None:
    assert [d.hwid for d in list_devices(fleet, now=T0, **filters)] == expected


@pytest.mark.parametrize("spelling", [PHONE, PHONE.upper(), "00-90-33-30-00-af", "00:90:33:30:00:AF", "0090333000af"])
def test_history_finds_a_device_by_hwid_or_mac_in_any_spelling(fleet: str, spelling: str) -> None:
    assert [p.hwid for p in device_history(fleet, spelling)] == [PHONE]


def test_history_is_newest_first_and_limited(sqlite_url: str) -> None:
    async def record() -> None:
        async with running(sqlite_url) as inventory:
            for n in range(30):
                inventory.record(poll(PHONE, T0 + n))

    asyncio.run(record())
    assert [p.time for p in device_history(sqlite_url, PHONE, limit=3)] == [T0 + 29, T0 + 28, T0 + 27]
    assert device_history(sqlite_url, "IP232-99-99-99") == []


def test_devices_json_has_the_shape_of_the_discovery_list(fleet: str) -> None:
    listed = devices_json(list_devices(fleet, now=T0))
    assert json.loads(json.dumps(listed))[0] == {
        "mac": "00-90-33-30-00-af",
        "time": int(T0 - 60),
        "ip": "198.51.100.7",
        "localip": "10.0.0.5",
        "devattrs": {
            "mac": "00-90-33-30-00-af", "hwid": PHONE, "type": "IP232", "firm": "13A127", "boot": "113454",
            "ver": VER, "localip": "10.0.0.5",
        },
        "status": 200,
        "reason": None,
        "template": "models/IP232.j2",
        "script_sha256": "ab" * 32,
        "first_seen": int(T0 - 60),
        "served_at": int(T0 - 60),
    }
    assert listed[1]["devattrs"]["boot"] == "" and listed[1]["reason"] == "wrong CA"


def test_devices_table_shows_one_line_per_device_and_escapes_what_devices_sent(fleet: str) -> None:
    lines = devices_table(list_devices(fleet), now=T0).splitlines()
    assert lines[0].split() == ["HWID", "MAC", "MODEL", "FIRMWARE", "LAST", "SEEN", "(UTC)", "AGO", "STATUS",
                                "REASON", "TEMPLATE", "IP"]
    assert len(lines) == 4
    assert lines[1].split()[:4] == [PHONE, "00-90-33-30-00-af", "IP232", "13A127"]
    assert "1m" in lines[1].split() and "10d" in lines[3].split()
    assert "\x1b" not in lines[2] and "12\\x1b[2J" in lines[2] and "wrong CA" in lines[2]
    assert devices_table([]) == "no devices\n"


def test_history_table_shows_one_line_per_poll(fleet: str) -> None:
    lines = history_table(device_history(fleet, GATEWAY)).splitlines()
    assert lines[0].split()[:3] == ["TIME", "(UTC)", "STATUS"]
    assert "403" in lines[1].split() and "wrong CA" in lines[1]
    assert history_table([]) == "no polls\n"


# -- settings and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "driver"),
    [
        ("sqlite:///configserver.db", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite:////var/lib/configserver/inventory.db", "sqlite+aiosqlite"),
        ("postgresql://cs:secret@db.example/configserver", "postgresql+asyncpg"),
        ("postgres://cs@db.example/configserver", "postgresql+asyncpg"),
        ("postgresql+asyncpg://cs@db.example:5433/configserver", "postgresql+asyncpg"),
    ],
)
def test_database_setting_takes_sqlite_and_postgresql_urls(setting: str, driver: str) -> None:
    assert database_url(setting).drivername == driver


@pytest.mark.parametrize(
    "setting", ["mysql://cs@db/configserver", "postgresql+psycopg2://cs@db/x", "configserver.db", "sqlite://"]
)
def test_other_database_settings_are_refused_naming_the_setting(setting: str) -> None:
    with pytest.raises(InventoryError, match="setting 'database'"):
        Inventory(setting)


def test_inventory_takes_its_settings(tmp_path: Path) -> None:
    from configserver.settings import Settings

    settings = Settings(database=f"sqlite:///{tmp_path}/x.db", audit_retention_days=7, audit_queue_size=123)
    inventory = Inventory.from_settings(settings)
    assert (inventory.retention_days, inventory.queue_size) == (7, 123)
    assert not (tmp_path / "x.db").exists()  # built, not connected


def test_unreachable_database_is_one_clear_error_without_its_password() -> None:
    with pytest.raises(InventoryError, match=r"cannot use the inventory database .*\(setting 'database'\)") as raised:
        list_devices(f"postgresql://cs:hunter2@127.0.0.1:{free_port()}/configserver")
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("45s", 45), ("1d12h", 129600),
     (" 1.5h ", 5400)],
)
def test_durations_read_like_an_admin_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "7x", "", "m", "-1d", "0m", "7 days"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(InventoryError, match="30m, 12h, 7d or 2w|longer than zero"):
        parse_duration(text)


def test_bad_duration_is_refused_before_touching_the_database(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="not a duration"):
        list_devices(f"sqlite:///{tmp_path}/x.db", since="soon")
    assert not (tmp_path / "x.db").exists()


# -- the commands -----------------------------------------------------------------------------


@pytest.fixture
def cli(fleet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `configserver ...` against the fleet; returns (exit status, stdout, stderr)."""
    from configserver.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIGSERVER_DATABASE", fleet)

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_devices_command_prints_a_table_or_the_discovery_json(cli) -> None:
    status, out, _ = cli("devices", "--model", "IP232", "--stale", "1d")
    assert status == 0
    assert out.splitlines()[0].startswith("HWID") and len(out.splitlines()) == 2
    assert "IP232-30-00-b1" in out

    status, out, _ = cli("devices", "--json", "--status", "403")
    assert status == 0
    [gateway] = json.loads(out)
    assert (gateway["devattrs"]["hwid"], gateway["mac"]) == (GATEWAY, "00-90-33-35-fe-4d")
    assert (gateway["status"], gateway["reason"]) == (403, "wrong CA")


def test_history_command_lists_a_devices_polls(cli) -> None:
    status, out, _ = cli("history", "00:90:33:30:00:AF", "--limit", "5")
    assert status == 0
    assert out.splitlines()[0].startswith("TIME (UTC)") and len(out.splitlines()) == 2


def test_commands_explain_bad_durations_and_databases(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, err = cli("devices", "--since", "soon")
    assert (status, out) == (1, "")
    assert "'soon' is not a duration" in err and "30m, 12h, 7d or 2w" in err

    monkeypatch.setenv("CONFIGSERVER_DATABASE", "mysql://db/configserver")
    status, _, err = cli("history", PHONE)
    assert status == 1 and "setting 'database'" in err


def test_migrate_command_creates_the_schema(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIGSERVER_DATABASE", f"sqlite:///{tmp_path}/new.db")
    assert cli("migrate") == (0, f"inventory schema at version {SCHEMA_VERSION}\n", "")
    assert cli("devices") == (0, "no devices\n", "")


def test_read_commands_never_create_a_database(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIGSERVER_DATABASE", f"sqlite:///{tmp_path}/typo.db")
    for command in (["devices"], ["history", PHONE]):
        status, out, err = cli(*command)
        assert (status, out) == (1, "") and "no inventory database at" in err and "setting 'database'" in err
    assert not (tmp_path / "typo.db").exists()
    sqlite3.connect(tmp_path / "empty.db").close()
    monkeypatch.setenv("CONFIGSERVER_DATABASE", f"sqlite:///{tmp_path}/empty.db")
    status, _, err = cli("devices")
    assert status == 1 and "holds no inventory" in err


def test_history_finds_a_device_by_the_name_its_certificate_shows(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/fleet.db"

    async def record() -> None:
        inventory = Inventory(database)
        await inventory.start()
        inventory.record(Outcome(time=time.time(), client_ip="192.0.2.1", path="/", status=200, reason=None,
                                    hwid="IP222-30-00-b0", mac="00-90-33-30-00-b0", model="IP222"))
        await inventory.close()

    asyncio.run(record())
    assert [poll.hwid for poll in device_history(database, "IP222s-30-00-b0")] == ["IP222-30-00-b0"]


@pytest.mark.parametrize("database", ["postgresql://cs:p@ss:w/rd#1%?@db/cs", "not a url at all"])
def test_a_database_url_that_cannot_be_read_says_how_without_echoing_it(database):
    from configserver.inventory import InventoryError, database_url

    with pytest.raises(InventoryError, match="percent-encoded") as error:
        database_url(database)
    assert "w/rd" not in str(error.value) and "not a url" not in str(error.value)
