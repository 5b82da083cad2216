"""A lab fleet of a few hundred devices polling two app instances while a rollout advances on an
injected clock: waves open in order, the same devices in each wave on both nodes, a halt after
injected failures that both nodes keep, and no device ever sent a file it should not get."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Iterable

import pytest
from driving import Site

from configserver import create_app, load_settings
from configserver.app import ConfigServer
from configserver.firmware import position
from configserver.firmware._state import RolloutState
from configserver.inventory import database_url, migrate, open_engine

START = dt.datetime(2026, 12, 1, 22, 0, tzinfo=dt.UTC)
DAY, HOUR = 86400.0, 3600.0
OLD, NEW = "13.4000", "13.4711"
URL = "http://fw.example.com/firmware/"
ISSUER = "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"
FIRST = ("IP232-30-00-01", "IP232-30-00-02", "IP232-30-00-03")
LINE = re.compile(r"^mod cmd UP0 (prot|boot) (\S+) ser (\S+)$")


def fleet() -> list[tuple[str, str]]:
    """(hwid, model): IP232 and IP1202 take both files, IPVA only firmware, swphone and IPBS2 none."""
    devices = [(f"IP232-30-{i // 256:02x}-{i % 256:02x}", "IP232") for i in range(1, 241)]
    devices += [(f"IP1202-31-00-{i:02x}", "IP1202") for i in range(40)]
    devices += [(f"IPVA-32-00-{i:02x}", "IPVA") for i in range(10)]
    devices += [(f"swphone-33-00-{i:02x}", "swphone") for i in range(5)]
    devices += [(f"IPBS2-34-00-{i:02x}", "IPBS2") for i in range(5)]
    return devices


def expected_file(hwid: str, kind: str) -> str:
    model = hwid.rsplit("-", 3)[0].casefold().removeprefix("ip")
    return f"{URL}{NEW}/{'ip' if kind == 'prot' else 'boot'}{model}.bin"


def wave(hwid: str) -> int:
    if hwid in FIRST:
        return 0
    place = position(hwid)
    return 1 if place < 5 else 2 if place < 25 else 3


class Device:
    """A device as the fleet sees it: the builds it runs, and whether it takes what it is sent."""

    def __init__(self, hwid: str, takes_updates: bool = True) -> None:
        self.hwid = hwid
        self.builds = {"prot": OLD, "boot": OLD}
        self.check = "applied-before"
        self.takes_updates = takes_updates

    def query(self) -> str:
        return f"hwid={self.hwid}&PROT={self.builds['prot']}&BOOT={self.builds['boot']}&CHECK={self.check}"

    def apply(self, body: str) -> dict[str, tuple[str, str]]:
        """Run the answer's firmware lines; returns kind -> (URL, build) of each."""
        sent = {}
        for line in body.splitlines():
            match = LINE.match(line)
            if match:
                sent[match[1]] = (match[2], match[3])
        if self.takes_updates:
            for kind, (_, build) in sent.items():
                self.builds[kind] = build
        return sent


async def poll(app: ConfigServer, device: Device) -> tuple[int, str]:
    headers = [("x-ssl-client-verify", "SUCCESS"), ("x-ssl-client-s-dn", f"CN={device.hwid},O=innovaphone,C=DE"),
               ("x-ssl-client-i-dn", ISSUER)]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/update", "raw_path": b"/update", "query_string": device.query().encode(), "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080), "extensions": {},
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]).decode()


async def settled(apps: Iterable[ConfigServer]) -> None:
    """Every poll written to the inventory, every send noted, halts read: one pass on each node."""
    for app in apps:
        for _ in range(500):
            if app.inventory.stats()["queued"] == 0:
                break
            await asyncio.sleep(0.01)
    for app in apps:
        await app.firmware.tick()


@pytest.fixture
def rollout_site(site: Site) -> Site:
    site.write("templates/default.j2", "config change SIP0 /registrar 192.0.2.1\n")
    site.write("vars/default.toml", f"""
[firmware]
url = "{URL}"
prot = "{NEW}"
boot = "{NEW}"
[firmware.rollout]
start = {START.isoformat()}
first = {list(FIRST)!r}
waves = [{{ after = "1d", share = 5 }}, {{ after = "2d", share = 25 }}, {{ after = "3d", share = 100 }}]
halt_after = 3
watch = "1h"
""".replace("'", '"'))
    return site


def node(site: Site, database: str) -> ConfigServer:
    app = create_app(load_settings(templates=site.templates, vars=site.vars, ca_bundle=site.ca_bundle,
                                   grace_seconds=0, database=database))
    app.store.refresh()
    return app


def test_a_rollout_opens_its_waves_in_order_on_both_nodes_and_halts_on_failures(rollout_site, tmp_path):
    database = f"sqlite:///{tmp_path / 'inventory.db'}"
    apps = [node(rollout_site, database), node(rollout_site, database)]
    clock = [START.timestamp() - HOUR]
    for app in apps:
        app.clock = lambda: clock[0]
    devices = [Device(hwid) for hwid, _ in fleet()]
    # three of the first wave's devices never take what they are sent: the injected failures
    failing = [d for d in devices if wave(d.hwid) == 1 and d.hwid.startswith("IP232")][:3]
    for device in failing:
        device.takes_updates = False
    updated_at: dict[str, int] = {}   # hwid -> the round in which it was sent its files
    # (time, the waves open then); the halt comes with the watch after wave 1
    rounds = [
        (START.timestamp() - HOUR, set()),
        (START.timestamp() + 60, {0}),
        (START.timestamp() + DAY + 60, {0, 1}),
        (START.timestamp() + DAY + 2 * HOUR, {0, 1}),            # the watch has passed: halted
        (START.timestamp() + 2 * DAY + 60, {0, 1, 2}),           # wave 2 opens: IP232 halted
        (START.timestamp() + 3 * DAY + 60, {0, 1, 2, 3}),
    ]
    halts = []

    async def scenario():
        for app in apps:
            await app.inventory.start()
        try:
            for number, (moment, open_waves) in enumerate(rounds):
                clock[0] = moment
                for device in devices:
                    answers = [await poll(app, device) for app in apps]
                    # both nodes give the same answer (the poll to the second changes nothing)
                    assert answers[0] == answers[1], device.hwid
                    status, body = answers[0]
                    assert status == 200, body
                    sent = device.apply(body)
                    model = device.hwid.rsplit("-", 3)[0].casefold()
                    for kind, (url, build) in sent.items():
                        assert wave(device.hwid) in open_waves, (number, device.hwid, kind)
                        assert (url, build) == (expected_file(device.hwid, kind), NEW)
                        assert not (model in ("swphone", "ipbs2") or (model == "ipva" and kind == "boot"))
                        updated_at.setdefault(device.hwid, number)
                    if sent:
                        assert body.splitlines()[len(sent)] == "iresetn"
                await settled(apps)
                halts.append([app.firmware.state.halted("IP232", "prot", NEW) for app in apps])
            metrics = await metrics_text(apps[1])
        finally:
            for app in apps:
                await app.firmware.close()
                await app.inventory.close()
        return metrics

    metrics = asyncio.run(scenario())
    rounds_of: dict[tuple[str, int], set[int]] = {}   # (model, wave) -> rounds its devices were first sent files
    for device in devices:
        if device.hwid in updated_at:
            rounds_of.setdefault((model_of(device.hwid), wave(device.hwid)), set()).add(updated_at[device.hwid])
    # IP232: the first devices in round 1, wave 1 in round 2, and nobody after its halt; the
    # other models (no failures) go on: wave 2 in round 4, the rest in round 5
    assert rounds_of == {
        ("IP232", 0): {1}, ("IP232", 1): {2},
        ("IP1202", 1): {2}, ("IP1202", 2): {4}, ("IP1202", 3): {5},
        ("IPVA", 2): {4}, ("IPVA", 3): {5},
    } | ({("IPVA", 1): {2}} if any(wave(d.hwid) == 1 for d in devices if model_of(d.hwid) == "IPVA") else {})
    # both nodes see the halt from the pass after the watch ran out, and keep it
    assert halts == [[False, False]] * 3 + [[True, True]] * 3
    # pending IP232 devices were never sent anything, and nobody was sent an old build
    assert all(d.builds == {"prot": OLD, "boot": OLD} for d in devices if model_of(d.hwid) == "IP232" and wave(d.hwid) >= 2)
    assert 'configserver_firmware_halted{build="13.4711",kind="prot",model="ip232"} 1.0' in metrics
    assert 'configserver_firmware_halted{build="13.4711",kind="boot",model="ip232"} 1.0' in metrics
    assert 'model="ip1202"' not in metrics.split("configserver_firmware_halted")[-1]


async def halt_by_hand(database: str) -> None:
    """An admin halts IP232's firmware and boot code (`configserver firmware halt IP232`)."""
    engine = open_engine(database_url(database))
    try:
        await migrate(engine)
        for kind in ("prot", "boot"):
            await RolloutState(engine).halt("IP232", kind, NEW, START.timestamp(), by="admin")
    finally:
        await engine.dispose()


def test_a_node_that_starts_never_sends_a_target_halted_before(rollout_site, tmp_path):
    database = f"sqlite:///{tmp_path / 'inventory.db'}"
    asyncio.run(halt_by_hand(database))
    app = node(rollout_site, database)
    app.clock = lambda: START.timestamp() + 4 * DAY          # every wave open

    async def scenario():
        async with app._lifespan():      # what uvicorn runs before it answers any poll
            return [await poll(app, Device(hwid)) for hwid in ("IP232-30-00-01", "IP1202-31-00-01")]

    (status, halted), (_, other) = asyncio.run(scenario())
    assert status == 200 and "mod cmd UP0" not in halted and "config change SIP0" in halted
    assert f"mod cmd UP0 prot {URL}{NEW}/ip1202.bin ser {NEW}" in other   # read the halts, sends the rest


def test_a_node_that_cannot_read_the_halts_sends_no_file_until_it_can(rollout_site, tmp_path):
    """The shared database is away when the node starts: any target may be halted, so no device
    is sent one, and the scripts go on. Once the database answers, the halt holds and the rest go."""
    shared = tmp_path / "shared"
    shared.mkdir()
    asyncio.run(halt_by_hand(f"sqlite:///{shared / 'inventory.db'}"))
    shared.rename(tmp_path / "away")
    app = node(rollout_site, f"sqlite:///{shared / 'inventory.db'}")
    app.clock = lambda: START.timestamp() + 4 * DAY
    devices = [Device("IP232-30-00-01"), Device("IP1202-31-00-01")]

    async def scenario():
        async with app._lifespan():
            away = [await poll(app, device) for device in devices]
            (tmp_path / "away").rename(shared)
            await app.firmware.tick(watch=False)
            back = [await poll(app, device) for device in devices]
        return away, back

    away, back = asyncio.run(scenario())
    assert [status for status, _ in away + back] == [200] * 4
    assert all("mod cmd UP0" not in body and "config change SIP0" in body for _, body in away)
    assert "mod cmd UP0" not in back[0][1]
    assert f"mod cmd UP0 prot {URL}{NEW}/ip1202.bin ser {NEW}" in back[1][1]


def test_sends_that_cannot_be_written_never_keep_the_halts_unread(rollout_site, tmp_path, monkeypatch):
    database = f"sqlite:///{tmp_path / 'inventory.db'}"
    app = node(rollout_site, database)

    async def refused() -> int:
        raise OSError("disk full")

    async def scenario():
        await halt_by_hand(database)
        monkeypatch.setattr(app.firmware.state, "flush", refused)
        with pytest.raises(OSError):
            await app.firmware.tick(watch=False)
        return app.firmware.state.halted("IP232", "prot", NEW)

    assert asyncio.run(scenario())


def model_of(hwid: str) -> str:
    return hwid.rsplit("-", 3)[0]


async def metrics_text(app: ConfigServer) -> str:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/metrics", "raw_path": b"/metrics", "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080), "extensions": {}}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return b"".join(m.get("body", b"") for m in sent[1:]).decode()
