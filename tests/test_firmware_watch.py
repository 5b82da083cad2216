"""The firmware watch on a node whose database is away: polls go on, one log line, not one a pass."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from configserver.content import ContentStore
from configserver.firmware import FirmwareStage
from configserver.firmware._watch import FirmwareWatch
from configserver.inventory import database_url, open_engine
from configserver.service import content_rules
from configserver.settings import load_settings


def test_a_database_that_is_away_is_logged_once_and_its_return_once(tmp_path, caplog):
    (tmp_path / "templates").mkdir()
    settings = load_settings(templates=tmp_path / "templates", vars=tmp_path / "vars")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", content_rules(settings), grace_seconds=0)
    store.refresh()
    folder = tmp_path / "not-yet"
    watch = FirmwareWatch(f"sqlite:///{folder / 'inventory.db'}", FirmwareStage(), lambda: store.snapshot,
                          interval=0.01)

    async def scenario():
        await watch.start()
        await asyncio.sleep(0.3)       # some thirty passes with no folder for the database
        folder.mkdir()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if any(r.getMessage() == "firmware watch back" for r in caplog.records):
                break
        await watch.close()

    with caplog.at_level(logging.INFO, logger="configserver.firmware"):
        asyncio.run(scenario())
    events = [r.fields["event"] for r in caplog.records if r.name == "configserver.firmware"]
    assert events == ["firmware_watch_failed", "firmware_halts_unknown_at_start", "firmware_halts_known",
                      "firmware_watch_back"]
    assert (folder / "inventory.db").is_file()


def test_a_node_cut_off_from_the_database_shows_and_logs_once_that_it_knows_no_halts(tmp_path, caplog, monkeypatch):
    from configserver.firmware import _state

    monkeypatch.setattr(_state, "HALTS_KEPT", 0.1)
    (tmp_path / "templates").mkdir()
    settings = load_settings(templates=tmp_path / "templates", vars=tmp_path / "vars")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", content_rules(settings), grace_seconds=0)
    store.refresh()
    folder = tmp_path / "shared"
    folder.mkdir()
    registry = CollectorRegistry()
    watch = FirmwareWatch(f"sqlite:///{folder / 'inventory.db'}", FirmwareStage(), lambda: store.snapshot,
                          registry=registry, interval=0.01)

    def known() -> float | None:
        return registry.get_sample_value("configserver_firmware_halts_known")

    async def until(condition) -> None:
        for _ in range(300):
            if condition():
                return
            await asyncio.sleep(0.01)

    async def scenario():
        shown = [known()]
        await watch.start()
        shown.append(known())
        shared = watch.state.engine
        # this node loses the database
        watch.state.engine = open_engine(database_url(f"sqlite:///{tmp_path / 'away' / 'inventory.db'}"))
        await until(lambda: known() == 0)
        shown.append((known(), watch.state.knows_halts()))
        await asyncio.sleep(0.3)                   # many passes more, still away
        await watch.state.engine.dispose()
        watch.state.engine = shared                # and reads it again
        await until(lambda: any(r.getMessage() == "firmware watch back" for r in caplog.records))
        shown.append((known(), watch.state.knows_halts()))
        await watch.close()
        return shown

    with caplog.at_level(logging.INFO, logger="configserver.firmware"):
        shown = asyncio.run(scenario())
    assert shown == [0, 1, (0, False), (1, True)]
    events = [r.fields["event"] for r in caplog.records if r.name == "configserver.firmware"]
    assert events == ["firmware_watch_failed", "firmware_halts_stale", "firmware_halts_known", "firmware_watch_back"]


def test_one_pass_of_the_watch_resolves_each_model_once_however_many_rows_name_it(tmp_path, monkeypatch):
    from configserver.firmware import _stage

    (tmp_path / "templates").mkdir()
    (tmp_path / "vars" / "models").mkdir(parents=True)
    (tmp_path / "vars" / "default.toml").write_text(
        '[firmware]\nurl = "http://fw.example.com/firmware/"\nprot = "13.4711"\n')
    (tmp_path / "vars" / "models" / "ip232.toml").write_text('[firmware.rollout]\nhalt_after = 7\n')
    settings = load_settings(templates=tmp_path / "templates", vars=tmp_path / "vars")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", content_rules(settings), grace_seconds=0)
    store.refresh()
    resolved = []
    real = _stage.resolve
    monkeypatch.setattr(_stage, "resolve", lambda *args: resolved.append(args) or real(*args))

    policy = FirmwareStage().policy(store.snapshot)
    rollouts = {policy(model, kind) for model in ("IP232", "ip232") * 250 for kind in ("prot", "boot")}
    assert [r.halt_after for r in rollouts] == [7]
    assert len(resolved) == 1
    assert FirmwareStage().policy(store.snapshot)("IP232", "prot").halt_after == 7   # the next pass reads again
