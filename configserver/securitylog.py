"""The security log: one line per refused poll and per failed admin login, for fail2ban.

Every line has one fixed form, so that a fail2ban filter can rely on it (README, "Admin page"):

    2026-11-29T14:30:00Z configserver-security: refusal client=198.51.100.7 reason="wrong CA" hwid=IP232-30-00-af path=/update
    2026-11-29T14:31:00Z configserver-security: login-failed client=198.51.100.7 user="admin"

The client address comes first, right after the event, so nothing a client controls (a path,
a user name) can stand before it; `-` when there is none (a unix socket without a terminator).
Quoted values escape `"` and `\\`, and the path is percent-encoded: no value holds a space,
a quote or a line break that could make a line say more than it does. The address itself must
be the real one: the caller hands over what the trusted-proxy rules gave (`forwarded.py`),
never a header from an untrusted peer.

Targets (setting `security_log`): none (the default: nothing is written), a file path (one
line per event, appended, reopened when logrotate moves it), or `journal`: syslog to journald
with the identifier `configserver-security`, where the journal adds the time itself.
"""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import time
import urllib.parse
from pathlib import Path

IDENTIFIER = "configserver-security"
JOURNAL = "journal"
SYSLOG_SOCKET = "/dev/log"

_log = logging.getLogger("configserver.security")
_log.propagate = False    # never mixed into the JSON lines of the service log
_log.setLevel(logging.INFO)


class _FileFormatter(logging.Formatter):
    """`<UTC time> configserver-security: <event ...>`: a time fail2ban reads without a pattern."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return f"{stamp} {IDENTIFIER}: {record.getMessage()}"


def configure(target: str | Path | None) -> None:
    """Send the security lines to `target` from now on: None (nowhere), `journal`, or a file.

    Replaces the previous target. Raises OSError when the file cannot be opened for appending
    (the message names it), so a wrong path stops start-up instead of losing the lines.
    """
    for handler in list(_log.handlers):
        _log.removeHandler(handler)
        handler.close()
    if target is None or str(target) == "":
        return
    if str(target) == JOURNAL:
        # Python's handler would keep quiet about a missing socket and lose every line.
        if not Path(SYSLOG_SOCKET).exists():
            raise OSError(f"setting 'security_log': journal: cannot reach {SYSLOG_SOCKET}; "
                          "is systemd-journald running? (or give a file)")
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
        handler.setFormatter(logging.Formatter(f"{IDENTIFIER}: %(message)s"))
    else:
        path = Path(target)
        try:
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise OSError(f"setting 'security_log': cannot append to {path.absolute()}: {exc.strerror or exc}") from None
        handler.setFormatter(_FileFormatter())
    _log.addHandler(handler)


def refusal(client_ip: str | None, reason: str, hwid: str | None, path: str) -> None:
    """Log one refused poll: who asked (the real client address), why it was refused, as which
    device (None when the poll showed none), for which path. Never raises."""
    if not _log.handlers:
        return
    _emit(f"refusal client={_address(client_ip)} reason={_quoted(reason)} hwid={_token(hwid)} path={_path(path)}")


def login_failed(client_ip: str | None, user: str) -> None:
    """Log one failed admin login: the real client address, the user name that was tried.
    Never raises."""
    if not _log.handlers:
        return
    _emit(f"login-failed client={_address(client_ip)} user={_quoted(user[:64])}")


def _emit(line: str) -> None:
    try:
        _log.info(line)
    except Exception:  # noqa: BLE001, S110 - a refusal must be answered even when its log line is lost
        pass


def _address(ip: str | None) -> str:
    # Only an IP address is written as one: anything else must not look like one to fail2ban.
    try:
        return str(ipaddress.ip_address(ip or ""))
    except ValueError:
        return "-"


def _token(value: str | None) -> str:
    if not value:
        return "-"
    return "".join(ch if ch.isalnum() or ch in "-_." else "?" for ch in value[:64])


def _quoted(value: str) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in value)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path(path: str) -> str:
    return urllib.parse.quote(path[:512], safe="/?&=%-._~+,;:@!$'()*")
