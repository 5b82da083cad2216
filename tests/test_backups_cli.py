"""`configserver backups`: a device's versions, one printed, two diffed, devices missing a
backup, and asking devices for one now."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from configserver.backups import Asking, BackupStore
from configserver.cli import main

NOW = float(int(time.time()))
DAY = 86400.0
PHONE = ("IP232-30-00-af", "00-90-33-30-00-af", "IP232")


def body(name: str) -> bytes:
    return (
        "config change IP0 /addr 10.0.0.5\r\n"
        f"config change PHONE /user-1 /name {name} /pwd s3cret\r\n"
        f"vars create TLS0/TICKET/0 pb {name.encode().hex()}\r\n"
        "config write\r\n"
    ).encode()


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'configserver.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIGSERVER_DATABASE", url)
    monkeypatch.setenv("CONFIGSERVER_GROUPS", '{"desk": ["IP232", "IP112"]}')
    return url


def stored(database: str, *uploads: tuple[str, float]) -> None:
    async def go() -> None:
        store = BackupStore(database)
        await store.migrate()
        for name, at in uploads:
            await store.store_config(mac=PHONE[1], hwid=PHONE[0], model=PHONE[2], body=body(name), now=at)
        await store.close()
    asyncio.run(go())


def test_listing_shows_each_version_with_time_size_and_lines_changed(database: str, capsys) -> None:
    stored(database, ("Reception", NOW - 2 * DAY), ("Lobby", NOW - DAY), ("Lobby", NOW - 60))
    assert main(["backups", "IP232-30-00-af"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("IP232-30-00-af (00-90-33-30-00-af): 2 versions kept, 3 uploads, last upload ")
    assert out[1].split() == ["VERSION", "STORED", "(UTC)", "BYTES", "LINES", "LINES", "CHANGED"]
    assert out[2].split()[0] == "2" and out[2].split()[-2:] == ["3", "2"]
    assert out[3].split()[0] == "1" and out[3].split()[-1] == "first"
    assert main(["backups", "0090333000AF"]) == 0   # the MAC finds it too
    assert "2 versions kept" in capsys.readouterr().out


def test_show_prints_a_version_exactly_as_uploaded(database: str, capsys: pytest.CaptureFixture[bytes]) -> None:
    stored(database, ("Reception", NOW - DAY), ("Lobby", NOW))
    assert main(["backups", "IP232-30-00-af", "--show", "1"]) == 0
    assert capsys.readouterr().out == body("Reception").decode()


def test_diff_defaults_to_the_last_two_and_leaves_out_volatile_lines(database: str, capsys) -> None:
    stored(database, ("Reception", NOW - 2 * DAY), ("Lobby", NOW - DAY), ("Desk", NOW))
    assert main(["backups", "IP232-30-00-af", "--diff"]) == 0
    diff = capsys.readouterr().out.splitlines()
    assert diff[:2] == ["--- IP232-30-00-af version 2", "+++ IP232-30-00-af version 3"]
    assert "-config change PHONE /user-1 /name Lobby /pwd s3cret" in diff
    assert "+config change PHONE /user-1 /name Desk /pwd s3cret" in diff
    assert not any("TICKET" in line for line in diff)
    assert main(["backups", "IP232-30-00-af", "--diff", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "--- IP232-30-00-af version 1", "+++ IP232-30-00-af version 3"]


def test_an_unknown_version_or_device_name_is_an_error(database: str, capsys) -> None:
    stored(database, ("Reception", NOW))
    assert main(["backups", "IP232-30-00-af", "--show", "7"]) == 1
    assert "has no version 7" in capsys.readouterr().err
    assert main(["backups", "IP232-30-00-af", "--diff"]) == 1
    assert "fewer than two versions" in capsys.readouterr().err
    assert main(["backups", "reception-phone"]) == 1
    assert "neither a hwid" in capsys.readouterr().err


def test_missing_lists_devices_without_a_recent_backup(database: str, capsys) -> None:
    stored(database, ("Reception", NOW - 3 * DAY))
    assert main(["backups", "--missing", "2d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["HWID", "MAC", "MODEL"]
    assert lines[1].split()[:3] == ["IP232-30-00-af", "00-90-33-30-00-af", "IP232"] and "3d" in lines[1]
    assert main(["backups", "--missing", "4d"]) == 0
    assert capsys.readouterr().out == "no devices missing a backup\n"
    assert main(["backups", "--missing", "soon"]) == 1


def test_now_asks_a_group_a_device_and_all_and_the_schedule_sees_it(database: str, capsys) -> None:
    stored(database, ("Reception", NOW - 60))
    assert main(["backups", "--now", "desk", "IP1202-35-fe-4d"]) == 0
    out = capsys.readouterr().out
    assert "model IP232 (group desk)" in out and "model IP112 (group desk)" in out and "device IP1202-35-fe-4d" in out

    async def asked() -> list[str]:
        store = BackupStore(database)
        asking = Asking(store, url="https://config.example.com/backup", interval_seconds=0, facts=False)
        await asking.refresh()
        await store.close()
        return asking.lines(*PHONE[1::-1], PHONE[2]) + asking.lines("00-90-33-35-fe-4d", "IP1202-35-fe-4d", "IP1202")
    assert len(asyncio.run(asked())) == 2


def test_no_database_is_an_error_not_an_empty_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIGSERVER_DATABASE", f"sqlite:///{tmp_path / 'nowhere.db'}")
    assert main(["backups", "IP232-30-00-af"]) == 1
    assert "no inventory database" in capsys.readouterr().err
    assert not (tmp_path / "nowhere.db").exists()


def test_listing_shows_the_facts_the_device_reported(database: str, capsys) -> None:
    from configserver.backups import parse_certificate_facts, parse_device_facts

    stored(database, ("Reception", NOW))

    async def report() -> None:
        store = BackupStore(database)
        await store.store_facts(mac=PHONE[1], hwid=PHONE[0], source="cmd0", now=NOW, facts=parse_device_facts(
            '<info name="Reception&#x7f;&#x202e;" version="13r1 IP232[13.A127], Bootcode[113454], Hardware[300]"/>'
        ).as_json())
        await store.store_facts(mac=PHONE[1], hwid=PHONE[0], source="x509", now=NOW, facts=parse_certificate_facts(
            '<info><servercert><certificate subject_cn="IP232-30-00-af" issuer_cn="innovaphone Device '
            'Certification Authority" not_before="2015-06-01" not_after="2035-06-01"/></servercert></info>'
        ).as_json())
        await store.close()
    asyncio.run(report())
    assert main(["backups", "IP232-30-00-af"]) == 0
    out = capsys.readouterr().out
    # what the device chose to call itself is shown escaped, never as a terminal control sequence
    assert "device: name Reception\\x7f\\x202e, firmware 13.A127, boot 113454, hardware 300" in out
    assert ("certificate: IP232-30-00-af, issued by innovaphone Device Certification Authority, "
            "valid 2015-06-01 to 2035-06-01") in out


@pytest.mark.parametrize("arguments", [
    ["--show", "99999999999999999999999"],
    ["--show", "0"],
    ["--diff", "1", "99999999999999999999999"],
    ["--diff", "x"],
])
def test_a_version_number_out_of_range_is_one_clear_line(database: str, capsys, arguments: list[str]) -> None:
    stored(database, ("Reception", NOW - DAY), ("Lobby", NOW - 60))
    assert main(["backups", "IP232-30-00-af", *arguments]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("configserver backups: ") and "is not a version number" in line


def test_a_device_argument_that_is_not_utf8_is_named_by_its_bytes(database: str, capsys) -> None:
    import os

    stored(database, ("Reception", NOW - DAY))
    for arguments in (["backups", os.fsdecode(b"IP232-30-00-\xff")], ["backups", "--now", os.fsdecode(b"IP\xff\x1b")]):
        assert main(arguments) == 1
        [line] = capsys.readouterr().err.splitlines()
        assert "\\udc" not in line and "\x1b" not in line
        assert "'IP232-30-00-\\xff' is neither a hwid" in line or "'IP\\xff\\x1b' is not all, a hwid" in line
