"""An edit renders again only the devices whose answers it changes, and file events publish it
without waiting for a scan: the answers kept across snapshots, the index redone for what changed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from driving import call, request_scope, terminator_headers

from configserver.content import ContentStore, analysis


def settled(path: Path) -> None:
    """Date a file as written long ago: the next refresh publishes it at once."""
    os.utime(path, (time.time() - 60, time.time() - 60))


def rendered(app) -> list[str]:
    """The hwids the app renders a script for from now on (its answers, kept or not, are unchanged)."""
    devices: list[str] = []
    render = app.pipeline.renderer.render

    def counting(snapshot, template, context):
        devices.append(context["device"].hwid)
        return render(snapshot, template, context)

    app.pipeline.renderer.render = counting
    return devices


def poll_all(app, pki) -> dict[str, str]:
    answers = {}
    for name, cert in (("IP232-30-00-af", pki.phone), ("IP1202-35-fe-4d", pki.gateway), ("IP222s-30-00-b0", pki.broken)):
        answer = call(app, "/", terminator_headers(cert))
        assert answer.status == 200, answer.text
        answers[name] = answer.text
    return answers


@pytest.fixture
def fleet(site):
    """Three devices: the phone has a template of its own, the other two get default.j2."""
    site.write("templates/default.j2", "# default for {{ device.hwid }}\nconfig change SIP0 /user {{ vars.user }}\n")
    site.write("templates/devices/IP232-30-00-af.j2", "# own\n{% include 'part.j2' %}\n")
    site.write("templates/part.j2", "config change NTP0 /server {{ vars.ntp }}\n")
    site.write("vars/default.toml", 'user = "nobody"\nntp = "pool.ntp.org"\n')
    site.write("vars/models/IP1202.toml", 'user = "gateway"\n')
    site.write("vars/devices.csv", "hwid,user\nIP232-30-00-af,alice\nIP222-30-00-b0,bob\n")
    for path in (*site.templates.rglob("*.j2"), *site.vars.rglob("*.*")):
        settled(path)
    return site


def edit(site, app, relative: str, text: str) -> None:
    settled(site.write(relative, text))
    assert app.store.refresh() is True


def test_an_edit_to_one_devices_template_renders_that_device_again_only(fleet, pki):
    app = fleet.app()
    before = poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "templates/devices/IP232-30-00-af.j2", "# own, edited\n{% include 'part.j2' %}\n")
    after = poll_all(app, pki)
    assert renders == ["IP232-30-00-af"]
    assert after["IP232-30-00-af"].startswith("# own, edited\r\n")
    assert after["IP1202-35-fe-4d"] == before["IP1202-35-fe-4d"] and after["IP222s-30-00-b0"] == before["IP222s-30-00-b0"]


def test_an_edit_to_default_j2_renders_again_only_the_devices_that_use_it(fleet, pki):
    app = fleet.app()
    poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "templates/default.j2", "# default, edited\nconfig change SIP0 /user {{ vars.user }}\n")
    after = poll_all(app, pki)
    assert sorted(renders) == ["IP1202-35-fe-4d", "IP222-30-00-b0"]
    assert after["IP1202-35-fe-4d"].startswith("# default, edited\r\n")


def test_an_edit_to_an_included_template_renders_again_the_devices_that_include_it(fleet, pki):
    app = fleet.app()
    poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "templates/part.j2", "config change NTP0 /server ntp.example.com\n")
    after = poll_all(app, pki)
    assert renders == ["IP232-30-00-af"]
    assert "/server ntp.example.com\r\n" in after["IP232-30-00-af"]


def test_a_changed_devices_csv_row_renders_again_only_its_device(fleet, pki):
    app = fleet.app()
    poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "vars/devices.csv", "hwid,user\nIP232-30-00-af,alice\nIP222-30-00-b0,carol\n")
    after = poll_all(app, pki)
    assert renders == ["IP222-30-00-b0"]
    assert "/user carol\r\n" in after["IP222s-30-00-b0"]


def test_a_vars_file_change_renders_again_only_the_devices_that_read_it(fleet, pki):
    app = fleet.app()
    poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "vars/models/IP1202.toml", 'user = "gateway two"\n')
    after = poll_all(app, pki)
    assert renders == ["IP1202-35-fe-4d"]
    assert "/user gateway two\r\n" in after["IP1202-35-fe-4d"]


def test_a_new_template_for_a_device_takes_over_from_default_j2_for_that_device_only(fleet, pki):
    app = fleet.app()
    poll_all(app, pki)
    renders = rendered(app)
    edit(fleet, app, "templates/devices/IP1202-35-fe-4d.j2", "# gateway's own\n")
    after = poll_all(app, pki)
    assert renders == ["IP1202-35-fe-4d"] and after["IP1202-35-fe-4d"].startswith("# gateway's own\r\n")
    (fleet.templates / "devices" / "IP1202-35-fe-4d.j2").unlink()
    assert app.store.refresh() is True
    assert poll_all(app, pki)["IP1202-35-fe-4d"].startswith("# default for IP1202-35-fe-4d\r\n")


def test_of_two_files_for_one_device_the_first_name_wins_and_the_other_takes_over_when_it_goes(tmp_path):
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    (tmp_path / "templates" / "devices").mkdir(parents=True)
    upper = tmp_path / "templates" / "devices" / "IP232-30-00-AF.j2"
    lower = tmp_path / "templates" / "devices" / "IP232-30-00-af.j2"
    upper.write_text("upper\n")
    lower.write_text("lower\n")
    store.refresh()
    assert store.snapshot.lookup["devices/ip232-30-00-af"] == "devices/IP232-30-00-AF.j2"
    upper.unlink()
    store.refresh([upper])
    assert store.snapshot.lookup["devices/ip232-30-00-af"] == "devices/IP232-30-00-af.j2"
    lower.unlink()
    store.refresh([lower])
    assert "devices/ip232-30-00-af" not in store.snapshot.lookup


def test_start_up_reads_every_file_but_parses_a_template_only_once_a_device_is_given_it(fleet, pki):
    app = fleet.app()
    own = app.store.snapshot.templates["devices/IP232-30-00-af.j2"]
    assert own.content == "# own\n{% include 'part.j2' %}\n" and own.learned is None
    call(app, "/", terminator_headers(pki.phone))
    assert analysis.facts(own) == (False, ("part.j2",))
    assert app.store.snapshot.templates["default.j2"].learned is None   # nobody polled for it yet


# -- file events ------------------------------------------------------------------------------

async def _wait(until, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if until():
            return True
        await asyncio.sleep(0.02)
    return until()


def test_a_saved_file_is_published_by_its_file_event_once_the_grace_window_has_passed(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0.5)
    store.refresh()

    async def scenario() -> tuple[float, bool]:
        ready = asyncio.Event()
        follower = asyncio.create_task(store.follow(3600, ready))
        await ready.wait()
        await asyncio.sleep(0.3)
        (tmp_path / "templates" / "default.j2").write_text("hello\n")
        saved = time.time()
        try:
            published = await _wait(lambda: "default.j2" in store.snapshot.templates, 15)
            return time.time() - saved, published
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    waited, published = asyncio.run(scenario())
    assert published
    assert waited >= 0.5   # never before the grace window has passed: the file may still be written


def test_a_folder_moved_in_whole_is_published_by_its_file_event(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "IP232-30-00-af.j2").write_text("own\n")

    def moved() -> bool:
        return store.snapshot.lookup.get("devices/ip232-30-00-af") == "devices/IP232-30-00-af.j2"

    async def scenario() -> bool:
        ready = asyncio.Event()
        follower = asyncio.create_task(store.follow(3600, ready))
        await ready.wait()
        await asyncio.sleep(0.3)
        staged.rename(tmp_path / "templates" / "devices")
        try:
            if not await _wait(moved, 15):
                return False
            (tmp_path / "templates" / "devices").rename(tmp_path / "gone")
            return await _wait(lambda: not store.snapshot.templates, 15)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    assert asyncio.run(scenario())


def test_a_folder_of_device_links_to_model_templates_moved_in_whole_is_published_by_its_event(tmp_path):
    """devices/<hwid>.j2 -> ../models/<model>.j2: the link names a file in another folder of
    templates/, which a folder's event accepts as the rescan does."""
    (tmp_path / "templates" / "models").mkdir(parents=True)
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "models" / "IP232.j2").write_text("config change SIP0 /user model\n")
    settled(tmp_path / "templates" / "models" / "IP232.j2")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    staged = tmp_path / "templates" / ".staging"
    staged.mkdir()
    (staged / "IP232-30-00-af.j2").symlink_to("../models/IP232.j2")
    staged.rename(tmp_path / "templates" / "devices")   # one event, naming the folder
    assert store.refresh([tmp_path / "templates" / "devices"]) is True
    assert store.snapshot.templates["devices/IP232-30-00-af.j2"].text == "config change SIP0 /user model\n"


def test_an_event_on_a_folder_of_device_links_to_model_templates_keeps_them(tmp_path):
    (tmp_path / "templates" / "models").mkdir(parents=True)
    (tmp_path / "templates" / "devices").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "models" / "IP232.j2").write_text("config change SIP0 /user model\n")
    settled(tmp_path / "templates" / "models" / "IP232.j2")
    (tmp_path / "templates" / "devices" / "IP232-30-00-af.j2").symlink_to("../models/IP232.j2")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    assert "devices/IP232-30-00-af.j2" in store.snapshot.templates
    os.chmod(tmp_path / "templates" / "devices", 0o750)   # an event naming the folder
    store.refresh([tmp_path / "templates" / "devices"])
    assert "devices/IP232-30-00-af.j2" in store.snapshot.templates


async def _marked_after(store, act) -> bool:
    """With `store` following its folders: `act`, then a marker template written; whether the
    marker was published (so every event of `act` was seen before it) within 15 s."""
    ready = asyncio.Event()
    follower = asyncio.create_task(store.follow(3600, ready))
    await ready.wait()
    await asyncio.sleep(0.3)
    await act()
    (store.templates_dir / "marker.j2").write_text("seen\n")
    try:
        return await _wait(lambda: "marker.j2" in store.snapshot.templates, 15)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def test_a_symlink_out_of_the_folder_made_while_watched_is_never_read(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()

    async def act() -> None:
        (tmp_path / "templates" / "default.j2").symlink_to(secret)

    assert asyncio.run(_marked_after(store, act))
    assert "default.j2" not in store.snapshot.templates


# -- a fleet listed in bulk ------------------------------------------------------------------------

def test_templates_listed_in_bulk_are_read_on_first_use_and_only_in_the_version_listed(site, pki):
    from configserver.content.watcher import READ_AT_ONCE

    for n in range(READ_AT_ONCE + 1):
        settled(site.write(f"templates/devices/IP232-31-{n >> 8:02x}-{n & 255:02x}.j2", f"# device {n}\n"))
    settled(site.write("templates/devices/IP232-30-00-af.j2", "# own\n"))
    gateway = site.write("templates/devices/IP1202-35-fe-4d.j2", "# gateway\n")
    settled(gateway)
    app = site.app()
    assert app.store.snapshot.templates["devices/IP232-30-00-af.j2"].content is None   # listed, not read
    outcomes: list = []
    app.recorders.append(outcomes.append)
    assert call(app, "/", terminator_headers(pki.phone)).text.startswith("# own\r\n")

    gateway.write_text("# gateway, edited before anyone read it\n")   # the snapshot still names the old version
    # not answered at once: the poll waits the ASGI way for the next snapshot
    assert app.answer_at_once(request_scope("/", terminator_headers(pki.gateway))) is None
    polls = len(outcomes)
    # no watcher runs here to publish the next snapshot: the poll waits for it, then says so
    assert call(app, "/", terminator_headers(pki.gateway)).text == "# configuration changing\n"
    assert len(outcomes) == polls + 1
    assert outcomes[-1].status == 503 and outcomes[-1].reason == "configuration changing"
    assert "changed on disk since the folder was listed" in outcomes[-1].detail
    settled(gateway)
    assert app.store.refresh([gateway]) is True
    assert call(app, "/", terminator_headers(pki.gateway)).text.startswith("# gateway, edited before anyone read it\r\n")


def test_a_templates_folder_moved_away_and_back_is_watched_again(tmp_path, monkeypatch):
    monkeypatch.setattr("configserver.content.watcher.FOLDER_CHECK_SECONDS", 0.2)   # seconds otherwise
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "default.j2").write_text("first\n")
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()

    def text() -> str | None:
        source = store.snapshot.templates.get("default.j2")
        return source.text if source is not None else None

    async def scenario() -> list[bool]:
        ready = asyncio.Event()
        follower = asyncio.create_task(store.follow(3600, ready))
        await ready.wait()
        await asyncio.sleep(0.3)
        seen = []
        try:
            (tmp_path / "templates").rename(tmp_path / "away")
            seen.append(await _wait(lambda: text() is None, 15))
            (tmp_path / "away").rename(tmp_path / "templates")
            seen.append(await _wait(lambda: text() == "first\n", 15))
            await asyncio.sleep(0.3)
            (tmp_path / "templates" / "default.j2").write_text("second\n")   # an event from the folder back
            seen.append(await _wait(lambda: text() == "second\n", 15))
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        return seen

    assert asyncio.run(scenario()) == [True, True, True]


def test_an_edit_in_the_grace_window_never_mixes_into_the_version_listed(site, pki):
    # compiled again (a fleet larger than the compiled templates kept), a template is the
    # version its snapshot lists, the new one only once it is published
    own = site.write("templates/devices/IP232-30-00-af.j2",
                     "{# configserver: apply_once=false #}\n# own at {{ now.year }}\n{% include 'part.j2' %}\n")
    part = site.write("templates/part.j2", "config change NTP0 /server one.example.com\n")
    settled(own)
    settled(part)
    app = site.app(grace_seconds=60)
    outcomes: list = []
    app.recorders.append(outcomes.append)
    compiled = app.pipeline.renderer.environment.cache
    first = call(app, "/", terminator_headers(pki.phone))
    assert first.status == 200 and "\r\n# own at " in first.text and "/server one.example.com\r\n" in first.text

    part.write_text("config change NTP0 /server two.example.com\n")   # the snapshot still lists the first
    assert app.store.refresh() is False                                # within the grace window
    compiled.clear()
    during = call(app, "/", terminator_headers(pki.phone))
    assert during.status == 200 and "/server one.example.com\r\n" in during.text and "two.example" not in during.text

    settled(part)
    assert app.store.refresh() is True
    after = call(app, "/", terminator_headers(pki.phone))
    assert after.status == 200 and "/server two.example.com\r\n" in after.text and "one.example" not in after.text


def test_a_vars_file_that_cannot_be_read_for_a_while_is_read_again_until_it_can(tmp_path, monkeypatch, caplog):
    """A read that fails for a passing cause (no file descriptor left in a poll storm, a file
    the service may not open for a moment) is shown as it is, then read again by the watcher
    until it can be: not kept as that version's error until someone edits the file."""
    from configserver.content import snapshot, watcher

    monkeypatch.setattr(watcher, "FOLDER_CHECK_SECONDS", 0.2)   # how often follow wakes with nothing to do
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "default.j2").write_text("user {{ vars.user }}\n")
    (tmp_path / "vars" / "default.toml").write_text('user = "alice"\n')
    settled(tmp_path / "vars" / "default.toml")
    failing = {"now": True}
    usual = snapshot.read_version

    def read_version(path, stamp, checksum=None, folder=None):
        if failing["now"] and path.endswith("default.toml"):
            return snapshot.Read(None, f"{snapshot.NOT_NOW}[Errno 24] Too many open files", False, None)
        return usual(path, stamp, checksum, folder)

    monkeypatch.setattr(snapshot, "read_version", read_version)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    listed = store.snapshot.vars["default.toml"]
    assert listed.problem == "cannot read now: [Errno 24] Too many open files" and listed.passing

    # while it still fails: looked at again, and nothing new published (no reload line, no churn)
    caplog.clear()
    assert store.refresh(()) is False and store.refresh() is False
    assert store.snapshot.vars["default.toml"] is listed
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "reload"]

    async def scenario() -> bool:
        ready = asyncio.Event()
        follower = asyncio.create_task(store.follow(3600, ready))
        await ready.wait()
        try:
            failing["now"] = False   # the storm is over: no event, no edit, the same version on disk
            return await _wait(lambda: store.snapshot.vars["default.toml"].data == {"user": "alice"}, 15)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    assert asyncio.run(scenario())
    assert store.snapshot.vars["default.toml"].problem is None and store.snapshot.vars["default.toml"].stamp == listed.stamp
    assert store.refresh(()) is False   # read: nothing to look at any more


def test_a_vars_file_listed_with_a_passing_problem_is_read_again_at_once_not_waited_for(tmp_path, monkeypatch):
    """Read again in the version listed, it is no change: even with a modification time ahead of
    the clock, which a change would wait out, it holds nothing up."""
    from configserver.content import snapshot

    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    ahead = tmp_path / "vars" / "default.toml"
    ahead.write_text('user = "alice"\n')
    os.utime(ahead, (time.time() + 3600, time.time() + 3600))   # a tarball from a clock an hour ahead
    usual = snapshot.read_version
    monkeypatch.setattr(snapshot, "read_version", lambda path, stamp, checksum=None, folder=None: snapshot.Read(
        None, f"{snapshot.NOT_NOW}[Errno 23] Too many open files in system", False, None))
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    assert store.snapshot.vars["default.toml"].passing
    store.grace_seconds = 30
    assert store.refresh(()) is False and not store.pending   # looked at, nothing to wait out
    monkeypatch.setattr(snapshot, "read_version", usual)
    assert store.refresh(()) is True and store.snapshot.vars["default.toml"].data == {"user": "alice"}


def test_a_file_that_cannot_be_opened_for_good_is_not_read_again_and_again(tmp_path, monkeypatch):
    from configserver.content import snapshot

    real_open = os.open

    def refused(path, flags, *args):
        if str(path).endswith("default.toml"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    (tmp_path / "vars").mkdir()
    (tmp_path / "vars" / "default.toml").write_text('user = "alice"\n')
    stamp = snapshot.stamp_of(os.stat(tmp_path / "vars" / "default.toml"))
    monkeypatch.setattr(snapshot.os, "open", refused)
    found = snapshot.read_version(str(tmp_path / "vars" / "default.toml"), stamp)
    assert found.problem == f"cannot read: [Errno 13] Permission denied: '{tmp_path / 'vars' / 'default.toml'}'"
    assert not found.lasting   # a template's next reading tries again, as before
    assert not snapshot.SourceFile("default.toml", stamp, "", None, found.problem).passing   # the watcher does not


def test_a_folder_that_cannot_be_listed_now_is_not_taken_for_empty(tmp_path, monkeypatch, caplog):
    """No file descriptor left while the folders are listed: every file is unknown for now, not
    gone. Nothing is published until a listing works, and then only what really changed."""
    from configserver.content import watcher

    monkeypatch.setattr(watcher, "FOLDER_CHECK_SECONDS", 0.2)
    for name in ("templates", "vars"):
        (tmp_path / name).mkdir()
    (tmp_path / "templates" / "default.j2").write_text("first\n")
    (tmp_path / "vars" / "default.toml").write_text('user = "alice"\n')
    for path in ((tmp_path / "templates" / "default.j2"), (tmp_path / "vars" / "default.toml")):
        settled(path)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    listed = store.snapshot

    storm = {"on": True}
    real_scandir = os.scandir

    def scandir(path="."):
        if storm["on"] and str(path).startswith(str(tmp_path)):
            raise OSError(24, "Too many open files", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    caplog.clear()
    assert store.refresh() is False and store.refresh() is False and store.snapshot is listed
    postponed = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "reload_postponed"]
    assert len(postponed) == 1   # said once, not at every try
    settled(Path(store.templates_dir) / "default.j2")
    (tmp_path / "templates" / "new.j2").write_text("new\n")   # written during the storm
    settled(tmp_path / "templates" / "new.j2")

    async def scenario() -> bool:
        ready = asyncio.Event()
        follower = asyncio.create_task(store.follow(3600, ready))
        await ready.wait()
        try:
            await asyncio.sleep(0.5)   # follow tries again meanwhile, and publishes nothing
            assert store.snapshot is listed
            storm["on"] = False   # no event comes: the listing is tried again by itself
            return await _wait(lambda: "new.j2" in store.snapshot.templates, 15)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    assert asyncio.run(scenario())
    assert set(store.snapshot.templates) == {"default.j2", "new.j2"} and set(store.snapshot.vars) == {"default.toml"}


def test_start_up_lists_the_folders_again_until_a_listing_works(tmp_path, monkeypatch):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    (tmp_path / "templates" / "default.j2").write_text("x\n")
    failures = {"left": 3}
    real_scandir = os.scandir

    def scandir(path="."):
        if failures["left"] and str(path).startswith(str(tmp_path)):
            failures["left"] -= 1
            raise OSError(23, "Too many open files in system", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.settle(timeout=5)
    assert failures["left"] == 0 and set(store.snapshot.templates) == {"default.j2"}


def test_a_read_ahead_that_failed_for_now_is_read_again_when_published(tmp_path, monkeypatch):
    """A changed file is read ahead while its grace window runs; a reading that failed for a
    cause of the moment is not the one published once the window ends: the file is read again."""
    from configserver.content import snapshot

    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    path = tmp_path / "vars" / "default.toml"
    path.write_text('user = "alice"\n')
    settled(path)
    now = [time.time()]
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1, clock=lambda: now[0])
    store.refresh()
    path.write_text('user = "bob"\n')   # an edit: read ahead during its grace window
    os.utime(path, (now[0], now[0]))
    usual, storm = snapshot.read_version, {"on": True}
    monkeypatch.setattr(snapshot, "read_version", lambda p, stamp, checksum=None, folder=None: snapshot.Read(
        None, f"{snapshot.NOT_NOW}[Errno 24] Too many open files", False, None) if storm["on"] else usual(p, stamp, checksum))
    assert store.refresh() is False and store.pending   # waiting out the grace window, read ahead meanwhile
    storm["on"] = False
    now[0] += 2
    assert store.refresh() is True
    assert store.snapshot.vars["default.toml"].data == {"user": "bob"}


# -- symlinks --------------------------------------------------------------------------------------

def test_a_file_event_below_a_symlinked_folder_publishes_nothing_from_outside(site, pki, tmp_path):
    """inotify (watchfiles) follows symlinked folders and reports their files under the link's
    path; the watcher does not enter them, by event no more than by rescan."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("proxy_secret = 'hunter2'\n")
    settled(secret)
    site.write("templates/default.j2", "{% include 'shared/secret.txt' ignore missing %}config change SIP0 /user a\n")
    site.templates.joinpath("shared").symlink_to(outside, target_is_directory=True)
    site.vars.joinpath("shared").symlink_to(outside, target_is_directory=True)
    settled(site.templates / "default.j2")
    app = site.app()
    secret.write_text("proxy_secret = 'hunter3'\n")
    settled(secret)
    (outside / "more").mkdir()
    (outside / "more" / "x.toml").write_text("x = 1\n")
    settled(outside / "more" / "x.toml")

    app.store.refresh([site.templates / "shared" / "secret.txt", site.templates / "shared" / "more",
                       site.vars / "shared" / "secret.txt", site.vars / "shared" / "more"])
    assert set(app.store.snapshot.templates) == {"default.j2"} and not app.store.snapshot.vars
    assert not app.store.pending
    answer = call(app, "/", terminator_headers(pki.phone))
    assert answer.status == 200 and "hunter" not in answer.text


def test_a_folder_swapped_for_a_symlink_right_after_it_was_checked_publishes_nothing_outside(tmp_path, monkeypatch):
    """The swap lands between the check of the folders on the way and the look at the file:
    what is looked at is the file opened, so the file outside is never taken."""
    from configserver.content import watcher

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.j2").write_text("proxy_secret = 'hunter3'\n")
    settled(outside / "x.j2")
    sub = tmp_path / "templates" / "sub"
    sub.mkdir(parents=True)
    (sub / "x.j2").write_text("harmless\n")
    settled(sub / "x.j2")
    (tmp_path / "vars").mkdir()
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()
    checked = watcher._reached_directly

    def swapped_right_after(root, folder):
        found = checked(root, folder)
        if folder == "sub" and not sub.is_symlink():
            (sub / "x.j2").unlink()
            sub.rmdir()
            sub.symlink_to(outside, target_is_directory=True)
        return found

    monkeypatch.setattr(watcher, "_reached_directly", swapped_right_after)
    store.refresh([str(sub / "x.j2")])
    listed = store.snapshot.templates.get("sub/x.j2")
    assert listed is None or "hunter3" not in listed.text


def test_a_template_listed_below_a_folder_now_a_symlink_is_never_read_from_outside(tmp_path):
    """A listing raced the same way (the rescan's): the version listed is the file outside,
    but reading it opens a file outside the folder, which is taken as changed, never read."""
    from configserver.content.snapshot import SourceFile, stamp_of

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.j2").write_text("proxy_secret = 'hunter3'\n")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "sub").symlink_to(outside, target_is_directory=True)
    listed = SourceFile("sub/x.j2", stamp_of(os.stat(outside / "x.j2")), folder=str(tmp_path / "templates"))
    assert listed.read() == ("", listed.problem) and listed.changed


def test_a_folder_replaced_by_a_symlink_takes_its_files_out_of_the_snapshot(site):
    site.write("templates/default.j2", "x\n")
    site.write("templates/shared/part.j2", "inside\n")
    site.write(str(site.root / "elsewhere" / "part.j2"), "outside\n")
    for path in (site.templates / "default.j2", site.templates / "shared" / "part.j2"):
        settled(path)
    app = site.app()
    assert "shared/part.j2" in app.store.snapshot.templates
    (site.templates / "shared").rename(site.root / "old-shared")
    (site.templates / "shared").symlink_to(site.root / "elsewhere", target_is_directory=True)
    app.store.refresh([site.templates / "shared" / "part.j2"])
    assert set(app.store.snapshot.templates) == {"default.j2"}


def test_a_symlinked_folder_is_not_entered_by_the_real_file_events(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "common.j2").write_text("outside\n")
    (tmp_path / "templates" / "common").symlink_to(outside, target_is_directory=True)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=0)
    store.refresh()

    async def act() -> None:
        (outside / "common.j2").write_text("edited outside\n")
        (outside / "new.j2").write_text("new outside\n")
        await asyncio.sleep(0.6)   # its events come first, or with the marker's

    assert asyncio.run(_marked_after(store, act))
    assert set(store.snapshot.templates) == {"marker.j2"}



def test_an_edit_of_a_symlinked_templates_target_is_published_by_its_file_event(site, pki):
    """A symlink to a file inside the folder is content; an edit of the file it names reaches
    the link as soon as the edit itself, not at the next rescan."""
    target = site.write("templates/shared/phone.j2", "config change SIP0 /pwd old\n")
    settled(target)
    site.templates.joinpath("devices").mkdir()
    site.templates.joinpath("devices", "IP232-30-00-af.j2").symlink_to("../shared/phone.j2")
    site.write("vars/shared.toml", 'pwd = "old"\n')
    site.vars.joinpath("default.toml").symlink_to("shared.toml")
    settled(site.vars / "shared.toml")
    app = site.app()
    assert "/pwd old" in call(app, "/", terminator_headers(pki.phone)).text

    settled(site.write("templates/shared/phone.j2", "config change SIP0 /pwd {{ vars.pwd }}\n"))
    settled(site.write("vars/shared.toml", 'pwd = "new"\n'))
    assert app.store.refresh([target, site.vars / "shared.toml"]) is True
    assert app.store.snapshot.vars["default.toml"].data == {"pwd": "new"}
    assert "/pwd new" in call(app, "/", terminator_headers(pki.phone)).text

    site.templates.joinpath("shared", "phone.j2").unlink()   # the target goes: the link names nothing
    assert app.store.refresh([target]) is True
    assert "devices/IP232-30-00-af.j2" not in app.store.snapshot.templates
    settled(site.write("templates/shared/phone.j2", "config change SIP0 /pwd back\n"))   # and comes back
    assert app.store.refresh([target]) is True
    assert "/pwd back" in call(app, "/", terminator_headers(pki.phone)).text


def test_an_edit_of_a_hidden_file_a_symlinked_template_names_is_published_by_its_file_event(site, pki):
    hidden = site.write("templates/.phone.j2", "config change SIP0 /pwd old\n")
    settled(hidden)
    site.templates.joinpath("default.j2").symlink_to(".phone.j2")
    app = site.app()
    assert "/pwd old" in call(app, "/", terminator_headers(pki.phone)).text
    settled(site.write("templates/.phone.j2", "config change SIP0 /pwd new\n"))
    assert app.store.refresh([hidden]) is True
    assert "/pwd new" in call(app, "/", terminator_headers(pki.phone)).text


# -- a file that keeps changing --------------------------------------------------------------------

def test_a_file_that_keeps_changing_holds_other_edits_back_only_for_ten_grace_windows(tmp_path, caplog):
    """A file rewritten more often than grace_seconds (a log someone writes under vars/) never
    settles. The edits made with it wait ten grace windows, as a checkout would, then are
    published without it; it is named in the log once, and holds nothing back from then on."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    clock = [time.time()]
    edited = tmp_path / "templates" / "default.j2"
    edited.write_text("config change SIP0 /pwd old\n")
    noisy = tmp_path / "vars" / "notes.txt"
    noisy.write_text("0\n")
    for path in (edited, noisy):
        settled(path)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=lambda: clock[0])
    store.refresh()

    def tick(*also: Path) -> bool:
        clock[0] += 0.5
        noisy.write_text(f"{clock[0]}\n")
        os.utime(noisy, (clock[0], clock[0]))
        return store.refresh([noisy, *also])

    def dated(path: Path, text: str) -> Path:
        path.write_text(text)
        os.utime(path, (clock[0], clock[0]))
        return path

    caplog.set_level("WARNING", logger="configserver.content")
    dated(edited, "config change SIP0 /pwd new\n")
    published = [tick(edited)] + [tick() for _ in range(40)]   # twenty seconds, a tick every half second
    assert True in published and published.index(True) == 20   # ten grace windows after the edit
    assert store.snapshot.templates["default.j2"].content == "config change SIP0 /pwd new\n"
    assert store.snapshot.vars["notes.txt"].stamp != snapshot_stamp(noisy) and store.pending
    warned = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "reload_partial"]
    assert warned == [{"event": "reload_partial", "files": ["vars/notes.txt"], "waited_s": 10.0}]

    # from now on an edit waits its own grace window only, and the two files that make it are
    # still published together
    dated(tmp_path / "templates" / "part.j2", "a\n")
    assert tick(tmp_path / "templates" / "part.j2") is False
    dated(edited, "config change SIP0 /pwd newer\n{% include 'part.j2' %}\n")
    assert [tick(edited), tick()] == [False, True]   # part.j2 settled first, and waited for default.j2
    assert {"part.j2", "default.j2"} <= set(store.snapshot.templates)
    assert "newer" in store.snapshot.templates["default.j2"].content
    assert len([r for r in caplog.records if getattr(r, "fields", {}).get("event") == "reload_partial"]) == 1

    clock[0] += 1.5   # it stops: published like any file
    assert store.refresh(()) is True and store.snapshot.vars["notes.txt"].stamp == snapshot_stamp(noisy)
    assert not store.pending


def test_a_checkout_that_settles_within_ten_grace_windows_is_published_whole(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    clock = [time.time()]
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=lambda: clock[0])
    store.refresh()
    written = []
    for step in range(18):   # a slow checkout: one file every half second for nine seconds
        clock[0] += 0.5
        path = tmp_path / "templates" / f"part{step}.j2"
        path.write_text("x\n")
        os.utime(path, (clock[0], clock[0]))
        written.append(path)
        assert store.refresh([path]) is False
    clock[0] += 1.0
    assert store.refresh(()) is True and len(store.snapshot.templates) == 18


def test_a_quick_checkout_that_lands_as_another_file_turns_restless_is_still_published_whole(tmp_path):
    """A log under vars/ rewritten every half second turns restless ten grace windows after it
    began; a checkout of two files written just before that (the template, then the include it
    now names) is not split by it: both are published together once both have settled."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    clock = [time.time()]
    noisy = tmp_path / "vars" / "notes.txt"
    default = tmp_path / "templates" / "default.j2"
    part = tmp_path / "templates" / "part.j2"
    for path, text in ((noisy, "0\n"), (default, "config change SIP0 /user a\n")):
        path.write_text(text)
        settled(path)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=lambda: clock[0])
    store.refresh()

    def dated(path: Path, text: str) -> Path:
        path.write_text(text)
        os.utime(path, (clock[0], clock[0]))
        return path

    published_at = []
    for step in range(1, 40):   # the log every half second; the checkout at 10.0 s and 10.5 s
        clock[0] += 0.5
        paths = [dated(noisy, f"{step}\n")]
        if step == 20:
            paths.append(dated(default, "{% include 'part.j2' %}\n"))
        if step == 21:
            paths.append(dated(part, "config change SIP0 /user b\n"))
        store.refresh(paths)
        templates = store.snapshot.templates
        if "include" in templates["default.j2"].content or "part.j2" in templates:
            assert "include" in templates["default.j2"].content and "part.j2" in templates, step
            published_at.append(step)
    assert published_at and published_at[0] == 23   # one grace window after its last file


def test_a_file_written_in_bursts_holds_other_edits_back_one_grace_window_per_burst(tmp_path, caplog):
    """Once a file has been found restless, each later burst of writes to it holds the edits
    made meanwhile back for one grace window at most, not ten again, and is not logged again."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    clock = [time.time()]
    noisy = tmp_path / "vars" / "state.txt"
    edited = tmp_path / "templates" / "default.j2"
    for path in (noisy, edited):
        path.write_text("0\n")
        settled(path)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=lambda: clock[0])
    store.refresh()
    caplog.set_level("WARNING", logger="configserver.content")

    def dated(path: Path, text: str) -> Path:
        path.write_text(text)
        os.utime(path, (clock[0], clock[0]))
        return path

    def burst(seconds: int, edit_at: float | None = None) -> list[float]:
        """The file rewritten every half second for `seconds`, then calm for three seconds;
        `edited` changed `edit_at` seconds into the burst. When the edit was published."""
        published = []
        for step in range(1, 2 * seconds + 7):
            clock[0] += 0.5
            paths = [dated(noisy, f"{clock[0]}\n")] if step <= 2 * seconds else []
            if edit_at is not None and step == 2 * edit_at:
                paths.append(dated(edited, f"config change SIP0 /user {clock[0]}\n"))
            if store.refresh(paths) and store.snapshot.templates["default.j2"].content != "0\n":
                published.append(step / 2)
        return published

    burst(12)   # restless ten grace windows into its first burst
    for _ in range(3):
        dated(edited, "0\n")
        settled(edited)
        store.refresh([edited])
        published = burst(12, edit_at=1)
        assert published and published[0] <= 2.5, published   # the edit's own grace window, and one for the burst
    warned = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "reload_partial"]
    assert len(warned) == 1


def test_new_files_coming_one_after_the_other_hold_a_settled_edit_back_thirty_grace_windows_at_most(tmp_path):
    """A tool that drops a new file every half second: no file keeps changing for long, but
    there is always one in its grace window. An edit made meanwhile is still published."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    clock = [time.time()]
    edited = tmp_path / "templates" / "default.j2"
    edited.write_text("config change SIP0 /user old\n")
    settled(edited)
    store = ContentStore(tmp_path / "templates", tmp_path / "vars", grace_seconds=1.0, clock=lambda: clock[0])
    store.refresh()
    edited.write_text("config change SIP0 /user new\n")
    os.utime(edited, (clock[0], clock[0]))
    published = []
    for step in range(1, 80):
        clock[0] += 0.5
        dropped = tmp_path / "vars" / f"state-{step}.txt"
        dropped.write_text("x\n")
        os.utime(dropped, (clock[0], clock[0]))
        published.append(store.refresh([dropped, edited] if step == 1 else [dropped]))
    assert published.index(True) + 1 == 62   # settled at 1 s, then thirty grace windows
    assert "/user new" in store.snapshot.templates["default.j2"].content


def snapshot_stamp(path: Path) -> int:
    from configserver.content.snapshot import stamp_of

    return stamp_of(os.stat(path))


def test_a_release_renamed_and_the_link_switched_to_it_is_still_read(tmp_path):
    # the same folder under a new name: its real path is worked out again, not refused for ever
    from configserver.content.snapshot import read_text, stamp_of
    releases = tmp_path / "releases"
    (releases / "staging" / "templates").mkdir(parents=True)
    (releases / "staging" / "templates" / "a.j2").write_text("x")
    current = tmp_path / "current"
    current.symlink_to(releases / "staging")
    folder = str(current / "templates")
    assert read_text(f"{folder}/a.j2", stamp_of(os.stat(f"{folder}/a.j2")), folder) == ("x", None)
    os.rename(releases / "staging", releases / "v42")   # promoted: the same folder, a new name
    switched = tmp_path / "current.new"
    switched.symlink_to(releases / "v42")
    os.replace(switched, current)
    assert read_text(f"{folder}/a.j2", stamp_of(os.stat(f"{folder}/a.j2")), folder) == ("x", None)
