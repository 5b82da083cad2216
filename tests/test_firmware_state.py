"""The rollout's state in a real database: sends, failures after the watch, halts shared by nodes."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy.exc import OperationalError
from test_inventory import postgres_server, postgres_url, sqlite_url  # noqa: F401 - fixtures

from configserver.firmware import Rollout
from configserver.firmware._state import HALTS_KEPT, RolloutState, Send
from configserver.inventory._database import database_url, devices, migrate, open_engine

T0 = 1_800_000_000.0
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str:
    """The same behaviour on both backends: PostgreSQL is what several nodes share."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param])


def run(coroutine):
    return asyncio.run(coroutine)


async def _open(url: str):
    engine = open_engine(database_url(url))
    await migrate(engine)   # the inventory's migrations create the firmware tables too
    return engine


async def _reported(engine, mac: str, hwid: str, firmware: str | None, seen: float) -> None:
    """The inventory's row of a device, as its last poll left it."""
    async with engine.begin() as connection:
        await connection.execute(devices.delete().where(devices.c.device == mac))
        await connection.execute(devices.insert().values(
            device=mac, hwid=hwid, mac=mac, model="IP232", hwid_key=hwid.lower(), first_seen=T0, last_seen=seen,
            status=200, firmware=firmware, boot=None, reported_at=seen))


def _device(i: int) -> tuple[str, str]:
    return f"00-90-33-30-00-{i:02x}", f"IP232-30-00-{i:02x}"


def policy(halt_after: int = 3, watch: str = "1h"):
    rollout = Rollout(halt_after=halt_after, watch=dt.timedelta(seconds=3600 if watch == "1h" else 60))
    return lambda model, kind: rollout


def test_a_device_sent_the_same_build_again_keeps_when_it_was_first_sent(url):
    async def scenario():
        engine = await _open(url)
        state = RolloutState(engine)
        mac, hwid = _device(1)
        for minutes in (0, 15, 30):
            state.note(Send(mac, hwid, "IP232", "prot", "13.4711", 1, T0 + minutes * 60))
            await state.flush()
        state.note(Send(mac, hwid, "IP232", "prot", "13.4800", 1, T0 + 3600))
        state.note(Send(mac, hwid, "IP232", "prot", "13.4800", 1, T0 + 3700))
        await state.flush()
        first_sends = await state.sends()
        await engine.dispose()
        return first_sends

    assert run(scenario()) == {("00-90-33-30-00-01", "prot"): ("13.4800", T0 + 3600)}


def test_failures_are_devices_that_do_not_report_the_build_once_the_watch_has_passed(url):
    async def scenario():
        engine = await _open(url)
        state = RolloutState(engine)
        for i in range(4):
            mac, hwid = _device(i)
            state.note(Send(mac, hwid, "IP232", "prot", "13.4711", 1, T0))
        await state.flush()
        await _reported(engine, *_device(0), "13.4711", T0 + 600)       # took it
        await _reported(engine, *_device(1), "13.4000", T0 + 1800)      # came back with the old build
        await _reported(engine, *_device(2), "13.4000", T0)             # silent since it was sent
        # device 3 never reached the inventory at all: silent too
        early = await state.failures(T0 + HOUR - 1, policy())
        late = await state.failures(T0 + HOUR, policy())
        await engine.dispose()
        return early, sorted(failure.hwid for failure in late)

    early, late = run(scenario())
    assert early == []
    assert late == ["IP232-30-00-01", "IP232-30-00-02", "IP232-30-00-03"]


def test_a_halt_is_taken_once_seen_by_every_node_and_lifted_only_by_resume(url):
    async def scenario():
        engine_a, engine_b = await _open(url), await _open(url)
        node_a, node_b = RolloutState(engine_a), RolloutState(engine_b)
        for i in range(3):
            node_a.note(Send(*_device(i), "IP232", "prot", "13.4711", 1, T0))
        await node_a.flush()
        for i in range(3):
            await _reported(engine_a, *_device(i), "13.4000", T0 + 60)
        below = await node_a.watch(T0 + 2 * HOUR, policy(halt_after=4))
        halts_a = await node_a.watch(T0 + 2 * HOUR, policy(halt_after=3))
        halts_b = await node_b.watch(T0 + 2 * HOUR, policy(halt_after=3))   # the other node: already halted
        await node_b.refresh()
        seen = (node_a.halted("ip232", "prot", "13.4711"), node_b.halted("IP232", "prot", "13.4711"),
                node_b.halted("IP232", "boot", "13.4711"))
        # time passing does not lift it
        await node_b.watch(T0 + 30 * HOUR, policy(halt_after=3))
        still = node_b.halted("IP232", "prot", "13.4711")
        resumed = await node_b.resume("IP232", ["prot", "boot"], T0 + 31 * HOUR)
        await node_a.refresh()
        after_resume = node_a.halted("IP232", "prot", "13.4711")
        # the failures before the resume count no more: no halt again at once
        again = await node_a.watch(T0 + 40 * HOUR, policy(halt_after=3))
        await engine_a.dispose()
        await engine_b.dispose()
        return below, halts_a, halts_b, seen, still, resumed, after_resume, again

    below, halts_a, halts_b, seen, still, resumed, after_resume, again = run(scenario())
    assert below == []
    assert [(h.model, h.kind, h.build, h.failures, h.threshold) for h in halts_a] == [("ip232", "prot", "13.4711", 3, 3)]
    assert halts_b == []
    assert seen == (True, True, False)
    assert still is True
    assert resumed == [("ip232", "prot", "13.4711")]
    assert after_resume is False
    assert again == []


def test_the_halt_is_logged(url, caplog):
    async def scenario():
        engine = await _open(url)
        state = RolloutState(engine)
        state.note(Send(*_device(9), "IP232", "boot", "138912", 2, T0))
        await state.flush()
        halts = await state.watch(T0 + HOUR, policy(halt_after=1))
        await engine.dispose()
        return halts

    with caplog.at_level("WARNING", logger="configserver.firmware"):
        assert len(run(scenario())) == 1
    record = next(r for r in caplog.records if r.getMessage() == "firmware rollout halted")
    assert record.fields == {"event": "firmware_halt", "model": "ip232", "kind": "boot", "build": "138912",
                             "failures": 1, "halt_after": 1}


def test_sends_whose_write_fails_stay_queued_and_are_written_by_the_next_pass(tmp_path):
    """The database refuses the write (here: its tables are not made yet); the sends are not lost,
    so a device that bricked after its send is still counted as a failure later."""
    async def scenario():
        engine = open_engine(database_url(f"sqlite:///{tmp_path / 'inventory.db'}"))
        state = RolloutState(engine)
        mac, hwid = _device(7)
        state.note(Send(mac, hwid, "IP232", "prot", "13.4711", 1, T0))
        with pytest.raises(OperationalError):   # no firmware_sent table yet
            await state.flush()
        state.note(Send(mac, hwid, "IP232", "prot", "13.4711", 1, T0 + 60))   # a poll meanwhile
        await migrate(engine)
        written = await state.flush()
        await _reported(engine, mac, hwid, None, T0)   # silent since it was sent
        sends = await state.sends()
        failures = await state.failures(T0 + 2 * HOUR, policy())
        await engine.dispose()
        return written, sends, [f.hwid for f in failures]

    written, sends, failed = run(scenario())
    assert written == 2
    assert sends == {("00-90-33-30-00-07", "prot"): ("13.4711", T0)}
    assert failed == ["IP232-30-00-07"]


def test_a_device_that_never_reported_a_build_is_not_counted_but_named_as_not_judged(url):
    """It came back after its send, and neither before nor since did it report PROT (or a build
    in ver): whether it took the file cannot be told, so it halts nothing."""
    async def scenario():
        engine = await _open(url)
        state = RolloutState(engine)
        for i in range(3):
            state.note(Send(*_device(i), "IP232", "prot", "13.4711", 1, T0))
        await state.flush()
        await _reported(engine, *_device(0), None, T0 + 1800)   # back, no build ever
        await _reported(engine, *_device(1), None, T0)          # no build ever, and silent: a failure
        # device 2 reported 13.4000 before the send, and nothing since: the inventory keeps 13.4000
        await _reported(engine, *_device(2), "13.4000", T0 + 1800)
        failures, unjudged = await state.judged(T0 + 2 * HOUR, policy())
        halts = await state.watch(T0 + 2 * HOUR, policy(halt_after=3))
        await engine.dispose()
        return sorted(f.hwid for f in failures), [f.hwid for f in unjudged], halts

    failures, unjudged, halts = run(scenario())
    assert failures == ["IP232-30-00-01", "IP232-30-00-02"]
    assert unjudged == ["IP232-30-00-00"]
    assert halts == []


def test_the_halts_are_not_known_until_read_and_not_once_the_last_read_is_older_than_the_bound(url):
    """A node cut off from the database while another halts a target: it may send the target
    only for HALTS_KEPT after its last read that answered, then nothing until it reads again."""
    now = [100.0]

    async def scenario():
        engine = await _open(url)
        node = RolloutState(engine, clock=lambda: now[0])
        seen = [node.knows_halts()]
        await node.refresh()                     # nothing halted yet
        await RolloutState(engine).halt("IP232", "prot", "13.4711", T0)   # another node
        node.engine = open_engine(database_url("sqlite:////nonexistent/folder/inventory.db"))
        now[0] += HALTS_KEPT
        with pytest.raises(OperationalError):
            await node.refresh()
        seen.append(node.knows_halts())          # still within the bound: the last read holds
        now[0] += 1
        with pytest.raises(OperationalError):
            await node.refresh()
        seen.append(node.knows_halts())          # older than the bound: not known any more
        await node.engine.dispose()
        node.engine = engine                     # the database answers again
        await node.refresh()
        seen.append(node.knows_halts())
        await engine.dispose()
        return seen, node.halted("ip232", "prot", "13.4711")

    assert run(scenario()) == ([False, True, False, True], True)
