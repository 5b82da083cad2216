"""Template lookup, variable layers, hot reload and the edit grace window."""

import dataclasses
import datetime as dt
import errno
import os
import time

import pytest

from configserver.admission import NamedDevice
from configserver.content import ConfigurationError, ContentStore, Renderer, Snapshot, to_crlf
from configserver.content import snapshot as snapshot_module
from configserver.identity import DeviceIdentity, parse_device_name
from configserver.poll import Pipeline, PollRequest


def device(cn: str) -> DeviceIdentity:
    name = parse_device_name(cn)
    return DeviceIdentity(hwid=name.hwid, model=name.model, mac=name.mac, cn=cn, issuer="test")


def render(store, template, context):
    """Render `template` of the store's current snapshot."""
    return Renderer(store.templates_dir).render(store.snapshot, template, context)


@pytest.fixture
def store(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    return ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)


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
    with pytest.raises(ConfigurationError, match="update"):
        render(store, choice.template, {"vars": choice.variables})
    assert choice.variables["t"]["x"] == 1


def test_changed_template_is_used_after_the_next_scan(store):
    write(store, "templates/default.j2", "old\n")
    store.refresh()
    assert render(store, "default.j2", {}) == "old\r\n"
    write(store, "templates/default.j2", "new\n", age=5)
    assert store.refresh() is True
    assert render(store, "default.j2", {}) == "new\r\n"


def test_unchanged_folder_keeps_the_snapshot(store):
    write(store, "templates/default.j2", "x\n")
    store.refresh()
    before = store.snapshot
    assert store.refresh() is False
    assert store.snapshot is before


def test_file_modified_within_the_grace_window_keeps_the_last_version(tmp_path):
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0)
    write(store, "templates/default.j2", "complete\n")
    store.refresh()
    write(store, "templates/default.j2", "half writ", age=0)     # being written right now
    store.refresh()
    assert render(store, "default.j2", {}) == "complete\r\n"
    write(store, "templates/devices/IP232-30-00-af.j2", "new device\n", age=0)
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).template == "default.j2"  # not yet visible
    os.utime(store.templates_dir / "default.j2", (time.time() - 2, time.time() - 2))
    os.utime(store.templates_dir / "devices/IP232-30-00-af.j2", (time.time() - 2, time.time() - 2))
    store.refresh()
    assert render(store, "default.j2", {}) == "half writ\r\n"
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
    with pytest.raises(ConfigurationError) as error:
        render(store, "default.j2", {})
    assert "not found" in str(error.value)


@pytest.mark.parametrize("text, out", [("", ""), ("a", "a\r\n"), ("a\n", "a\r\n"), ("a\n\n", "a\r\n\r\n"), ("a\r\nb", "a\r\nb\r\n")])
def test_crlf(text, out):
    assert to_crlf(text) == out


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def test_file_dated_in_the_future_is_read_once_it_has_stayed_the_same(tmp_path):
    clock = Clock()
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=clock)
    write(store, "templates/default.j2", "from a skewed clock\n", age=-3600)
    assert store.refresh() is False and store.pending
    clock.now += 1.5
    assert store.refresh() is True
    assert render(store, "default.j2", {}) == "from a skewed clock\r\n"


def test_a_change_spread_over_several_files_is_published_whole(tmp_path):
    clock = Clock()
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=clock)
    write(store, "templates/devices/IP232-30-00-af.j2", "own\n")
    write(store, "vars/default.toml", 'a = "old"\n')
    store.refresh()
    # a checkout: the device file goes, the vars change, both just now
    (store.templates_dir / "devices/IP232-30-00-af.j2").unlink()
    write(store, "templates/default.j2", "default {{ vars.a }}\n", age=0)
    write(store, "vars/default.toml", 'a = "new"\n', age=0)
    assert store.refresh() is False
    assert store.snapshot.choose(device("IP232-30-00-af")).template == "devices/IP232-30-00-af.j2"  # still the old view
    clock.now += 1.5
    assert store.refresh() is True
    choice = store.snapshot.choose(device("IP232-30-00-af"))
    assert choice.template == "default.j2" and choice.variables["a"] == "new"


def test_a_file_written_while_it_is_read_is_not_taken(store, monkeypatch):
    write(store, "templates/default.j2", "complete\n")
    real_fstat = os.fstat

    def fstat_after_a_write(fd):
        result = real_fstat(fd)
        return os.stat_result((*result[:8], result[8] + 1, result[9]),   # mtime moved on
                              {"st_mtime_ns": result.st_mtime_ns + 1_000_000_000})

    monkeypatch.setattr(os, "fstat", fstat_after_a_write)
    assert store.refresh() is False and store.pending
    monkeypatch.undo()
    assert store.refresh() is True
    assert render(store, "default.j2", {}) == "complete\r\n"


def test_start_up_waits_for_files_still_settling(tmp_path):
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0.2)
    write(store, "templates/default.j2", "x\n", age=0)
    store.settle(timeout=5)
    assert store.snapshot.lookup == {"default": "default.j2"}


@pytest.mark.parametrize(
    "relative, content, message",
    [
        ("templates/default.j2", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("vars/default.toml", "a = " + "[" * 2000 + "]" * 2000 + "\n", "cannot be read as TOML"),
        ("vars/devices.csv", "hwid,pwd\nIP232-30-00-af,gr\xfc\xdf\n".encode("cp1252"), "devices.csv: not UTF-8"),
    ],
)
def test_a_file_that_cannot_be_read_is_a_problem_never_an_empty_value(store, relative, content, message):
    write(store, "templates/default.j2", "x\n")
    path = store.templates_dir.parent / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    os.utime(path, (time.time() - 10, time.time() - 10))
    store.refresh()
    assert message in store.snapshot.choose(device("IP232-30-00-af")).problem


def test_an_unreadable_include_fails_the_render(store):
    write(store, "templates/default.j2", "a\n{% include 'part.j2' %}\n")
    path = store.templates_dir / "part.j2"
    path.write_bytes(b"\xff\xfe")
    os.utime(path, (time.time() - 10, time.time() - 10))
    store.refresh()
    with pytest.raises(ConfigurationError, match="part.j2: not UTF-8"):
        render(store, "default.j2", {})


def test_a_csv_saved_with_a_byte_order_mark_is_read(store):
    write(store, "vars/devices.csv", "\ufeffhwid,ext\nIP232-30-00-af,42\n")
    store.refresh()
    assert store.snapshot.choose(device("IP232-30-00-af")).variables["ext"] == "42"


# -- a template that cannot be read says nothing -------------------------------------------------

def refuse_to_open(monkeypatch, path) -> dict[str, bool]:
    """Opening `path` fails with EACCES while the switch is on: what the service user sees of a
    template left 0600 root (a checkout as root) until the admin runs chmod."""
    blocked = {"on": True}
    real_open = os.open

    def fake_open(name, flags, *args, **kwargs):
        if blocked["on"] and str(name) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(snapshot_module.os, "open", fake_open)
    return blocked


def poll(pipeline: Pipeline, dev: DeviceIdentity, query: dict[str, str] | None = None):
    request = PollRequest("GET", "/", {k: [v] for k, v in (query or {}).items()}, None, "192.0.2.1", time.time())
    return pipeline.serve(dev, request, dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))


@pytest.mark.parametrize("unreadable", ["templates/default.j2", "templates/part.j2"])
def test_a_template_unreadable_at_first_is_served_with_its_own_options_once_it_can_be_read(
        store, monkeypatch, unreadable):
    write(store, "templates/default.j2", "{# configserver: apply_once=false -#}\n{% include 'part.j2' %}\n")
    write(store, "templates/part.j2", "mod cmd UP1 check ser own-{{ request.query.get('x', '') }}")
    blocked = refuse_to_open(monkeypatch, store.templates_dir.parent / unreadable)
    store.refresh()
    phone = device("IP232-30-00-af")
    pipeline = Pipeline(NamedDevice(phone), store, Renderer(store.templates_dir))
    first = poll(pipeline, phone)
    name = unreadable.removeprefix("templates/")
    assert first.status == 500 and first.detail.startswith(f"{name}: cannot read: [Errno 13] Permission denied")
    blocked["on"] = False   # chmod 644: no new stamp, no new snapshot
    assert poll(pipeline, phone, {"x": "1"}).body == b"mod cmd UP1 check ser own-1\r\n"
    assert poll(pipeline, phone, {"x": "2"}).body == b"mod cmd UP1 check ser own-2\r\n"   # rendered on every poll


def test_a_template_unreadable_at_first_keeps_its_final_command_in_later_snapshots(store, monkeypatch):
    path = write(store, "templates/default.j2", "{# configserver: final=ser -#}\nconfig change SIP0 /user a\n")
    blocked = refuse_to_open(monkeypatch, path)
    store.refresh()
    phone = device("IP232-30-00-af")
    pipeline = Pipeline(NamedDevice(phone), store, Renderer(store.templates_dir))
    assert poll(pipeline, phone).status == 500
    blocked["on"] = False
    assert no_final_line(poll(pipeline, phone).body)
    write(store, "vars/unrelated.toml", "x = 1\n")   # any later change: a new snapshot
    assert store.refresh() is True
    assert no_final_line(poll(pipeline, phone).body)


def test_an_include_changed_since_it_was_listed_is_configuration_changing_not_an_error(store, monkeypatch):
    monkeypatch.setattr("configserver.content.watcher.READ_AT_ONCE", 0)   # a fleet's folders: listed, not read
    write(store, "templates/default.j2", "{% include 'part.j2' %}\n")
    part = write(store, "templates/part.j2", "config change SIP0 /user a\n")
    store.refresh()
    write(store, "templates/part.j2", "config change SIP0 /user bb\n")   # a checkout, its event not yet handled
    looked_at: list[str] = []
    monkeypatch.setattr(store, "look_again", looked_at.append)
    phone = device("IP232-30-00-af")
    pipeline = Pipeline(NamedDevice(phone), store, Renderer(store.templates_dir))
    for _ in range(2):   # the choice worked out once for the snapshot says the same on every poll
        outcome = poll(pipeline, phone)
        assert (outcome.status, outcome.reason) == (503, "configuration changing"), (outcome.status, outcome.detail)
        assert outcome.detail.startswith("part.j2: changed on disk since the folder was listed")
    assert looked_at == ["part.j2", "part.j2"]   # the watcher is told to look at the include now
    assert store.refresh([str(part)]) is True
    assert b"config change SIP0 /user bb\r\n" in poll(pipeline, phone).body


def no_final_line(body: bytes) -> bool:
    """Whether a wrapped script ends in its check line (`final=ser`: no reset after it)."""
    return body.split(b"\r\n")[-2].startswith(b"mod cmd UP1 check ser ")


def test_an_answer_kept_is_wrapped_again_when_its_wrap_changes(store, monkeypatch):
    write(store, "templates/default.j2", "config change SIP0 /user a\n")
    store.refresh()
    phone = device("IP232-30-00-af")
    pipeline = Pipeline(NamedDevice(phone), store, Renderer(store.templates_dir))
    assert poll(pipeline, phone).body.endswith(b"\r\niresetn\r\n")
    choose = Snapshot.choose
    monkeypatch.setattr(Snapshot, "choose", lambda snapshot, dev: dataclasses.replace(choose(snapshot, dev),
                                                                                      final_command="ser"))
    assert no_final_line(poll(pipeline, phone).body)   # the same sources, another wrap
