"""What the admin declares about firmware, read from the `[firmware]` table of the vars files.

The table is layered the way variables are, with one more level for groups of models:

    vars/default.toml [firmware]          the whole fleet
    [firmware.groups.<group>]             devices of that group's models (first group in the
                                          `groups` table's order wins), in any vars file
    vars/models/<model>.toml [firmware]   one model
    vars/devices/<mac or hwid>.toml       one device

Each level overrides the keys it names, key by key; `prot = false` (or `boot = false`) takes a
target back. Pure functions on values: nothing here reads files.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..durations import HOW, duration_seconds
from ..errors import ConfigserverError

KINDS = ("prot", "boot")   # firmware, boot code: innovaphone's names for them (UP0 prot / boot)

# What innovaphone builds look like (`13.4711`, `138912`, `13A127`, `04-5656`): letters, digits,
# dots and dashes, never a space (a serial on a command line) and never a `/` (a path in a URL).
BUILD = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,31}", re.ASCII)

_KEYS = frozenset({
    "prot", "boot", "url", "folder", "allow", "initial", "timezone", "fast_poll", "rollout", "groups",
})
_ROLLOUT_KEYS = frozenset({"start", "first", "waves", "halt_after", "watch"})
# The longest a wave may wait or a watch may last. Longer is a typo (a rollout planned years
# ahead is a start in the future), and unbounded it overflows a timedelta or a date.
LONGEST = dt.timedelta(days=3 * 366)


class FirmwareError(ConfigserverError, ValueError):
    """A `[firmware]` table cannot be understood; the text names the key and how to write it."""


@dataclass(frozen=True, slots=True)
class Wave:
    """Devices whose place in the fleet (0-100, see rollout.position) is below `share` may update
    from `start + after`. Shares count from the start: 5, then 25, then 100."""

    after: dt.timedelta
    share: float


@dataclass(frozen=True, slots=True)
class Rollout:
    """Who gets a new target when: the `first` devices from `start`, then the waves.

    `first` holds hwids and MACs (casefolded) and group names; `halt_after` failures halt the
    rollout, a failure being a device that was sent the firmware and, `watch` later, has not
    polled again or still reports another build.
    """

    start: dt.datetime | None = None
    first: frozenset[str] = frozenset()
    waves: tuple[Wave, ...] = ()
    halt_after: int = 3
    watch: dt.timedelta = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Window:
    """The maintenance window: `mod cmd UP1 times /allow <hours> /initial <minutes>`.

    `allow`: the hours (0-23, in the device's local time, `timezone`) in which the device runs
    its script at all; None: any hour. `initial`: no commands in the first minutes after boot.
    """

    allow: tuple[int, ...] | None = None
    initial: int | None = None
    timezone: str = "UTC"


DEFAULT_WINDOW = Window()   # the window of a declaration that names none


@dataclass(frozen=True, slots=True)
class Declaration:
    """One device's firmware declaration, all levels applied."""

    targets: Mapping[str, str]     # "prot"/"boot" -> build; a kind not named has no target
    url: str | None = None         # where the terminator serves the firmware folder, ends in `/`
    folder: str | None = None      # the same folder on this machine, for `configserver check`
    window: Window = DEFAULT_WINDOW
    fast_poll: int | None = None   # minutes between polls while a device is first provisioned
    rollout: Rollout | None = None

    @property
    def empty(self) -> bool:
        """Nothing to send: no target, no window, no fast polling."""
        return not self.targets and self.window == DEFAULT_WINDOW and self.fast_poll is None


NOTHING = Declaration(targets={})


def resolve(layers: Sequence[tuple[str, Mapping[str, Any]]], groups: Sequence[str] = ()) -> Declaration:
    """The declaration of one device from its vars files' `[firmware]` tables.

    `layers`: (file name, its `firmware` table) in the vars order, `default.toml` first when
    present; `groups`: the device's model's groups in the `groups` table's order. Raises
    FirmwareError naming the file and key of anything malformed.
    """
    fleet: list[tuple[str, Mapping[str, Any]]] = []
    narrower: list[tuple[str, Mapping[str, Any]]] = []
    group_tables: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for name, table in layers:
        if not isinstance(table, Mapping):
            raise FirmwareError(f"{name}: firmware must be a table ([firmware])")
        _check_keys(name, "firmware", table, _KEYS)
        found = table.get("groups", {})
        if not isinstance(found, Mapping) or not all(isinstance(v, Mapping) for v in found.values()):
            raise FirmwareError(f"{name}: firmware.groups must hold tables, [firmware.groups.<group>]")
        for group, values in found.items():
            _check_keys(name, f"firmware.groups.{group}", values, _KEYS - {"groups"})
            group_tables[group.casefold()] = (name, values)
        (fleet if name == "default.toml" else narrower).append((name, table))
    ordered = list(fleet)
    ordered += [group_tables[g.casefold()] for g in reversed(groups) if g.casefold() in group_tables]
    ordered += narrower
    values: dict[str, tuple[str, Any]] = {}   # key -> (file that set it, value)
    for name, table in ordered:
        for key, value in table.items():
            if key != "groups":
                values[key] = (name, value)
    return _declaration(values)


def _declaration(values: Mapping[str, tuple[str, Any]]) -> Declaration:
    targets: dict[str, str] = {}
    for kind in KINDS:
        if kind in values:
            name, build = values[kind]
            if build is False:
                continue
            if not isinstance(build, str) or not BUILD.fullmatch(build):
                raise FirmwareError(
                    f"{name}: firmware.{kind} = {build!r} is not a build: give it as innovaphone "
                    f"writes it, e.g. \"138912\" or \"13.4711\" (letters, digits, dots, dashes), or false")
            targets[kind] = build
    url = _text(values, "url")
    if url is not None:
        check_url(url, values["url"][0])
    if targets and url is None:
        raise FirmwareError(f"{values[next(iter(targets))][0]}: firmware.{next(iter(targets))} is set but "
                            "no firmware.url says where the files are (e.g. url = \"http://fw.example.com/firmware/\")")
    return Declaration(
        targets=targets,
        url=url,
        folder=_text(values, "folder"),
        window=_window(values),
        fast_poll=_minutes(values, "fast_poll", low=1),
        rollout=_rollout(*values["rollout"]) if "rollout" in values else None,
    )


def check_url(url: str, where: str = "firmware") -> None:
    """Raise FirmwareError unless `url` is a folder URL a device can fetch from: http or https,
    a host, a path ending in `/`, no query, no fragment, nothing a command line would split."""
    parts = urllib.parse.urlsplit(url)
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif not parts.hostname:
        problem = "names no host"
    elif parts.query or parts.fragment or "?" in url or "#" in url:
        problem = "must not carry a query or fragment"
    elif not parts.path.endswith("/"):
        problem = "must end in '/': it names the folder, the build and file name are added to it"
    elif any(ch.isspace() or ord(ch) < 0x21 or ord(ch) > 0x7E for ch in url):
        problem = "must be plain ASCII without spaces (percent-encode the rest)"
    if problem:
        raise FirmwareError(f"{where}: firmware.url = {url!r} {problem}")


def _text(values: Mapping[str, tuple[str, Any]], key: str) -> str | None:
    if key not in values:
        return None
    name, value = values[key]
    if not isinstance(value, str) or not value:
        raise FirmwareError(f"{name}: firmware.{key} must be a non-empty string")
    return value


def _minutes(values: Mapping[str, tuple[str, Any]], key: str, low: int) -> int | None:
    if key not in values:
        return None
    name, value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1440:
        raise FirmwareError(f"{name}: firmware.{key} must be a number of minutes, {low} to 1440")
    return value


def _window(values: Mapping[str, tuple[str, Any]]) -> Window:
    allow = None
    if "allow" in values:
        name, hours = values["allow"]
        if (not isinstance(hours, (list, tuple)) or not hours
                or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in hours)):
            raise FirmwareError(f"{name}: firmware.allow must list hours 0 to 23, e.g. [22, 23, 0, 1, 2, 3, 4]")
        allow = tuple(dict.fromkeys(hours))
    timezone = _text(values, "timezone") or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise FirmwareError(f"{values['timezone'][0]}: firmware.timezone = {timezone!r} is no time zone "
                            "(write one like \"Europe/Berlin\" or \"UTC\")") from None
    return Window(allow, _minutes(values, "initial", low=0), timezone)


def _rollout(name: str, table: Any) -> Rollout:
    if not isinstance(table, Mapping):
        raise FirmwareError(f"{name}: firmware.rollout must be a table ([firmware.rollout])")
    _check_keys(name, "firmware.rollout", table, _ROLLOUT_KEYS)
    start = table.get("start")
    if start is not None and (not isinstance(start, dt.datetime) or start.tzinfo is None):
        raise FirmwareError(f"{name}: firmware.rollout.start must be a date and time with its offset, "
                            "e.g. 2026-12-01T22:00:00Z")
    first = table.get("first", [])
    if not isinstance(first, (list, tuple)) or not all(isinstance(item, str) and item for item in first):
        raise FirmwareError(f"{name}: firmware.rollout.first must list groups, hwids or MACs")
    waves: list[Wave] = []
    previous = Wave(dt.timedelta(0), 0.0)
    for index, wave in enumerate(table.get("waves", [])):
        where = f"{name}: firmware.rollout.waves[{index}]"
        if not isinstance(wave, Mapping) or set(wave) != {"after", "share"}:
            raise FirmwareError(f"{where} must be {{ after = \"1d\", share = 5 }}")
        share = wave["share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 100:
            raise FirmwareError(f"{where}: share must be a percentage above 0, at most 100")
        after = duration(wave["after"], f"{where}: after")
        if share <= previous.share or after < previous.after:
            raise FirmwareError(f"{where}: shares count from the start, so each wave's share and "
                                "`after` must be larger than the one before (5, 25, 100)")
        previous = Wave(after, float(share))
        waves.append(previous)
    if waves and start is None:
        raise FirmwareError(f"{name}: firmware.rollout.waves need a start (start = 2026-12-01T22:00:00Z)")
    if waves and start is not None and start > dt.datetime.max.replace(tzinfo=dt.UTC) - LONGEST - dt.timedelta(days=2):
        # start + after must be a date: one this close to year 9999 is a typo
        raise FirmwareError(f"{name}: firmware.rollout.start = {start.isoformat()} is too far ahead: "
                            "its waves would open after the last date there is")
    halt_after = table.get("halt_after", 3)
    if isinstance(halt_after, bool) or not isinstance(halt_after, int) or halt_after < 1:
        raise FirmwareError(f"{name}: firmware.rollout.halt_after must be a number of failed devices, 1 or more")
    watch = duration(table.get("watch", "1h"), f"{name}: firmware.rollout.watch")
    return Rollout(start, frozenset(item.casefold() for item in first), tuple(waves), halt_after, watch)


def duration(text: Any, where: str) -> dt.timedelta:
    """`30m`, `12h`, `1d`, `2w` or `1d12h` as a timedelta, at most LONGEST; FirmwareError naming
    `where` otherwise."""
    seconds = duration_seconds(text)
    if seconds is None:
        raise FirmwareError(f"{where} = {text!r} is not a duration: {HOW}")
    if seconds > LONGEST.total_seconds():
        raise FirmwareError(f"{where} = {text!r} is longer than {LONGEST.days} days: "
                            "for a rollout that far ahead, move its start instead")
    return dt.timedelta(seconds=seconds)


def _check_keys(name: str, where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(str(key) for key in table if key not in allowed)
    if unknown:
        raise FirmwareError(f"{name}: {where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(allowed))})")
