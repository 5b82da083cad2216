"""The firmware stage of the poll pipeline: a device's declaration from one content snapshot,
its wave, the halted targets, and the lines of this poll.

The lines go above the device's script, outside its `CHECK` digest: they depend on what the
device reports and on the time, not on the templates, so a device never applies its script
again because its firmware changed. A node that serves polls hands the stage a RolloutState
(a Ledger) to note sends in and read halts from; `configserver render` and `check` use none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..caches import BoundedCache
from ..identity import DeviceIdentity
from ._decision import NO_LINES, FirmwareAnswer, decide
from ._declaration import Declaration, FirmwareError, Rollout, resolve
from ._rollout import place

_DECLARATIONS_KEPT = 4096   # distinct sets of vars files (and groups) one snapshot remembers


@dataclass(frozen=True, slots=True)
class Send:
    """One poll's firmware line for one device and kind, queued for `firmware_sent`."""

    device: str     # the inventory's key: the MAC
    hwid: str
    model: str
    kind: str
    build: str
    wave: int | None
    time: float


class Ledger(Protocol):
    """Where a serving node notes the files it sent and learns which targets are halted
    (RolloutState, over the inventory's database). Until it `knows_halts`, no file is sent."""

    def note(self, send: Send) -> None: ...

    def knows_halts(self) -> bool: ...

    def halted(self, model: str, kind: str, build: str) -> bool: ...


class KnownHalts:
    """The ledger of a preview (`configserver render`): the halts as read from the database
    (firmware/_state.py), and no send noted, since a preview sends nothing. `read` is called
    once, when a target is first looked at: a device with no firmware declared needs no database.
    It returns (casefolded model, kind, build) triples, as RolloutState.refresh() does."""

    def __init__(self, read: Callable[[], frozenset[tuple[str, str, str]]]) -> None:
        self._read = read
        self._halts: frozenset[tuple[str, str, str]] | None = None

    def note(self, send: Send) -> None:
        pass

    def knows_halts(self) -> bool:
        return True   # `read` answers or raises: `render` says so, and shows the lines unhalted

    def halted(self, model: str, kind: str, build: str) -> bool:
        if self._halts is None:
            self._halts = self._read()
        return (model.casefold(), kind, build) in self._halts


class _Source(Protocol):
    data: Any


class _Snapshot(Protocol):
    vars: Mapping[str, _Source]
    vars_lookup: Mapping[str, str]
    model_groups: Mapping[str, tuple[str, ...]]


class _Choice(Protocol):
    vars_files: tuple[str, ...]
    groups: tuple[str, ...]
    apply_once: bool


def firmware_layers(snapshot: _Snapshot, vars_files: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(file, its `firmware` table) for each of `vars_files` (in the vars order) that has one."""
    for name in vars_files:
        source = snapshot.vars.get(name)
        data = source.data if source is not None else None
        if name.endswith(".toml") and isinstance(data, Mapping) and "firmware" in data:
            yield name, data["firmware"]


def model_declaration(snapshot: _Snapshot, model: str) -> Declaration:
    """What the fleet, the model's groups and its model file declare for `model`, without any
    device's own file. Raises FirmwareError."""
    files = tuple(name for name in (snapshot.vars_lookup.get("default"),
                                    snapshot.vars_lookup.get(f"models/{model.casefold()}")) if name)
    return resolve(list(firmware_layers(snapshot, files)), snapshot.model_groups.get(model.casefold(), ()))


class FirmwareStage:
    """Decides one poll's firmware lines; notes sends in `state` when given one."""

    def __init__(self, state: Ledger | None = None) -> None:
        self.state = state
        self._of: object | None = None
        self._declarations: BoundedCache[tuple[tuple[str, ...], tuple[str, ...]], Declaration | FirmwareError] = (
            BoundedCache(_DECLARATIONS_KEPT))

    def declaration(self, snapshot: _Snapshot, choice: _Choice) -> Declaration:
        """The device's declaration (worked out once per set of vars files per snapshot).
        Raises FirmwareError for a malformed `[firmware]` table."""
        if self._of is not snapshot:   # a new snapshot: its files may say otherwise
            self._of, self._declarations = snapshot, BoundedCache(_DECLARATIONS_KEPT)
        key = (choice.vars_files, choice.groups)
        found = self._declarations.get(key)
        if found is None:
            try:
                found = resolve(list(firmware_layers(snapshot, choice.vars_files)), choice.groups)
            except FirmwareError as error:
                found = error
            self._declarations.put(key, found)
        if isinstance(found, FirmwareError):
            raise found
        return found

    def answer(
        self, snapshot: _Snapshot, choice: _Choice, device: DeviceIdentity, query: Mapping[str, str], now: dt.datetime,
    ) -> FirmwareAnswer:
        """The firmware lines of this poll. Raises FirmwareError for a malformed declaration."""
        declaration = self.declaration(snapshot, choice)
        if declaration.empty or not device.model:   # no model (`render` by MAC alone): no file name
            return NO_LINES
        placement = place(declaration.rollout, device.hwid, device.mac, choice.groups)
        state = self.state
        known = state is None or state.knows_halts()
        halted = () if state is None or not known else tuple(
            kind for kind, build in declaration.targets.items() if state.halted(device.model, kind, build))
        answer = decide(declaration, device.model, query, placement, now, halted, choice.apply_once, known)
        if state is not None:
            for kind, build in answer.sent.items():
                state.note(Send(device.mac, device.hwid, device.model, kind, build, placement.wave, now.timestamp()))
        return answer

    def policy(self, snapshot: _Snapshot) -> Callable[[str, str], Rollout | None]:
        """(model, kind) -> the model's rollout, for the watch over failures. Each model is
        resolved once per policy (one pass of the watch), however many failure rows name it."""
        found: dict[str, Rollout | None] = {}

        def rollout(model: str, kind: str) -> Rollout | None:
            key = model.casefold()   # the rollout is the model's, the same for both kinds
            if key not in found:
                try:
                    found[key] = model_declaration(snapshot, model).rollout
                except FirmwareError:
                    found[key] = None
            return found[key]
        return rollout
