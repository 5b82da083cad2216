"""The security log's fixed line form: what fail2ban reads, and what no client can forge."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configserver import securitylog

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
def log_file(tmp_path: Path):
    path = tmp_path / "security.log"
    securitylog.configure(path)
    yield path
    securitylog.configure(None)


def lines(path: Path) -> list[str]:
    text = path.read_text()
    for line in text.splitlines():
        assert re.match(STAMP + " configserver-security: ", line), line
    return [line.split(" ", 1)[1].removeprefix("configserver-security: ") for line in text.splitlines()]


def test_a_refusal_is_one_line_with_address_reason_device_and_path(log_file: Path) -> None:
    securitylog.refusal("198.51.100.7", "wrong CA", "IP232-30-00-af", "/update?mac=0090333000af")
    securitylog.refusal("2001:db8::7", "https required", None, "/")
    securitylog.login_failed("203.0.113.5", "alice")
    assert lines(log_file) == [
        'refusal client=198.51.100.7 reason="wrong CA" hwid=IP232-30-00-af path=/update?mac=0090333000af',
        'refusal client=2001:db8::7 reason="https required" hwid=- path=/',
        'login-failed client=203.0.113.5 user="alice"',
    ]


def test_what_a_client_controls_cannot_make_a_line_name_another_address(log_file: Path) -> None:
    securitylog.refusal("198.51.100.7", "device mismatch", "IP232-30-00-af",
                        '/x client=192.0.2.66 "\n2026-01-01T00:00:00Z configserver-security: refusal client=192.0.2.66')
    securitylog.login_failed("198.51.100.8", 'x" client=192.0.2.67\nrefusal client=192.0.2.67')
    securitylog.refusal("not an address", "wrong CA", "IP232-30-00-af", "/")
    written = lines(log_file)
    assert len(written) == 3
    assert [re.search(r" client=(\S+)", line).group(1) for line in written] == ["198.51.100.7", "198.51.100.8", "-"]
    assert '"' not in written[0].split("path=")[1] and " " not in written[0].split("path=")[1]


def test_without_a_target_nothing_is_written_and_nothing_fails(tmp_path: Path) -> None:
    securitylog.configure(None)
    securitylog.refusal("198.51.100.7", "wrong CA", None, "/")
    securitylog.login_failed("198.51.100.7", "alice")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_opened_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="setting 'security_log': cannot append to"):
        securitylog.configure(tmp_path / "no-such-folder" / "security.log")


def test_the_journal_target_sends_the_same_line_to_syslog_as_authpriv(tmp_path: Path, monkeypatch) -> None:
    import socket

    path = tmp_path / "log"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # what journald listens on at /dev/log
    journal.bind(str(path))
    journal.settimeout(5)
    monkeypatch.setattr(securitylog, "SYSLOG_SOCKET", str(path))
    try:
        securitylog.configure("journal")
        securitylog.refusal("198.51.100.7", "wrong CA", "IP232-30-00-af", "/update")
        datagram = journal.recv(4096).decode()
    finally:
        securitylog.configure(None)
        journal.close()
    # <86>: facility authpriv (10), severity info (6); journald takes the identifier from the tag
    assert datagram.rstrip("\x00") == (
        '<86>configserver-security: refusal client=198.51.100.7 reason="wrong CA" hwid=IP232-30-00-af path=/update')


def test_a_journal_that_is_not_there_stops_start_up_saying_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(securitylog, "SYSLOG_SOCKET", str(tmp_path / "no-journal"))
    with pytest.raises(OSError, match="setting 'security_log': journal: cannot reach"):
        securitylog.configure("journal")
