"""The admin page's firmware and backups: a device's targets, sends and halts; its backups, a diff
of two versions with its secrets masked; the certificates it reports; halted rollouts on the fleet."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_admin_page import PASSWORD, log_in
from test_admin_queries import NOW, fill_sqlite, fleet_rows

from configserver import load_settings, securitylog
from configserver.admin import add_user, create_admin_app
from configserver.admin._device import chosen_pair, diff_rows, sent_query
from configserver.admin._script import MASK, mask_config
from configserver.backups import BackupStore, parse_certificate_facts
from configserver.backups._store import Version
from configserver.firmware import Send
from configserver.firmware._state import RolloutState
from configserver.inventory._database import database_url, open_engine

MAC, HWID = "00-90-33-00-00-01", "IP222-00-00-01"     # device 1 of fleet_rows: an IP222, served
OTHER = "00-90-33-00-00-02"                             # device 2: never backed up
SIP_PASSWORD = "hunter2-sip-pw"

VERSIONS = [
    ("config change SIP0 /user IP222-00-00-01 /pwd old-sip-pw\r\n"
    "config change IP0 /addr 10.0.0.1\r\n"
    "vars create X509/REQUESTKEY pb 3082abcdef\r\n"),
    # the secret variable's value under an option no rule knows, and a device-chosen text
    (f"config change SIP0 /user IP222-00-00-01 /pwd old-sip-pw /auth {SIP_PASSWORD}\r\n"
    "config change IP0 /addr 10.0.0.2\r\n"
    "vars create X509/REQUESTKEY pb 3082abcdef\r\n"
    "config change CMD0 /name <script>alert(1)</script>\r\n"),
    (f"config change SIP0 /user IP222-00-00-01 /pwd new-sip-pw /auth {SIP_PASSWORD}\r\n"
    "config change IP0 /addr 10.0.0.2\r\n"
    "vars create X509/REQUESTKEY pb 3082abcdef\r\n"
    "config change CMD0 /name <script>alert(1)</script>\r\n"),
]
X509 = ('<info><servercert><certificate subject_cn="IP222-00-00-01" issuer_cn="innovaphone Device CA" '
        'serial="4f2a91" not_before="2024-01-01 00:00:00" not_after="2034-01-01 00:00:00"/></servercert></info>')


async def _record(database: str) -> None:
    store = BackupStore(database)
    try:
        for n, text in enumerate(VERSIONS):
            await store.store_config(mac=MAC, hwid=HWID, model="IP222", body=text.encode(), now=NOW - 3600 * (3 - n))
        await store.store_facts(mac=MAC, hwid=HWID, source="x509",
                                facts=parse_certificate_facts(X509).as_json(), now=NOW - 60)
    finally:
        await store.close()
    engine = open_engine(database_url(database))
    try:
        state = RolloutState(engine)
        for at in (NOW - 7200, NOW - 3600):
            state.note(Send(MAC, HWID, "IP222", "prot", "13.4711", 0, at))
        await state.flush()
        await state.halt("IP222", "prot", "13.4711", NOW - 1800, by="watch")
    finally:
        await engine.dispose()


@pytest.fixture
def settings(tmp_path: Path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "default.j2").write_text(
        "config change SIP0 /user {{ device.hwid }} /auth {{ vars.sip.password }}\n")
    (tmp_path / "vars").mkdir()
    (tmp_path / "vars" / "default.toml").write_text(
        f'[sip]\npassword = "{SIP_PASSWORD}"\n\n'
        '[firmware]\nurl = "http://fw.example.com/firmware/"\nprot = "13.4711"\nboot = "13.4711"\n\n'
        '[firmware.rollout]\nstart = 2026-01-01T00:00:00Z\nfirst = ["IP222-00-00-01"]\n')
    add_user(tmp_path / "admin-users", "alice", PASSWORD)
    database = fill_sqlite(tmp_path / "inventory.db", *fleet_rows(20))
    asyncio.run(_record(database))
    return load_settings(templates=tmp_path / "templates", vars=tmp_path / "vars", database=database,
                         admin_users=tmp_path / "admin-users", admin_port=8081)


@pytest.fixture
def browser(settings):
    with TestClient(create_admin_app(settings), follow_redirects=False) as client:
        log_in(client)
        yield client
    securitylog.configure(None)


def section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}</h2>", 1)[1].split("</section>", 1)[0]


def test_the_fleet_shows_each_devices_last_backup_and_finds_those_without(browser) -> None:
    rows = browser.get("/", params={"sort": "hwid", "order": "asc"}).text.split("<tbody>")[1]
    backed_up = rows.split(f'href="/devices/{MAC}"')[1].split("</tr>")[0]
    last_upload = dt.datetime.fromtimestamp(NOW - 3600, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f'<td class="backup"><time datetime="{last_upload}"' in backed_up
    assert '<span class="pending">none</span>' in rows.split(f'href="/devices/{OTHER}"')[1].split("</tr>")[0]
    missing = browser.get("/", params={"nobackup": "2h"}).text
    assert "19 devices" in missing and f"/devices/{MAC}" not in missing
    assert "is not a duration" in browser.get("/", params={"nobackup": "soon"}).text


def test_a_halted_rollout_is_a_problem_with_the_command_that_resumes_it(browser, caplog) -> None:
    card = browser.get("/").text.split("<h2>Firmware halted</h2>")[1].split("</div>")[0]
    assert "IP222" in card and "13.4711" in card and "1 failure" not in card and "0 failures" in card
    assert "configserver firmware resume IP222 --kind prot" in card
    form = dict(re.findall(r'name="(\w+)" value="([^"]*)"', card))
    assert form["model"] == "ip222" and form["kind"] == "prot"
    # resuming changes state: without the page's token it is refused and nothing changes
    assert browser.post("/firmware/resume", data={**form, "csrf": "forged"}).status_code == 403
    assert "configserver firmware resume IP222" in browser.get("/").text
    with caplog.at_level(logging.WARNING, logger="configserver.admin"):
        answer = browser.post("/firmware/resume", data=form)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    assert "configserver firmware resume" not in browser.get("/").text
    resumed = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "admin_firmware_resume"]
    assert resumed and resumed[0].fields["user"] == "alice" and resumed[0].fields["builds"] == ["13.4711"]


def test_resuming_needs_a_session(settings) -> None:
    with TestClient(create_admin_app(settings), follow_redirects=False) as client:
        answer = client.post("/firmware/resume", data={"model": "ip222", "kind": "prot", "csrf": "x"})
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
        log_in(client)
        assert "configserver firmware resume IP222 --kind prot" in client.get("/").text   # still halted
    securitylog.configure(None)


def test_a_firmware_table_that_cannot_be_read_is_said_on_the_device_page(settings, browser) -> None:
    vars_file = Path(settings.vars) / "default.toml"
    vars_file.write_text(vars_file.read_text().replace('prot = "13.4711"', 'prot = "13 4711"'))
    deadline = time.monotonic() + 15   # the page's content store follows the folders' file events
    while "is not a build" not in (page := browser.get(f"/devices/{MAC}")).text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.status_code == 200
    firmware = page.text.split('<dl class="firmware">')[1].split("</dl>")[0]
    assert "firmware.prot = &#39;13 4711&#39; is not a build" in firmware.split('<dd class="alert">')[1]


def test_the_device_page_reuses_one_content_store_that_follows_the_folders(settings) -> None:
    app = create_admin_app(settings)
    with TestClient(app, follow_redirects=False) as client:
        log_in(client)
        assert "/auth" in client.get(f"/devices/{MAC}").text
        store = app.state.page.content_service().store
        seen = store.snapshot
        assert "/auth" in client.get(f"/devices/{MAC}").text
        assert store.snapshot is seen and app.state.page.content_service().store is store   # no rescan
        template = Path(settings.templates) / "default.j2"
        template.write_text(template.read_text().replace("/auth", "/secret-auth"))
        deadline = time.monotonic() + 15
        while store.snapshot is seen and time.monotonic() < deadline:   # no page asked meanwhile
            time.sleep(0.05)
        assert store.snapshot is not seen
        assert "/secret-auth" in client.get(f"/devices/{MAC}").text
    securitylog.configure(None)


def test_the_device_page_shows_its_firmware_targets_sends_and_halt(browser) -> None:
    page = browser.get(f"/devices/{MAC}").text
    firmware = html.unescape(page.split('<dl class="firmware">')[1].split("</dl>")[0])
    assert re.search(r"Firmware target</dt>\s*<dd><span class=\"mono\">13.4711</span>: <span class=\"halted\">halted</span>",
                     firmware), firmware
    # the boot code's target is not halted: what a poll reporting its builds would be sent
    assert re.search(r"Boot code target</dt>\s*<dd><span class=\"mono\">13.4711</span>: sent</dd>", firmware), firmware
    assert "first devices" in firmware                          # its wave: the rollout's `first`
    assert re.search(r"Firmware sent</dt>\s*<dd><span class=\"mono\">13.4711</span>, wave 0: first .*2 times", firmware)


def test_the_device_page_lists_backups_and_diffs_the_last_two_with_secrets_masked(browser, caplog) -> None:
    with caplog.at_level(logging.INFO):
        page = browser.get(f"/devices/{MAC}").text
    backups = section(page, "Configuration backups")
    assert "3 versions kept, 3 uploads" in backups
    numbers = re.findall(r"<tr><td>(\d)</td>", backups)
    assert numbers == ["3", "2", "1"]
    assert "<td>first</td>" in backups
    assert "a line that only moved counts none" in backups   # what the count counts
    diff = backups.split('<pre class="diff">')[1].split("</pre>")[0]
    assert '<span class="file">--- version 2</span>' in diff and '<span class="file">+++ version 3</span>' in diff
    assert f'<span class="del">-config change SIP0 /user IP222-00-00-01 /pwd {MASK} /auth {MASK}</span>' in diff
    assert f'<span class="add">+config change SIP0 /user IP222-00-00-01 /pwd {MASK} /auth {MASK}</span>' in diff
    for secret in ("old-sip-pw", "new-sip-pw", SIP_PASSWORD, "3082abcdef"):
        assert secret not in page
    # the device's text is shown, never run
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in diff and "<script" not in page
    assert all(secret not in record.getMessage() + repr(record.__dict__)
               for record in caplog.records for secret in ("old-sip-pw", "new-sip-pw", SIP_PASSWORD))


def test_the_backup_diff_is_made_and_masked_off_the_pages_event_loop(browser, monkeypatch) -> None:
    """Two large versions take up to half a second to compare and mask: the other admins' pages
    are answered meanwhile."""
    from configserver.admin import _device, _script

    def on_the_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    calls: list[tuple[str, bool]] = []

    def watched(name, real):
        return lambda *args, **kwargs: calls.append((name, on_the_loop())) or real(*args, **kwargs)

    for module, name in ((_device, "meaningful_lines"), (_device, "unified_diff"), (_script, "mask_config"),
                         (_device, "diff_rows")):
        monkeypatch.setattr(module, name, watched(name, getattr(module, name)))
    page = browser.get(f"/devices/{MAC}").text
    assert f"/pwd {MASK}" in section(page, "Configuration backups")
    assert sorted(set(calls)) == [("diff_rows", False), ("mask_config", False), ("meaningful_lines", False),
                                  ("unified_diff", False)]


def test_two_versions_chosen_on_the_page_are_compared_and_revealed_only_when_asked(browser, caplog) -> None:
    page = browser.get(f"/devices/{MAC}", params={"old": "1", "new": "2"}).text
    diff = section(page, "Configuration backups").split('<pre class="diff">')[1].split("</pre>")[0]
    assert '<span class="del">-config change IP0 /addr 10.0.0.1</span>' in diff
    assert '<span class="add">+config change IP0 /addr 10.0.0.2</span>' in diff
    assert f'<span class=""> vars create X509/REQUESTKEY pb {MASK}</span>' in diff   # context, masked too
    assert re.search(r'<option value="1" selected>version 1</option>', page)
    with caplog.at_level(logging.WARNING, logger="configserver.admin"):
        shown = browser.get(f"/devices/{MAC}", params={"old": "2", "new": "3", "reveal": "1"}).text
    diff = section(shown, "Configuration backups").split('<pre class="diff">')[1]
    assert "/pwd old-sip-pw" in diff and "/pwd new-sip-pw" in diff and f"/auth {SIP_PASSWORD}" in diff
    reveals = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "admin_reveal"]
    assert reveals and reveals[0].fields["user"] == "alice"
    assert all(secret not in repr(r.__dict__) for r in caplog.records for secret in ("old-sip-pw", SIP_PASSWORD))
    # the reveal stays on the page's own links and form, never a secret in them
    assert '<input type="hidden" name="reveal" value="1">' in shown
    assert all("sip-pw" not in link for link in re.findall(r'href="([^"]*)"', shown))


def test_the_device_page_shows_the_certificate_the_device_reports_as_its_word(browser) -> None:
    identity = section(browser.get(f"/devices/{MAC}").text, "Identity")
    word = identity.split('<dd class="device-word">')[1].split("</dd>")[0]
    assert "IP222-00-00-01, issued by innovaphone Device CA" in word
    assert '<span class="mono">4f2a91</span>' in word and "2034-01-01" in word
    assert "the device's own word" in word and "X509 xml-info" in word


def test_a_device_without_backups_or_sends_says_so(browser) -> None:
    page = browser.get(f"/devices/{OTHER}").text
    assert "No backup uploaded yet" in section(page, "Configuration backups")
    assert "Firmware sent" not in page and "device-word" not in page


# -- the rules behind it -----------------------------------------------------------------------

@pytest.mark.parametrize(("line", "masked"), [
    ("config change SIP0 /user x /pwd secret1 /proxy p", f"config change SIP0 /user x /pwd {MASK} /proxy p"),
    ("config change GK0 /gk-pwd a /gk-id b", f"config change GK0 /gk-pwd {MASK} /gk-id b"),
    ("config change TLS0 /psk 1234 /ping 1", f"config change TLS0 /psk {MASK} /ping 1"),
    ("config change ADMIN /PIN 4711", f"config change ADMIN /PIN {MASK}"),
    ("vars create X509/REQUESTKEY pb 3082aa", f"vars create X509/REQUESTKEY pb {MASK}"),
    ("+vars create CMD0/ADMINPWD c secret", f"+vars create CMD0/ADMINPWD c {MASK}"),
    ("vars create CMD0/NAME c Reception", "vars create CMD0/NAME c Reception"),
    ("config change IP0 /addr 10.0.0.1/24", "config change IP0 /addr 10.0.0.1/24"),
])
def test_what_innovaphones_syntax_marks_secret_is_masked(line: str, masked: str) -> None:
    assert mask_config(line) == masked


def test_the_devices_secret_variables_are_masked_in_its_backup_wherever_they_appear() -> None:
    assert mask_config("config change X /desc hunter22 here", {"sip": {"password": "hunter22"}}) == \
        f"config change X /desc {MASK} here"
    assert mask_config("config change X /desc p%40ss%20w0rd%21 p%40ss+w0rd%21", {"sip": {"password": "p@ss w0rd!"}}) \
        == f"config change X /desc {MASK} {MASK}"


def test_a_password_in_an_array_of_tables_is_masked_in_the_backup() -> None:
    accounts = {"accounts": ({"user": "desk", "password": "acct-secret-9931"}, {"user": "lobby", "pin": "80443"})}
    assert mask_config("config change SIP1 /user desk /desc acct-secret-9931 80443", accounts) == \
        f"config change SIP1 /user desk /desc {MASK} {MASK}"


@pytest.mark.parametrize(("old", "new", "pair"), [
    (None, None, (2, 3)), ("1", "3", (1, 3)), ("3", "1", (3, 1)), ("1", "9", (2, 3)), ("x", "1", (2, 3)),
    ("2", "2", (2, 3)),
])
def test_the_versions_compared_are_those_asked_for_when_kept_else_the_last_two(old, new, pair) -> None:
    versions = [Version(n, NOW, 10, 1, None) for n in (3, 2, 1)]
    assert chosen_pair(versions, old, new) == pair
    assert chosen_pair(versions[:1], old, new) is None


def test_diff_lines_are_classed_by_what_they_are() -> None:
    assert diff_rows("--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n z\n") == [
        ("file", "--- a"), ("file", "+++ b"), ("hunk", "@@ -1 +1 @@"), ("del", "-x"), ("add", "+y"), ("", " z")]


def test_a_devices_sends_are_a_search_of_its_primary_key(tmp_path: Path) -> None:
    import sqlite3

    import sqlalchemy as sa
    database = fill_sqlite(tmp_path / "inventory.db", *fleet_rows(5))
    sql = str(sent_query(MAC).compile(dialect=sa.dialects.sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    with sqlite3.connect(database.removeprefix("sqlite:///")) as connection:
        plan = "\n".join(row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}"))
    assert "SEARCH firmware_sent USING INDEX sqlite_autoindex_firmware_sent_1 (device=?)" in plan, plan
