"""`configserver firmware`: the rollout per model as the inventory saw it, and halts by hand or watch,
lifted only by `configserver firmware resume`."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from test_firmware_fleet import Device, node, poll, settled

from configserver.cli import main

START = dt.datetime(2026, 11, 1, 22, 0, tzinfo=dt.UTC)   # in the past: the command judges at the real time
HOUR = 3600.0
FIRST = ["IP232-30-00-01", "IP232-30-00-02", "IP232-30-00-03"]
OTHERS = ["IP232-30-00-10", "IP232-30-00-11", "IP232-30-00-12"]


@pytest.fixture
def rolled_out(site, monkeypatch, tmp_path):
    """Three first devices were sent 13.4711 a minute after the start: one took it, one came back
    with the old build, one never came back."""
    monkeypatch.chdir(site.root)
    database = f"sqlite:///{tmp_path / 'inventory.db'}"
    site.write("configserver.toml", f'templates = "templates"\nvars = "vars"\ndatabase = "{database}"\n'
                                    f'ca_bundle = "{site.ca_bundle}"\n')
    site.write("templates/default.j2", "config change SIP0 /registrar 192.0.2.1\n")
    site.write("vars/default.toml", f"""
[firmware]
url = "http://fw.example.com/firmware/"
prot = "13.4711"
[firmware.rollout]
start = {START.isoformat()}
first = {FIRST!r}
waves = [{{ after = "400d", share = 100 }}]
halt_after = 1
watch = "1h"
""".replace("'", '"'))
    app = node(site, database)
    clock = [START.timestamp() + 60]
    app.clock = lambda: clock[0]
    devices = [Device(hwid) for hwid in FIRST + OTHERS]
    devices[1].takes_updates = False
    silent = devices[2]

    async def scenario():
        await app.inventory.start()
        await app.firmware.tick(watch=False)   # the halts read, as a start does: files may go
        try:
            for moment in (START.timestamp() + 60, START.timestamp() + 2 * HOUR):
                clock[0] = moment
                for device in devices:
                    if device is silent and moment > START.timestamp() + 60:
                        continue
                    status, body = await poll(app, device)
                    assert status == 200
                    device.apply(body)
                await settled([app])
        finally:
            await app.firmware.close()
            await app.inventory.close()

    asyncio.run(scenario())
    return site


def firmware(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["--config", "configserver.toml", "firmware", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_the_report_shows_targets_waves_failures_and_the_halt(rolled_out, capsys):
    status, out, _ = firmware(capsys)
    assert status == 0
    assert out.splitlines() == [
        "IP232 firmware: target 13.4711",
        ("  HALTED 13.4711 since 2026-11-02 00:00 UTC (2 failed, halt_after 1); "
        "resume with: configserver firmware resume IP232 --kind prot"),
        "  devices 6, on target 1, pending 5",
        "    wave 0: 2 (open)",
        "    wave 1: 3 (opens 2027-12-06 22:00 UTC)",
        "  failed: IP232-30-00-02 sent 13.4711 at 2026-11-01 22:01 UTC, came back with 13.4000 at 2026-11-02 00:00 UTC",
        "  failed: IP232-30-00-03 sent 13.4711 at 2026-11-01 22:01 UTC, silent since",
    ]


def test_resume_lifts_the_halt_and_says_what_it_resumed(rolled_out, capsys):
    assert firmware(capsys, "resume", "ip232") == (0, "resumed: IP232 prot 13.4711\n", "")
    assert "HALTED" not in firmware(capsys)[1]
    status, _, err = firmware(capsys, "resume", "IP232")
    assert status == 1 and "no halted rollout of IP232" in err


def test_an_admin_halts_a_target_by_hand(rolled_out, capsys):
    firmware(capsys, "resume", "IP232")
    assert firmware(capsys, "halt", "IP232", "--kind", "prot") == (0, "halted: IP232 prot 13.4711\n", "")
    assert "HALTED 13.4711 since" in firmware(capsys)[1]
    status, _, err = firmware(capsys, "halt", "IP232", "--kind", "boot")
    assert status == 1 and "has no target to halt" in err


def test_without_an_inventory_the_command_says_where_it_looked(site, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(site.root)
    site.write("configserver.toml", f'templates = "templates"\nvars = "vars"\ndatabase = "sqlite:///{tmp_path}/none.db"\n')
    site.write("templates/default.j2", "\n")
    status, _, err = firmware(capsys)
    assert status == 1
    assert f"no inventory database at {tmp_path}/none.db" in err


def test_the_report_names_devices_it_cannot_judge_without_counting_them():
    from configserver.firmware._report import KindReport, report_text
    from configserver.firmware._state import Failure

    sent = START.timestamp() + 60
    entry = KindReport("IP232", "prot", targets={"13.4711": 1}, devices=1,
                       unjudged=[Failure("IP232-30-00-09", "ip232", "prot", "13.4711", None, sent, sent + 7200)])
    assert report_text([entry], sent + 7200).splitlines() == [
        "IP232 firmware: target 13.4711",
        "  devices 1, on target 0, pending 0",
        ("  cannot judge: IP232-30-00-09 sent 13.4711 at 2026-11-01 22:01 UTC, back at 2026-11-02 00:01 UTC "
         "but it has never reported a build (no PROT, nothing in ver): not counted as failed"),
    ]
