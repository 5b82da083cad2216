"""An upload whose body trickles in is cut off: the listeners bound only the request head."""

from __future__ import annotations

import asyncio

import pytest

from configserver.backups._upload import BodyTooSlow, read_body


def trickle(chunks: int, pause: float):
    sent = {"n": 0}

    async def receive():
        sent["n"] += 1
        if sent["n"] > 1:
            await asyncio.sleep(pause)
        return {"type": "http.request", "body": b"config change X\n", "more_body": sent["n"] < chunks}

    return receive


def test_a_body_that_is_not_whole_in_time_is_refused():
    with pytest.raises(BodyTooSlow):
        asyncio.run(read_body(trickle(chunks=100, pause=0.05), limit=1 << 20, seconds=0.3))


def test_a_body_that_arrives_in_time_is_read_whole():
    body = asyncio.run(read_body(trickle(chunks=3, pause=0.01), limit=1 << 20, seconds=5))
    assert body == b"config change X\n" * 3
