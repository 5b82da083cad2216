"""Firmware rules as tables: declarations layered like variables, waves, windows, the decision."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tomllib

import pytest

from configserver.firmware import (
    AT_ONCE,
    HALTED,
    HALTS_UNKNOWN,
    NO_TARGET,
    ON_TARGET,
    OUTSIDE_WINDOW,
    SENT,
    TAKES_NONE,
    WAITING,
    FirmwareError,
    Placement,
    decide,
    place,
    position,
    resolve,
)

UTC = dt.UTC
NOW = dt.datetime(2026, 12, 1, 23, 30, tzinfo=UTC)   # 00:30 in Berlin


def firmware(text: str) -> dict:
    """The `[firmware]` table of a vars file written as TOML."""
    return tomllib.loads(text)["firmware"]


FLEET = firmware("""
[firmware]
url = "http://fw.example.com/firmware/"
prot = "13.4711"
boot = "13.4711"
allow = [22, 23, 0, 1, 2, 3, 4]
initial = 10
timezone = "Europe/Berlin"

[firmware.groups.phones]
prot = "13.4800"

[firmware.groups.new-ui]
prot = "13.4900"
""")


# -- declarations: layered as variables are, with groups between the fleet and the model -----

@pytest.mark.parametrize("layers, groups, expected", [
    ([("default.toml", FLEET)], (), {"prot": "13.4711", "boot": "13.4711"}),
    ([("default.toml", FLEET)], ("phones",), {"prot": "13.4800", "boot": "13.4711"}),
    # the first group of the model in the groups table's order wins
    ([("default.toml", FLEET)], ("new-ui", "phones"), {"prot": "13.4900", "boot": "13.4711"}),
    ([("default.toml", FLEET), ("models/IP232.toml", {"prot": "13.5000"})], ("phones",),
     {"prot": "13.5000", "boot": "13.4711"}),
    ([("default.toml", FLEET), ("models/IP232.toml", {"prot": "13.5000"}),
      ("devices/IP232-30-00-af.toml", {"prot": "13.5100", "boot": False})], ("phones",),
     {"prot": "13.5100"}),
    ([("models/IP232.toml", {"url": "http://fw/", "boot": "120"})], (), {"boot": "120"}),
    ([], (), {}),
])
def test_targets_layer_fleet_groups_model_device(layers, groups, expected):
    assert dict(resolve(layers, groups).targets) == expected


def test_a_device_file_overrides_the_window_its_group_declared():
    group_window = firmware("""
[firmware.groups.phones]
allow = [1, 2]
""")
    declaration = resolve([("default.toml", {**FLEET, "groups": group_window["groups"]}),
                           ("devices/00-90-33-30-00-af.toml", {"allow": [3]})], ("phones",))
    assert declaration.window.allow == (3,)
    assert resolve([("default.toml", {**FLEET, "groups": group_window["groups"]})], ("phones",)).window.allow == (1, 2)


@pytest.mark.parametrize("table, complaint", [
    ({"prot": "13 4711", "url": "http://fw/"}, "is not a build"),
    ({"prot": "../../etc", "url": "http://fw/"}, "is not a build"),
    ({"prot": 134711, "url": "http://fw/"}, "is not a build"),
    ({"prot": "134711"}, "no firmware.url"),
    ({"url": "ftp://fw/"}, "http:// or https://"),
    ({"url": "http:///firmware/"}, "names no host"),
    ({"url": "http://fw/firmware"}, "must end in '/'"),
    ({"url": "http://fw/firmware/?a=1"}, "query or fragment"),
    ({"url": "http://fw/fir mware/"}, "without spaces"),
    ({"allow": [24]}, "hours 0 to 23"),
    ({"allow": "22-4"}, "hours 0 to 23"),
    ({"initial": -1}, "minutes"),
    ({"timezone": "Mars/Olympus"}, "no time zone"),
    ({"fast_poll": 0}, "minutes, 1 to 1440"),
    ({"prto": "1"}, "unknown key 'prto'"),
    ({"rollout": {"waves": [{"after": "1d", "share": 5}]}}, "need a start"),
    ({"rollout": {"start": dt.datetime(2026, 12, 1), "waves": []}}, "with its offset"),
    ({"rollout": {"start": NOW, "waves": [{"after": "1d", "share": 25}, {"after": "2d", "share": 5}]}},
     "count from the start"),
    ({"rollout": {"start": NOW, "waves": [{"after": "1 day", "share": 5}]}}, "not a duration"),
    ({"rollout": {"start": NOW, "waves": [{"after": "1d", "share": 150}]}}, "at most 100"),
    ({"rollout": {"halt_after": 0}}, "1 or more"),
    ({"rollout": {"first": "IP232-30-00-af"}}, "must list"),
    # durations and dates a timedelta or a date cannot hold are the admin's typo, not a crash
    ({"rollout": {"start": NOW, "waves": [{"after": "99999999999999999999d", "share": 5}]}},
     "waves[0]: after = '99999999999999999999d' is longer than"),
    ({"rollout": {"start": NOW, "waves": [{"after": "3000000d", "share": 5}]}}, "waves[0]: after = '3000000d'"),
    ({"rollout": {"watch": "99999999999999999999w"}}, "firmware.rollout.watch = '99999999999999999999w' is longer"),
    ({"rollout": {"start": dt.datetime(9999, 12, 30, tzinfo=UTC), "waves": [{"after": "1d", "share": 5}]}},
     "firmware.rollout.start = 9999-12-30T00:00:00+00:00 is too far ahead"),
])
def test_a_malformed_declaration_names_the_file_and_key(table, complaint):
    with pytest.raises(FirmwareError) as raised:
        resolve([("models/IP232.toml", table)])
    assert complaint in str(raised.value)
    assert str(raised.value).startswith("models/IP232.toml")


# -- waves: a stable hash of the hwid ---------------------------------------------------------

ROLLOUT = firmware("""
[firmware]
url = "http://fw.example.com/firmware/"
prot = "13.4711"
[firmware.rollout]
start = 2026-12-01T22:00:00Z
first = ["pilot", "IP232-30-00-01", "00-90-33-30-00-02"]
waves = [{ after = "1d", share = 5 }, { after = "2d", share = 25 }, { after = "3d", share = 100 }]
""")


def test_a_device_place_is_the_same_in_another_process():
    hwids = [f"IP232-30-{i // 256:02x}-{i % 256:02x}" for i in range(50)]
    here = [position(hwid) for hwid in hwids]
    code = "import sys; from configserver.firmware import position; print([position(h) for h in sys.argv[1:]])"
    there = subprocess.run([sys.executable, "-c", code, *hwids], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345"}).stdout
    assert repr(here) == there.strip()
    assert position("IP232-30-00-AF") == position("ip232-30-00-af")


def test_waves_take_the_shares_of_the_fleet_they_declare():
    rollout = resolve([("default.toml", ROLLOUT)]).rollout
    waves = [place(rollout, f"IP232-{i // 65536:02x}-{i // 256 % 256:02x}-{i % 256:02x}", "00-90-33-00-00-00").wave
             for i in range(20_000)]
    assert 0.04 < waves.count(1) / len(waves) < 0.06
    assert 0.18 < waves.count(2) / len(waves) < 0.22   # 25 % by the second wave: 20 % more
    assert waves.count(None) == 0 and waves.count(0) == 0


@pytest.mark.parametrize("hwid, mac, groups, wave, opens", [
    ("IP232-30-00-01", "00-90-33-30-00-01", (), 0, "2026-12-01T22:00:00+00:00"),
    ("IP232-30-00-02", "00-90-33-30-00-02", (), 0, "2026-12-01T22:00:00+00:00"),
    ("IP112-30-00-03", "00-90-33-30-00-03", ("pilot",), 0, "2026-12-01T22:00:00+00:00"),
])
def test_first_devices_are_named_by_hwid_mac_or_group(hwid, mac, groups, wave, opens):
    placement = place(resolve([("default.toml", ROLLOUT)]).rollout, hwid, mac, groups)
    assert placement == Placement(wave, dt.datetime.fromisoformat(opens))


def test_a_wave_opens_at_its_time_and_stays_open():
    rollout = resolve([("default.toml", ROLLOUT)]).rollout
    hwid = next(f"IP232-40-00-{i:02x}" for i in range(256) if 5 <= position(f"IP232-40-00-{i:02x}") < 25)
    placement = place(rollout, hwid, "00-90-33-40-00-00")
    assert placement.wave == 2
    opens = dt.datetime(2026, 12, 3, 22, 0, tzinfo=UTC)
    assert [placement.open_at(opens + dt.timedelta(seconds=s)) for s in (-1, 0, 86400 * 30)] == [False, True, True]


def test_a_rollout_of_first_devices_only_keeps_the_rest_waiting():
    rollout = resolve([("m.toml", {"rollout": {"first": ["IP232-30-00-01"]}})]).rollout
    assert place(rollout, "IP232-30-00-01", "00-90-33-30-00-01") == AT_ONCE
    assert place(rollout, "IP232-30-00-09", "00-90-33-30-00-09").wave is None


# -- the decision: target, reported build, wave, window -> lines --------------------------------

DECLARED = resolve([("default.toml", FLEET)])
OPEN, NOT_YET = AT_ONCE, Placement(2, NOW + dt.timedelta(hours=1))
NIGHT, DAY = NOW, dt.datetime(2026, 12, 1, 11, 0, tzinfo=UTC)   # 00:30 and 12:00 in Berlin
TIMES = "mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 10"
PROT = "mod cmd UP0 prot http://fw.example.com/firmware/13.4711/ip232.bin ser 13.4711"
BOOT = "mod cmd UP0 boot http://fw.example.com/firmware/13.4711/boot232.bin ser 13.4711"


@pytest.mark.parametrize("reported, placement, now, halted, lines, verdicts", [
    # reported build differs, wave open, inside the window: both files, then iresetn
    ({"CHECK": "ab", "PROT": "13.4000", "BOOT": "13.4000"}, OPEN, NIGHT, (),
     [TIMES, PROT, BOOT, "iresetn"], (SENT, SENT)),
    ({"CHECK": "ab", "PROT": "13.4711", "BOOT": "13.4711"}, OPEN, NIGHT, (), [TIMES], (ON_TARGET, ON_TARGET)),
    ({"CHECK": "ab", "PROT": "13.4711", "BOOT": "99"}, OPEN, NIGHT, (), [TIMES, BOOT, "iresetn"], (ON_TARGET, SENT)),
    # builds compare without regard to case or surrounding blanks
    ({"CHECK": "ab", "PROT": " 13.4711", "BOOT": "13.4711"}, OPEN, NIGHT, (), [TIMES], (ON_TARGET, ON_TARGET)),
    # no build, an empty one, or something that is no build: differs
    ({"CHECK": "ab"}, OPEN, NIGHT, (), [TIMES, PROT, BOOT, "iresetn"], (SENT, SENT)),
    ({"CHECK": "ab", "PROT": "", "BOOT": "13.4711"}, OPEN, NIGHT, (), [TIMES, PROT, "iresetn"], (SENT, ON_TARGET)),
    ({"CHECK": "ab", "PROT": "13.4711 ser x", "BOOT": "13.4711"}, OPEN, NIGHT, (),
     [TIMES, PROT, "iresetn"], (SENT, ON_TARGET)),
    ({"CHECK": "ab", "PROT": "../ip811.bin", "BOOT": "13.4711"}, OPEN, NIGHT, (),
     [TIMES, PROT, "iresetn"], (SENT, ON_TARGET)),
    # the wave is not open yet, or the rollout is halted: nothing but the window
    ({"CHECK": "ab", "PROT": "1", "BOOT": "1"}, NOT_YET, NIGHT, (), [TIMES], (WAITING, WAITING)),
    ({"CHECK": "ab", "PROT": "1", "BOOT": "1"}, Placement(None, None), NIGHT, (), [TIMES], (WAITING, WAITING)),
    ({"CHECK": "ab", "PROT": "1", "BOOT": "1"}, OPEN, NIGHT, ("prot",), [TIMES, BOOT, "iresetn"], (HALTED, SENT)),
    # outside the window the device would not run the line: it is not sent
    ({"CHECK": "ab", "PROT": "1", "BOOT": "1"}, OPEN, DAY, (), [TIMES], (OUTSIDE_WINDOW, OUTSIDE_WINDOW)),
    # a device provisioned for the first time (no CHECK yet) gets its firmware at any hour
    ({"PROT": "1", "BOOT": "1"}, OPEN, DAY, (), ["mod cmd UP1 times /initial 10", PROT, BOOT, "iresetn"], (SENT, SENT)),
    ({"CHECK": "", "PROT": "1", "BOOT": "1"}, NOT_YET, DAY, (), ["mod cmd UP1 times /initial 10"], (WAITING, WAITING)),
])
def test_decision_table(reported, placement, now, halted, lines, verdicts):
    answer = decide(DECLARED, "IP232", reported, placement, now, halted)
    assert list(answer.lines) == lines
    assert (answer.verdicts["prot"], answer.verdicts["boot"]) == verdicts
    assert answer.text == "".join(line + "\r\n" for line in lines)


def test_a_node_that_does_not_know_the_halts_yet_sends_the_window_and_fast_polling_but_no_file():
    declared = resolve([("default.toml", {**FLEET, "fast_poll": 2})])
    answer = decide(declared, "IP232", {"PROT": "1", "BOOT": "13.4711"}, OPEN, DAY, halts_known=False)
    assert answer.lines == ("mod cmd UP1 times /initial 10", "mod cmd UP1 provision 2")
    assert (answer.verdicts, answer.sent) == ({"prot": HALTS_UNKNOWN, "boot": ON_TARGET}, {})
    assert HALTS_UNKNOWN == "halts not known yet"


VER = "13r1 dvl IP232[13.4711], Bootcode[13.4711], Hardware[300]"


@pytest.mark.parametrize("reported, verdicts", [
    # the build arguments in any case, as the inventory reads them
    ({"CHECK": "ab", "prot": "13.4711", "Boot": "13.4711"}, (ON_TARGET, ON_TARGET)),
    # no PROT/BOOT: what `ver` shows, as the inventory reads it
    ({"CHECK": "ab", "ver": VER}, (ON_TARGET, ON_TARGET)),
    ({"CHECK": "ab", "VER": VER.replace("IP232[13.4711]", "IP232[13.4000]")}, (SENT, ON_TARGET)),
    ({"CHECK": "ab", "PROT": "", "ver": VER}, (ON_TARGET, ON_TARGET)),
    # PROT/BOOT win over ver
    ({"CHECK": "ab", "PROT": "13.4000", "ver": VER}, (SENT, ON_TARGET)),
    ({"CHECK": "ab", "ver": "no brackets here"}, (SENT, SENT)),
])
def test_the_reported_build_is_read_as_the_inventory_reads_it(reported, verdicts):
    from configserver.firmware import differs
    from configserver.inventory._rows import reported_facts

    answer = decide(DECLARED, "IP232", reported, OPEN, NIGHT)
    assert (answer.verdicts["prot"], answer.verdicts["boot"]) == verdicts
    facts = reported_facts(reported)   # what the failure watch and the admin page compare
    assert [differs(facts[column], "13.4711") for column in ("firmware", "boot")] == [v == SENT for v in verdicts]


@pytest.mark.parametrize("model, lines, verdicts", [
    ("IP232", [PROT, BOOT, "iresetn"], (SENT, SENT)),
    ("IP29-4", [PROT.replace("ip232", "ip29"), BOOT.replace("boot232", "boot29"), "iresetn"], (SENT, SENT)),
    ("IPVA", [PROT.replace("ip232", "ipva"), "iresetn"], (SENT, TAKES_NONE)),
    ("mypbxa", [PROT.replace("ip232.bin", "mypbx.apk"), "iresetn"], (SENT, TAKES_NONE)),
    ("swphone", [], (TAKES_NONE, TAKES_NONE)),
    ("IPBS2", [], (TAKES_NONE, TAKES_NONE)),
    ("pbl", [], (TAKES_NONE, TAKES_NONE)),
])
def test_models_that_take_none_never_get_one(model, lines, verdicts):
    declared = resolve([("default.toml", {"url": "http://fw.example.com/firmware/", "prot": "13.4711", "boot": "13.4711"})])
    answer = decide(declared, model, {"CHECK": "ab"}, OPEN, NIGHT)
    assert list(answer.lines) == lines
    assert (answer.verdicts["prot"], answer.verdicts["boot"]) == verdicts


def test_no_target_no_window_no_lines():
    assert decide(resolve([]), "IP232", {}, OPEN, NIGHT).lines == ()
    answer = decide(resolve([("d.toml", {"url": "http://fw/", "boot": "1"})]), "IP232", {"CHECK": "a"}, OPEN, NIGHT)
    assert answer.verdicts["prot"] == NO_TARGET
    assert answer.lines == ("mod cmd UP0 boot http://fw/1/boot232.bin ser 1", "iresetn")


def test_fast_polling_while_first_provisioned_then_back_to_normal():
    declared = resolve([("default.toml", {"fast_poll": 1})])
    assert decide(declared, "IP232", {}, OPEN, NIGHT).lines == ("mod cmd UP1 provision 1",)
    assert decide(declared, "IP232", {"CHECK": "5a87b4ad"}, OPEN, NIGHT).lines == ("mod cmd UP1 provision 0",)


def test_a_template_not_applied_once_never_leaves_its_devices_being_provisioned():
    """Its devices are never sent a check line, so they never report CHECK: without apply_once
    that says nothing about provisioning. No fast polling, and the window holds."""
    declared = resolve([("default.toml", {**FLEET, "fast_poll": 2})])
    day = decide(declared, "IP232", {"PROT": "1", "BOOT": "1"}, OPEN, DAY, apply_once=False)
    assert list(day.lines) == [TIMES]
    assert (day.verdicts["prot"], day.verdicts["boot"]) == (OUTSIDE_WINDOW, OUTSIDE_WINDOW)
    night = decide(declared, "IP232", {"PROT": "1", "BOOT": "1"}, OPEN, NIGHT, apply_once=False)
    assert list(night.lines) == [TIMES, PROT, BOOT, "iresetn"]
    # applied once, the same device is being provisioned: no /allow, fast polling, firmware now
    assert list(decide(declared, "IP232", {"PROT": "1", "BOOT": "1"}, OPEN, DAY).lines) == [
        "mod cmd UP1 times /initial 10", "mod cmd UP1 provision 2", PROT, BOOT, "iresetn"]


def test_a_window_that_would_say_nothing_sends_no_times_line():
    declared = resolve([("default.toml", {"allow": [1, 2], "fast_poll": 1})])
    assert decide(declared, "IP232", {}, OPEN, NIGHT).lines == ("mod cmd UP1 provision 1",)
    assert decide(declared, "IP232", {"CHECK": "ab"}, OPEN, NIGHT).lines == (
        "mod cmd UP1 times /allow 1,2", "mod cmd UP1 provision 0")


def test_nothing_a_device_reports_reaches_a_line():
    hostile = ["http://evil.example/x.bin", "13.4711/../../x", "13.4711\r\nmod cmd UP0 prot http://evil/",
               "13.4711 ser 1", "%2e%2e", "\x00", "ö" * 40]
    for value in hostile:
        reported = {"CHECK": value, "PROT": value, "BOOT": value, "type": value, "hwid": value}
        for line in decide(DECLARED, "IP232", reported, OPEN, NIGHT).lines:
            assert value not in line
            assert line in (TIMES, PROT, BOOT, "iresetn", "mod cmd UP1 times /initial 10")


def test_the_firmware_modules_use_only_the_inventorys_public_names():
    """firmware/ keeps its tables beside the inventory's: it may use the inventory package, never
    one of its private modules (which may change under it)."""
    import ast
    from pathlib import Path

    import configserver.firmware

    private = []
    for path in sorted(Path(configserver.firmware.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "inventory._" in node.module:
                private.append(f"{path.name}: from {'.' * node.level}{node.module}")
    assert private == []
