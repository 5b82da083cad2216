"""What a large fleet's content costs in memory: bounded caches with one policy, devices.csv
held once as text with an index, compiled templates bounded, template texts held within a
bound (and a text let go read again in its own version only), the lookup index 16 bytes a file."""

from __future__ import annotations

import asyncio
import errno
import os
import time

from driving import acall, call, terminator_headers

from configserver.caches import ADMIT_ONE_IN, BoundedCache
from configserver.content import (
    TEMPLATE_SUFFIX,
    ContentRules,
    ContentStore,
    Renderer,
    SourceFile,
    build_snapshot,
)
from configserver.content import snapshot as snapshot_module
from configserver.content.lookup import KeyIndex
from configserver.content.variables import DeviceRows, parse_vars
from configserver.identity import DeviceIdentity, parse_device_name
from configserver.innovaphone import BROKEN_MODEL_NAMES


def device(cn: str) -> DeviceIdentity:
    name = parse_device_name(cn)
    return DeviceIdentity(hwid=name.hwid, model=name.model, mac=name.mac, cn=cn, issuer="test")


def test_a_cache_bounded_by_bytes_stays_within_its_bound_and_keeps_what_it_holds():
    cache: BoundedCache[str, bytes] = BoundedCache(100, max_bytes=10, weigh=len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.put("c", b"1234") == b"1234"     # 12 bytes: full, the newcomer is not kept
    assert list(cache) == ["a", "b"] and cache.bytes == 8
    cache.put("b", b"1")                          # a held key is replaced, and stored anew
    assert list(cache) == ["a", "b"] and cache.bytes == 5
    cache.put("b", b"12345678")                   # heavier: the oldest others go until it fits
    assert list(cache) == ["b"] and cache.bytes == 8
    cache.put("x", b"12345678901")                # heavier than the bound alone: never kept
    assert "x" not in cache and cache.bytes == 8


def test_a_full_cache_keeps_one_newcomer_in_32_in_place_of_the_one_stored_longest_ago():
    cache: BoundedCache[int, int] = BoundedCache(3)
    for n in range(3 + ADMIT_ONE_IN):
        cache[n] = n
    assert list(cache) == [1, 2, 3 + ADMIT_ONE_IN - 1] and cache.get(0) is None and cache[2] == 2
    weighed: BoundedCache[int, bytes] = BoundedCache(100, max_bytes=30, weigh=len)
    for n in range(3 + ADMIT_ONE_IN):
        weighed.put(n, b"0123456789")
    assert list(weighed) == [1, 2, 3 + ADMIT_ONE_IN - 1] and weighed.bytes <= 30


def test_an_entry_used_by_every_poll_stays_while_a_larger_fleet_comes_round():
    cache: BoundedCache[str, str] = BoundedCache(50, promote_hits=True)   # as the compiled templates are kept
    cache.put("default.j2", "compiled once")
    for _ in range(5):
        for device in range(1000):
            assert cache.get("default.j2") == "compiled once"
            if cache.get(f"devices/{device}.j2") is None:
                cache.put(f"devices/{device}.j2", "compiled")
    assert len(cache) == 50


def test_a_fleet_larger_than_the_cache_polling_in_turn_finds_its_share_in_it():
    # evicting the oldest entry would find none: the next device is always the one just gone
    cache: BoundedCache[int, int] = BoundedCache(500)
    hits = polls = 0
    for round_ in range(20):
        for device in range(1000):
            found = cache.get(device)
            if found is None:
                cache.put(device, device)
            elif round_ >= 10:
                hits += 1
            polls += round_ >= 10
    assert 0.45 < hits / polls <= 0.5


def test_a_cache_keyed_by_device_finds_more_without_promoting_its_hits():
    # a fleet ten times the cache, polling in turn: promoting hits makes each newcomer kept push
    # out the entry used longest ago, the next device to poll
    found_share = {}
    for promote_hits in (False, True):
        cache: BoundedCache[int, int] = BoundedCache(1000, promote_hits=promote_hits)
        hits = polls = 0
        for round_ in range(12):
            for device in range(10_000):
                if cache.get(device) is None:
                    cache.put(device, device)
                elif round_ >= 6:
                    hits += 1
                polls += round_ >= 6
        found_share[promote_hits] = hits / polls
    assert found_share[False] >= 0.085 and found_share[True] <= found_share[False] - 0.01, found_share


def test_the_devices_that_left_the_fleet_leave_a_full_cache_in_their_turn():
    cache: BoundedCache[int, int] = BoundedCache(100)
    for device in range(100):
        cache.put(device, device)
    for _ in range(40):       # devices 0-49 left; 50-249 poll in turn
        for device in range(50, 250):
            if cache.get(device) is None:
                cache.put(device, device)
    assert not any(device in cache for device in range(50))
    assert len(cache) == 100


def test_the_compiled_templates_are_bounded_by_the_one_cache_policy(tmp_path):
    templates = {f"devices/IP232-30-00-{n:02x}.j2": SourceFile(f"devices/IP232-30-00-{n:02x}.j2", (n, 1, 1), f"# {n}")
                 for n in range(20)}
    snapshot = build_snapshot(templates, {}, ContentRules())
    renderer = Renderer(tmp_path)
    renderer.environment.cache = BoundedCache(5)
    for name in templates:
        assert renderer.render(snapshot, name, {}).startswith("# ")
    assert len(renderer.environment.cache) == 5
    assert renderer.render(snapshot, "devices/IP232-30-00-00.j2", {}) == "# 0\r\n"   # compiled again


def test_devices_csv_rows_are_read_from_the_text_by_the_one_row_rule():
    text = ('hwid,mac,user,ext,\n'
            'IP232-30-00-AF,,alice,42,x\n'
            ',00-90-33-30-00-b0,"bob, ""the builder""",,\n'
            'IP222s-30-00-b1,,"multi\nline",7\n'
            'not-a-device,,mallory,1\n'
            '\n'
            'IP232-30-00-af,,alice again,43\n')
    rows, error = parse_vars("devices.csv", text)
    assert error is None and isinstance(rows, DeviceRows)
    assert len(rows) == 3
    assert rows.values("ip232-30-00-af") == {"user": "alice again", "ext": "43"}   # the last row counts
    assert rows.values("00-90-33-30-00-b0") == {"user": 'bob, "the builder"'}     # empty cells left out
    assert rows.values("ip222-30-00-b1") == {"user": "multi\nline", "ext": "7"}     # broken model name fixed
    assert rows.values("ip232-30-00-ff") is None
    assert [row["user"] for row in rows.rows()] == ["alice", 'bob, "the builder"', "multi\nline", "mallory", "alice again"]


def test_a_devices_csv_that_is_not_valid_csv_is_a_problem_for_every_device():
    rows, error = parse_vars("devices.csv", "hwid,notes\nIP232-30-00-af," + "x" * 200_000 + "\n")
    assert rows is None and error.startswith("not valid CSV: field larger than field limit")


def test_an_unchanged_devices_csv_row_keeps_a_kept_answer_valid_when_other_rows_change():
    def snapshot(table: str):
        variables = {"devices.csv": SourceFile("devices.csv", (len(table), 1, 1), table, parse_vars("devices.csv", table)[0])}
        templates = {"default.j2": SourceFile("default.j2", (1, 1, 1), "{{ vars.user }}")}
        return build_snapshot(templates, variables, ContentRules())

    before = snapshot("hwid,user\nIP232-30-00-af,alice\nIP232-30-00-b0,bob\n")
    after = snapshot("hwid,user\nIP232-30-00-af,alice\nIP232-30-00-b0,carol\n")
    assert before.choose(device("IP232-30-00-af")).sources == after.choose(device("IP232-30-00-af")).sources
    assert before.choose(device("IP232-30-00-b0")).sources != after.choose(device("IP232-30-00-b0")).sources
    assert after.choose(device("IP232-30-00-b0")).variables["user"] == "carol"


def settled(path):
    """Date a file as written long ago: it is listed at once."""
    os.utime(path, (time.time() - 60, time.time() - 60))


def test_a_template_that_cannot_be_read_for_now_is_read_again_on_the_next_poll(site, pki, monkeypatch):
    # no file descriptor left (a poll storm), or permissions set wrong for a moment: that poll
    # fails, the version does not: once the cause passes, the same file is served
    monkeypatch.setattr("configserver.content.watcher.READ_AT_ONCE", 0)   # listed in bulk: read on first use
    settled(site.write("templates/devices/IP232-30-00-af.j2", "{% include 'default.j2' %}\nconfig change PHONE /key1\n"))
    settled(site.write("templates/default.j2", "# {{ device.hwid }}\n"))
    app = site.app()
    real_open = os.open

    def exhausted(path, *args, **kwargs):
        if str(path).endswith("IP232-30-00-af.j2"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", exhausted)
    assert call(app, "/", terminator_headers(pki.phone)).status == 500
    monkeypatch.setattr(os, "open", real_open)
    answer = call(app, "/", terminator_headers(pki.phone))
    assert answer.status == 200 and answer.text.startswith("# IP232-30-00-af\r\n")
    assert "config change PHONE /key1\r\n" in answer.text   # its facts too: it includes default.j2


def hold_texts(monkeypatch, max_bytes: int) -> snapshot_module._HeldTexts:
    held = snapshot_module._HeldTexts(max_bytes)
    monkeypatch.setattr(snapshot_module, "HELD_TEXTS", held)
    return held


def test_template_texts_held_stay_within_their_bound_and_one_let_go_is_read_again_in_its_version(
        tmp_path, monkeypatch):
    held = hold_texts(monkeypatch, 2000)
    monkeypatch.setattr("configserver.content.watcher.READ_AT_ONCE", 0)   # listed in bulk: read on first use
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "devices").mkdir(parents=True)
    for n in range(100):
        path = tmp_path / "templates" / "devices" / f"IP232-30-00-{n:02x}.j2"
        path.write_text(f"# device {n}: " + "x" * 100 + "\n")
        settled(path)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    renderer = Renderer(tmp_path / "templates")
    snapshot = store.snapshot

    def render(n: int) -> str:
        choice = snapshot.choose(device(f"IP232-30-00-{n:02x}"))
        return renderer.render(snapshot, choice.template, {"device": None, "vars": {}})

    assert [render(n) for n in range(100)] == [f"# device {n}: " + "x" * 100 + "\r\n" for n in range(100)]
    texts = [source for source in snapshot.templates.values() if source.content is not None]
    assert held.bytes <= 2000 and sum(map(len, (s.content for s in texts))) <= 2000
    assert 5 <= len(texts) == len(held) < 100    # the ones read last; the others let go
    assert snapshot.templates["devices/IP232-30-00-00.j2"].content is None
    renderer.environment.cache.clear()           # as a large fleet's compiled templates go
    assert render(0) == "# device 0: " + "x" * 100 + "\r\n"   # read again, in its version
    assert snapshot.templates["devices/IP232-30-00-00.j2"].content is not None


def let_go(app, template: str, *, answers: bool = True) -> None:
    """What a large fleet's polls do: a template's text, its compiled form and (unless
    `answers` is False) the kept answers go to make room for the others'."""
    source = app.store.snapshot.templates[template]
    snapshot_module.HELD_TEXTS.hold(SourceFile("other.j2", 0, folder="/nowhere"), "the text read last", 0)
    assert source.content is None
    app.pipeline.renderer.environment.cache.clear()
    if answers:
        app.pipeline._answers.clear()


async def following(app, *polls):
    """The answers to `polls` (header lists) made one after the other while the app's watcher runs."""
    ready = asyncio.Event()
    follower = asyncio.create_task(app.store.follow(3600, ready))
    await ready.wait()
    try:
        return [await acall(app, "/", headers) for headers in polls]
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)



async def edit_then_poll(app, path, text: str, cert):
    """With the store following the folders: `path` rewritten with `text`, then a poll at once."""
    ready = asyncio.Event()
    follower = asyncio.create_task(app.store.follow(3600, ready))
    await ready.wait()
    try:
        path.write_text(text)
        return await acall(app, "/", terminator_headers(cert))
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

def test_a_poll_whose_template_changed_after_its_text_was_let_go_waits_for_the_new_version(site, pki, monkeypatch):
    hold_texts(monkeypatch, 1)
    own = site.write("templates/devices/IP232-30-00-af.j2", "# first\n")
    settled(own)
    app = site.app(grace_seconds=0.3)
    outcomes: list = []
    app.recorders.append(outcomes.append)
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# first\r\n")
    let_go(app, "devices/IP232-30-00-af.j2")

    # not published yet when the poll comes
    answer = asyncio.run(edit_then_poll(app, own, "# second, written while the first was let go\n", pki.phone))
    assert answer.status == 200 and answer.text.startswith("# second, written while the first was let go\r\n")
    assert [outcome.status for outcome in outcomes] == [200, 200]   # never a 500, nor a 503


def test_a_poll_whose_include_changed_before_it_was_first_read_waits_for_the_new_version(site, pki, monkeypatch):
    monkeypatch.setattr("configserver.content.watcher.READ_AT_ONCE", 0)   # listed in bulk: read on first use
    settled(site.write("templates/devices/IP232-30-00-af.j2", "{% include 'parts/own.j2' %}\n"))
    part = site.write("templates/parts/own.j2", "# first\n")
    settled(part)
    app = site.app(grace_seconds=0.3)
    outcomes: list = []
    app.recorders.append(outcomes.append)

    answer = asyncio.run(edit_then_poll(app, part, "# second, written before the include was first read\n", pki.phone))
    assert answer.status == 200 and answer.text.startswith("# second, written before the include was first read\r\n")
    assert [outcome.status for outcome in outcomes] == [200]   # never a 500, nor a 503


def same_stamp_rewrite(path, text: str) -> None:
    """Rewrite `path` in place with `text` of the same length, and give it back its time: the
    same size, inode and modification time, so the same stamp (as a fast tool's two writes in
    one tick of the file system's clock can make)."""
    before = os.stat(path)
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def test_a_rewrite_keeping_size_time_and_inode_is_found_looked_at_again_and_served_to_every_device(
        site, pki, monkeypatch):
    hold_texts(monkeypatch, 1)
    default = site.write("templates/default.j2", "# version A for {{ device.hwid }}\n")
    settled(default)
    app = site.app(grace_seconds=0.2)
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# version A for IP232-30-00-af\r\n")
    let_go(app, "default.j2", answers=False)      # the phone's answer stays kept
    same_stamp_rewrite(default, "# version B for {{ device.hwid }}\n")
    assert app.store.refresh() is False           # no stamp tells the change

    # Written before the watcher runs: no file event tells it either. The gateway's poll reads
    # the text again, finds other bytes, has the watcher look again, and waits for what it
    # publishes; the phone's answer, kept from the old bytes, is then rendered again.
    gateway, phone = asyncio.run(following(app, terminator_headers(pki.gateway), terminator_headers(pki.phone)))
    assert gateway.status == 200 and gateway.text.startswith("# version B for IP1202-35-fe-4d\r\n")
    assert phone.status == 200 and phone.text.startswith("# version B for IP232-30-00-af\r\n")


def served_then_rewritten_in_place(site, pki, monkeypatch, grace_seconds: float):
    """An app that served the phone its template's version A and let its text go; the file
    then rewritten as version B with the same stamp. Returns the app and the file."""
    hold_texts(monkeypatch, 1)
    own = site.write("templates/devices/IP232-30-00-af.j2", "# version A\n")
    settled(own)
    app = site.app(grace_seconds=grace_seconds)
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# version A\r\n")
    let_go(app, "devices/IP232-30-00-af.j2")
    same_stamp_rewrite(own, "# version B\n")
    return app, own


def test_without_a_watcher_a_poll_whose_template_changed_is_told_at_once(site, pki, monkeypatch):
    app, own = served_then_rewritten_in_place(site, pki, monkeypatch, 0.2)
    started = time.monotonic()
    answer = call(app, "/", terminator_headers(pki.phone))   # nothing would publish a snapshot: no wait
    assert answer.status == 503 and answer.text == "# configuration changing\n"
    assert time.monotonic() - started < 1.0
    assert app.store.refresh([own]) is True       # what the watcher does when it looks again
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# version B\r\n")


def test_no_more_than_waiting_max_polls_wait_for_the_next_snapshot(site, pki, monkeypatch):
    monkeypatch.setattr("configserver.content.watcher.WAITING_MAX", 0)
    app, _ = served_then_rewritten_in_place(site, pki, monkeypatch, 5)
    started = time.monotonic()
    [answer] = asyncio.run(following(app, terminator_headers(pki.phone)))
    assert answer.status == 503 and time.monotonic() - started < 2.0   # not the 7 s it could wait


def test_symlinked_templates_are_read_through_the_link_and_their_texts_held_within_the_bound(
        site, pki, monkeypatch):
    held = hold_texts(monkeypatch, 4000)
    model = site.write("templates/models/shared.txt", "# shared by link: " + "x" * 1000 + "\n")
    settled(model)
    (site.templates / "devices").mkdir()
    for n in range(20):
        (site.templates / "devices" / f"IP232-30-01-{n:02x}.j2").symlink_to("../models/shared.txt")
    (site.templates / "devices" / "IP232-30-00-af.j2").symlink_to("../models/shared.txt")
    app = site.app()
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# shared by link: ")
    texts = [source for source in app.store.snapshot.templates.values() if source.content is not None]
    assert held.bytes <= 4000 and len(texts) == len(held) < 20


def test_a_template_that_fails_to_render_leaves_no_text_in_linecache(site, pki):
    import linecache

    broken = site.write("templates/default.j2", "# line one\n{{ vars.nothing_here }}\n")
    settled(broken)
    app = site.app()
    outcomes: list = []
    app.recorders.append(outcomes.append)
    assert call(app, "/", terminator_headers(pki.phone)).status == 500
    assert outcomes[-1].detail.startswith("default.j2:2: ")   # the file and line, still
    assert str(broken) not in linecache.cache


def test_the_lookup_index_finds_each_file_by_its_key_and_follows_changes():
    def name(n: int) -> str:
        return f"devices/IP232-30-00-{n:02x}.j2"

    index = KeyIndex(TEMPLATE_SUFFIX, BROKEN_MODEL_NAMES, [(f"devices/ip232-30-00-{n:02x}", name(n)) for n in range(100)])
    index = index.changed({"default": "default.j2"})                      # a few: made in place
    assert len(index) == 101 and index["devices/ip232-30-00-07"] == name(7) and index.get("default") == "default.j2"
    assert "devices/ip232-30-00-ff" not in index and index.get("devices/ip232-30-00-ff") is None
    fewer = index.changed({f"devices/ip232-30-00-{n:02x}": None for n in range(0, 100, 2)})   # fifty: in place
    assert len(fewer) == 51 and "devices/ip232-30-00-02" not in fewer and fewer["devices/ip232-30-00-03"] == name(3)
    assert index["devices/ip232-30-00-02"] == name(2)                    # the index it came from is unchanged
    assert set(fewer.values()) == {"default.j2", *(name(n) for n in range(1, 100, 2))}
    assert dict(fewer) == {"default": "default.j2", **{f"devices/ip232-30-00-{n:02x}": name(n) for n in range(1, 100, 2)}}
    # more than 64 at once (a checkout of the fleet): sorted anew, with the same answers
    anew = index.changed({**{f"devices/ip232-30-00-{n:02x}": None for n in range(80)},
                          **{f"devices/ip232-31-00-{n:02x}": f"devices/IP232-31-00-{n:02x}.j2" for n in range(20)}})
    assert len(anew) == 101 - 80 + 20 and anew.get("default") == "default.j2"
    assert "devices/ip232-30-00-4f" not in anew and anew["devices/ip232-30-00-50"] == name(0x50)
    assert anew["devices/ip232-31-00-13"] == "devices/IP232-31-00-13.j2"
    assert dict(anew) == {"default": "default.j2", **{f"devices/ip232-30-00-{n:02x}": name(n) for n in range(80, 100)},
                          **{f"devices/ip232-31-00-{n:02x}": f"devices/IP232-31-00-{n:02x}.j2" for n in range(20)}}


def test_keys_that_all_hash_alike_each_find_their_own_file(monkeypatch):
    # every key one hash: a file found by the hash is a key's only if its own key is that key
    from configserver.content import lookup

    monkeypatch.setattr(lookup, "hash", lambda key: 0, raising=False)
    keys = {f"devices/ip232-30-00-{n:02x}": f"devices/IP232-30-00-{n:02x}.j2" for n in range(1, 6)}
    index = KeyIndex(TEMPLATE_SUFFIX, BROKEN_MODEL_NAMES, keys.items()).changed({"devices/ip232-30-00-03": None})
    assert {key: index.get(key) for key in keys} == {**keys, "devices/ip232-30-00-03": None}
    assert "devices/ip232-30-00-09" not in index
