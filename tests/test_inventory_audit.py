"""What the audit keeps: refusals a certificate only claimed, floods folded without losing anyone's polls,
and commands that answer bad input and broken databases in one line."""

# ruff: noqa: F811 - the fixtures come from test_inventory; pytest passes them by the names imported

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from pathlib import Path

import pytest
from test_inventory import (  # noqa: F401 - fixtures
    FAST,
    GATEWAY,
    PHONE,
    T0,
    anyio_backend,
    database,
    eventually,
    poll,
    postgres_server,
    postgres_url,
    reading,
    running,
    sqlite_url,
)

from configserver.inventory import (
    Inventory,
    InventoryError,
    device_history,
    history_table,
    list_devices,
    migrate_database,
)
from configserver.inventory._rows import fold_floods
from configserver.outcome import Outcome

EXPIRED = "IP232-30-00-b1"


def claimed(hwid: str, at: float, reason: str = "certificate expired", **changes: object) -> Outcome:
    """A refusal whose certificate names `hwid` without proving it."""
    return dataclasses.replace(poll(hwid, at, status=403, reason=reason), claimed=True, **changes)


# -- claimed identities ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_refusal_the_certificate_only_claims_is_in_history_but_never_in_the_inventory(database: str) -> None:
    async with running(database) as inventory:
        inventory.record(poll(PHONE, T0))
        inventory.record(claimed(PHONE, T0 + 60, "device mismatch", client_ip="203.0.113.66", query={"PROT": "9Z999"}))
        inventory.record(claimed(EXPIRED, T0 + 90))  # a device never admitted
        await eventually(lambda: inventory.stats()["written"] == 3)
        found = await inventory.devices()
        phone_history = await inventory.history(PHONE)
        expired_by_mac = await inventory.history("00:90:33:30:00:B1")
        expired_by_hwid = await inventory.history(EXPIRED.upper())

    [phone] = found  # the device that was never admitted is not in the fleet
    assert (phone.last_seen, phone.status, phone.reason) == (T0, 200, None)
    assert (phone.client_ip, phone.firmware, phone.template) == ("198.51.100.7", "13A127", "models/IP232.j2")
    assert [(p.time, p.status, p.reason, p.claimed) for p in phone_history] == [
        (T0 + 60, 403, "device mismatch", True), (T0, 200, None, False),
    ]
    assert [(p.hwid, p.reason, p.claimed) for p in expired_by_mac] == [(EXPIRED, "certificate expired", True)]
    assert expired_by_hwid == expired_by_mac


def test_history_marks_claimed_polls_and_shows_decisions_in_their_own_column(sqlite_url: str) -> None:
    async def record() -> None:
        async with running(sqlite_url) as inventory:
            inventory.record(poll(PHONE, T0))
            inventory.record(claimed(PHONE, T0 + 60, "revoked"))

    asyncio.run(record())
    header, revoked, served = history_table(device_history(sqlite_url, PHONE)).splitlines()
    columns = [header.index(name) for name in ("STATUS", "REASON", "DECISION", "IP")]
    assert revoked[columns[0]:columns[1]].strip() == "403 (claimed)"
    assert revoked[columns[1]:columns[2]].strip() == "revoked"
    assert served[columns[1]:columns[2]].strip() == "-"  # served: no reason ...
    assert served[columns[2]:columns[3]].strip() == "sent"  # ... and the decision under DECISION


# -- floods ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_flood_by_one_device_costs_no_other_device_a_poll(database: str) -> None:
    # 3,000 refusals of one stolen certificate in three seconds, into a queue of 100, while 40
    # other devices and the flooded device itself poll cleanly: all of it accounted for.
    others = [f"IP232-30-02-{n:02x}" for n in range(40)]
    async with running(database, queue_size=100) as inventory:
        for n in range(3000):
            inventory.record(claimed(PHONE, T0 + n / 1000, "device mismatch"))
            if n % 75 == 0:
                inventory.record(poll(others[n // 75], T0 + n / 1000))
            if n == 1500:
                inventory.record(poll(PHONE, T0 + 1.5001))
            if n % 500 == 0:
                await asyncio.sleep(0)  # the writer runs in the gaps, as beside a busy app
        await eventually(lambda: inventory.stats()["queued"] == 0)
        stats = inventory.stats()
        fleet = {device.hwid: device for device in await inventory.devices()}
        history = await inventory.history(PHONE, limit=1000)

    assert stats["dropped"] == 0 and stats["written"] == 3000 + 40 + 1 and stats["folded"] > 2500
    assert set(fleet) == {PHONE, *others}
    assert (fleet[PHONE].status, fleet[PHONE].last_seen) == (200, T0 + 1.5001)  # the flood proved nothing
    assert sum(1 + p.repeats for p in history if p.claimed) == 3000
    assert [p.time for p in history if not p.claimed] == [T0 + 1.5001]
    folded = [p for p in history if p.repeats]
    assert folded and all(p.repeats_since is not None and p.repeats_since < p.time for p in folded)


def test_polls_that_come_minutes_apart_are_never_folded_even_in_a_backlog() -> None:
    backlog = [poll(PHONE, T0 + n * 300) for n in range(50)]  # four hours of an outage
    assert [repeats for _, repeats, _ in fold_floods(backlog, 8)] == [0] * 50


def test_a_run_of_alike_polls_under_a_second_apart_becomes_its_newest_counting_the_rest() -> None:
    run = [poll(PHONE, T0 + n * 0.1) for n in range(20)]
    other = poll(GATEWAY, T0 + 1)
    refused = poll(PHONE, T0 + 1.05, status=404, reason="no configuration")
    folded = fold_floods([*run, other, refused], 8)
    assert sorted((record.hwid, record.status, repeats, since) for record, repeats, since in folded) == [
        (GATEWAY, 200, 0, None), (PHONE, 200, 19, T0), (PHONE, 404, 0, None),
    ]
    assert next(record for record, repeats, _ in folded if repeats).time == T0 + 1.9


def test_history_says_how_many_polls_a_row_stands_for(sqlite_url: str) -> None:
    async def record() -> None:
        async with running(sqlite_url) as inventory:
            for n in range(30):
                inventory.record(claimed(PHONE, T0 + n * 0.01, "device mismatch"))

    asyncio.run(record())
    [row] = device_history(sqlite_url, PHONE)
    assert (row.repeats, row.repeats_since, row.time) == (29, T0, T0 + 0.29)
    assert "29 more since" in history_table([row])


# -- bad input and broken databases: one line, nonzero status ----------------------------------


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from configserver.cli import main

    migrate_database(sqlite_url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIGSERVER_DATABASE", sqlite_url)

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["history", PHONE, "--limit", "99999999999999999999"], "limit must be from 1 to 1,000,000"),
        (["history", PHONE, "--limit", "0"], "limit must be from 1 to 1,000,000"),
        (["devices", "--status", "9" * 30], "is no HTTP status"),
        (["devices", "--json", "--status", "-1"], "is no HTTP status"),
    ],
)
def test_numbers_out_of_range_are_one_line_and_a_nonzero_status(cli, argv: list[str], says: str) -> None:
    status, out, err = cli(*argv)
    assert (status, out) == (1, "")
    assert says in err and len(err.strip().splitlines()) == 1


def test_a_schema_version_that_is_no_number_is_one_clear_line(cli, sqlite_url: str, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "inventory.db") as connection:  # a table remade by hand, as text
        versions = connection.execute("SELECT version, applied_at FROM inventory_schema").fetchall()
        connection.execute("DROP TABLE inventory_schema")
        connection.execute("CREATE TABLE inventory_schema (version TEXT PRIMARY KEY, applied_at REAL)")
        connection.executemany("INSERT INTO inventory_schema VALUES (?, ?)", versions)
        connection.execute("INSERT INTO inventory_schema VALUES ('two', 0)")
    for argv in (["devices"], ["history", PHONE], ["migrate"]):
        status, out, err = cli(*argv)
        assert (status, out) == (1, "")
        assert "inventory_schema holds 'two' where a schema version number belongs" in err
        assert len(err.strip().splitlines()) == 1


def test_the_writer_logs_the_database_and_its_schema_version_once_ready(
    postgres_server, caplog: pytest.LogCaptureFixture,
) -> None:
    postgres_server.empty_database()
    url = postgres_server.url("scratch").replace("postgres@", "postgres:hunter2@")  # trust: any password

    async def start() -> None:
        async with running(url):
            await eventually(lambda: any(r.getMessage() == "inventory ready" for r in caplog.records))

    with caplog.at_level(logging.INFO, logger="configserver.inventory"):
        asyncio.run(start())
    [ready] = [r.fields for r in caplog.records if r.getMessage() == "inventory ready"]  # type: ignore[attr-defined]
    from configserver.inventory import SCHEMA_VERSION

    assert ready["schema_version"] == SCHEMA_VERSION
    assert ready["database"].startswith("postgresql+asyncpg://postgres:***@127.0.0.1:")
    assert "hunter2" not in str(ready)


def test_a_client_that_cannot_use_its_own_files_says_so(
    postgres_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The PostgreSQL driver reads $HOME/.postgresql before it connects. A HOME it cannot use
    # (unreadable for the service's user; here, too long a path even for root) is a file error
    # of the client, not of the database: say so, and what to do.
    monkeypatch.setenv("HOME", "/tmp/" + "/".join(["h" * 200] * 25))
    url = postgres_server.empty_database()
    with pytest.raises(InventoryError) as raised:
        list_devices(url)
    message = str(raised.value)
    assert "cannot use its own file" in message and ".postgresql" in message and "set HOME" in message
    assert len(message.splitlines()) == 1

    async def write() -> None:
        inventory = Inventory(url, **FAST)
        await inventory.start()
        inventory.record(poll(PHONE, T0))
        await eventually(lambda: inventory.stats()["failures"] >= 1)
        await inventory.close(timeout=0.1)

    with caplog.at_level(logging.WARNING, logger="configserver.inventory"):
        asyncio.run(write())
    errors = [r.fields["error"] for r in caplog.records if "error" in getattr(r, "fields", {})]  # type: ignore[attr-defined]
    assert errors and all("cannot use its own file" in error for error in errors)


def test_the_inventory_refuses_an_unusable_number_before_asking_the_database(tmp_path: Path) -> None:
    for call in (lambda: list_devices(f"sqlite:///{tmp_path}/x.db", status=2**70),
                 lambda: device_history(f"sqlite:///{tmp_path}/x.db", PHONE, limit=2**70)):
        with pytest.raises(InventoryError):
            call()
    assert not (tmp_path / "x.db").exists()


def test_refusals_from_the_app_land_in_the_history_of_the_device_they_name(site, pki, sqlite_url: str) -> None:
    from driving import call, terminator_headers

    site.write("templates/models/IP232.j2", "# script for {{ device.hwid }}\n")
    app = site.app()
    inventory = Inventory(sqlite_url, **FAST)
    app.recorders.append(inventory.record)
    assert call(app, "/update/", terminator_headers(pki.phone)).status == 200
    assert call(app, "/update/", terminator_headers(pki.phone), query="hwid=IP232-30-00-b2").status == 403
    assert call(app, "/update/", terminator_headers(pki.expired)).status == 403

    async def write() -> None:
        await inventory.start()
        await inventory.close()

    asyncio.run(write())
    # The expired phone proved nothing: not in the fleet. The phone's own certificate is proven,
    # so its query naming another device is the phone's newest poll, not a claim.
    [phone] = list_devices(sqlite_url)
    assert (phone.hwid, phone.status, phone.reason) == (PHONE, 403, "device mismatch")
    [mismatch, served] = device_history(sqlite_url, PHONE)
    assert (mismatch.reason, mismatch.claimed, served.status, served.claimed) == ("device mismatch", False, 200, False)
    [expired] = device_history(sqlite_url, EXPIRED)
    assert (expired.status, expired.claimed) == (403, True) and expired.reason  # whichever check refused it
    assert "403 (claimed)" in history_table([expired])
