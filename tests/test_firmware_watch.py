"""The firmware watch on a node whose database is away: polls go on, one log line, not one a pass."""

from __future__ import annotations

import asyncio
import logging

from configserver.content import ContentStore
from configserver.firmware import FirmwareStage
from configserver.firmware._watch import FirmwareWatch
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
    assert events == ["firmware_watch_failed", "firmware_watch_back"]
    assert (folder / "inventory.db").is_file()
