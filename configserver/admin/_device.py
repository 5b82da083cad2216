"""One device's firmware rollout and configuration backups, for the device page. Read only.

The firmware tables (`firmware_sent`, `firmware_rollouts`) and the backup tables are read by
their primary keys: one device's rows, the few halted targets. What the device would be sent
comes from the poll pipeline (`_web.AdminPage.would_get`); this module adds what the database
remembers: when a build was sent, in which wave, and whether its target is halted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..backups import (
    BackupState,
    BackupStore,
    Version,
    decode,
    meaningful_lines,
    unified_diff,
)
from ..firmware import Halt, RolloutState, firmware_sent

KIND_NAMES = {"prot": "firmware", "boot": "boot code"}


@dataclass(frozen=True, slots=True)
class Sent:
    """A build the device was sent (`firmware_sent`): the last one of its kind."""

    kind: str
    build: str
    wave: int | None
    first_sent_at: float
    last_sent_at: float
    sends: int


def sent_query(device: str) -> sa.Select[Any]:
    """The device's rows of `firmware_sent`: a search of its primary key."""
    return sa.select(firmware_sent).where(firmware_sent.c.device == device).order_by(firmware_sent.c.kind)


@dataclass(frozen=True, slots=True)
class FirmwareState:
    sent: list[Sent]
    halts: list[Halt]      # halted targets of the device's model (any build)

    def halt_of(self, kind: str, build: str | None) -> Halt | None:
        return next((h for h in self.halts if h.kind == kind and h.build == build), None)


async def firmware_state(engine: AsyncEngine, device: str, model: str | None) -> FirmwareState:
    """What the database remembers of the device's firmware: sends and its model's halts."""
    async with engine.connect() as connection:
        rows = list(await connection.execute(sent_query(device)))
    sent = [Sent(r.kind, r.build, r.wave, r.first_sent_at, r.last_sent_at, r.sends) for r in rows]
    halts = [h for h in await RolloutState(engine).halt_records() if model and h.model == model.casefold()]
    return FirmwareState(sent, halts)


@dataclass(frozen=True, slots=True)
class Backups:
    state: BackupState | None
    versions: list[Version]                        # newest first
    facts: Mapping[str, tuple[float, dict[str, Any]]]


async def backups(engine: AsyncEngine, database: str, mac: str) -> Backups:
    """The device's stored versions (newest first), its upload counters and its facts."""
    store = BackupStore(database, engine=engine)   # the page's engine: never closed here
    return Backups(await store.state(mac), await store.versions(mac), await store.facts(mac))


def chosen_pair(versions: Sequence[Version], old: str | None, new: str | None) -> tuple[int, int] | None:
    """The two version numbers to compare: those asked for when both are kept, else the last two.
    None with fewer than two versions."""
    numbers = [v.number for v in versions]
    if len(numbers) < 2:
        return None
    try:
        pair = (int(old or ""), int(new or ""))
    except ValueError:
        return numbers[1], numbers[0]
    if pair[0] in numbers and pair[1] in numbers and pair[0] != pair[1]:
        return pair
    return numbers[1], numbers[0]


async def diff(engine: AsyncEngine, database: str, mac: str, old: int, new: int) -> str | None:
    """A unified diff of two versions' meaningful lines (the lines that change on every upload
    left out, as when deciding what is a new version); None when one is gone. The text work,
    up to half a second for two large versions, runs in a thread: the page's event loop answers
    the other admins meanwhile."""
    store = BackupStore(database, engine=engine)
    before, after = await store.content(mac, old), await store.content(mac, new)
    if before is None or after is None:
        return None
    return await asyncio.to_thread(_diff_text, before, after, old, new)


def _diff_text(before: bytes, after: bytes, old: int, new: int) -> str:
    return unified_diff(meaningful_lines(decode(before)), meaningful_lines(decode(after)),
                        f"version {old}", f"version {new}")


def diff_rows(text: str) -> list[tuple[str, str]]:
    """Each line of a unified diff with its class for the page: add, del, hunk, file or ''."""
    rows = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = ""
        rows.append((kind, line))
    return rows


@dataclass(frozen=True, slots=True)
class CertificateFact:
    """One certificate as the device lists it in `mod cmd X509 xml-info`: its word, not ours."""

    subject: str | None
    issuer: str | None
    serial: str | None
    not_before: str | None
    not_after: str | None


_SERIAL_NAMES = ("serial", "serial_number", "serialnumber", "sn")


def certificates(facts: Mapping[str, tuple[float, dict[str, Any]]]) -> tuple[float | None, list[CertificateFact]]:
    """The certificates of the device's last X509 report, and when it reported them. The
    documented attributes are subject_cn, issuer_cn, not_before and not_after; a serial is shown
    when the device names one among its other attributes."""
    if "x509" not in facts:
        return None, []
    at, data = facts["x509"]
    found = []
    for cert in data.get("certificates", [])[:8]:
        attributes = {str(k).lower(): v for k, v in (cert.get("attributes") or {}).items()}
        serial = next((attributes[name] for name in _SERIAL_NAMES if attributes.get(name)), None)
        found.append(CertificateFact(cert.get("subject_cn"), cert.get("issuer_cn"), serial,
                                     cert.get("not_before"), cert.get("not_after")))
    return at, found
