"""The rollout's state, shared by every node through the inventory's database.

* Sends: which build each device was sent, and since when (`firmware_sent`). Polls only queue
  them; `flush()` writes the queue, off the poll path.
* Failures: a device sent a build at least `watch` ago that still reports another one (it came
  back with the old build, or has not come back at all). The build it reports is the one the
  inventory keeps (`devices.firmware`, `devices.boot`).
* Halts (`firmware_rollouts`): once a target's failures since its last resume reach the
  rollout's `halt_after`, any node halts it; the poll path reads the halted targets from memory,
  refreshed by `refresh()`. Until a `refresh()` has answered, and again once the last answer is
  older than HALTS_KEPT, they are not known, and the poll path sends no file at all: a node that
  (re)starts while the database is away, or is cut off from it while other nodes are not, must
  not send a target another node halted meanwhile. Only an admin resumes a halted target.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..inventory import devices
from ._decision import differs
from ._declaration import Rollout
from ._stage import Send
from ._tables import firmware_rollouts, firmware_sent

log = logging.getLogger("configserver.firmware")

_QUEUE_KEPT = 100_000
HALTED_STATE = "halted"
RESUMED_STATE = "resumed"
_REPORTED_COLUMN = {"prot": devices.c.firmware, "boot": devices.c.boot}
# How old the last read of the halts may be before the node stops sending files: six passes of
# the watch (firmware/_watch.py INTERVAL, 5 s), so five reads in a row may fail (a database
# restart, a failover) without stopping a rollout, while a node cut off from the database sends
# a build another node halted for at most this long after its last read. Withholding a file
# costs a delay; sending a halted build can cost a device.
HALTS_KEPT = 30.0

Target = tuple[str, str, str]   # (casefolded model, kind, build)
Policy = Callable[[str, str], "Rollout | None"]   # (model, kind) -> the model's rollout


@dataclass(frozen=True, slots=True)
class Failure:
    """A device that was sent `build` and, `watch` later, does not report it."""

    hwid: str
    model: str
    kind: str
    build: str
    reported: str | None
    first_sent_at: float
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class Halt:
    """A halted target: no device that is not on it yet is sent it, until an admin resumes it."""

    model: str
    kind: str
    build: str
    since: float
    failures: int
    threshold: int
    by: str


class RolloutState:
    """The sends queued by this node, and the halted targets as last read from the database."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: seconds, for the age of the last read of the halts."""
        self.engine = engine
        self._clock = clock
        # append and popleft are atomic: safe from any thread. Bounded: with the database away
        # for long, the oldest sends go (a device sent its file again is noted again)
        self._queue: deque[Send] = deque(maxlen=_QUEUE_KEPT)
        self._halted: frozenset[Target] | None = None   # not read yet
        self._read_at = float("-inf")   # when the last read that answered began

    # -- the poll path: memory only ---------------------------------------------------------

    def note(self, send: Send) -> None:
        """Queue one send. Never blocks, never touches the database."""
        self._queue.append(send)

    def knows_halts(self) -> bool:
        """Whether a `refresh()` has answered within the last HALTS_KEPT seconds: otherwise
        nothing may be sent."""
        return self._halted is not None and self.halts_age() <= HALTS_KEPT

    def halts_age(self) -> float:
        """Seconds since the last read of the halts that answered began (infinite: never)."""
        return self._clock() - self._read_at

    def halted(self, model: str, kind: str, build: str) -> bool:
        """Whether the target is halted, as of the last `refresh()` (none before the first: ask
        `knows_halts`)."""
        return (model.casefold(), kind, build) in self.halts

    @property
    def halts(self) -> frozenset[Target]:
        """The halted targets as last read, however long ago; none before the first `refresh()`."""
        return self._halted if self._halted is not None else frozenset()

    # -- the background: database -----------------------------------------------------------

    async def flush(self) -> int:
        """Write the queued sends. A device sent the build it was sent before keeps the time it
        was first sent. Returns how many sends were written. When the write fails, the sends stay
        queued (in their order) for the next pass, and the error is raised."""
        batch: list[Send] = []
        while self._queue:
            batch.append(self._queue.popleft())
        if not batch:
            return 0
        latest: dict[tuple[str, str], Send] = {}
        counts: dict[tuple[str, str], int] = {}
        firsts: dict[tuple[str, str], Send] = {}
        for send in batch:   # one row per device and kind; the batch may hold several polls
            key = (send.device, send.kind)
            if key not in latest or latest[key].build != send.build:
                firsts[key], counts[key] = send, 0
            latest[key] = send
            counts[key] += 1
        try:
            async with self.engine.begin() as connection:
                for key, send in latest.items():
                    await _store_send(connection, firsts[key], send, counts[key])
        except BaseException:
            # not written: the batch goes back in front of what polls queued meanwhile, so a device
            # that bricks after its send is still counted. Still bounded: when the queue is full,
            # extendleft drops the newest (those devices are noted again on their next poll).
            self._queue.extendleft(reversed(batch))
            raise
        return len(batch)

    async def refresh(self) -> frozenset[Target]:
        """Read the halted targets (every node's halts and resumes)."""
        began = self._clock()   # what was read is as old as the query, not as its answer
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(firmware_rollouts.c.model, firmware_rollouts.c.kind, firmware_rollouts.c.build)
                .where(firmware_rollouts.c.state == HALTED_STATE))
            halted = frozenset((model, kind, build) for model, kind, build in rows)
        self._halted, self._read_at = halted, began
        return halted

    async def failures(self, now: float, policy: Policy) -> list[Failure]:
        """Every device that was sent a build at least its model's `watch` ago (counted from the
        target's last resume) and does not report that build now."""
        return (await self.judged(now, policy))[0]

    async def judged(self, now: float, policy: Policy) -> tuple[list[Failure], list[Failure]]:
        """(failures, devices that cannot be judged): the second are devices that came back after
        the watch and have never reported a build of that kind (no `PROT`/`BOOT`, nothing in `ver`),
        neither before their send nor since. They may well have taken it; the watch does not
        count them, `configserver firmware` names them. (The inventory keeps the last build a
        device reported, so an empty column means it never reported one.)"""
        resumed = await self._resumes()
        found: list[Failure] = []
        unjudged: list[Failure] = []
        async with self.engine.connect() as connection:
            for kind, reported_column in _REPORTED_COLUMN.items():
                # devices that report the build they were sent are done: the database leaves them
                # out (most of a fleet, once a rollout is through), `differs` judges the rest
                rows = await connection.execute(
                    sa.select(firmware_sent.c.hwid, firmware_sent.c.model, firmware_sent.c.build,
                              firmware_sent.c.first_sent_at, reported_column, devices.c.last_seen)
                    .select_from(firmware_sent.outerjoin(devices, devices.c.device == firmware_sent.c.device))
                    .where(firmware_sent.c.kind == kind,
                           sa.or_(reported_column.is_(None), reported_column != firmware_sent.c.build)))
                for hwid, model, build, first_sent_at, reported, last_seen in rows:
                    rollout = policy(model, kind) or Rollout()
                    if first_sent_at < resumed.get((model, kind, build), float("-inf")):
                        continue
                    if now - first_sent_at < rollout.watch.total_seconds():
                        continue
                    if not differs(reported, build):
                        continue
                    failure = Failure(hwid, model, kind, build, reported, first_sent_at, last_seen)
                    came_back = last_seen is not None and last_seen > first_sent_at
                    (unjudged if reported is None and came_back else found).append(failure)
        return found, unjudged

    async def watch(self, now: float, policy: Policy) -> list[Halt]:
        """Halt every target whose failures reached its rollout's `halt_after`. Returns the new
        halts (each logged); any node may run this, a target is halted once."""
        counts: dict[Target, int] = {}
        for failure in await self.failures(now, policy):
            target = (failure.model, failure.kind, failure.build)
            counts[target] = counts.get(target, 0) + 1
        halts: list[Halt] = []
        for (model, kind, build), failures in sorted(counts.items()):
            threshold = (policy(model, kind) or Rollout()).halt_after
            if failures < threshold or (model, kind, build) in self.halts:
                continue
            halt = Halt(model, kind, build, now, failures, threshold, "watch")
            if await self._set_state(halt, HALTED_STATE):
                halts.append(halt)
                log.warning("firmware rollout halted", extra={"fields": {
                    "event": "firmware_halt", "model": model, "kind": kind, "build": build,
                    "failures": failures, "halt_after": threshold,
                }})
        if halts:
            await self.refresh()
        return halts

    async def halt(self, model: str, kind: str, build: str, now: float, by: str = "admin") -> None:
        """Halt a target by hand."""
        await self._set_state(Halt(model.casefold(), kind, build, now, 0, 0, by), HALTED_STATE, force=True)
        await self.refresh()

    async def resume(self, model: str, kinds: Iterable[str], now: float, by: str = "admin") -> list[Target]:
        """Resume every halted target of `model` and `kinds`; failures count again from `now`.
        Returns the targets resumed."""
        resumed: list[Target] = []
        async with self.engine.begin() as connection:
            rows = await connection.execute(
                sa.select(firmware_rollouts.c.build, firmware_rollouts.c.kind)
                .where(firmware_rollouts.c.model == model.casefold(), firmware_rollouts.c.kind.in_(list(kinds)),
                       firmware_rollouts.c.state == HALTED_STATE))
            for build, kind in list(rows):
                await connection.execute(
                    firmware_rollouts.update()
                    .where(firmware_rollouts.c.model == model.casefold(), firmware_rollouts.c.kind == kind,
                           firmware_rollouts.c.build == build)
                    .values(state=RESUMED_STATE, changed_at=now, by=by))
                resumed.append((model.casefold(), kind, build))
        for model_cf, kind, build in resumed:
            log.warning("firmware rollout resumed", extra={"fields": {
                "event": "firmware_resume", "model": model_cf, "kind": kind, "build": build, "by": by}})
        await self.refresh()
        return resumed

    async def halt_records(self) -> list[Halt]:
        """Every halted target, with when and why."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(firmware_rollouts).where(firmware_rollouts.c.state == HALTED_STATE)
                .order_by(firmware_rollouts.c.model, firmware_rollouts.c.kind))
            return [Halt(r.model, r.kind, r.build, r.changed_at, r.failures, r.threshold, r.by) for r in rows]

    async def sends(self) -> dict[tuple[str, str], tuple[str, float]]:
        """(device, kind) -> (build, first sent at) for every device ever sent a file."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(sa.select(
                firmware_sent.c.device, firmware_sent.c.kind, firmware_sent.c.build, firmware_sent.c.first_sent_at))
            return {(device, kind): (build, first) for device, kind, build, first in rows}

    async def _resumes(self) -> dict[Target, float]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(firmware_rollouts.c.model, firmware_rollouts.c.kind, firmware_rollouts.c.build,
                          firmware_rollouts.c.changed_at)
                .where(firmware_rollouts.c.state == RESUMED_STATE))
            return {(model, kind, build): changed for model, kind, build, changed in rows}

    async def _set_state(self, halt: Halt, state: str, force: bool = False) -> bool:
        """Mark the target halted. False when another node (or an earlier pass) did it first."""
        values: dict[str, Any] = {
            "state": state, "changed_at": halt.since, "failures": halt.failures,
            "threshold": halt.threshold, "by": halt.by,
        }
        key = (firmware_rollouts.c.model == halt.model, firmware_rollouts.c.kind == halt.kind,
               firmware_rollouts.c.build == halt.build)
        async with self.engine.begin() as connection:
            guard = () if force else (firmware_rollouts.c.state != HALTED_STATE,)
            updated = await connection.execute(firmware_rollouts.update().where(*key, *guard).values(**values))
            if updated.rowcount:
                return True
            exists = await connection.scalar(sa.select(sa.func.count()).select_from(firmware_rollouts).where(*key))
            if exists:
                return False
            try:
                await connection.execute(firmware_rollouts.insert().values(
                    model=halt.model, kind=halt.kind, build=halt.build, **values))
            except IntegrityError:   # another node halted it at the same moment
                return False
        return True


async def _store_send(connection: AsyncConnection, first: Send, last: Send, count: int) -> None:
    key = (firmware_sent.c.device == last.device, firmware_sent.c.kind == last.kind)
    same = await connection.execute(
        firmware_sent.update().where(*key, firmware_sent.c.build == last.build)
        .values(last_sent_at=last.time, sends=firmware_sent.c.sends + count, hwid=last.hwid, wave=last.wave))
    if same.rowcount:
        return
    await connection.execute(firmware_sent.delete().where(*key))
    await connection.execute(firmware_sent.insert().values(
        device=last.device, kind=last.kind, hwid=last.hwid, model=last.model.casefold(), build=last.build,
        wave=last.wave, first_sent_at=first.time, last_sent_at=last.time, sends=count))
