"""Who may see the admin page, and what it shows: sessions, CSRF, headers, its own listener."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from driving import call
from fastapi.testclient import TestClient
from pydantic import SecretStr
from test_admin_queries import NOW, fill_sqlite, fleet_rows

from configserver import load_settings, securitylog
from configserver.admin import add_user, create_admin_app, remove_user
from configserver.admin._sessions import MAX_DELAY, Sessions, Throttle, failure_delay

PASSWORD = "correct horse battery staple"


@pytest.fixture
def admin_settings(tmp_path: Path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "default.j2").write_text(
        "config change SIP0 /user {{ device.hwid }} /pwd {{ vars.sip.password }}\n"
        "config change ADMIN /pin {{ vars.admin_pin }} /site {{ vars.site }}\n")
    (tmp_path / "vars").mkdir()
    (tmp_path / "vars" / "default.toml").write_text(
        'site = "lab"\nadmin_pin = "7391"\n[sip]\npassword = "hunter2-sip-pw"\nregistrar = "sip.example"\n')
    add_user(tmp_path / "admin-users", "alice", PASSWORD)
    devices, polls = fleet_rows(120)
    database = fill_sqlite(tmp_path / "inventory.db", devices, polls)
    return load_settings(
        templates=tmp_path / "templates", vars=tmp_path / "vars", database=database,
        admin_users=tmp_path / "admin-users", admin_port=8081, security_log=str(tmp_path / "security.log"),
    )


@pytest.fixture
def browser(admin_settings):
    with TestClient(create_admin_app(admin_settings), follow_redirects=False) as client:
        yield client
    securitylog.configure(None)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def log_in(client: TestClient, user: str = "alice", password: str = PASSWORD):
    form = client.get("/login")
    return client.post("/login", data={"user": user, "password": password, "csrf": csrf_of(form.text)})


def test_no_page_without_a_session(browser) -> None:
    for path in ("/", "/devices/00-90-33-00-00-01", "/?status=403", "/anything"):
        answer = browser.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/login", path
        assert "00-90-33" not in answer.text


def test_logging_in_opens_the_fleet_with_a_strict_httponly_cookie(browser) -> None:
    answer = log_in(browser)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie           # plain HTTP on loopback: a Secure cookie would never come back
    fleet = browser.get("/")
    assert fleet.status_code == 200
    assert "120 devices" in fleet.text and "IP232-" in fleet.text


def test_the_cookie_is_secure_behind_tls(admin_settings) -> None:
    with TestClient(create_admin_app(admin_settings), base_url="https://admin.example", follow_redirects=False) as client:
        cookie = log_in(client).headers["set-cookie"]
        assert "Secure" in cookie
        assert client.get("/").headers["strict-transport-security"] == "max-age=31536000"


PROXY_SECRET = "p" * 40


def test_a_removed_admin_loses_their_sessions(browser, admin_settings) -> None:
    assert log_in(browser).status_code == 303
    assert browser.get("/").status_code == 200
    remove_user(admin_settings.admin_users, "alice")          # `configserver admin-user remove alice`
    for path in ("/", "/devices/00-90-33-00-00-01"):
        answer = browser.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/login", path
    add_user(admin_settings.admin_users, "alice", PASSWORD)  # back with the very same password
    assert browser.get("/").status_code == 303               # a new login, not the old session


def test_a_new_password_ends_the_sessions_opened_with_the_old_one(browser, admin_settings) -> None:
    assert log_in(browser).status_code == 303
    add_user(admin_settings.admin_users, "bob", "bob's long passphrase")   # others' changes: no effect
    assert browser.get("/").status_code == 200
    add_user(admin_settings.admin_users, "alice", "a brand new passphrase")
    answer = browser.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert log_in(browser, password="a brand new passphrase").status_code == 303
    assert browser.get("/").status_code == 200


def test_a_wrong_password_is_refused_slowed_down_and_logged(admin_settings) -> None:
    app = create_admin_app(admin_settings.model_copy(update={"proxy_secret": SecretStr(PROXY_SECRET)}))
    with TestClient(app, client=("203.0.113.5", 50000), follow_redirects=False) as browser:
        started = time.monotonic()
        answer = log_in(browser, password="not the password")
        assert answer.status_code == 401 and "Wrong user name or password" in answer.text
        assert time.monotonic() - started >= failure_delay(1)
        assert "configserver_admin=" not in answer.headers.get("set-cookie", "")
        assert browser.get("/").status_code == 303
        assert log_in(browser, user="mallory", password=PASSWORD).status_code == 401
    # through the admin vhost, proving itself with the proxy secret: the address it forwards
    with TestClient(app, client=("127.0.0.1", 50000), follow_redirects=False) as browser:
        form = browser.get("/login")
        browser.post("/login", data={"user": "alice", "password": "wrong", "csrf": csrf_of(form.text)},
                     headers={"X-Forwarded-For": "192.0.2.1, 198.51.100.7", "X-Configserver-Proxy-Secret": PROXY_SECRET})
    # any other local process, without the secret (or with a wrong one): its own address
    for secret in ({}, {"X-Configserver-Proxy-Secret": "q" * 40}):
        with TestClient(app, client=("127.0.0.1", 50001), follow_redirects=False) as browser:
            form = browser.get("/login")
            browser.post("/login", data={"user": "alice", "password": "wrong", "csrf": csrf_of(form.text)},
                         headers={"X-Forwarded-For": "198.51.100.66", **secret})
    # from a peer it does not trust, a forwarded address counts for nothing
    with TestClient(app, client=("203.0.113.9", 50000), follow_redirects=False) as browser:
        form = browser.get("/login")
        browser.post("/login", data={"user": "alice", "password": "wrong", "csrf": csrf_of(form.text)},
                     headers={"X-Forwarded-For": "198.51.100.99"})
    securitylog.configure(None)
    lines = Path(str(admin_settings.security_log)).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        'configserver-security: login-failed client=203.0.113.5 user="alice"',
        'configserver-security: login-failed client=203.0.113.5 user="mallory"',
        'configserver-security: login-failed client=198.51.100.7 user="alice"',
        'configserver-security: login-failed client=127.0.0.1 user="alice"',
        'configserver-security: login-failed client=127.0.0.1 user="alice"',
        'configserver-security: login-failed client=203.0.113.9 user="alice"',
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line.split(" ")[0]) for line in lines)


def test_a_login_form_we_did_not_hand_out_checks_no_password(browser) -> None:
    answer = browser.post("/login", data={"user": "alice", "password": PASSWORD, "csrf": "forged"})
    assert answer.status_code == 400
    assert browser.get("/").status_code == 303
    # the answer is a fresh form that works
    retry = browser.post("/login", data={"user": "alice", "password": PASSWORD, "csrf": csrf_of(answer.text)})
    assert retry.status_code == 303 and browser.get("/").status_code == 200


def test_logging_out_needs_the_pages_token_and_ends_the_session_here(browser) -> None:
    log_in(browser)
    page = browser.get("/")
    cookie = browser.cookies.get("configserver_admin")
    assert browser.post("/logout", data={"csrf": "not the token"}).status_code == 403
    assert browser.get("/").status_code == 200                 # still logged in
    answer = browser.post("/logout", data={"csrf": csrf_of(page.text)})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    browser.cookies.set("configserver_admin", cookie)           # the old cookie, kept by someone
    assert browser.get("/").status_code == 303


def test_every_answer_forbids_inline_script_framing_and_caching(browser) -> None:
    for answer in (browser.get("/login"), browser.get("/"), log_in(browser), browser.get("/"),
                   browser.get("/static/admin.css")):
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert "script-src" not in csp      # falls back to default-src 'none': no script at all
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
    assert "<script" not in browser.get("/").text and " style=" not in browser.get("/").text


def test_the_admin_listener_serves_no_device_script(browser, pki) -> None:
    from driving import terminator_headers

    headers = dict(terminator_headers(pki.phone))
    for client_headers in (headers, {}):
        answer = browser.get("/update", headers=client_headers)
        assert answer.status_code == 303 and answer.text == ""
    log_in(browser)
    answer = browser.get("/update", headers=headers)
    assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
    assert "config change" not in answer.text


def test_the_devices_listener_answers_nothing_of_the_page(site) -> None:
    site.write("templates/default.j2", "config change SIP0 /user {{ device.hwid }}\n")
    app = site.app()
    for path in ("/login", "/", "/static/admin.css", "/devices/00-90-33-30-00-af"):
        answer = call(app, path)
        assert answer.headers["content-type"].startswith("text/plain"), path
        assert answer.text.startswith("#") and "<" not in answer.text, path
    assert call(app, "/login", method="POST").status == 405


def test_the_fleet_filters_and_pages_as_asked(browser) -> None:
    log_in(browser)
    refused = browser.get("/", params={"status": "403"})
    assert refused.status_code == 200
    statuses = re.findall(r'<span class="status s(\d)xx"', refused.text.split("<tbody>")[1])
    assert statuses and set(statuses) == {"4"}
    first = browser.get("/", params={"model": "IP1202", "sort": "hwid", "order": "asc"})
    names = re.findall(r'<a href="/devices/[^"]+">(IP1202-[^<]+)</a>', first.text)
    assert names == sorted(names) and len(names) == 24                     # 120 devices, one in five
    assert 'rel="next"' not in first.text
    everyone = browser.get("/")
    assert 'rel="next"' in everyone.text
    after = re.search(r'rel="next" href="([^"]+)"', everyone.text).group(1).replace("&amp;", "&")
    second = browser.get(after)
    assert 'rel="prev"' in second.text and second.text.count('href="/devices/') == 50
    after = re.search(r'rel="next" href="([^"]+)"', second.text).group(1).replace("&amp;", "&")
    third = browser.get(after)
    assert third.text.count('href="/devices/') == 20 and 'rel="next"' not in third.text
    bad = browser.get("/", params={"stale": "soon"})
    assert "is not a duration" in bad.text


@pytest.mark.parametrize("status", ["99999999999999999999", "600", "99", "-403"])
def test_a_status_filter_out_of_range_is_said_on_the_page(browser, status: str) -> None:
    log_in(browser)
    answer = browser.get("/", params={"status": status})
    assert answer.status_code == 200
    assert f"status {int(status)} is no HTTP status: give one from 100 to 599" in answer.text
    assert "showing every status" in answer.text and "120 devices" in answer.text


def test_a_page_link_with_a_number_out_of_range_is_said_and_gives_the_first_page(browser) -> None:
    import base64
    import json

    log_in(browser)
    for way in ("after", "before"):
        cursor = base64.urlsafe_b64encode(json.dumps([10**20, "x"]).encode()).decode()
        answer = browser.get("/", params={way: cursor})
        assert answer.status_code == 200
        assert "not one this page made; showing the first page" in answer.text
        assert answer.text.count('href="/devices/') == 50 and 'rel="prev"' not in answer.text


def test_the_device_page_shows_its_polls_newest_first_with_refusal_reasons(browser) -> None:
    log_in(browser)
    answer = browser.get("/devices/00-90-33-00-00-00")      # device 0: its poll was refused
    assert answer.status_code == 200
    assert "IP232-00-00-00" in answer.text and "Recent polls" in answer.text
    history = answer.text.split("Recent polls")[1]
    assert 'class="refused"' in history and re.search(r"(wrong CA|device mismatch)", history)
    assert browser.get("/devices/no-such-device").status_code == 404


def test_the_device_page_shows_the_script_it_would_get_with_secrets_masked(browser) -> None:
    log_in(browser)
    answer = browser.get("/devices/00-90-33-00-00-00")
    assert "What it would get now" in answer.text
    script = answer.text.split('<pre class="script">')[1].split("</pre>")[0]
    assert "config change SIP0 /user IP232-00-00-00 /pwd ••••••" in script
    assert "/pin •••••• /site lab" in script
    assert "hunter2-sip-pw" not in answer.text and "7391" not in answer.text
    assert "mod cmd UP1 check ser" in script          # the very answer a poll gets, wrapped to apply once
    assert "2 secrets" in answer.text and "sip.registrar" in answer.text
    shown = browser.get("/devices/00-90-33-00-00-00", params={"reveal": "1"})
    assert "/pwd hunter2-sip-pw" in shown.text and "/pin 7391" in shown.text


@pytest.mark.parametrize(("name", "secret"), [
    ("password", True), ("sip.password", True), ("admin_pin", True), ("api_key", True), ("SIP.Secret", True),
    ("site", False), ("keyboard", False), ("pinned", False), ("registrar", False), ("extra", True),
    ("accounts[0].password", True), ("accounts[1].user", False), ("accounts[3].token", True), ("token", False),
    ("rooms[0][1].extra", True),
    # a table's own name says nothing of what it holds (function keys: labels and extensions);
    # a table the admin marks, everything in it
    ("function_key[0].label", False), ("hotkey.number", False), ("extra.sub", True), ("accounts.token.id", True),
    ("passwords.admin", True), ("secrets.ldap", True), ("ldap_credentials.bind", True), ("secret.note", True),
])
def test_which_variables_are_secret(name: str, secret: bool) -> None:
    from configserver.admin._script import is_secret
    assert is_secret(name, marked=["extra", "accounts.token"]) is secret


def test_an_array_of_tables_is_one_variable_per_value_and_its_secrets_are_masked() -> None:
    from configserver.admin._script import MASK, flatten, mask
    variables = {"ntp": ("a.example", "b.example"), "accounts": (
        {"user": "desk", "password": "acct-secret-9931"}, {"user": "lobby", "password": "acct-secret-4417"})}
    assert flatten(variables) == [
        ("ntp", ("a.example", "b.example")), ("accounts[0].user", "desk"), ("accounts[0].password", "acct-secret-9931"),
        ("accounts[1].user", "lobby"), ("accounts[1].password", "acct-secret-4417")]
    masked = mask("/auth-pw acct-secret-9931\n/auth-pw acct-secret-4417\n", variables)
    assert masked.script == f"/auth-pw {MASK}\n/auth-pw {MASK}\n"
    assert ("accounts[0].password", MASK, True) in masked.variables and masked.secrets == 2
    assert ("accounts[1].user", "lobby", False) in masked.variables


def test_a_password_in_an_array_of_tables_is_masked_on_the_device_page(admin_settings) -> None:
    (admin_settings.vars / "default.toml").write_text(
        'site = "lab"\n[[accounts]]\nuser = "desk"\npassword = "acct-secret-9931"\n')
    (admin_settings.templates / "default.j2").write_text(
        "{% for a in vars.accounts %}config change SIP1 /user {{ a.user }} /auth-pw {{ a.password }}\n{% endfor %}")
    with TestClient(create_admin_app(admin_settings), follow_redirects=False) as client:
        log_in(client)
        page = client.get("/devices/00-90-33-00-00-01").text
        assert "acct-secret-9931" not in page
        assert "accounts[0].password" in page and "config change SIP1 /user desk /auth-pw ••••••" in page
        shown = client.get("/devices/00-90-33-00-00-01", params={"reveal": "1"}).text
        assert "/auth-pw acct-secret-9931" in shown


def test_masking_hides_every_occurrence_but_never_a_short_value() -> None:
    from configserver.admin._script import MASK, mask
    masked = mask("a hunter2 b hunter2x c 12\n", {"sip": {"password": "hunter2"}, "pin": "12", "site": "x"})
    assert masked.script == f"a {MASK} b {MASK}x c 12\n"
    assert masked.variables == [("sip.password", MASK, True), ("pin", MASK, True), ("site", "x", False)]


def test_a_short_secret_number_is_masked_where_it_stands_alone_not_among_other_digits() -> None:
    from configserver.admin._script import MASK, mask
    masked = mask("/pin 100 /ext 1100 /emergency 911 /room A100b /url ?text=PIN%20100&x=%401100\n", {"pin": "100"})
    assert masked.script == f"/pin {MASK} /ext 1100 /emergency 911 /room A{MASK}b /url ?text=PIN%20{MASK}&x=%401100\n"


def test_a_table_named_like_a_secret_leaves_what_it_holds_shown() -> None:
    # phones have function keys: their labels and extensions are what the page is opened for
    from configserver.admin._script import mask
    variables = {"function_key": [{"label": "Reception", "num": "100"}], "hotkey": {"number": "911"}}
    masked = mask("/label Reception /num 100 /ext 1100 /emergency 911\n", variables)
    assert masked.script == "/label Reception /num 100 /ext 1100 /emergency 911\n" and masked.secrets == 0



@pytest.mark.parametrize("line", [
    "config change SIP0 /user a /pwd p%40ss%20w0rd%21%3B",                   # quote(), as config lines carry it
    "mod cmd UP0 scfg https://x/b?pw=p%40ss+w0rd%21%3B",                       # quote_plus()
    "config change SIP0 /desc p%40ss%20w0rd%21%3B and p%40ss%20w0rd%21%3B",    # anywhere, every time
    "config change SIP0 /desc p%40ss%20w0rd%21%3b",                            # lower-case hex too
    "config change SIP0 /desc p@ss w0rd!;",
])
def test_a_secret_is_masked_in_the_script_percent_encoded_too(line: str) -> None:
    from configserver.admin._script import MASK, mask
    masked = mask(line, {"sip": {"password": "p@ss w0rd!;"}}).script
    assert "w0rd" not in masked and MASK in masked


def test_innovaphones_secret_options_are_masked_in_the_script_unless_revealed() -> None:
    from configserver.admin._script import MASK, mask
    script = "config change GK0 /gk-pwd literal-in-template /gk-id b\nconfig change IP0 /addr 10.0.0.1/24\n"
    assert mask(script, {}).script == f"config change GK0 /gk-pwd {MASK} /gk-id b\nconfig change IP0 /addr 10.0.0.1/24\n"
    assert mask(script, {}, reveal=True).script == script


# -- the rules behind it -----------------------------------------------------------------------

ALICE_HASH = "$argon2id$v=19$m=65536,t=3,p=4$alice"


def test_a_session_ends_when_its_lifetime_is_over() -> None:
    clock = [NOW]
    sessions = Sessions(lifetime=60, hash_of={"alice": ALICE_HASH}.get, clock=lambda: clock[0])
    cookie, session = sessions.start("alice", ALICE_HASH)
    assert sessions.find(cookie) == session
    clock[0] += 61
    assert sessions.find(cookie) is None


def test_a_session_cookie_that_was_changed_is_no_session() -> None:
    sessions = Sessions(lifetime=60, hash_of={"alice": ALICE_HASH}.get)
    cookie, _ = sessions.start("alice", ALICE_HASH)
    # another session id under the same signature (the signature's last character may carry only
    # base64 padding bits, so the id is what is changed)
    assert sessions.find(("A" if cookie[0] != "A" else "B") + cookie[1:]) is None
    other = Sessions(lifetime=60, hash_of={"alice": ALICE_HASH}.get)
    assert sessions.find(other.start("alice", ALICE_HASH)[0]) is None   # another process's key


def test_a_session_lives_only_while_its_user_keeps_the_password_hash_it_was_opened_with() -> None:
    from configserver.admin import UsersError

    current: dict[str, str] = {"alice": ALICE_HASH}
    broken = [False]

    def hash_of(user: str) -> str | None:
        if broken[0]:
            raise UsersError("admin-users:1: not 'name:$argon2...'")
        return current.get(user)

    sessions = Sessions(lifetime=60, hash_of=hash_of)
    cookie, session = sessions.start("alice", ALICE_HASH)
    assert ALICE_HASH not in repr(session) and ALICE_HASH not in cookie   # a digest, kept here only
    broken[0] = True
    assert sessions.find(cookie) is None            # a file that cannot be read lets nobody in...
    broken[0] = False
    assert sessions.find(cookie) == session         # ...and the same hash again is the same session
    current["alice"] = ALICE_HASH + "-new"
    assert sessions.find(cookie) is None
    current["alice"] = ALICE_HASH                   # gone for good: it does not come back
    assert sessions.find(cookie) is None
    cookie, _ = sessions.start("alice", ALICE_HASH)
    del current["alice"]
    assert sessions.find(cookie) is None


@pytest.mark.parametrize(("failures", "delay"), [(0, 0), (1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (9, MAX_DELAY)])
def test_failed_logins_wait_longer_each_time(failures: int, delay: float) -> None:
    assert failure_delay(failures) == delay


def test_failed_logins_are_forgotten_after_the_window() -> None:
    clock = [0.0]
    throttle = Throttle(clock=lambda: clock[0])
    assert [throttle.failed("198.51.100.7") for _ in range(3)] == [0.5, 1, 2]
    assert throttle.failed("203.0.113.9") == 0.5             # per address
    clock[0] += 15 * 60 + 1
    assert throttle.failed("198.51.100.7") == 0.5


def test_an_address_tries_one_login_at_a_time_and_not_before_its_wait_is_over() -> None:
    clock = [0.0]
    throttle = Throttle(clock=lambda: clock[0])
    assert throttle.begin("198.51.100.7") == 0
    assert throttle.begin("198.51.100.7") == 1               # a second one while the first is checked
    assert throttle.begin("203.0.113.9") == 0                # per address
    assert throttle.failed("198.51.100.7") == 0.5
    throttle.done("198.51.100.7")
    assert throttle.begin("198.51.100.7") == 1               # its wait is not over
    clock[0] += 0.5
    assert throttle.begin("198.51.100.7") == 0
    [throttle.failed("198.51.100.7") for _ in range(4)]
    throttle.done("198.51.100.7")
    assert throttle.begin("198.51.100.7") == 8               # Retry-After, in whole seconds


def test_parallel_guesses_from_one_address_are_refused_without_a_hash(admin_settings) -> None:
    import asyncio

    import httpx

    async def guesses() -> list[int]:
        transport = httpx.ASGITransport(app=create_admin_app(admin_settings), client=("203.0.113.5", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            form = await client.get("/login")
            data = {"user": "alice", "csrf": csrf_of(form.text)}
            answers = await asyncio.gather(*(client.post("/login", data={**data, "password": f"guess {n}"})
                                             for n in range(8)))
            assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 429)
            return sorted(a.status_code for a in answers)

    assert asyncio.run(guesses()) == [401] + [429] * 7
    securitylog.configure(None)
    # one password checked and logged; the others were refused before any hash
    assert len(Path(str(admin_settings.security_log)).read_text().splitlines()) == 1
