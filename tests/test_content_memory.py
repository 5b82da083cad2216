"""What a large fleet's content costs in memory: bounded caches with one policy, devices.csv
held once as text with an index, compiled templates bounded."""

from __future__ import annotations

from configserver.caches import BoundedCache
from configserver.content import ContentRules, Renderer, SourceFile, build_snapshot
from configserver.content.variables import DeviceRows, parse_vars
from configserver.identity import DeviceIdentity, parse_device_name


def device(cn: str) -> DeviceIdentity:
    name = parse_device_name(cn)
    return DeviceIdentity(hwid=name.hwid, model=name.model, mac=name.mac, cn=cn, issuer="test")


def test_a_cache_bounded_by_bytes_drops_the_oldest_until_the_new_entry_fits():
    cache: BoundedCache[str, bytes] = BoundedCache(100, max_bytes=10, weigh=len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    cache.put("c", b"1234")          # 12 bytes: "a" goes
    assert list(cache) == ["b", "c"] and cache.bytes == 8
    cache.put("b", b"1")             # replacing counts the new value only, and stores it anew
    assert list(cache) == ["c", "b"] and cache.bytes == 5
    cache.put("d", b"123456789")     # the oldest goes until the new one fits
    assert list(cache) == ["b", "d"] and cache.bytes == 10


def test_a_cache_bounded_by_count_keeps_the_newest():
    cache: BoundedCache[int, int] = BoundedCache(3)
    for n in range(5):
        cache[n] = n
    assert list(cache) == [2, 3, 4] and cache[4] == 4 and cache.get(0) is None


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
