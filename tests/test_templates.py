"""Template lookup, variable layers, hot reload and the edit grace window."""

import os
import time

import pytest

from configserver.identity import DeviceIdentity, parse_device_name
from configserver.templates import TemplateStore, to_crlf


def device(cn: str) -> DeviceIdentity:
    name = parse_device_name(cn)
    return DeviceIdentity(hwid=name.hwid, model=name.model, mac=name.mac, cn=cn, issuer="test")


@pytest.fixture
def store(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    return TemplateStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)


def write(store, relative, text, age: float = 10.0):
    root = store.templates_dir.parent
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


LEVELS = [
    ("templates/devices/IP232-30-00-af.j2", "devices/IP232-30-00-af.j2"),
    ("templates/devices/00-90-33-30-00-af.j2", "devices/00-90-33-30-00-af.j2"),
    ("templates/models/IP232.j2", "models/IP232.j2"),
    ("templates/default.j2", "default.j2"),
]


@pytest.mark.parametrize("present", range(len(LEVELS)))
def test_first_existing_template_wins(store, present):
    for relative, _ in LEVELS[present:]:
        write(store, relative, "x")
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).template == LEVELS[present][1]


def test_hex_in_names_is_matched_without_regard_to_case(store):
    write(store, "templates/devices/IP232-30-00-AF.j2", "x")
    write(store, "templates/devices/00-90-33-30-00-B0.j2", "x")
    write(store, "templates/models/ip1202.j2", "x")
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).template == "devices/IP232-30-00-AF.j2"
    assert store.snapshot.choose(device("IP232-30-00-b0")).template == "devices/00-90-33-30-00-B0.j2"
    assert store.snapshot.choose(device("IP1202-30-00-c0")).template == "models/ip1202.j2"


def test_broken_cn_device_file_under_either_name_is_found(store):
    write(store, "templates/devices/IP222s-30-00-af.j2", "x")
    store.refresh()
    assert store.snapshot.choose(device("IP222s-30-00-af")).template == "devices/IP222s-30-00-af.j2"


def test_no_template_at_all(store):
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).template is None


def test_variables_layer_from_default_to_device(store):
    write(store, "vars/default.toml", 'a = "default"\nb = "default"\nc = "default"\nd = "default"\n[sip]\nserver = "pbx"\nuser = "?"\n')
    write(store, "vars/models/IP232.toml", 'b = "model"\nc = "model"\nd = "model"\n')
    write(store, "vars/devices/00-90-33-30-00-af.toml", 'c = "mac"\nd = "mac"\n')
    write(store, "vars/devices/IP232-30-00-af.toml", 'd = "hwid"\n[sip]\nuser = "alice"\n')
    write(store, "vars/devices.csv", "hwid,e,d\nIP232-30-00-AF,csv,\nIP232-30-00-b0,other,other\n")
    store.refresh()
    choice = store.snapshot.choose(device("IP232-30-00-af"))
    assert dict(choice.variables["sip"]) == {"server": "pbx", "user": "alice"}
    assert {k: choice.variables[k] for k in "abcde"} == {"a": "default", "b": "model", "c": "mac", "d": "hwid", "e": "csv"}
    assert choice.vars_files == (
        "default.toml", "models/IP232.toml", "devices/00-90-33-30-00-af.toml", "devices/IP232-30-00-af.toml", "devices.csv",
    )


def test_csv_row_by_mac_overrides_lower_layers(store):
    write(store, "vars/default.toml", 'ext = "0"\n')
    write(store, "vars/devices.csv", "mac,ext\n0090333000af,42\n")
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).variables["ext"] == "42"


def test_variables_are_read_only_for_templates(store):
    write(store, "vars/default.toml", "[t]\nx = 1\n")
    write(store, "templates/default.j2", "{{ vars.t.update({'x': 2}) }}")
    store.refresh()
    choice = store.snapshot.choose(device("IP232-30-00-af"))
    with pytest.raises(Exception):
        store.render(choice.template, {"vars": choice.variables})
    assert choice.variables["t"]["x"] == 1


def test_changed_template_is_used_after_the_next_scan(store):
    write(store, "templates/default.j2", "old\n")
    store.refresh()
    assert store.render("default.j2", {}) == "old\r\n"
    write(store, "templates/default.j2", "new\n", age=5)
    assert store.refresh() is True
    assert store.render("default.j2", {}) == "new\r\n"


def test_unchanged_folder_keeps_the_snapshot(store):
    write(store, "templates/default.j2", "x\n")
    store.refresh()
    before = store.snapshot
    assert store.refresh() is False
    assert store.snapshot is before


def test_file_modified_within_the_grace_window_keeps_the_last_version(tmp_path):
    store = TemplateStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0)
    write(store, "templates/default.j2", "complete\n")
    store.refresh()
    write(store, "templates/default.j2", "half writ", age=0)     # being written right now
    store.refresh()
    assert store.render("default.j2", {}) == "complete\r\n"
    write(store, "templates/devices/IP232-30-00-af.j2", "new device\n", age=0)
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).template == "default.j2"  # not yet visible
    os.utime(store.templates_dir / "default.j2", (time.time() - 2, time.time() - 2))
    os.utime(store.templates_dir / "devices/IP232-30-00-af.j2", (time.time() - 2, time.time() - 2))
    store.refresh()
    assert store.render("default.j2", {}) == "half writ\r\n"
    assert store.snapshot.choose(device("IP232-30-00-af")).template == "devices/IP232-30-00-af.j2"


def test_broken_vars_edit_keeps_no_stale_values_when_never_good(store):
    write(store, "vars/default.toml", "x = [\n")
    store.refresh()
    assert "default.toml" in store.snapshot.choose(device("IP232-30-00-af")).problem


def test_editor_droppings_are_ignored(store):
    write(store, "templates/.default.j2.swp", "x")
    write(store, "templates/default.j2~", "x")
    store.refresh()
    assert store.snapshot.templates == {}


def test_nothing_outside_the_templates_folder_can_be_included(store, tmp_path):
    (tmp_path / "secret.txt").write_text("root password")
    write(store, "templates/default.j2", "{% include '../secret.txt' %}")
    store.refresh()
    with pytest.raises(Exception) as error:
        store.render("default.j2", {})
    assert "not found" in str(error.value)


@pytest.mark.parametrize("text, out", [("", ""), ("a", "a\r\n"), ("a\n", "a\r\n"), ("a\n\n", "a\r\n\r\n"), ("a\r\nb", "a\r\nb\r\n")])
def test_crlf(text, out):
    assert to_crlf(text) == out


def test_file_dated_in_the_future_is_read_at_once(tmp_path):
    store = TemplateStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0)
    write(store, "templates/default.j2", "from a skewed clock\n", age=-3600)
    store.refresh()
    assert store.render("default.j2", {}) == "from a skewed clock\r\n"
