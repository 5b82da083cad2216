"""What `configserver firmware` shows and does: the rollout per model, and resuming a halt.

Per model and kind (firmware, boot code): the target build, the devices on it, the pending ones
by wave (and whether that wave is open), the devices that took the update and then went silent
or came back with another build once the watch passed, and whether the rollout is halted. Each
device is judged by its own declaration, from the same vars files a poll reads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from ..identity import DeviceIdentity, InvalidDeviceName, parse_device_name
from ..inventory import (
    InventoryError,
    database_url,
    devices,
    explain,
    migrate,
    open_engine,
)
from ..service import content_store
from ..settings import Settings
from ._decision import differs, takes
from ._declaration import KINDS, FirmwareError
from ._rollout import place
from ._stage import FirmwareStage, model_declaration
from ._state import Failure, Halt, RolloutState

_KIND_NAMES = {"prot": "firmware", "boot": "boot code"}


@dataclass
class KindReport:
    """One model's rollout of one kind."""

    model: str
    kind: str
    targets: dict[str, int] = field(default_factory=dict)     # build -> devices with that target
    devices: int = 0
    on_target: int = 0
    pending: dict[tuple[int | None, float | None], int] = field(default_factory=dict)  # (wave, opens) -> devices
    failures: list[Failure] = field(default_factory=list)
    unjudged: list[Failure] = field(default_factory=list)   # came back, never reported a build
    halts: list[Halt] = field(default_factory=list)
    problems: int = 0   # devices whose declaration cannot be read


def report(settings: Settings, now: float) -> list[KindReport]:
    """The rollout of every model the inventory has seen, sorted by model and kind. Raises
    InventoryError when the database cannot be used."""
    store = content_store(settings, grace_seconds=0)
    store.refresh()
    snapshot = store.snapshot
    stage = FirmwareStage()

    async def gather(state: RolloutState) -> list[KindReport]:
        async with state.engine.connect() as connection:
            rows = list(await connection.execute(sa.select(
                devices.c.hwid, devices.c.model, devices.c.firmware, devices.c.boot).where(devices.c.hwid.is_not(None))))
        failures, unjudged = await state.judged(now, stage.policy(snapshot))
        halts = await state.halt_records()
        reports: dict[tuple[str, str], KindReport] = {}
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        for hwid, _, firmware, boot in rows:
            try:
                name = parse_device_name(hwid, snapshot.fixes)
            except InvalidDeviceName:
                continue
            device = DeviceIdentity(name.hwid, name.model, name.mac, cn=hwid, issuer="")
            choice = snapshot.choose(device)
            reported = {"prot": firmware, "boot": boot}
            for kind in KINDS:
                if not takes(name.model, kind):
                    continue
                entry = reports.setdefault((name.model.casefold(), kind), KindReport(name.model, kind))
                entry.devices += 1
                try:
                    declaration = stage.declaration(snapshot, choice) if not choice.problem else None
                except FirmwareError:
                    declaration = None
                if declaration is None:
                    entry.problems += 1
                    continue
                target = declaration.targets.get(kind)
                if target is None:
                    continue
                entry.targets[target] = entry.targets.get(target, 0) + 1
                if not differs(reported[kind], target):
                    entry.on_target += 1
                    continue
                placement = place(declaration.rollout, device.hwid, device.mac, choice.groups)
                opens = placement.opens.timestamp() if placement.opens and placement.opens > moment else None
                key = (placement.wave, opens)
                entry.pending[key] = entry.pending.get(key, 0) + 1
        for failure in failures:
            entry = reports.setdefault((failure.model, failure.kind), KindReport(failure.model.upper(), failure.kind))
            entry.failures.append(failure)
        for failure in unjudged:
            entry = reports.setdefault((failure.model, failure.kind), KindReport(failure.model.upper(), failure.kind))
            entry.unjudged.append(failure)
        for halt in halts:
            entry = reports.setdefault((halt.model, halt.kind), KindReport(halt.model.upper(), halt.kind))
            entry.halts.append(halt)
        return [reports[key] for key in sorted(reports)]

    return _with_state(settings, gather)


def resume(settings: Settings, model: str, kinds: Iterable[str], now: float) -> list[tuple[str, str, str]]:
    """Resume the halted targets of `model` (any case) and `kinds`; returns those resumed."""
    async def act(state: RolloutState) -> list[tuple[str, str, str]]:
        return await state.resume(model, list(kinds), now, by="configserver firmware resume")
    return _with_state(settings, act)


def halt_current(settings: Settings, model: str, kinds: Iterable[str], now: float) -> list[tuple[str, str]]:
    """Halt `model`'s current targets of `kinds` by hand, as the watch would; returns the
    (kind, build) halted. Raises FirmwareError when the model's declaration cannot be read."""
    store = content_store(settings, grace_seconds=0)
    store.refresh()
    targets = model_declaration(store.snapshot, model).targets
    chosen = [(kind, targets[kind]) for kind in kinds if kind in targets]

    async def act(state: RolloutState) -> None:
        for kind, build in chosen:
            await state.halt(model, kind, build, now, by="configserver firmware halt")
    _with_state(settings, act)
    return chosen


def halts(settings: Settings) -> frozenset[tuple[str, str, str]]:
    """The halted targets as every node reads them ((casefolded model, kind, build)), for
    `render`; none while there is no inventory yet. Raises InventoryError when the database
    cannot be used."""
    try:
        return _with_state(settings, RolloutState.refresh)
    except NoInventory:
        return frozenset()


class NoInventory(InventoryError):
    """The SQLite inventory the settings name has not been created yet."""


def _with_state(settings: Settings, action):  # type: ignore[no-untyped-def]
    url = database_url(settings.database)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise NoInventory(f"no inventory database at {url.database} (setting 'database'); "
                          "configserver serve creates it when it starts, or run configserver migrate")

    async def run():  # type: ignore[no-untyped-def]
        engine = open_engine(url)
        try:
            await migrate(engine)
            return await action(RolloutState(engine))
        except (SQLAlchemyError, OSError) as exc:
            raise InventoryError(f"cannot use the inventory database (setting 'database'): {explain(exc, url)}") from None
        finally:
            await engine.dispose()

    return asyncio.run(run())


def report_text(reports: list[KindReport], now: float) -> str:
    """The report as `configserver firmware` prints it."""
    if not reports:
        return "no device has polled yet: the inventory is empty\n"
    out: list[str] = []
    for entry in reports:
        if not (entry.targets or entry.halts or entry.failures or entry.unjudged or entry.problems):
            continue   # a kind nothing is declared for, of a model nothing was sent to
        what = _KIND_NAMES[entry.kind]
        targets = ", ".join(f"{build} ({count})" if len(entry.targets) > 1 else build
                            for build, count in sorted(entry.targets.items())) or "none declared"
        out.append(f"{entry.model} {what}: target {targets}")
        for halt in entry.halts:
            why = (f"{halt.failures} failed, halt_after {halt.threshold}" if halt.by == "watch" else halt.by)
            out.append(f"  HALTED {halt.build} since {_when(halt.since)} ({why}); "
                       f"resume with: configserver firmware resume {entry.model} --kind {entry.kind}")
        pending = sum(entry.pending.values())
        out.append(f"  devices {entry.devices}, on target {entry.on_target}, pending {pending}"
                   + (f", declaration unreadable {entry.problems} (run configserver check)" if entry.problems else ""))
        for (wave, opens), count in sorted(entry.pending.items(), key=lambda item: (item[0][0] is None, item[0])):
            name = "wave -" if wave is None else f"wave {wave}"
            state = "in no wave yet" if wave is None else (f"opens {_when(opens)}" if opens else "open")
            out.append(f"    {name}: {count} ({state})")
        for failure in sorted(entry.failures, key=lambda f: f.hwid):
            sent = f"  failed: {failure.hwid} sent {failure.build} at {_when(failure.first_sent_at)}, "
            if failure.last_seen is None or failure.last_seen <= failure.first_sent_at:
                out.append(sent + "silent since")
            else:
                out.append(sent + f"came back with {failure.reported or 'no build'} at {_when(failure.last_seen)}")
        for failure in sorted(entry.unjudged, key=lambda f: f.hwid):
            out.append(f"  cannot judge: {failure.hwid} sent {failure.build} at {_when(failure.first_sent_at)}, "
                       f"back at {_when(failure.last_seen)} but it has never reported a build "
                       f"(no {failure.kind.upper()}, nothing in ver): not counted as failed")
    return "\n".join(out) + "\n" if out else "no firmware or boot code is declared for the models seen\n"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
