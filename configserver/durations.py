"""Durations as admins write them, in settings, commands and vars files: `30m`, `12h`, `7d`,
`2w`, `1d12h`, `1.5d`. One grammar for the whole project; each caller sets its own bounds.

A pure function on text.
"""

from __future__ import annotations

import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
HOW = "write a number and a unit, like 30m, 12h, 7d or 2w (s seconds, m minutes, h hours, d days, w weeks)"
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+", re.ASCII)
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.ASCII)


def duration_seconds(text: object) -> float | None:
    """The seconds `text` stands for, or None when it is not a duration (a bare number included).

    A float, never an overflow: an absurd length comes out huge (or infinite) for the caller's
    bound to refuse.
    """
    if not isinstance(text, str):
        return None
    compact = text.strip().lower().replace(" ", "")
    if not _DURATION.fullmatch(compact):
        return None
    return sum(float(number) * UNITS[unit] for number, unit in _PART.findall(compact))
