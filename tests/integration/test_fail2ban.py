"""The fail2ban filters and jails in deploy/fail2ban, run by Debian's fail2ban against a security
log that the admin page and the security log module write for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from needs import need_server

from configserver import load_settings, securitylog
from configserver.admin import add_user, create_admin_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "fail2ban"


@pytest.fixture(scope="module")
def fail2ban_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's /etc/fail2ban with our filters and jail installed as the README says."""
    need_server(shutil.which("fail2ban-regex") is not None and Path("/etc/fail2ban/filter.d").is_dir(),
                "fail2ban (Debian package)")
    root = tmp_path_factory.mktemp("fail2ban") / "etc"
    shutil.copytree("/etc/fail2ban", root)
    for path in (DEPLOY / "filter.d").glob("*.conf"):
        shutil.copy(path, root / "filter.d")
    shutil.copy(DEPLOY / "jail.d" / "configserver.conf", root / "jail.d")
    return root


@pytest.fixture(scope="module")
def security_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A security log as the service writes it: refused polls and failed admin logins."""
    root = tmp_path_factory.mktemp("service")
    log = root / "security.log"
    (root / "templates").mkdir()
    add_user(root / "admin-users", "alice", "correct horse battery staple")
    settings = load_settings(templates=root / "templates", vars=root / "vars", database=f"sqlite:///{root}/i.db",
                             admin_users=root / "admin-users", admin_port=8081, security_log=str(log),
                             proxy_secret="x" * 40)
    app = create_admin_app(settings)
    for client, forwarded in (("203.0.113.5", None), ("203.0.113.5", None), ("127.0.0.1", "198.51.100.23"),
                              ("2001:db8::5", None)):
        with TestClient(app, client=(client, 50000), follow_redirects=False) as browser:
            form = browser.get("/login").text
            token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            answer = browser.post("/login", data={"user": 'al"ice\\', "password": "wrong password", "csrf": token},
                                  headers={"X-Forwarded-For": forwarded, "X-Configserver-Proxy-Secret": "x" * 40}
                                  if forwarded else {})
            assert answer.status_code == 401
    securitylog.configure(log)
    try:
        securitylog.refusal("198.51.100.7", "wrong CA", "IP232-30-00-af", "/update")
        securitylog.refusal("198.51.100.7", "device mismatch", "IP232-30-00-af", '/update?hwid=IP232-30-01-10&x="a b"')
        securitylog.refusal("2001:db8::7", "https required", None, "/")
        securitylog.refusal(None, "untrusted proxy", None, "/")          # a unix socket: no address to ban
        securitylog.refusal("198.51.100.8", "certificate mismatch", "IP232-30-00-b1",
                            "/x client=192.0.2.66 refusal client=192.0.2.66")
    finally:
        securitylog.configure(None)
    return log


def matched(config: Path, log: Path, filter_name: str) -> list[str]:
    """The addresses fail2ban-regex finds in `log` with one of our filters, in order."""
    run = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), str(config / "filter.d" / f"{filter_name}.conf")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_the_refusals_filter_finds_each_refused_polls_real_address(fail2ban_config, security_log) -> None:
    assert matched(fail2ban_config, security_log, "configserver-refusals") == [
        "198.51.100.7", "198.51.100.7", "2001:db8::7", "198.51.100.8"]


def test_the_admin_filter_finds_each_failed_logins_real_address(fail2ban_config, security_log) -> None:
    # the forwarded address counts only from the trusted terminator (127.0.0.1 here)
    assert matched(fail2ban_config, security_log, "configserver-admin") == [
        "203.0.113.5", "203.0.113.5", "198.51.100.23", "2001:db8::5"]


def test_the_filters_read_the_same_lines_from_syslog(fail2ban_config, tmp_path: Path, security_log) -> None:
    # security_log = "journal": journald (and rsyslog's files) show the identifier and a pid
    lines = [line.split(" ", 1)[1].replace("configserver-security:", "configserver-security[4711]:", 1)
             for line in security_log.read_text().splitlines()]
    syslog = tmp_path / "syslog"
    syslog.write_text("".join(f"Nov 29 14:30:{n:02d} config01 {line}\n" for n, line in enumerate(lines)))
    assert matched(fail2ban_config, syslog, "configserver-refusals") == [
        "198.51.100.7", "198.51.100.7", "2001:db8::7", "198.51.100.8"]
    assert len(matched(fail2ban_config, syslog, "configserver-admin")) == 4


def test_fail2ban_accepts_the_jails(fail2ban_config, security_log, tmp_path: Path) -> None:
    config = tmp_path / "etc"
    shutil.copytree(fail2ban_config, config)
    (config / "jail.d" / "defaults-debian.conf").unlink(missing_ok=True)   # sshd: no auth log here
    jail = config / "jail.d" / "configserver.conf"
    jail.write_text(jail.read_text().replace("/var/log/configserver/security.log", str(security_log)))
    run = subprocess.run(["fail2ban-client", "-c", str(config), "-t"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: configuration test is successful" in run.stdout + run.stderr
