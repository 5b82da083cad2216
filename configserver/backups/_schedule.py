"""When a device is asked for its configuration: once per interval at a time of its own, and
whenever an admin asks for it now.

Each device's time in the interval comes from a hash of its hwid, so a fleet spreads its uploads
over the whole interval instead of uploading at once, and every node of a cluster computes the
same time. Pure functions: the caller brings the clock and what it knows of past uploads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

# A device that was asked and did not upload (an old firmware, a terminator that refuses the
# upload) is asked again after this long, not on every poll.
ASK_AGAIN_SECONDS = 3600.0
# An admin's "now" request stays in force this long for devices that have not polled yet.
REQUEST_SECONDS = 7 * 86400.0

ALL = "all"

def slot_offset(hwid: str, interval: float) -> float:
    """Seconds into each interval at which this device's backup falls due: the same on every
    node and after every restart (SHA-256 of the lower-case hwid, not Python's salted hash)."""
    if interval <= 0:
        return 0.0
    # worked out on every poll (0.8 us): kept for a fleet, it would weigh about 8 MB
    digest = hashlib.sha256(hwid.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


def slot_start(hwid: str, interval: float, now: float) -> float:
    """The latest time at or before `now` at which this device's backup fell due."""
    offset = slot_offset(hwid, interval)
    return math.floor((now - offset) / interval) * interval + offset


def device_targets(mac: str, hwid: str, model: str) -> tuple[str, ...]:
    """The request targets that name this device: itself (by MAC), its model, everyone."""
    return (f"device:{mac.lower()}", f"model:{model.lower()}", ALL)


def device_target(mac: str) -> str:
    """The request target for one device, by its MAC as `00-90-33-30-00-af`."""
    return f"device:{mac.lower()}"


def model_target(model: str) -> str:
    """The request target for every device of a model."""
    return f"model:{model.lower()}"


@dataclass(frozen=True, slots=True)
class Knowledge:
    """What a node knows about one device's backups when it polls (unix seconds, None: never)."""

    last_upload: float | None = None   # the newest configuration upload, on any node
    asked: float | None = None         # when this node last put the request into its answer
    requested: float | None = None     # the newest admin request naming this device, its model or all


def is_due(
    hwid: str, now: float, interval: float, known: Knowledge, since: float,
) -> bool:
    """Whether this poll's answer should ask the device for its configuration.

    Due when an admin request is newer than the last upload, or when the device's slot in the
    current interval has passed since its last upload; a device with no upload counts from
    `since` (when this node started knowing), so a new fleet spreads over the interval too.
    Once asked, a device is asked again only after ASK_AGAIN_SECONDS, unless a newer request
    came. `interval` 0 turns the schedule off: only requests ask.
    """
    uploaded, asked = known.last_upload, known.asked
    if known.requested is not None and now - known.requested < REQUEST_SECONDS:
        if uploaded is None or known.requested > uploaded:
            if asked is None or asked < known.requested or now - asked >= ASK_AGAIN_SECONDS:
                return True
    if interval <= 0:
        return False
    baseline = uploaded if uploaded is not None else since
    if slot_start(hwid, interval, now) <= baseline:
        return False
    return asked is None or now - asked >= ASK_AGAIN_SECONDS


def newest_request(requests: dict[str, float], targets: Iterable[str]) -> float | None:
    """The newest time among the requests for any of `targets`, or None."""
    times = [requests[target] for target in targets if target in requests]
    return max(times) if times else None
