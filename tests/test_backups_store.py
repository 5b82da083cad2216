"""Backups in the inventory's database, on SQLite and a real PostgreSQL: versions kept only when
the configuration changed, pruned to the last N and the retention period, numbered per device
even when two nodes take uploads of one device at once; facts; requests; and no backup text in
any log line or error."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from postgres import PostgresServer
from sqlalchemy.ext.asyncio import create_async_engine

from configserver.backups import (
    Asking,
    BackupStore,
    device_target,
    model_target,
    parse_certificate_facts,
    parse_device_facts,
    receive_upload,
    slot_offset,
)
from configserver.backups._tables import backup_versions
from configserver.inventory import Inventory, database_url
from configserver.outcome import Outcome

T0 = float(int(time.time()))
DAY = 86400.0
SECRET = "s3cret-Passw0rd-4711"


class Phone:
    hwid, mac, model = "IP232-30-00-af", "00-90-33-30-00-af", "IP232"


class Gateway:
    hwid, mac, model = "IP1202-35-fe-4d", "00-90-33-35-fe-4d", "IP1202"


def config(name: str = "Reception", ticket: str = "00112233", *, extra: str = "") -> bytes:
    """A phone's configuration upload; `ticket` only changes a volatile line."""
    return (
        "config change IP0 /addr 10.0.0.5 /mask 255.255.255.0\r\n"
        f"config change PHONE /user-1 /name {name} /pwd {SECRET}\r\n"
        f"vars create TLS0/TICKET/0 pb {ticket}\r\n"
        f"vars create UPDATE/CHECK p {ticket}\r\n"
        f"{extra}"
        "config write\r\n"
    ).encode()


BACKUP = {"mode": ["backup"], "hwid": ["IP232-30-00-af"], "sn": ["0090333000af"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.create()
    yield server
    server.cleanup()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'configserver.db'}"


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.empty_database("backups")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param])


@asynccontextmanager
async def opened(database: str, **options: float) -> AsyncIterator[BackupStore]:
    store = BackupStore(database, **options)  # type: ignore[arg-type]
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


# -- keeping versions -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_first_upload_is_version_one_stored_compressed(database: str) -> None:
    async with opened(database) as store:
        stored = await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0)
        assert (stored.kept, stored.number, stored.lines_changed) == (True, 1, None)
        assert await store.content(Phone.mac, 1) == config()
        [version] = await store.versions(Phone.mac)
        assert (version.number, version.stored_at, version.size, version.lines) == (1, T0, len(config()), 3)
    engine = create_async_engine(database_url(database))
    async with engine.connect() as connection:
        raw = (await connection.execute(sa.select(backup_versions.c.content))).scalar()
    await engine.dispose()
    assert SECRET.encode() not in raw and zlib.decompress(raw) == config()


@pytest.mark.anyio
async def test_an_upload_differing_only_in_volatile_lines_keeps_no_new_version(database: str) -> None:
    async with opened(database) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0)
        again = await store.store_config(
            mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(ticket="ffeeddcc"), now=T0 + DAY)
        assert (again.kept, again.number) == (False, 1)
        assert [v.number for v in await store.versions(Phone.mac)] == [1]
        state = await store.state(Phone.mac)
        assert state is not None and (state.uploads, state.last_upload_at, state.last_stored_at) == (2, T0 + DAY, T0)


@pytest.mark.anyio
async def test_a_changed_configuration_is_a_new_version_with_lines_changed(database: str) -> None:
    async with opened(database) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0)
        changed = await store.store_config(
            mac=Phone.mac, hwid=Phone.hwid, model=Phone.model,
            body=config("Lobby", extra="config change PHONE /user-2 /name Desk\r\n"), now=T0 + 60)
        assert (changed.kept, changed.number, changed.lines_changed) == (True, 2, 3)
        assert [(v.number, v.lines_changed) for v in await store.versions(Phone.mac)] == [(2, 3), (1, None)]


@pytest.mark.anyio
async def test_only_an_upload_that_differs_is_compressed(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from configserver.backups import _store

    compressed: list[bytes] = []
    real = _store._compressed
    monkeypatch.setattr(_store, "_compressed", lambda body: compressed.append(body) or real(body))
    async with opened(database) as store:
        for n, body in enumerate([config(), config(ticket="ffeeddcc"), config(), config("Lobby")]):
            await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=body, now=T0 + n)
        assert [v.number for v in await store.versions(Phone.mac)] == [2, 1]
        assert await store.content(Phone.mac, 2) == config("Lobby")
    assert compressed == [config(), config("Lobby")]


@pytest.mark.anyio
async def test_an_upload_found_unchanged_before_another_came_in_is_stored_after_all(
    database: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The newest version read outside the transaction may be gone by the time the device's lock
    is taken: the check under the lock decides, and the upload is stored, compressed then."""
    async with opened(database) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0)
        seen_before = await store._newest_digest(Phone.mac)
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config("Lobby"), now=T0 + 1)

        async def read_before_the_other_upload(mac: str) -> str | None:
            return seen_before

        monkeypatch.setattr(store, "_newest_digest", read_before_the_other_upload)
        stored = await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0 + 2)
        assert (stored.kept, stored.number, stored.lines_changed) == (True, 3, 2)
        assert await store.content(Phone.mac, 3) == config()


@pytest.mark.anyio
async def test_an_upload_of_many_repeated_lines_is_stored_while_the_audit_goes_on(sqlite_url: str) -> None:
    """The upload's lines changed are counted under SQLite's write lock, which the audit of every
    poll needs too: 50,000 repeated lines (1.1 MB; difflib's matcher took hours on them) are
    counted at once, and the poll of another device recorded meanwhile is written."""
    same = ("config change X /a 1\r\n" * 50_000).encode()
    alternating = ("config change X /a 1\r\nconfig change X /b 2\r\n" * 25_000).encode()
    inventory = Inventory(sqlite_url, flush_interval=0.01, retry_first=0.2, retry_max=0.5)
    await inventory.migrate()
    await inventory.start()
    try:
        async with opened(sqlite_url) as store:
            await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=same, now=T0)
            upload = asyncio.create_task(store.store_config(
                mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=alternating, now=T0 + 60))
            inventory.record(Outcome(time=T0 + 60, client_ip="198.51.100.7", path="/update", status=200,
                                     reason=None, hwid=Gateway.hwid, mac=Gateway.mac, model=Gateway.model, query={}))
            stored = await upload
            for _ in range(1000):   # the writer's next batch, a few of its 10 ms intervals away
                if inventory.stats()["written"] or inventory.stats()["failures"]:
                    break
                await asyncio.sleep(0.01)
    finally:
        await inventory.close()
    assert (stored.kept, stored.number, stored.lines_changed) == (True, 2, 50_000)
    assert (inventory.stats()["written"], inventory.stats()["failures"]) == (1, 0)


@pytest.mark.anyio
async def test_each_device_has_its_own_versions(database: str) -> None:
    async with opened(database) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0)
        await store.store_config(mac=Gateway.mac, hwid=Gateway.hwid, model=Gateway.model, body=config("GW"), now=T0)
        assert await store.content(Gateway.mac, 1) == config("GW")
        assert await store.content(Phone.mac, 1) == config()
        assert await store.content(Phone.mac, 2) is None


@pytest.mark.anyio
async def test_only_the_last_n_versions_are_kept_and_numbers_go_on(database: str) -> None:
    async with opened(database, keep=3) as store:
        for day in range(5):
            await store.store_config(
                mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(f"name{day}"), now=T0 + day * DAY)
        assert [v.number for v in await store.versions(Phone.mac)] == [5, 4, 3]
        assert await store.content(Phone.mac, 3) == config("name2")


@pytest.mark.anyio
async def test_retention_deletes_old_versions_but_never_a_devices_newest(database: str) -> None:
    async with opened(database, retention_days=30) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config("a"), now=T0 - 90 * DAY)
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config("b"), now=T0 - 60 * DAY)
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config("c"), now=T0 - 1 * DAY)
        await store.store_config(mac=Gateway.mac, hwid=Gateway.hwid, model=Gateway.model, body=config("g"),
                                 now=T0 - 400 * DAY)
        assert await store.purge(now=T0) == 2
        assert [v.number for v in await store.versions(Phone.mac)] == [3]
        assert [v.number for v in await store.versions(Gateway.mac)] == [1]  # old, but its only one


# -- two nodes, one PostgreSQL ------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_nodes_taking_uploads_of_one_device_at_once_number_them_in_turn(postgres_url: str) -> None:
    async with opened(postgres_url) as node_a, opened(postgres_url) as node_b:
        bodies = [config(f"name{i}") for i in range(12)]
        results = await asyncio.gather(*(
            (node_a if i % 2 else node_b).store_config(
                mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=body, now=T0 + i)
            for i, body in enumerate(bodies)
        ))
        assert sorted(r.number for r in results) == list(range(1, 13))
        versions = await node_a.versions(Phone.mac)
        assert [v.number for v in versions] == list(range(12, 2, -1))  # the newest 10
        # the same configuration from both nodes at once: one new version, not two
        same = await asyncio.gather(*(
            node.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config("final", ticket=t),
                              now=T0 + 100)
            for node, t in ((node_a, "aa"), (node_b, "bb"))
        ))
        assert sorted(s.kept for s in same) == [False, True]
        assert (await node_b.versions(Phone.mac))[0].number == 13
        state = await node_a.state(Phone.mac)
        assert state is not None and state.uploads == 14


@pytest.mark.anyio
async def test_a_node_learns_the_other_nodes_uploads_and_stops_asking(postgres_url: str) -> None:
    async with opened(postgres_url) as node_a, opened(postgres_url) as node_b:
        hwid = Phone.hwid
        day_start = T0 - T0 % DAY
        slot = day_start + slot_offset(hwid, DAY)
        clock = [slot + 60]
        asking_a = Asking(node_a, url="https://config.example.com/backup", interval_seconds=DAY,
                          clock=lambda: clock[0])
        asking_a.since = slot - DAY
        assert asking_a.lines(Phone.mac, hwid, Phone.model) == []  # knows nothing yet: never asks
        await asking_a.refresh()
        assert asking_a.lines(Phone.mac, hwid, Phone.model)[0].startswith("mod cmd UP0 scfg https://")
        await node_b.store_config(mac=Phone.mac, hwid=hwid, model=Phone.model, body=config(), now=slot + 120)
        clock[0] = slot + 2 * 3600  # asked an hour ago: it would be asked again, but node B has its backup
        await asking_a.refresh()
        assert asking_a.lines(Phone.mac, hwid, Phone.model) == []


@pytest.mark.anyio
async def test_an_admin_request_for_a_model_asks_its_devices_on_every_node(database: str) -> None:
    async with opened(database) as store:
        now = T0
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=now - 60)
        await store.store_config(mac=Gateway.mac, hwid=Gateway.hwid, model=Gateway.model, body=config(), now=now - 60)
        asking = Asking(store, url="https://config.example.com/backup", interval_seconds=0, facts=False,
                        clock=lambda: now)
        await asking.refresh()
        assert asking.lines(Phone.mac, Phone.hwid, Phone.model) == []
        await store.request([model_target("IP232")], now=now - 1)
        await asking.refresh()
        assert asking.lines(Phone.mac, Phone.hwid, Phone.model) == [
            "mod cmd UP0 scfg https://config.example.com/backup?mode=backup&hwid=#h&sn=#m"]
        assert asking.lines(Gateway.mac, Gateway.hwid, Gateway.model) == []
        await store.request([device_target(Gateway.mac)], now=now - 1)
        await asking.refresh()
        assert len(asking.lines(Gateway.mac, Gateway.hwid, Gateway.model)) == 1


# -- uploads end to end, facts, missing ------------------------------------------------------


@pytest.mark.anyio
async def test_an_upload_is_stored_then_found_unchanged(database: str) -> None:
    async with opened(database) as store:
        first = await receive_upload(store, Phone, BACKUP, config(), now=T0)
        assert (first.status, first.reason, first.number, first.body) == (200, "stored", 1, b"# stored: version 1\n")
        again = await receive_upload(store, Phone, BACKUP, config(ticket="99"), now=T0 + 5)
        assert (again.status, again.reason, again.number) == (200, "unchanged", 1)


@pytest.mark.anyio
@pytest.mark.parametrize(("query", "body", "status", "reason"), [
    (BACKUP, b"config change PHONE /pwd " + SECRET.encode() + b"\x00\x01\xff binary", 415, "upload is not text"),
    (BACKUP, b"  \r\n", 400, "empty upload"),
    ({"mode": ["restore"]}, config(), 400, "unknown upload"),
    ({"mode": ["query"], "id": ["x509"]}, b"<info><servercert>" + SECRET.encode(), 400, "facts unreadable"),
])
async def test_a_refused_upload_stores_nothing_and_never_quotes_it(
    sqlite_url: str, query: dict[str, list[str]], body: bytes, status: int, reason: str,
) -> None:
    async with opened(sqlite_url) as store:
        outcome = await receive_upload(store, Phone, query, body, now=T0)
        assert (outcome.status, outcome.reason) == (status, reason)
        assert SECRET not in f"{outcome.detail} {outcome.body!r}"
        assert await store.versions(Phone.mac) == [] and await store.facts(Phone.mac) == {}


@pytest.mark.anyio
async def test_a_database_failure_is_a_503_that_names_no_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    async with opened(database) as store:
        engine = create_async_engine(database_url(database))
        async with engine.begin() as connection:
            await connection.execute(sa.text("DROP TABLE backup_versions"))
        await engine.dispose()
        with caplog.at_level(logging.DEBUG):
            outcome = await receive_upload(store, Phone, BACKUP, config(), now=T0)
        assert (outcome.status, outcome.reason, outcome.detail) == (503, "backup not stored", "OperationalError")
        assert SECRET not in caplog.text and SECRET not in repr(outcome)


@pytest.mark.anyio
async def test_facts_are_kept_with_the_device(database: str) -> None:
    x509 = ('<info><servercert><certificate subject_cn="IP232-30-00-af" issuer_cn="innovaphone Device '
            'Certification Authority" not_before="2015-06-01" not_after="2035-06-01"/></servercert></info>')
    cmd0 = '<info name="Reception" version="13r1 IP232[13.A127], Bootcode[113454], Hardware[300]"/>'
    async with opened(database) as store:
        for what, document in (("x509", x509), ("cmd0", cmd0)):
            outcome = await receive_upload(store, Phone, {"mode": ["query"], "id": [what]}, document.encode(), now=T0)
            assert (outcome.status, outcome.reason) == (200, "facts kept")
        facts = await store.facts(Phone.mac)
        assert facts["x509"] == (T0, parse_certificate_facts(x509).as_json())
        assert facts["cmd0"][1]["firmware"] == "13.A127"
        assert facts["cmd0"][1] == parse_device_facts(cmd0).as_json()


@pytest.mark.anyio
async def test_missing_lists_stale_backups_and_known_devices_that_never_uploaded(database: str) -> None:
    inventory = Inventory(database, flush_interval=0.01)
    await inventory.migrate()
    for hwid in (Phone.hwid, Gateway.hwid, "IP112-30-03-01"):
        inventory.record(Outcome(time=T0 - 10 * DAY, client_ip="198.51.100.7", path="/update", status=200,
                                    reason=None, hwid=hwid, mac="00-90-33-" + hwid.split("-", 1)[1].lower(),
                                    model=hwid.split("-")[0], query={}))
    await inventory.start()
    await inventory.close()
    async with opened(database) as store:
        await store.store_config(mac=Phone.mac, hwid=Phone.hwid, model=Phone.model, body=config(), now=T0 - 3 * DAY)
        await store.store_config(mac=Gateway.mac, hwid=Gateway.hwid, model=Gateway.model, body=config(), now=T0 - 3600)
        missing = await store.missing(2 * DAY, now=T0)
        assert [(m.hwid, m.last_upload_at) for m in missing] == [("IP112-30-03-01", None), (Phone.hwid, T0 - 3 * DAY)]
