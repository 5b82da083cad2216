"""The admin page in a real browser: Debian's headless Chromium, driven by Playwright.

A lab server takes polls from lab devices over mutual TLS; the admin page, on a listener of its
own, shows them. An admin logs in, finds the devices, filters, opens one with its history and a
refusal's reason, and logs out; a wrong password is refused; no page shows without a session;
and the page's Content-Security-Policy stops inline script. With a firmware target declared and
configuration backups stored, the admin sees a halted rollout first, resumes it with the page's
token, and compares two backup versions with their secrets masked until asked.

With CONFIGSERVER_SCREENSHOTS=DIR the fleet and device pages are saved there (the README's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need_server
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from configserver.lab import LabError, create_lab, poll

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "correct horse battery staple"
SIP_SECRET = "lab-sip-secret-77"
PROXY_SECRET = "s" * 40   # shared by admin-serve and the terminators' admin vhosts
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        assert process.poll() is None, f"{what} stopped: {process.stderr.read().decode() if process.stderr else ''}"
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return              # it answers
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not start")


class Lab:
    def __init__(self, root: Path, device_port: int, admin_port: int) -> None:
        self.root, self.device_port, self.admin_port = root, device_port, admin_port
        self.lab = create_lab(root / "lab")
        # a firmware target for the fleet (no window: the lab's templates write their own times
        # line) and a secret variable the backups below hold
        with (root / "lab" / "vars" / "default.toml").open("a") as vars_file:
            vars_file.write(f'sip_password = "{SIP_SECRET}"\n\n'
                            '[firmware]\nurl = "http://firmware.lab.invalid/firmware/"\nprot = "13.4711"\n')
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
        self.env.update({
            "CONFIGSERVER_DATABASE": f"sqlite:///{root}/inventory.db",
            "CONFIGSERVER_ADMIN_PORT": str(admin_port),
            "CONFIGSERVER_ADMIN_USERS": str(root / "admin-users"),
            "CONFIGSERVER_SECURITY_LOG": str(root / "security.log"),
            "CONFIGSERVER_GRACE_SECONDS": "0",
            # the admin vhosts below prove themselves with it (the devices' built-in TLS reads no headers)
            "CONFIGSERVER_PROXY_SECRET": PROXY_SECRET,
        })

    def command(self, *args: str, **options) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "configserver", "--config", str(self.lab.config), *args],
                                cwd=self.root, env=self.env, **options)

    def poll(self, name: str, path: str = "/update") -> int:
        device = self.lab.device(name)
        answer = poll(f"https://127.0.0.1:{self.device_port}{path}", cert=device.cert, key=device.key,
                      server_ca=self.lab.server_ca)
        return answer.status


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need_server(Path(CHROMIUM).is_file(), "chromium (Debian package)")
    lab = Lab(tmp_path_factory.mktemp("admin"), free_port(), free_port())
    added = lab.command("admin-user", "add", "alice", stdin=subprocess.PIPE)
    added.communicate(PASSWORD.encode() + b"\n", timeout=60)
    assert added.returncode == 0
    devices = lab.command("serve", "--port", str(lab.device_port), stderr=subprocess.PIPE)
    admin = lab.command("admin-serve", stderr=subprocess.PIPE)
    try:
        wait_for(f"{lab.admin}/login", admin, "admin-serve")
        deadline = time.time() + 30
        while True:
            try:
                lab.poll("IP232-30-00-af")
                break
            except LabError:   # not listening yet
                assert devices.poll() is None and time.time() < deadline, "serve did not start"
                time.sleep(0.2)
        yield lab
    finally:
        for process in (devices, admin):
            process.send_signal(signal.SIGTERM)
            process.wait(30)


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    need_server(Path(CHROMIUM).is_file(), "chromium (Debian package)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15000)
    yield page
    context.close()


def log_in(page, lab: Lab, password: str = PASSWORD) -> None:
    page.goto(f"{lab.admin}/login")
    page.fill("input[name=user]", "alice")
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.click("main button[type=submit]")


def screenshot(page, name: str) -> None:
    folder = os.environ.get("CONFIGSERVER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_an_admin_sees_the_lab_polls_filters_opens_a_device_and_logs_out(lab: Lab, page) -> None:
    for name, build in (("IP232-30-00-af", "13A127"), ("IP232-30-01-10", "13A127"), ("IP1202-35-fe-4d", "14A012"),
                        ("IP112-30-03-01", "13A140"), ("IP222s-30-00-b0", "13A127")):
        assert lab.poll(name, f"/update?PROT={build}&BOOT=113454") == 200   # as devices report their builds
    # a device whose URL names another device: refused, with the reason
    assert lab.poll("IP232-30-01-10", "/update?hwid=IP232-30-00-af") == 403

    page.goto(lab.admin + "/")
    assert page.url == f"{lab.admin}/login"              # no page without a session
    log_in(page, lab)
    assert page.url == f"{lab.admin}/", page.content()
    deadline = time.time() + 15                          # the inventory writes in batches
    while page.locator("table.fleet tbody a").count() < 5:
        assert time.time() < deadline, page.content()
        time.sleep(0.3)
        page.reload()
    names = page.locator("table.fleet tbody td:first-child a").all_inner_texts()
    assert set(names) == {"IP232-30-00-af", "IP232-30-01-10", "IP1202-35-fe-4d", "IP112-30-03-01", "IP222-30-00-b0"}
    assert "device mismatch" in page.locator("section.problems").inner_text()

    page.fill("input[name=model]", "ip232")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    assert sorted(page.locator("table.fleet tbody td:first-child a").all_inner_texts()) == [
        "IP232-30-00-af", "IP232-30-01-10"]
    assert "model=ip232" in page.url

    with page.expect_navigation():
        page.click("text=IP232-30-01-10")
    assert page.url == f"{lab.admin}/devices/00-90-33-30-01-10"
    history = page.locator("table.history tbody tr")
    assert history.count() == 2, page.content()
    newest = history.nth(0).inner_text()
    assert "403" in newest and "device mismatch" in newest and "/update" in newest
    assert "200" in history.nth(1).inner_text()
    assert "13A127" in page.locator("div.columns").inner_text()     # the firmware it reported
    would_get = page.locator("section.would-get").inner_text()
    assert "models/IP232.j2" in would_get
    assert "mod cmd UP1 check ser" in page.locator("pre.script").inner_text()

    with page.expect_navigation():
        page.click("header button:has-text('Log out')")
    assert page.url == f"{lab.admin}/login"
    page.goto(f"{lab.admin}/devices/00-90-33-30-01-10")
    assert page.url == f"{lab.admin}/login"


BACKUPS = [
    ("config change SIP0 /user IP232-30-01-10 /pwd first-pw /auth {secret}\r\n"
     "config change IP0 /addr 192.0.2.10\r\n"
     "config change CMD0 /name Reception\r\n"),
    ("config change SIP0 /user IP232-30-01-10 /pwd second-pw /auth {secret}\r\n"
     "config change IP0 /addr 192.0.2.11\r\n"
     "config change CMD0 /name <script>window.backupRan=1</script>\r\n"),
]
X509 = ('<info><servercert><certificate subject_cn="IP232-30-01-10" issuer_cn="innovaphone Device Certification '
        'Authority" serial="3a7c01" not_before="2024-03-01" not_after="2034-03-01"/></servercert></info>')


def store_backups(lab: Lab) -> None:
    from configserver.backups import BackupStore, parse_certificate_facts

    async def store() -> None:
        backups = BackupStore(lab.env["CONFIGSERVER_DATABASE"])
        try:
            for n, text in enumerate(BACKUPS):
                await backups.store_config(mac="00-90-33-30-01-10", hwid="IP232-30-01-10", model="IP232",
                                           body=text.format(secret=SIP_SECRET).encode(), now=time.time() - 7200 + n)
            await backups.store_facts(mac="00-90-33-30-01-10", hwid="IP232-30-01-10", source="x509",
                                      facts=parse_certificate_facts(X509).as_json())
        finally:
            await backups.close()

    # Playwright's sync API runs an event loop in this thread: the store runs in another
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, store()).result()


def test_an_admin_sees_firmware_and_backups_compares_versions_and_resumes_a_halt(lab: Lab, page) -> None:
    import sqlite3

    for name in ("IP232-30-00-af", "IP232-30-01-10", "IP1202-35-fe-4d", "IP112-30-03-01", "IP222s-30-00-b0"):
        assert lab.poll(name, "/update?PROT=13A127&CHECK=x") == 200   # on the old build: sent the target
    database = lab.env["CONFIGSERVER_DATABASE"].removeprefix("sqlite:///")
    deadline = time.time() + 20                                       # serve writes its sends every 5 s
    while True:
        with sqlite3.connect(database) as connection:
            sent = connection.execute("SELECT count(*) FROM firmware_sent WHERE device = '00-90-33-30-01-10'").fetchone()
        if sent[0]:
            break
        assert time.time() < deadline, "no firmware send recorded"
        time.sleep(0.5)
    halted = lab.command("firmware", "halt", "IP232", "--kind", "prot", stdout=subprocess.PIPE)
    assert halted.wait(60) == 0 and b"halted: IP232 prot 13.4711" in halted.stdout.read()
    store_backups(lab)

    log_in(page, lab)
    problems = page.locator("section.problems").inner_text()
    assert "firmware halted" in problems.lower() and "configserver firmware resume IP232 --kind prot" in problems
    row = page.locator("table.fleet tbody tr", has_text="IP232-30-01-10")
    assert re.search(r"(2h ago|1h ago)", row.locator("td.backup").inner_text()), row.inner_text()
    screenshot(page, "admin-fleet.png")

    with page.expect_navigation():
        page.click("text=IP232-30-01-10")
    firmware = page.locator("dl.firmware").inner_text()
    assert re.search(r"Firmware target\s+13\.4711: halted", firmware), firmware
    assert re.search(r"Firmware sent\s+13\.4711", firmware), firmware
    certificate = page.locator("dd.device-word").inner_text()
    assert "serial 3a7c01" in certificate and "the device's own word" in certificate
    backups = page.locator("section.backups")
    assert backups.locator("table.versions tbody tr").count() == 2
    diff = page.locator("pre.diff").inner_text()
    assert "-config change SIP0 /user IP232-30-01-10 /pwd •••••• /auth ••••••" in diff
    assert "+config change CMD0 /name <script>window.backupRan=1</script>" in diff   # shown as text
    assert page.evaluate("() => window.backupRan === undefined")                      # never run
    content = page.content()
    assert all(secret not in content for secret in ("first-pw", "second-pw", SIP_SECRET))
    screenshot(page, "admin-device.png")

    # the other way round, chosen on the page
    page.select_option("select[name=old]", "2")
    page.select_option("select[name=new]", "1")
    with page.expect_navigation():
        page.click("form.diff-choice button")
    assert "old=2" in page.url and "new=1" in page.url
    assert "+config change IP0 /addr 192.0.2.10" in page.locator("pre.diff").inner_text()
    with page.expect_navigation():
        page.click("section.backups a:has-text('Show them')")
    assert all(secret not in page.url for secret in ("first-pw", "second-pw", SIP_SECRET))
    assert "/pwd first-pw" in page.locator("pre.diff").inner_text()

    # resuming is a POST carrying the page's token; the problem goes away
    page.goto(lab.admin + "/")
    with page.expect_navigation():
        page.click("form.resume button")
    assert page.url == f"{lab.admin}/"
    assert "configserver firmware resume" not in page.locator("section.problems").inner_text()


def test_a_wrong_password_is_refused_and_logged(lab: Lab, page) -> None:
    log_in(page, lab, password="not the password")
    assert page.url == f"{lab.admin}/login"
    assert "Wrong user name or password" in page.locator("p.alert").inner_text()
    page.goto(lab.admin + "/")
    assert page.url == f"{lab.admin}/login"
    log = (lab.root / "security.log").read_text()
    assert re.search(r'login-failed client=127\.0\.0\.1 user="alice"', log), log


def test_the_content_security_policy_stops_inline_script(lab: Lab, page) -> None:
    log_in(page, lab)
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text))
    # what an injected <script> or event handler would be: neither may run
    page.evaluate("""() => {
        const script = document.createElement('script');
        script.textContent = 'window.inlineRan = true';
        document.body.appendChild(script);
        const image = document.createElement('img');
        image.setAttribute('onerror', 'window.handlerRan = true');
        image.src = 'data:,nothing';
        document.body.appendChild(image);
    }""")
    page.wait_for_timeout(300)
    assert page.evaluate("() => [window.inlineRan === undefined, window.handlerRan === undefined]") == [True, True]
    assert any("Content Security Policy" in text for text in violations), violations
    # and the page loads nothing it does not serve itself
    assert page.evaluate("() => document.scripts.length") == 1          # the one just refused
    styles = page.evaluate("() => [...document.styleSheets].map(s => s.href)")
    assert styles == [f"{lab.admin}/static/admin.css"]


def test_the_page_fits_a_phone(lab: Lab, chromium) -> None:
    context = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        log_in(page, lab)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, width                  # no sideways scrolling of the page itself
        assert page.locator("table.fleet th.wide").first.is_hidden()
        screenshot(page, "admin-phone.png")
    finally:
        context.close()


# -- through the terminators' admin vhosts -------------------------------------------------------

def enable_admin_block(kind: str, sample: str, port: int, backend_port: int) -> str:
    """The sample with its admin block turned on, as the README tells an admin to."""
    if kind == "apache":
        defines = (f"Define CONFIGSERVER_ADMIN_PORT {port}\n"
                   f"Define CONFIGSERVER_ADMIN_BACKEND http://127.0.0.1:{backend_port}/\n")
        return sample.replace("# ==== end of values to change", defines + "# ==== end of values to change", 1)
    start = sample.index("# ==== admin page")
    end = sample.index("# ==== end of admin page")
    block = "\n".join(line[1:] if re.match(r"#(?! )|#    ", line) else line
                      for line in sample[start:end].splitlines()) + "\n"
    block = block.replace("8081", str(backend_port))
    # nginx: the admin server block sets the secret itself, the same value as the values block
    block = block.replace("X-Configserver-Proxy-Secret CHANGE-ME", f"X-Configserver-Proxy-Secret {PROXY_SECRET}")
    block = block.replace("listen 8444 ssl", f"listen 127.0.0.1:{port} ssl").replace('":8444"', f'"127.0.0.1:{port}"')
    return sample[:start] + block + sample[end:]


@pytest.fixture(params=["apache", "nginx", "lighttpd"])
def admin_vhost(request, lab: Lab) -> Iterator[tuple[str, int, int]]:
    """A terminator started from its deploy sample, admin block on: (kind, devices' port, admin port)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from terminator_lab import (
        DEPLOY,
        Server,
        apache_main_conf,
        fill_in,
        find_binary,
        lighttpd_main_conf,
        nginx_main_conf,
        running_as_root,
        tcp_open,
        write_secret_file,
    )

    kind = request.param
    binary = find_binary({"apache": "apache2", "nginx": "nginx", "lighttpd": "lighttpd"}[kind])
    need_server(binary is not None, kind)
    root = Path(tempfile.mkdtemp(prefix=f"admin-{kind}-"))
    root.chmod(0o755)
    for sub in ("logs", "run", "tmp", "htdocs"):
        (root / sub).mkdir(mode=0o755)
        if running_as_root() and sub in ("logs", "tmp"):
            shutil.chown(root / sub, user="www-data", group="www-data")
    device_port, admin_port = free_port(), free_port()
    lab_dir = lab.lab.root
    cert, key, cas = lab_dir / "server" / "server.pem", lab_dir / "server" / "server.key", lab.lab.ca_bundle
    secret = PROXY_SECRET
    nowhere = root / "run" / "no-app.sock"    # the devices' app is not needed: only the page is asked
    if kind == "apache":
        sample = fill_in((DEPLOY / "apache" / "configserver.conf").read_text(), {
            "Define CONFIGSERVER_ADDRESS": "127.0.0.1", "Define CONFIGSERVER_PORT": str(device_port),
            "Define CONFIGSERVER_NAME": "localhost", "Define CONFIGSERVER_CERT": str(cert),
            "Define CONFIGSERVER_KEY": str(key), "Define CONFIGSERVER_DEVICE_CAS": str(cas),
            "Define CONFIGSERVER_BACKEND": f"unix:{nowhere}|http://localhost/",
            "Define CONFIGSERVER_PROXY_SECRET": secret,
        })
        write_secret_file(root / "site.conf", enable_admin_block(kind, sample, admin_port, lab.admin_port))
        (root / "main.conf").write_text(apache_main_conf(root, root / "site.conf"))
        command = [binary, "-d", str(root), "-f", str(root / "main.conf"), "-DFOREGROUND"]
        env = {**os.environ, "APACHE_LOG_DIR": str(root / "logs")}
    elif kind == "nginx":
        sample = fill_in((DEPLOY / "nginx" / "configserver.conf").read_text(), {
            "server": f"unix:{nowhere}", "listen": f"127.0.0.1:{device_port} ssl", "server_name": "localhost",
            "ssl_certificate": str(cert), "ssl_certificate_key": str(key), "ssl_client_certificate": str(cas),
            "proxy_set_header X-Configserver-Proxy-Secret": secret,
        })
        block = enable_admin_block(kind, sample, admin_port, lab.admin_port)
        block = block.replace("/etc/configserver/tls/server.crt", str(cert)).replace(
            "/etc/configserver/tls/server.key", str(key))
        write_secret_file(root / "site.conf", block)
        (root / "main.conf").write_text(nginx_main_conf(root, root / "site.conf"))
        command = [binary, "-p", f"{root}/", "-c", str(root / "main.conf"), "-e", str(root / "logs" / "error.log")]
        env = None
    else:
        chain = root / "server-chain.pem"
        chain.write_bytes(cert.read_bytes() + (lab_dir / "ca" / "server-ca.pem").read_bytes())
        lua = root / "client-cert.lua"
        shutil.copyfile(DEPLOY / "lighttpd" / "configserver-client-cert.lua", lua)
        lua.chmod(0o644)
        sample = fill_in((DEPLOY / "lighttpd" / "50-configserver.conf").read_text(), {
            "var.configserver_listen": f'"127.0.0.1:{device_port}"', "var.configserver_cert": f'"{chain}"',
            "var.configserver_key": f'"{key}"', "var.configserver_device_cas": f'"{cas}"',
            "var.configserver_lua": f'"{lua}"', "var.configserver_backend": f'( "host" => "{nowhere}" )',
            "var.configserver_proxy_secret": f'"{secret}"',
        })
        write_secret_file(root / "site.conf", enable_admin_block(kind, sample, admin_port, lab.admin_port))
        (root / "main.conf").write_text(lighttpd_main_conf(root, root / "site.conf", free_port()))
        command = [binary, "-D", "-f", str(root / "main.conf")]
        env = None
    server = Server(kind, command, [root / "logs" / "error.log"], env).start(root / "output.log")
    try:
        server.wait_until(lambda: tcp_open(admin_port) and tcp_open(device_port), "both listeners")
        yield kind, device_port, admin_port
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_each_samples_admin_vhost_serves_the_page_over_tls_and_the_devices_vhost_does_not(
        admin_vhost, lab: Lab, chromium) -> None:
    kind, device_port, admin_port = admin_vhost
    log_file = lab.root / "security.log"
    before = len(log_file.read_text().splitlines()) if log_file.exists() else 0
    context = chromium.new_context(ignore_https_errors=True)   # the lab's server certificate
    try:
        page = context.new_page()
        page.set_default_timeout(15000)
        base = f"https://127.0.0.1:{admin_port}"
        page.goto(base + "/")
        assert page.url == f"{base}/login"
        # a client's own X-Forwarded-For must not become the address the page logs and fail2ban bans
        page.set_extra_http_headers({"X-Forwarded-For": "198.51.100.66"})
        page.fill("input[name=user]", "alice")
        page.fill("input[name=password]", "wrong through " + kind)
        with page.expect_navigation():
            page.click("main button[type=submit]")
        assert "Wrong user name or password" in page.content()
        page.fill("input[name=user]", "alice")
        page.fill("input[name=password]", PASSWORD)
        with page.expect_navigation():
            page.click("main button[type=submit]")
        assert page.url == f"{base}/" and page.locator("table.fleet").count() == 1
        cookie = next(c for c in context.cookies() if c["name"] == "configserver_admin")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    finally:
        context.close()
    new_lines = log_file.read_text().splitlines()[before:]
    assert [line.split(" ", 1)[1] for line in new_lines] == [
        'configserver-security: login-failed client=127.0.0.1 user="alice"']   # the peer, not 198.51.100.66
    # the devices' port: no page without a device certificate, and with one only the devices' app
    context = chromium.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        try:
            answer = page.goto(f"https://127.0.0.1:{device_port}/login")
        except PlaywrightError:   # Apache and lighttpd fail the handshake
            answer = None
        assert answer is None or (answer.status == 400 and "Log in" not in page.content())
    finally:
        context.close()
