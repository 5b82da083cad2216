"""The lines that ask a device to upload, and what the upload's URL says it carries.

innovaphone's own update server asks with `mod cmd UP0 scfg <url>`, the URL carrying
`mode=backup&hwid=#h&sn=#m` (the device fills in its hwid and MAC), and fetches a command's
output with the extended form `mod cmd UP0 scfg <url>&id=<query> ser nop /always <command>`
(innovaphone.md 1.6). We ask the same way, so the upload comes back naming the device, and the
admission refuses one whose URL names another device than its certificate.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigserverError

CONFIG = "config"
X509 = "x509"
CMD0 = "cmd0"

# The queries for facts: our id in the URL, and the command whose output the device uploads.
FACT_COMMANDS: Mapping[str, str] = {
    X509: "mod cmd X509 xml-info",
    CMD0: "mod cmd CMD0 xml-info",
}


class UnknownUpload(ConfigserverError, ValueError):
    """The upload's URL names no kind of upload we asked for."""


def check_backup_url(url: str) -> str:
    """The `backup_url` setting, checked: an https:// URL with a host and a path, no query or
    fragment (we add the query). Returns it; raises ValueError saying what to change."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{url!r}: give the https:// URL the devices upload to, e.g. https://config.example.com/backup")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: give it without ?query or #fragment; the query is added for each device")
    if not parts.path or parts.path == "/":
        raise ValueError(f"{url!r}: give it a path of its own, e.g. /backup, that the terminator lets PUT through")
    if any(ch.isspace() for ch in url):
        raise ValueError(f"{url!r}: a URL in a script line must not hold spaces")
    return url


def upload_path(url: str) -> str:
    """The path of the `backup_url`: where the web layer takes uploads."""
    return urllib.parse.urlsplit(url).path


def upload_lines(url: str, facts: bool) -> list[str]:
    """The script lines that ask for the configuration (and with `facts`, the device's own
    account of its certificates and itself). They go before the script's `check` line, which
    skips everything after it, and outside its digest."""
    lines = [f"mod cmd UP0 scfg {url}?mode=backup&hwid=#h&sn=#m"]
    if facts:
        for query, command in FACT_COMMANDS.items():
            lines.append(
                f"mod cmd UP0 scfg {url}?mode=query&id={query}&hwid=#h&sn=#m"
                f" ser nop /always {urllib.parse.quote(command, safe='')}"
            )
    return lines


@dataclass(frozen=True, slots=True)
class UploadKind:
    """What an upload carries: the configuration, or the output of one of FACT_COMMANDS."""

    what: str   # CONFIG, X509 or CMD0


def upload_kind(query: Mapping[str, Sequence[str]]) -> UploadKind:
    """Read `mode` (and `id`) from an upload's query. Raises UnknownUpload for anything we never
    asked for: a mode or id given twice, unknown, or missing."""
    lowered: dict[str, list[str]] = {}
    for key, values in query.items():
        lowered.setdefault(key.lower(), []).extend(values)
    modes = lowered.get("mode", [])
    if len(modes) != 1:
        raise UnknownUpload("the URL needs exactly one mode=backup or mode=query")
    if modes[0] == "backup":
        return UploadKind(CONFIG)
    if modes[0] == "query":
        ids = lowered.get("id", [])
        if len(ids) == 1 and ids[0] in FACT_COMMANDS:
            return UploadKind(ids[0])
        raise UnknownUpload(f"mode=query needs exactly one id, one of {', '.join(FACT_COMMANDS)}")
    raise UnknownUpload("mode must be backup or query")
