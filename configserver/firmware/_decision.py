"""The decision: from a device's declaration, what it reports and the time, to the lines it gets.

The lines go first in the answer, above the script and outside its `CHECK` digest (they depend
on the poll, not on the templates), in innovaphone's own server's order:

    mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 10     the maintenance window
    mod cmd UP1 provision 1                                  fast polling while first provisioned
    mod cmd UP0 prot http://fw.example.com/firmware/13.4711/ip232.bin ser 13.4711
    mod cmd UP0 boot http://fw.example.com/firmware/13.4711/boot232.bin ser 13.4711
    iresetn                                                  only after a prot or boot line

`iresetn` resets the device only if it downloaded something; the rest of the answer follows it,
as with innovaphone's server, so a device whose firmware is current runs its script at once.

Nothing the device reports reaches a line: the URL is the declared folder, the declared build
and innovaphone's file name for the model of the device's certificate; the build is the
declared one. What the device reports only decides whether a line is sent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from zoneinfo import ZoneInfo

from ..innovaphone import (
    NO_BOOT_MODELS,
    NO_FIRMWARE_MODELS,
    firmware_file_name,
    reported_build,
)
from ._declaration import BUILD, KINDS, Declaration, Window
from ._rollout import Placement

# What was decided for one kind (prot, boot), in the words `configserver firmware` and the log use.
TAKES_NONE = "model takes none"
NO_TARGET = "no target"
ON_TARGET = "on target"
HALTED = "halted"
HALTS_UNKNOWN = "halts not known yet"
WAITING = "wave not open"
OUTSIDE_WINDOW = "outside window"
SENT = "sent"


@dataclass(frozen=True, slots=True)
class FirmwareAnswer:
    """The lines for one poll (CRLF-less), what was decided per kind, and the builds sent."""

    lines: tuple[str, ...] = ()
    verdicts: Mapping[str, str] = field(default_factory=dict)
    sent: Mapping[str, str] = field(default_factory=dict)   # kind -> build sent on this poll

    @property
    def text(self) -> str:
        """The lines as they go in the answer, each ending in CRLF."""
        return "".join(f"{line}\r\n" for line in self.lines)


NO_LINES = FirmwareAnswer()


def takes(model: str, kind: str) -> bool:
    """Whether devices of `model` take updates of `kind` ("prot" or "boot") at all."""
    excluded = NO_FIRMWARE_MODELS if kind == "prot" else NO_BOOT_MODELS
    return model.casefold() not in excluded


def file_url(declaration: Declaration, model: str, kind: str) -> str:
    """Where a device of `model` fetches its target of `kind`: `<url><build>/<file name>`."""
    return f"{declaration.url}{declaration.targets[kind]}/{firmware_file_name(model, kind)}"


@lru_cache(maxsize=4096)   # a fleet has few models and targets, and polls them over and over
def _line(url: str, build: str, model: str, kind: str) -> str:
    return f"mod cmd UP0 {kind} {url}{build}/{firmware_file_name(model, kind)} ser {build}"


def differs(reported: str | None, target: str) -> bool:
    """Whether a reported build is not the target: no build, or a value that is no build at all,
    differs; builds compare without regard to case."""
    if reported is None or not BUILD.fullmatch(reported.strip()):
        return True
    return reported.strip().casefold() != target.casefold()


def window_open(window: Window, now: dt.datetime, provisioning: bool) -> bool:
    """Whether the device runs its script now: inside the allowed hours of its local time, or
    always while it is first provisioned (its `times` line then has no /allow)."""
    if window.allow is None or provisioning:
        return True
    return now.astimezone(ZoneInfo(window.timezone)).hour in window.allow


@lru_cache(maxsize=256)
def times_line(window: Window, provisioning: bool) -> str | None:
    """`mod cmd UP1 times ...` for the window, or None when it would say nothing. A device being
    provisioned gets no /allow, as innovaphone's server does it: its site configuration (and
    firmware) must not wait for the night."""
    parts: list[str] = []
    if window.allow is not None and not provisioning:
        parts.append("/allow " + ",".join(str(hour) for hour in window.allow))
    if window.initial is not None:
        parts.append(f"/initial {window.initial}")
    # a bare `times` (allow while provisioning, no initial) would say nothing: no line
    return "mod cmd UP1 times " + " ".join(parts) if parts else None


def decide(
    declaration: Declaration,
    model: str,
    reported: Mapping[str, str],
    placement: Placement,
    now: dt.datetime,
    halted: Collection[str] = (),
    apply_once: bool = True,
    halts_known: bool = True,
) -> FirmwareAnswer:
    """The firmware lines for one poll.

    `model`: from the device's certificate; `reported`: the device's own query arguments
    (`PROT`, `BOOT`, `ver`, `CHECK`; untrusted; the build is read by innovaphone.reported_build,
    as the inventory and the failure watch read it); `placement`: its wave; `halted`: the kinds whose
    rollout is halted for its target; `apply_once`: whether the device's template is applied
    once (the Choice says); `halts_known`: False while the node serving the poll has not read
    the halted targets yet, when it sends no file at all (a halt it does not know of would be
    sent), only the `times` and `provision` lines. A device that reports no `CHECK` is being provisioned for the first
    time (its serial is empty until it applies a script), but only where scripts are applied
    once: otherwise it is never sent a check line, never reports one, and would count as being
    provisioned forever. Such a device is never provisioning: no fast polling, the window holds.
    """
    if declaration.empty:
        return NO_LINES
    provisioning = apply_once and not reported.get("CHECK")
    lines: list[str] = []
    times = times_line(declaration.window, provisioning)
    if times:
        lines.append(times)
    if declaration.fast_poll is not None and apply_once:
        lines.append(f"mod cmd UP1 provision {declaration.fast_poll if provisioning else 0}")
    verdicts: dict[str, str] = {}
    sent: dict[str, str] = {}
    for kind in KINDS:
        target = declaration.targets.get(kind)
        if not takes(model, kind):
            verdicts[kind] = TAKES_NONE
        elif target is None:
            verdicts[kind] = NO_TARGET
        elif not differs(reported_build(reported, kind), target):
            verdicts[kind] = ON_TARGET
        elif kind in halted:
            verdicts[kind] = HALTED
        elif not halts_known:
            verdicts[kind] = HALTS_UNKNOWN
        elif not placement.open_at(now):
            verdicts[kind] = WAITING
        elif not window_open(declaration.window, now, provisioning):
            verdicts[kind] = OUTSIDE_WINDOW
        else:
            verdicts[kind] = SENT
            sent[kind] = target
            lines.append(_line(declaration.url, target, model, kind))  # type: ignore[arg-type]
    if sent:
        lines.append("iresetn")
    return FirmwareAnswer(tuple(lines), verdicts, sent)
