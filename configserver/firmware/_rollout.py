"""Rollout waves: which wave a device belongs to, and when its wave opens.

A device's place in the fleet is a number from 0 to 100 taken from a SHA-256 of its hwid: the
same on every node, in every process and after every restart (Python's own `hash()` is salted
per process and would be none of these), and it never moves, so a device never jumps between
waves. Wave 0 is the rollout's `first` devices; wave n (1, 2, ...) holds the devices whose place
is below the n-th wave's share and not below the share of the wave before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ._declaration import Rollout

FIRST = 0          # the wave of the rollout's `first` devices


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a device stands in a rollout: its wave (None: in none yet, as when the last share
    is below 100) and when that wave opens (None: at once)."""

    wave: int | None
    opens: dt.datetime | None

    def open_at(self, now: dt.datetime) -> bool:
        """Whether the device may be sent its target at `now`."""
        return self.wave is not None and (self.opens is None or now >= self.opens)


AT_ONCE = Placement(FIRST, None)

def position(hwid: str) -> float:
    """The device's place in the fleet, 0 <= place < 100, from its hwid alone (any case)."""
    # worked out on every poll (0.8 us): kept for a fleet, it would weigh about 8 MB
    digest = hashlib.sha256(b"configserver wave " + hwid.casefold().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def place(rollout: Rollout | None, hwid: str, mac: str, groups: Sequence[str] = ()) -> Placement:
    """The device's wave and when it opens. Without a rollout every device may update at once."""
    if rollout is None:
        return AT_ONCE
    first = rollout.first
    if first and (hwid.casefold() in first or mac.casefold() in first or mac.replace("-", "").casefold() in first
                  or any(group.casefold() in first for group in groups)):
        return Placement(FIRST, rollout.start)
    if not rollout.waves:
        # a rollout that names only its first devices: the rest wait for the admin's next word
        return Placement(None, None) if rollout.first else Placement(FIRST, rollout.start)
    where = position(hwid)
    for number, wave in enumerate(rollout.waves, start=1):
        if where < wave.share:
            assert rollout.start is not None   # the declaration requires it with waves
            return Placement(number, rollout.start + wave.after)
    return Placement(None, None)
