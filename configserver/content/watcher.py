"""Watching the templates and vars folders: file events, scans, and the grace window.

The operating system tells us which files changed (inotify, through `watchfiles`); a refresh
looks at those files only and publishes a new immutable Snapshot that shares everything else
with the one before; an event on a file is one on every symlinked file that names it too. A
slow full rescan (`rescan_seconds`) stays as a safety net for what file events miss: network
file systems, an overflowed event queue.

A poll reads `store.snapshot` once and uses that snapshot from start to end. A file modified
less than `grace_seconds` ago is not read yet: the snapshot keeps the last version that was
complete, so a file being written never yields half a script, and a change spread over several
files (a git checkout, an rsync) is taken at once instead of file by file. A file that has kept
changing for RESTLESS_GRACES grace windows holds nothing back from then on: it is published
alone, each time it settles; and an edit that has settled waits HELD_GRACES grace windows at most.

Nothing outside the two folders is ever read: hidden files and editors' leftovers are skipped,
symlinked folders are not entered, and a symlinked file counts only when it points at a file
inside the same folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .snapshot import (
    PASSING_ERRNOS,
    ContentRules,
    Snapshot,
    SourceFile,
    Stamp,
    empty_snapshot,
    opened_at,
    read_text,
    stamp_mtime_ns,
    stamp_of,
    template_version,
)
from .variables import parse_vars

log = logging.getLogger("configserver.content")

RESCAN_SECONDS = 600.0   # the safety net's period; file events do the real work
READ_AT_ONCE = 1000      # changed templates read before publishing; more are read on first use
FOLDER_CHECK_SECONDS = 5.0   # how soon a folder that went, came back or was replaced is seen
WAITING_MAX = 100        # polls that may wait at once for the next snapshot (newer_than)
# A change spread over several files is published whole, once all of them have settled. A file
# that has kept changing, unsettled, for this many grace windows (a log, a sync tool's state)
# would otherwise hold every other edit back for good: it is "restless" and waits alone from
# then on, and the others are published without it. Files that began changing more recently
# still wait for each other. A restless file that comes back to life later (a writer in bursts)
# is restless again once it has kept changing for one grace window.
RESTLESS_GRACES = 10
# An edit that has settled waits at most this many grace windows for files still changing, in
# case none of them is restless: new files coming one after the other (each settling in its
# own grace window) would otherwise hold it back for good.
HELD_GRACES = 3 * RESTLESS_GRACES

Key = tuple[str, str]    # ("templates" | "vars", name relative to its folder, with '/')
Version = tuple[str | None, Stamp]   # a symlink's target to read (None: the file itself) and its version
_LEFTOVERS = ("~", ".swp", ".tmp", ".part")


class ContentStore:
    """The templates and vars folders, kept as snapshots."""

    def __init__(
        self,
        templates_dir: Path,
        vars_dir: Path,
        rules: ContentRules | None = None,
        *,
        grace_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.templates_dir = Path(templates_dir).absolute()
        self.vars_dir = Path(vars_dir).absolute()
        self._templates_folder = str(self.templates_dir)   # one string, kept by every template
        self.rules = rules or ContentRules()
        self.grace_seconds = grace_seconds
        # files that may differ from the snapshot, not yet published: key -> (the version seen,
        # or None if gone; since when it has looked like that by our clock)
        self._unsettled: dict[Key, tuple[Stamp | None, float]] = {}
        self._early: dict[Key, SourceFile] = {}   # changed files read while they settle
        self._changing_since: dict[Key, float] = {}   # since when each file still changing has been changing
        self._restless: set[Key] = set()   # files that kept changing too long (while they exist): they wait alone
        self._held_since: float | None = None   # since when changes that have settled have waited
        # vars files published with a problem that may pass (SourceFile.passing): looked at
        # again by every refresh until they can be read
        self._again: set[Key] = set()
        self._relist = False   # a listing failed for a passing cause: both folders are listed again
        self._links = _Links()   # the symlinked files seen, by the file each names
        self._clock = clock
        self._lock = threading.Lock()
        self._told: Callable[[set[str]], None] | None = None   # tells a running `follow` what to look at
        self._waiting: list[asyncio.Future[None]] = []   # polls waiting for the next snapshot (newer_than)
        self.snapshot: Snapshot = empty_snapshot(self.rules)

    def refresh(self, paths: Iterable[str | Path] | None = None) -> bool:
        """Look at `paths` (files or folders that changed), or rescan both folders when None;
        publish a new snapshot once every change seen has settled.

        Returns whether a new snapshot was published. While any file is new, changed or gone
        for less than `grace_seconds`, the snapshot in use stays as it is, whole, except for
        the files that have kept changing for RESTLESS_GRACES grace windows: they hold nothing
        back, and are published alone once they settle.
        """
        with self._lock:
            old = self.snapshot
            now = self._clock()
            # what is on disk now for every file that may differ from the snapshot (None: gone)
            try:
                found = self._scan(old) if paths is None else self._look_at(paths, old)
                if paths is not None:
                    # an edit of a file is a new version of every symlink that names it
                    found.update({link: self._stat(link) for link in self._links.naming(self._real_paths(paths, found))
                                  if link not in found})
                    for key in (*self._unsettled, *self._again):   # still waiting from before: look again
                        if key not in found:
                            found[key] = self._stat(key)
                self._links.note(found, self._folder)
            except CannotListNow as exc:   # not known now is not gone: publish nothing, list again
                if not self._relist:
                    log.warning("templates and vars cannot be listed now: listing them again", extra={"fields": {
                        "event": "reload_postponed", "error": str(exc)}})
                self._relist = True
                return False
            if paths is None:
                self._relist = False
            differing = {key: seen for key, seen in found.items() if _differs(old, key, seen)}
            if not differing:
                self._unsettled.clear()
                self._early.clear()
                self._changing_since.clear()
                self._held_since = None
                return False
            bulk = sum(kind == "templates" and seen is not None for (kind, _), seen in differing.items()) > READ_AT_ONCE
            # a vars file read again in the version listed, after a passing problem, is no change to wait for
            waiting = {key: seen for key, seen in differing.items() if not _read_again(old, key, seen)}
            changing = self._settling(waiting, now)
            holding = self._holding(changing, now)
            if holding and not self._held_too_long(len(waiting) > len(changing), holding, now):
                if not bulk:   # not the restless ones: read once they settle, not at each rewrite
                    self._read_ahead({key: seen for key, seen in waiting.items() if key in holding or key not in changing})
                return False
            templates: dict[str, SourceFile | None] = {}
            variables: dict[str, SourceFile | None] = {}
            # a few changed files are read now, so a file written while it is read is waited
            # for; a bulk of templates is read when a device first needs each (SourceFile)
            for key, seen in differing.items():
                if key in changing:
                    continue   # one that keeps changing: published once it settles
                kind, name = key
                source = None
                if seen is None:
                    self._restless.discard(key)   # gone: a file of that name later is a new one
                else:
                    target, stamp = seen
                    if bulk and kind == "templates" and target is None:
                        source = SourceFile(name, stamp, folder=self._templates_folder)
                    elif (early := self._early.get(key)) is not None and early.stamp == stamp and not early.passing:
                        source = early
                    else:
                        source = self._read(key, seen)
                    if source is None:  # written to while we read it: wait for it to settle
                        self._unsettled[key] = (None, now)
                        return False
                    if source.passing and _still(_published(old, key), source):
                        continue   # still the same passing problem: nothing to publish for it
                (templates if kind == "templates" else variables)[name] = source
            self._unsettled = {key: since for key, since in self._unsettled.items() if key in changing}
            self._early.clear()
            self._held_since = None
            if not templates and not variables:
                return False
            self.snapshot = old.changed(templates, variables)
            for name, source in variables.items():
                if source is not None and source.passing:
                    self._again.add(("vars", name))
                else:
                    self._again.discard(("vars", name))
            published = [*templates.values(), *variables.values()]
            log.info("templates reloaded", extra={"fields": {
                "event": "reload", "templates": len(self.snapshot.templates), "vars": len(self.snapshot.vars),
                "changed": sum(source is not None for source in published),
                "removed": sum(source is None for source in published),
            }})
            return True

    def _read_ahead(self, differing: dict[Key, Version | None]) -> None:
        """Read and parse the changed files while their grace window runs, so that publishing
        them when it ends takes no time (a 100,000-row devices.csv takes half a second). Each
        is used only if it is still that version then."""
        for key, seen in differing.items():
            if seen is None or ((early := self._early.get(key)) is not None and early.stamp == seen[1]):
                continue
            source = self._read(key, seen)
            if source is not None and not source.passing:   # read again when published: it may pass
                self._early[key] = source

    @property
    def pending(self) -> bool:
        """Whether a change is waiting to settle before it is published."""
        return bool(self._unsettled)

    def settle(self, timeout: float = 10.0) -> None:
        """Refresh until no change is pending (or `timeout` passes): for start-up, so that the
        first poll never meets an empty snapshot because a file was still settling."""
        deadline = self._clock() + timeout
        self.refresh()
        while (self.pending or self._relist) and self._clock() < deadline:
            time.sleep(self._retry_seconds())
            self.refresh(None if self._relist else ())

    async def follow(self, rescan_seconds: float = RESCAN_SECONDS, ready: asyncio.Event | None = None) -> None:
        """Keep the snapshot current until cancelled: refresh the files the operating system
        says changed, look again while a change settles, and rescan everything every
        `rescan_seconds`. A folder that goes, comes back or is replaced (a symlink switched to
        a new release) is watched anew and looked at whole within FOLDER_CHECK_SECONDS. Sets
        `ready` once the folders are watched. A failed refresh is logged and the next one goes on."""
        import watchfiles   # the file events (inotify on Linux); only the server needs them

        changes: asyncio.Queue[set[str]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def events(stop: asyncio.Event) -> None:
            folders = [folder for folder in (self.templates_dir, self.vars_dir) if folder.is_dir()]
            if not folders:
                return
            async for batch in watchfiles.awatch(*folders, watch_filter=None, debounce=400, step=100,
                                                 stop_event=stop, rust_timeout=60_000, yield_on_timeout=False):
                changes.put_nowait({path for _, path in batch})

        async def stopped(stop: asyncio.Event, watching: asyncio.Task[None]) -> None:
            stop.set()
            watching.cancel()
            with contextlib.suppress(BaseException):
                await watching

        watched = self._folders()
        stop = asyncio.Event()
        watching = asyncio.create_task(events(stop))
        try:
            self._told = lambda paths: loop.call_soon_threadsafe(changes.put_nowait, paths)
            await asyncio.sleep(0)
            if ready is not None:
                ready.set()
            next_rescan = time.monotonic() + rescan_seconds
            while True:
                wait = min(next_rescan - time.monotonic(), FOLDER_CHECK_SECONDS)
                if self.pending:
                    wait = min(wait, self._retry_seconds())
                paths: set[str] | None = set()
                try:
                    paths = await asyncio.wait_for(changes.get(), timeout=max(wait, 0))
                    while not changes.empty():
                        paths |= changes.get_nowait()
                except TimeoutError:
                    pass
                if watching.done() and not watching.cancelled() and watching.exception() is not None:
                    log.error("file events stopped; rescanning every %s s", rescan_seconds, extra={"fields": {
                        "event": "watch_failed", "error": repr(watching.exception())}})
                    watching = asyncio.create_task(asyncio.sleep(float("inf")))
                if (folders := self._folders()) != watched:
                    await stopped(stop, watching)
                    watched, stop = folders, asyncio.Event()
                    watching = asyncio.create_task(events(stop))
                    paths = None
                if time.monotonic() >= next_rescan or (self._relist and not paths):
                    paths = None   # the rescan, or a listing that failed for a passing cause, again
                if paths is None:
                    next_rescan = time.monotonic() + rescan_seconds
                elif not paths and not self.pending and not self._again:
                    continue
                try:
                    published = await asyncio.to_thread(self.refresh, paths)
                except Exception:  # a refresh must never stop the ones that follow
                    log.exception("template scan failed", extra={"fields": {"event": "reload_failed"}})
                else:
                    if published:
                        self._wake_waiting()
        finally:
            self._told = None
            self._wake_waiting()
            await stopped(stop, watching)

    async def newer_than(self, snapshot: Snapshot, timeout: float) -> bool:
        """Wait until a snapshot newer than `snapshot` is published: True then, False after
        `timeout` s, and False at once when nothing would publish one (no `follow` runs) or
        WAITING_MAX polls already wait (each holds a connection of its worker)."""
        if self.snapshot is not snapshot:
            return True
        if self._told is None or len(self._waiting) >= WAITING_MAX:
            return False
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(woken)
        try:
            await asyncio.wait_for(woken, timeout)
        except TimeoutError:
            pass
        finally:
            if woken in self._waiting:
                self._waiting.remove(woken)
        return self.snapshot is not snapshot

    def _wake_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for woken in waiting:
            if not woken.done():
                woken.set_result(None)

    def look_again(self, template: str) -> None:
        """Have `follow` look at the template `template` again at once: a poll found it changed
        on disk since it was listed, perhaps by a rewrite that kept its size, time and inode,
        which no file event or stamp tells. From any thread; nothing when no `follow` runs."""
        told = self._told
        if told is not None:
            told({f"{self._templates_folder}{os.sep}{template}"})

    def _folders(self) -> tuple[tuple[int, int] | None, ...]:
        """Which folders the two paths are now (device and inode), None for one that is gone."""
        found: list[tuple[int, int] | None] = []
        for folder in (self.templates_dir, self.vars_dir):
            try:
                st = os.stat(folder)
                found.append((st.st_dev, st.st_ino))
            except OSError:
                found.append(None)
        return tuple(found)

    # -- what is on disk ----------------------------------------------------------------------

    def _read(self, key: Key, seen: Version) -> SourceFile | None:
        """The file `key` in the version `seen`, or None if it changed while it was read."""
        kind, name = key
        target, stamp = seen
        if kind == "vars":
            return read_file(target or str(self.vars_dir / name), name, stamp, self._parse_vars, str(self.vars_dir))
        # read from its folder (a symlink through the link: a target that is no longer the one
        # `seen` is another stamp), so its text may be let go, and read again in this version
        return template_version(name, stamp, self._templates_folder)

    def _parse_vars(self, name: str, text: str) -> tuple[Any, str | None]:
        return parse_vars(name, text, self.rules.fixes)

    def _retry_seconds(self) -> float:
        return min(0.1, max(self.grace_seconds / 4, 0.01))

    def _folder(self, kind: str) -> Path:
        return self.templates_dir if kind == "templates" else self.vars_dir

    def _real_paths(self, paths: Iterable[str | Path], found: Iterable[Key]) -> Iterator[str]:
        """The real paths of the files an event names (hidden ones too: a link may name one) and
        of the files found below the folders it names."""
        if not self._links:
            return
        yield from map(os.path.realpath, paths)
        real = {kind: os.path.realpath(self._folder(kind)) for kind in ("templates", "vars")}
        for kind, name in found:   # the folders of a found file are real (`_reached_directly`)
            yield f"{real[kind]}{os.sep}{name}"

    def _scan(self, old: Snapshot) -> dict[Key, Version | None]:
        """Every file of both folders that differs from `old`: the safety net's full rescan."""
        found: dict[Key, Version | None] = {}
        for kind, published in (("templates", old.templates), ("vars", old.vars)):
            files = list_files(self._folder(kind))
            for name, seen in files.items():
                if not _is_listed(published.get(name), seen[1]):
                    found[(kind, name)] = seen
            found.update({(kind, name): None for name in published if name not in files})
        return found

    def _look_at(self, paths: Iterable[str | Path], old: Snapshot) -> dict[Key, Version | None]:
        """What is now on disk at `paths` and below them: a folder that came is listed, and
        every published file below a folder that went is gone. A path below a symlinked folder
        names nothing of ours (inotify follows such folders and reports their files under the
        link's path; the folders are not entered, by events no more than by the rescan)."""
        found: dict[Key, Version | None] = {}
        roots = [(kind, str(self._folder(kind))) for kind in ("templates", "vars")]
        for path in map(str, paths):
            for kind, root in roots:
                published = old.templates if kind == "templates" else old.vars
                if path == root:
                    name = ""
                elif path.startswith(root + os.sep):
                    name = path[len(root) + 1:]
                    if not _wanted(name):
                        break
                else:
                    continue
                if os.path.isdir(path) and _reached_directly(root, name):   # a folder of ours
                    prefix = f"{name}/" if name else ""
                    below = list_files(Path(path), os.path.realpath(root) + os.sep)   # links: the folder's rule
                    found.update({(kind, prefix + sub): seen for sub, seen in below.items()})
                    found.update({(kind, n): None for n in published
                                  if n.startswith(prefix) and n[len(prefix):] not in below})
                elif name:
                    found[(kind, name)] = seen = self._stat((kind, name))
                    if seen is None:   # perhaps a folder that went, or one that is now a symlink
                        prefix = f"{name}/"
                        found.update({(kind, n): None for n in published if n.startswith(prefix)})
                break
        return found

    def _stat(self, key: Key) -> Version | None:
        kind, name = key
        root = str(self._folder(kind))
        if not _wanted(name) or not _reached_directly(root, os.path.dirname(name)):
            return None
        return file_version(f"{root}{os.sep}{name}", os.path.realpath(root) + os.sep, name)

    def _settling(self, differing: dict[Key, Version | None], now: float) -> set[Key]:
        """The changed files that may not be published yet, from what `differing` says is on
        disk now. A file's new version (or its absence) may be once it has stayed the same for
        `grace_seconds` by our own clock, or the file was last modified at least that long ago.
        A modification time ahead of our clock proves nothing either way. Every change is
        remembered until it is published."""
        unsettled: dict[Key, tuple[Stamp | None, float]] = {}
        changing: set[Key] = set()
        for key, seen in differing.items():
            stamp = seen[1] if seen is not None else None
            since = self._unsettled.get(key)
            if since is None or since[0] != stamp:
                since = (stamp, now)
            unsettled[key] = since
            age = now - stamp_mtime_ns(stamp) / 1e9 if stamp is not None else -1.0
            old_on_disk = 0 <= age and age >= self.grace_seconds
            if not old_on_disk and now - since[1] < self.grace_seconds:
                changing.add(key)
        self._unsettled = unsettled
        return changing

    def _holding(self, changing: set[Key], now: float) -> set[Key]:
        """The files of `changing` (still changing) that hold the changes that have settled
        back: every one but the restless ones. A file is restless once it has kept changing,
        unsettled, for RESTLESS_GRACES grace windows (since it was first seen changing, however
        many versions it went through); one found restless before, once it has kept changing
        for one grace window (more than a single write), so a writer in bursts holds the
        others back a grace window per burst, not the whole bound. A file found restless is
        named in the log the first time only."""
        since = {key: self._changing_since.get(key, now) for key in changing}
        self._changing_since = since
        bound = RESTLESS_GRACES * self.grace_seconds
        holding: set[Key] = set()
        found: dict[Key, float] = {}
        for key, start in since.items():
            changing_for = now - start
            if key in self._restless and changing_for >= self.grace_seconds:
                continue
            if changing_for >= bound:
                found[key] = changing_for
            else:
                holding.add(key)
        if found:
            self._restless |= found.keys()
            _tell_partial(found, max(found.values()))
        return holding

    def _held_too_long(self, held: bool, holding: set[Key], now: float) -> bool:
        """Whether changes that have settled (`held`: some have) have waited HELD_GRACES grace
        windows for `holding`, which then holds them back no longer this time (named in the log)."""
        if not held:
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = now
        waited = now - self._held_since
        if waited < HELD_GRACES * self.grace_seconds:
            return False
        _tell_partial(holding, waited)
        return True


def _tell_partial(still: Iterable[Key], waited: float) -> None:
    """The log's word that the files `still` changing hold the others back no longer."""
    names = sorted(f"{kind}/{name}" for kind, name in still)
    log.warning("files still changing hold no other change back any longer", extra={"fields": {
        "event": "reload_partial", "files": names[:10], **({"more": len(names) - 10} if len(names) > 10 else {}),
        "waited_s": round(waited, 1)}})


class _Links:
    """The symlinked files seen in the folders, by the real path of the file each names (always
    one inside the same folder): an event names the file that was edited, never the links to it,
    and a link's version is its target's. Updated with every file looked at, so it holds the
    links on disk, published or not, and a dangling link is kept for when its target comes back."""

    def __init__(self) -> None:
        self._target: dict[Key, str] = {}
        self._links: dict[str, set[Key]] = {}

    def __bool__(self) -> bool:
        return bool(self._links)

    def naming(self, real_paths: Iterable[str]) -> set[Key]:
        """The links that name any of the files at `real_paths`."""
        return {link for path in real_paths for link in self._links.get(path, ())}

    def note(self, found: dict[Key, Version | None], folder: Callable[[str], Path]) -> None:
        """Take in what is now on disk for the files `found`."""
        for key, seen in found.items():
            if seen is not None:
                target = seen[0]
            elif key in self._target:   # no file now: still a link (dangling), or gone?
                path = folder(key[0]) / key[1]
                target = os.path.realpath(path) if os.path.islink(path) else None
            else:
                continue
            was = self._target.get(key)
            if was == target:
                continue
            if was is not None:
                self._target.pop(key)
                self._links[was].discard(key)
                if not self._links[was]:
                    del self._links[was]
            if target is not None:
                self._target[key] = target
                self._links.setdefault(target, set()).add(key)


def _published(snapshot: Snapshot, key: Key) -> SourceFile | None:
    """The version of the file `key` that `snapshot` lists, if any."""
    return (snapshot.templates if key[0] == "templates" else snapshot.vars).get(key[1])


def _differs(snapshot: Snapshot, key: Key, seen: Version | None) -> bool:
    """Whether what is on disk (`seen`) is not the version `snapshot` has: a file came, went or
    has another stamp, or its version was found changed although its stamp is the same."""
    source = _published(snapshot, key)
    return source is not None if seen is None else not _is_listed(source, seen[1])


def _is_listed(source: SourceFile | None, stamp: Stamp) -> bool:
    """Whether `source`, as a snapshot lists it, is the file's version `stamp` on disk: the
    same stamp, not found changed since (a rewrite that kept the stamp), and read (not a
    problem that may pass: it is read again)."""
    return source is not None and source.stamp == stamp and not source.changed and not source.passing


def _read_again(snapshot: Snapshot, key: Key, seen: Version | None) -> bool:
    """Whether `seen` is the version of a vars file that `snapshot` lists with a problem that
    may pass (a template's never has one): read again at once, not waited for as a change."""
    source = _published(snapshot, key)
    return source is not None and seen is not None and source.passing and source.stamp == seen[1]


def _still(published: SourceFile | None, read: SourceFile) -> bool:
    """Whether `read`, which could not be read for a passing cause, is what the snapshot
    already lists: the same version with the same problem."""
    return published is not None and published.stamp == read.stamp and published.problem == read.problem


def _reached_directly(root: str, folder: str) -> bool:
    """Whether the folder `folder` (relative, with '/'; "" for `root` itself) is reached from
    `root` through real folders only, no symlink on the way: a path through a symlinked folder
    is no path of ours. A part that does not exist (a folder that went) is no symlink."""
    if not folder:
        return True
    return os.path.realpath(f"{root}{os.sep}{folder}") == f"{os.path.realpath(root)}{os.sep}{folder}"


def _wanted(name: str) -> bool:
    """Whether a relative name may be content: no hidden part, no editor's leftover."""
    return bool(name) and not any(part.startswith(".") for part in name.split("/")) and not name.endswith(_LEFTOVERS)


class CannotListNow(OSError):
    """A folder or file could not be looked at for a passing cause (PASSING_ERRNOS): what is
    there is not known now, which is not the same as gone."""


def _raise_if_passing(exc: OSError) -> None:
    """Raise CannotListNow for an error of the moment (PASSING_ERRNOS); any other error says
    that the file or folder is not there to be listed, and the caller skips it."""
    if exc.errno in PASSING_ERRNOS:
        raise CannotListNow(exc.errno, exc.strerror, exc.filename) from exc


def file_version(path: str, real_root: str, name: str | None = None) -> Version | None:
    """A symlink's target to read (None for the file itself) and the version, or None when
    `path` is no file of the folder: gone, a folder, a symlink that leads out of `real_root`,
    or (given its `name` below the folder) one reached through a symlinked folder. Checked on
    the files opened, not on their paths, so a folder swapped for a symlink meanwhile is seen."""
    target = None
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)   # the file, or the symlink itself
        try:
            st = os.fstat(fd)
            at = opened_at(fd, path)
        finally:
            os.close(fd)
        if not (at == real_root + name if name is not None else at.startswith(real_root)):
            return None   # reached through a symlinked folder: no file of ours
        if stat.S_ISLNK(st.st_mode):
            fd = os.open(path, os.O_PATH)   # what it names
            try:
                st = os.fstat(fd)
                target = opened_at(fd, path)
            finally:
                os.close(fd)
            if not target.startswith(real_root):
                log.warning("symlink out of the folder ignored", extra={"fields": {
                    "event": "symlink_ignored", "file": path}})
                return None
    except OSError as exc:
        _raise_if_passing(exc)
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return target, stamp_of(st)


def list_files(root: Path, real_root: str | None = None) -> dict[str, Version]:
    """Every file below `root` that is not hidden or an editor's leftover, with its version.

    Symlinked folders are not entered; a symlinked file is listed only when it resolves to a
    regular file inside `real_root` (the real path of the templates or vars folder, ending in
    the separator; `root`'s own when not given), and its version is then the target's: a folder
    below the folder is listed by the same rule as the folder. One lstat per file: this is the
    safety net's whole cost, so it stays lean.
    """
    found: dict[str, Version] = {}
    if not root.is_dir():
        return found
    top = str(root)
    real_root = real_root or os.path.realpath(top) + os.sep
    skip = len(top) + 1
    pending = [top]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError as exc:
            _raise_if_passing(exc)
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                        continue
                    if name.endswith(_LEFTOVERS):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    _raise_if_passing(exc)
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[entry.path[skip:]] = (None, stamp_of(st))
                elif stat.S_ISLNK(st.st_mode):
                    version = file_version(entry.path, real_root)
                    if version is not None:
                        found[entry.path[skip:]] = version
    return found


def read_file(
    path: str | Path, name: str, stamp: Stamp, parse: Callable[[str, str], tuple[Any, str | None]],
    folder: str | None = None,
) -> SourceFile | None:
    """The file's text and parsed data, an error the admin must fix, or None when the file
    changed while it was read (then it is still being written) or is no longer inside `folder`."""
    text, problem = read_text(str(path), stamp, folder)
    if text is None:
        return None
    if problem:
        return SourceFile(name, stamp, "", None, problem)
    data, error = parse(name, text)
    return SourceFile(name, stamp, text, data, error)
