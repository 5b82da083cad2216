"""Faults on the content side while devices poll: folders removed, unreadable or replaced, and
templates rewritten in place. Affected devices get `# configuration error` or `# no
configuration`, the rest keep their scripts, and everything recovers without a restart."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from driving import call, terminator_headers

from configserver.apply_once import digest


def settled(*paths: Path) -> None:
    """Date files back, as if saved long ago, so that the next scan publishes them."""
    for path in paths:
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(item, (1, 1), follow_symlinks=False)


@pytest.fixture
def fleet(site):
    site.write("templates/default.j2", "# default for {{ device.hwid }}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    site.write("templates/devices/IP232-30-00-af.j2", "# own for {{ device.hwid }}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    site.write("vars/default.toml", 'pwd = "shared"\n')
    site.write("vars/devices/IP1202-35-fe-4d.toml", 'pwd = "gateway"\n')
    settled(site.templates, site.vars)
    return site


def script(app, device) -> tuple[int, str]:
    answer = call(app, "/", terminator_headers(device))
    return answer.status, answer.text


def test_a_templates_folder_removed_and_restored_recovers_without_a_restart(fleet, pki):
    app = fleet.app()
    before = script(app, pki.phone)
    assert before[0] == 200
    shutil.move(fleet.templates, fleet.root / "templates.away")
    app.store.refresh()
    assert script(app, pki.phone) == (404, "# no configuration for IP232-30-00-af\n")
    assert script(app, pki.gateway)[0] == 404
    shutil.move(fleet.root / "templates.away", fleet.templates)
    settled(fleet.templates)
    app.store.refresh()
    assert script(app, pki.phone) == before


def test_an_unreadable_template_costs_only_the_devices_that_use_it(fleet, pki, monkeypatch):
    app = fleet.app()
    gateway = script(app, pki.gateway)
    own = fleet.templates / "devices" / "IP232-30-00-af.j2"
    own.write_text("# own, edited\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    settled(own)
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if path == str(own):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    app.store.refresh()
    assert script(app, pki.phone) == (500, "# configuration error\n")
    assert script(app, pki.gateway) == gateway
    monkeypatch.undo()
    os.utime(own, (2, 2))   # the admin fixes the permissions: a new version
    app.store.refresh()
    assert script(app, pki.phone)[1].startswith("# own, edited\r\n")


def test_a_vars_folder_replaced_whole_is_taken_at_once(fleet, pki):
    app = fleet.app()
    assert "/pwd gateway\r\n" in script(app, pki.gateway)[1]
    new = fleet.root / "vars.new"
    (new / "devices").mkdir(parents=True)
    (new / "default.toml").write_text('pwd = "shared-2"\n')
    (new / "devices" / "IP1202-35-fe-4d.toml").write_text('pwd = "gateway-2"\n')
    settled(new)
    shutil.rmtree(fleet.vars)
    new.rename(fleet.vars)
    app.store.refresh()
    assert "/pwd gateway-2\r\n" in script(app, pki.gateway)[1]
    assert "/pwd shared-2\r\n" in script(app, pki.phone)[1]


def test_an_unparsable_vars_file_costs_only_its_readers(fleet, pki):
    app = fleet.app()
    phone = script(app, pki.phone)
    broken = fleet.vars / "devices" / "IP1202-35-fe-4d.toml"
    broken.write_text('pwd = "unterminated\n')
    settled(broken)
    app.store.refresh()
    assert script(app, pki.gateway) == (500, "# configuration error\n")
    assert script(app, pki.phone) == phone


def test_a_template_rewritten_in_place_during_a_poll_storm_never_yields_a_mixed_script(site, pki):
    old = "".join(f"config change SIP0 /line{n} old\n" for n in range(200))
    new = "".join(f"config change SIP0 /line{n} new\n" for n in range(200))
    template = site.write("templates/default.j2", old)
    settled(template)
    app = site.app(grace_seconds=0.3)
    wholes = {old.replace("\n", "\r\n"), new.replace("\n", "\r\n")}
    seen: list[str] = []
    failed: list[str] = []   # a thread's assertion would fail only the thread: collect, assert below
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            answer = call(app, "/", terminator_headers(pki.phone))
            body = answer.text
            if answer.status != 200 or "config write\r\n" not in body:
                failed.append(f"{answer.status} {body[:80]!r}")
                continue
            seen.append(body[: body.index("config write\r\n")])

    def scans() -> None:
        while not stop.is_set():
            app.store.refresh()
            time.sleep(0.02)

    workers = [threading.Thread(target=storm), threading.Thread(target=scans)]
    for worker in workers:
        worker.start()
    try:
        with open(template, "w") as file:   # not atomic: half, a pause, the rest
            file.write(new[: len(new) // 2])
            file.flush()
            time.sleep(0.2)
            file.write(new[len(new) // 2:])
        deadline = time.monotonic() + 5
        while (not seen or seen[-1] != new.replace("\n", "\r\n")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    assert failed == []
    assert set(seen) <= wholes, "a script was cut or mixed"
    assert seen[-1] == new.replace("\n", "\r\n")
    assert digest(seen[0]) != digest(seen[-1])
