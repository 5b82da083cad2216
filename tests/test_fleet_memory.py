"""What a fleet larger than its caches gets: each device its own verdict and its own answer,
from caches that stay within their bounds, with entries as small as they were meant to be."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import sqlite3
import time
import tracemalloc

import pytest

from driving import acall, terminator_headers

from configserver import allocator
from configserver.admission import Gate, verdict_weight
from configserver.certificates import CertificateVerifier
from configserver.content import ContentStore
from configserver.content.variables import DeviceRows
from configserver.forwarded import ClientFacts
from configserver.identity import DeviceIdentity, parse_device_name
from configserver.poll import Pipeline, PollRequest
from configserver.refusals import Refused

ISSUER = "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def hwid(n: int) -> str:
    return f"IP232-{n >> 16 & 255:02x}-{n >> 8 & 255:02x}-{n & 255:02x}"


def facts(n: int) -> ClientFacts:
    return ClientFacts("SUCCESS", f"CN={hwid(n)},O=innovaphone,C=DE", ISSUER, None, None)


def device(n: int) -> DeviceIdentity:
    name = parse_device_name(hwid(n))
    return DeviceIdentity(hwid=name.hwid, model=name.model, mac=name.mac, cn=hwid(n), issuer=ISSUER)


def test_a_fleet_larger_than_the_verdicts_kept_is_admitted_device_by_device_within_the_bound():
    gate = Gate([ISSUER], CertificateVerifier(None), verdicts_bytes=40_000)
    for _ in range(3):
        for n in range(500):
            admitted = gate.admit(facts(n), {}, NOW)
            assert (admitted.hwid, admitted.mac) == (hwid(n), f"00-90-33-{hwid(n)[6:]}")
    assert 0 < gate._verdicts.bytes <= 40_000
    assert sum(map(verdict_weight, gate._verdicts.values())) == gate._verdicts.bytes


def test_a_kept_refusal_is_weighed_too_and_still_refuses():
    gate = Gate([ISSUER], CertificateVerifier(None), verdicts_bytes=40_000)
    stranger = ClientFacts("SUCCESS", "CN=IP232-30-00-af,O=innovaphone,C=DE", "CN=someone else", None, None)
    for _ in range(2):
        try:
            gate.admit(stranger, {}, NOW)
        except Refused as refusal:
            assert refusal.reason == "wrong CA"
        else:
            raise AssertionError("admitted by another CA")
    assert gate._verdicts.bytes == sum(map(verdict_weight, gate._verdicts.values())) > 0


def test_a_verdict_weighs_what_it_holds_in_memory():
    gate = Gate([ISSUER], CertificateVerifier(None))
    many = [facts(n) for n in range(2000)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for one in many:
        gate.admit(one, {}, NOW)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # the weights add up to what the verdicts hold, give or take the dict's growth in steps
    assert 0.7 < held / gate._verdicts.bytes < 1.3
    assert gate._verdicts.bytes / 2000 < 400   # a device admitted by its DN headers: a few hundred bytes


def test_a_device_whose_answer_was_not_kept_still_gets_its_own(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates/default.j2").write_text("config change SIP0 /user {{ vars.user }} # {{ device.hwid }}\n")
    (tmp_path / "vars/devices.csv").write_text("hwid,user\n" + "".join(f"{hwid(n)},user{n}\n" for n in range(60)))
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.settle()
    pipeline = Pipeline(admission=None, store=store, answers_kept=8)  # type: ignore[arg-type]
    for _ in range(3):   # 60 devices in turn through 8 kept answers
        for n in range(60):
            outcome = pipeline.serve(device(n), PollRequest("GET", "/", {}, None, None, time.time()), NOW)
            assert outcome.status == 200
            assert f"config change SIP0 /user user{n} # {hwid(n)}\r\n".encode() in outcome.body
    assert len(pipeline._answers) == 8


def test_a_kept_answer_weighs_what_it_holds_in_memory(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates/default.j2").write_text(
        "# {{ device.hwid }}\nmod cmd UP1 times /allow 0,1,2,3,4 /initial 10\n"
        "config change SIP0 /server pbx.example.com /user {{ vars.user }} /pwd secret-{{ device.hwid }}\n")
    (tmp_path / "vars/devices.csv").write_text("hwid,user\n" + "".join(f"{hwid(n)},user{n}\n" for n in range(1000)))
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.settle()
    pipeline = Pipeline(admission=None, store=store)  # type: ignore[arg-type]
    devices = [device(n) for n in range(1000)]
    gc.collect()
    tracemalloc.start()
    for one in devices:
        pipeline.serve(one, PollRequest("GET", "/", {}, None, None, time.time()), NOW)
    gc.collect()
    weighed, before = pipeline._answers.bytes, tracemalloc.get_traced_memory()[0]
    pipeline._answers.clear()   # what goes with the answers is what they held
    gc.collect()
    held = before - tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    # poll_cache_mb means what it says: the weights add up to the memory, give or take the dict
    assert 0.7 < held / weighed < 1.3


def test_the_devices_csv_index_costs_a_few_bytes_a_row():
    text = "hwid,user\n" + "".join(f"{hwid(n)},user{n}\n" for n in range(20_000))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rows = DeviceRows(text)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(rows) == 20_000 and rows.values(hwid(7).casefold()) == {"user": "user7"}
    assert held / 20_000 < 24   # two 8-byte numbers a row; the text itself is the caller's


def test_reading_devices_csv_leaves_no_peak_of_memory_behind():
    # a table is read at start-up and again after every edit: what its reading took at its peak
    # stays with the worker, so the peak must stay near the index itself
    text = "hwid,user\n" + "".join(f"{hwid(n)},user{n}\n" for n in range(20_000))
    gc.collect()
    tracemalloc.start()
    DeviceRows(text)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak / 20_000 < 100   # bytes a row, at the peak (a dict of the keys took 390)


def test_devices_csv_rows_are_found_whatever_their_line_ends_and_the_last_row_counts():
    rows = DeviceRows('hwid,user,note\r\n' + f'{hwid(1)},first,"two\r\nlines"\r\n'
                      f'{hwid(2)},second,x\r{hwid(1).upper()},again,y\n{hwid(3)},third,z')
    assert len(rows) == 3
    assert rows.values(hwid(1).casefold()) == {"user": "again", "note": "y"}
    assert rows.values(hwid(2).casefold()) == {"user": "second", "note": "x"}
    assert rows.values(hwid(3).casefold()) == {"user": "third", "note": "z"}


class _HashedLike(str):
    """A key whose hash is another key's: what two keys of one hash look like to the index."""

    def __hash__(self) -> int:
        return hash(hwid(1).casefold())


def test_a_device_whose_key_hashes_like_another_never_gets_the_others_row():
    rows = DeviceRows("hwid,password\n" + f"{hwid(1)},secret-of-1\n{hwid(2)},secret-of-2\n")
    assert rows.row(hwid(1).casefold())[1] == {"password": "secret-of-1"}
    assert rows.row(_HashedLike(hwid(2).casefold())) is None
    assert rows.row(_HashedLike(hwid(1).casefold()))[1] == {"password": "secret-of-1"}


def test_devices_whose_keys_all_hash_alike_each_get_their_own_row(monkeypatch):
    # every key one hash: the index must step past the rows of the others to find a device's own
    import configserver.content.variables as variables

    monkeypatch.setattr(variables, "hash", lambda key: 0, raising=False)
    rows = DeviceRows("hwid,password\n" + "".join(f"{hwid(n)},secret-of-{n}\n" for n in range(1, 6)))
    for n in range(1, 6):
        assert rows.values(hwid(n).casefold()) == {"password": f"secret-of-{n}"}
    assert rows.row(hwid(9).casefold()) is None   # not in the file: none of the five


def test_poll_cache_mb_bounds_the_verdicts_and_the_answers_half_each(site):
    app = site.app(poll_cache_mb=3, database=f"sqlite:///{site.root}/audit.db")
    assert app.pipeline.admission._verdicts.max_bytes == 3 * 1024 * 1024 // 2
    assert app.pipeline._answers.max_bytes == 3 * 1024 * 1024 // 2


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


needs_glibc = pytest.mark.skipif(allocator._LIBC is None, reason="glibc's malloc only")


@needs_glibc
def test_freed_heap_is_handed_back_to_the_operating_system():
    blocks = [bytearray(100_000) for _ in range(400)]   # 40 MB in the heap (under mmap's threshold)
    pinned = bytearray(100_000)   # above them: the heap cannot shrink from its top
    full = rss_mb()
    del blocks
    assert allocator.give_back() is True
    assert full - rss_mb() > 30
    del pinned


def test_an_operators_own_arena_bound_wins(monkeypatch):
    asked: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, what: int, value: int) -> int:
            asked.append((what, value))
            return 1

    monkeypatch.setattr(allocator, "_LIBC", Libc())
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.limit_arenas() is False and asked == []
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert allocator.limit_arenas() is False and asked == []
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert allocator.limit_arenas() is True and asked == [(-8, 2)]


def test_a_worker_hands_freed_pages_back_only_after_it_has_answered_polls(site, pki, monkeypatch):
    given: list[int] = []
    monkeypatch.setattr(allocator, "give_back", lambda: given.append(1) or True)
    monkeypatch.setattr(allocator.give_back_while_busy, "__defaults__", (0.05,))
    site.write("templates/default.j2", "# {{ device.hwid }}\n")
    app = site.app()

    async def scenario() -> tuple[int, int, int]:
        async with app._lifespan():
            await asyncio.sleep(0.3)
            idle = len(given)
            assert (await acall(app, "/", terminator_headers(pki.phone))).status == 200
            await asyncio.sleep(0.3)
            busy = len(given)
            await asyncio.sleep(0.3)
            return idle, busy, len(given)

    idle, busy, after = asyncio.run(scenario())
    assert app.answered == 1
    assert (idle, busy, after) == (0, 1, 1)   # once after the poll, not while nothing came


def test_a_failing_give_back_is_logged_and_the_audit_is_still_written_at_shutdown(site, pki, monkeypatch, caplog):
    def failing() -> bool:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(allocator, "give_back", failing)
    monkeypatch.setattr(allocator.give_back_while_busy, "__defaults__", (0.05,))
    site.write("templates/default.j2", "# {{ device.hwid }}\n")
    app = site.app(database=f"sqlite:///{site.root}/audit.db")

    async def scenario() -> None:
        async with app._lifespan():
            await asyncio.sleep(0.1)   # the give-back task looks how many polls were answered
            for _ in range(3):
                assert (await acall(app, "/", terminator_headers(pki.phone))).status == 200
            await asyncio.sleep(0.3)   # the give-back fails meanwhile

    asyncio.run(scenario())   # shuts down cleanly
    assert "giving freed memory back failed" in caplog.text
    with sqlite3.connect(site.root / "audit.db") as db:
        assert db.execute("SELECT count(*) FROM polls").fetchone()[0] == 3
