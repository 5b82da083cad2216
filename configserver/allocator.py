"""What a worker asks of the C allocator, so that its memory follows what it holds.

glibc's malloc gives every thread that allocates an arena of its own (up to 8 per core: the
event loop, the audit writer, the database driver's thread, asyncio's thread pool), and each
arena keeps what was freed in it for the thread's next allocations. And what is freed in the
middle of a heap stays with the process until `malloc_trim` hands its pages back. A worker
that has rendered a fleet's scripts would otherwise keep the peak of every burst. Python's own
small objects live in its arenas and are not concerned.

An operator's own MALLOC_ARENA_MAX (or GLIBC_TUNABLES) wins. Elsewhere than glibc (musl,
macOS) both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

ARENAS = 2                # malloc arenas for all the threads of a worker
GIVE_BACK_SECONDS = 2.0   # how often a worker that answered polls meanwhile hands freed pages back (0.2-0.5 ms)
_M_ARENA_MAX = -8         # mallopt's parameter number (malloc.h)

log = logging.getLogger("configserver.allocator")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt, libc.malloc_trim   # noqa: B018 (both there, or not glibc)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def limit_arenas(count: int = ARENAS) -> bool:
    """Ask for at most `count` malloc arenas, unless the environment already says how many:
    threads that allocate from now on share them (arenas made before stay, and glibc keeps
    its own count once a process has had more than 8). Whether it was asked."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    _LIBC.mallopt(_M_ARENA_MAX, count)
    return True


def give_back() -> bool:
    """Hand the pages freed in the heap back to the operating system. Whether any were."""
    return _LIBC is not None and _LIBC.malloc_trim(0) == 1


async def give_back_while_busy(answered: Callable[[], int], seconds: float = GIVE_BACK_SECONDS) -> None:
    """Every `seconds`, when `answered()` has changed since the last look, `give_back` in a
    thread (0.2-0.5 ms; meanwhile the threads' own allocations in the arena it trims wait).
    Until cancelled; a failure is logged, and the next look tries again."""
    last = answered()
    while True:
        await asyncio.sleep(seconds)
        now = answered()
        if now != last:
            last = now
            try:
                await asyncio.to_thread(give_back)
            except Exception:   # nothing it does may stop the worker, nor its shutdown
                log.exception("giving freed memory back failed", extra={"fields": {"event": "give_back_failed"}})
