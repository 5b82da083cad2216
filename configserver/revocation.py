"""Revoked devices: a stolen phone keeps its factory certificate for life, so the admin names it
in a text file and it gets `403 # revoked` from then on.

The file (the `revoked` setting) holds one entry a line: a hwid (any case; broken early model
names match their fixed form), an innovaphone MAC (with dashes, colons or none), or a
certificate's SHA-256 fingerprint (64 hex digits, colons allowed). Blank lines and `#` comments,
also after an entry, are ignored.

`parse_revocations` is a pure function; `RevocationFile` re-reads the file when it changes,
without a restart, and keeps the last good list when it cannot be read.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigserverError
from .identity import DeviceIdentity, InvalidDeviceName, normalize_mac, parse_device_name
from .innovaphone import BROKEN_MODEL_NAMES, INNOVAPHONE_OUI

log = logging.getLogger("configserver.revocation")

CHECK_SECONDS = 1.0    # how often the file's stamp is looked at, at most
MAX_BYTES = 16 * 1024 * 1024
_FINGERPRINT = re.compile(r"(?:[0-9a-f]{2}:){31}[0-9a-f]{2}|[0-9a-f]{64}", re.ASCII)


class RevocationError(ConfigserverError):
    """The revoked file cannot be read at all."""


@dataclass(frozen=True, slots=True)
class Revocations:
    """The devices that get `403 # revoked`, and the lines of the file no entry could be read from."""

    hwids: frozenset[str] = frozenset()          # casefolded, fixed
    macs: frozenset[str] = frozenset()           # 00-90-33-xx-xx-xx
    fingerprints: frozenset[str] = frozenset()   # 64 lower-case hex digits
    problems: tuple[tuple[int, str], ...] = field(default=(), compare=False)

    def revokes(self, device: DeviceIdentity) -> str | None:
        """Which entry revokes `device` (for the log), or None."""
        if device.hwid.casefold() in self.hwids:
            return f"hwid {device.hwid}"
        if device.mac in self.macs:
            return f"MAC {device.mac}"
        if device.fingerprint_sha256 and device.fingerprint_sha256.lower() in self.fingerprints:
            return f"certificate {device.fingerprint_sha256.lower()}"
        return None

    def __len__(self) -> int:
        return len(self.hwids) + len(self.macs) + len(self.fingerprints)


NONE = Revocations()


def parse_revocations(text: str, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> Revocations:
    """Read the revoked file's text. Lines that name nothing are kept as (line, why) problems."""
    hwids: set[str] = set()
    macs: set[str] = set()
    fingerprints: set[str] = set()
    problems: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if _FINGERPRINT.fullmatch(entry.lower()):
            fingerprints.add(entry.lower().replace(":", ""))
            continue
        mac = normalize_mac(entry)
        if mac is not None:
            if mac.startswith(INNOVAPHONE_OUI):
                macs.add(mac)
            else:
                problems.append((number, f"{entry} is no innovaphone MAC (they start {INNOVAPHONE_OUI}): revokes nothing"))
            continue
        try:
            hwids.add(parse_device_name(entry, fixes).hwid.casefold())
        except InvalidDeviceName:
            problems.append((number, f"{entry[:80]!r} is neither a hwid, an innovaphone MAC nor a SHA-256 "
                                     "fingerprint: revokes nothing"))
    return Revocations(frozenset(hwids), frozenset(macs), frozenset(fingerprints), tuple(problems))


def read_revocations(path: Path, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES) -> Revocations:
    """Read and parse the file. Raises RevocationError when it cannot be read as UTF-8 text."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RevocationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise RevocationError(f"{path}: larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RevocationError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    return parse_revocations(text, fixes)


class RevocationFile:
    """The revoked file, re-read when its stamp changes; looked at no more than once a second.

    A file that cannot be read keeps the last good list in force (and is logged): a revoked
    device must not come back because of a bad save.
    """

    def __init__(
        self, path: Path | None, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._fixes = fixes
        self._clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._current = NONE
        if path is not None:
            self._current = read_revocations(path, fixes)   # at start-up a bad file stops the service
            self._stamp = _stamp(path)
            self._log_problems()

    def current(self) -> Revocations:
        """The list in force; re-read first if the file changed since it was last looked at."""
        if self.path is None:
            return NONE
        now = self._clock()
        if now - self._checked >= CHECK_SECONDS:
            self._checked = now
            self._reload()
        return self._current

    def _reload(self) -> None:
        assert self.path is not None
        try:
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                return
            self._current = read_revocations(self.path, self._fixes)
            self._stamp = stamp
        except (OSError, RevocationError) as exc:
            log.error("revoked file not read; the last list stays in force", extra={"fields": {
                "event": "revoked_unreadable", "file": str(self.path), "error": str(exc)}})
            return
        log.info("revoked file read", extra={"fields": {"event": "revoked_reload", "file": str(self.path),
                                                        "entries": len(self._current)}})
        self._log_problems()

    def _log_problems(self) -> None:
        for line, why in self._current.problems:
            log.error("revoked file: an entry revokes nothing", extra={"fields": {
                "event": "revoked_entry_ignored", "file": str(self.path), "line": line, "problem": why}})


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)
