"""Watching the templates and vars folders: scans, file versions, and the grace window.

A scan (`ContentStore.refresh`, run off the event loop) lists both folders; once every change
in them has settled it publishes a new immutable Snapshot. A poll reads `store.snapshot` once
and uses that snapshot from start to end. A file modified less than `grace_seconds` ago is not
read yet: the snapshot keeps the last version that was complete, so a file being written never
yields half a script, and a change spread over several files (a git checkout, an rsync) is
taken at once instead of file by file.

Nothing outside the two folders is ever read: hidden files and editors' leftovers are skipped,
symlinked folders are not entered, and a symlinked file counts only when it points at a file
inside the same folder.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .analysis import Analyses
from .snapshot import (
    ContentRules,
    Snapshot,
    SourceFile,
    Stamp,
    build_snapshot,
    empty_snapshot,
)
from .variables import parse_vars

log = logging.getLogger("configserver.templates")

MAX_FILE_BYTES = 4 * 1024 * 1024


def _no_parse(name: str, text: str) -> tuple[Any, str | None]:
    return None, None


class ContentStore:
    """The templates and vars folders, scanned into snapshots."""

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
        self.rules = rules or ContentRules()
        self.grace_seconds = grace_seconds
        # changes not yet published: (kind, name) -> (the version seen, or None if gone; since when)
        self._unsettled: dict[tuple[str, str], tuple[Stamp | None, float]] = {}
        self._analyses = Analyses()
        self._clock = clock
        self._lock = threading.Lock()
        self.snapshot: Snapshot = empty_snapshot(self.rules)

    def refresh(self) -> bool:
        """Rescan both folders; publish a new snapshot once every change in them has settled.

        Returns whether a new snapshot was published. While any file is new, changed or gone
        for less than `grace_seconds`, the snapshot in use stays as it is, whole.
        """
        with self._lock:
            old = self.snapshot
            now = self._clock()
            listed = {("templates", name): found for name, found in list_files(self.templates_dir).items()}
            listed.update({("vars", name): found for name, found in list_files(self.vars_dir).items()})
            published = {("templates", name): source for name, source in old.templates.items()}
            published.update({("vars", name): source for name, source in old.vars.items()})
            changed = [key for key, (_, stamp) in listed.items() if key not in published or published[key].stamp != stamp]
            vanished = [key for key in published if key not in listed]
            if not changed and not vanished:
                self._unsettled.clear()
                return False
            if not self._settled(changed, vanished, listed, now):
                return False
            files = {"templates": dict(old.templates), "vars": dict(old.vars)}
            for kind, name in vanished:
                del files[kind][name]
            for key in changed:
                kind, name = key
                path, stamp = listed[key]
                source = read_file(path, name, stamp, parse_vars if kind == "vars" else _no_parse)
                if source is None:  # written to while we read it: wait for it to settle
                    self._unsettled[key] = (None, now)
                    return False
                files[kind][name] = source
            self.snapshot = build_snapshot(files["templates"], files["vars"], self.rules, self._analyses)
            self._unsettled.clear()
            log.info("templates reloaded", extra={"fields": {
                "event": "reload", "templates": len(files["templates"]), "vars": len(files["vars"]),
                "changed": len(changed), "removed": len(vanished),
            }})
            return True

    @property
    def pending(self) -> bool:
        """Whether a change is waiting to settle before it is published."""
        return bool(self._unsettled)

    def settle(self, timeout: float = 10.0) -> None:
        """Refresh until no change is pending (or `timeout` passes): for start-up, so that the
        first poll never meets an empty snapshot because a file was still settling."""
        deadline = self._clock() + timeout
        self.refresh()
        while self.pending and self._clock() < deadline:
            time.sleep(min(0.1, max(self.grace_seconds / 4, 0.01)))
            self.refresh()

    def _settled(
        self,
        changed: list[tuple[str, str]],
        vanished: list[tuple[str, str]],
        listed: dict[tuple[str, str], tuple[Path, Stamp]],
        now: float,
    ) -> bool:
        """Whether every change may be published: each file's new version (or its absence) has
        stayed the same for `grace_seconds` by our own clock, or the file was last modified at
        least that long ago. A modification time ahead of our clock proves nothing either way."""
        pending: dict[tuple[str, str], tuple[Stamp | None, float]] = {}
        for key in [*changed, *vanished]:
            stamp = listed[key][1] if key in listed else None
            if stamp is not None and 0 <= now - stamp[0] / 1e9 and now - stamp[0] / 1e9 >= self.grace_seconds:
                continue
            since = self._unsettled.get(key)
            if since is None or since[0] != stamp:
                since = (stamp, now)
            if now - since[1] < self.grace_seconds:
                pending[key] = since
        self._unsettled = pending
        return not pending


def list_files(root: Path) -> dict[str, tuple[Path, Stamp]]:
    """Every file below `root` that is not hidden or an editor's leftover, with its version.

    Symlinked folders are not entered; a symlinked file is listed only when it resolves to a
    regular file inside `root` (its version is then the target's).
    """
    found: dict[str, tuple[Path, Stamp]] = {}
    if not root.is_dir():
        return found
    real_root = os.path.realpath(root) + os.sep
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or filename.endswith(("~", ".swp", ".tmp", ".part")):
                continue
            path = Path(dirpath, filename)
            try:
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    target = os.path.realpath(path)
                    if not target.startswith(real_root):
                        log.warning("symlink out of the folder ignored", extra={"fields": {
                            "event": "symlink_ignored", "file": str(path)}})
                        continue
                    path = Path(target)
                    st = path.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            found[Path(dirpath, filename).relative_to(root).as_posix()] = (path, (st.st_mtime_ns, st.st_size, st.st_ino))
    return found


def read_file(
    path: Path, name: str, stamp: Stamp, parse: Callable[[str, str], tuple[Any, str | None]],
) -> SourceFile | None:
    """The file's text and parsed data, an error the admin must fix, or None when the file
    changed while it was read (then it is still being written)."""
    try:
        with path.open("rb") as file:
            if stamp[1] > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = file.read(MAX_FILE_BYTES + 1)
            after = os.fstat(file.fileno())
        if (after.st_mtime_ns, after.st_size, after.st_ino) != stamp:
            return None
        text = data.decode("utf-8-sig")  # a byte order mark (Excel's "CSV UTF-8") is no content
    except UnicodeDecodeError as exc:
        return SourceFile(name, stamp, "", None, f"not UTF-8 text (byte {exc.start}): save it as UTF-8")
    except (OSError, ValueError) as exc:
        return SourceFile(name, stamp, "", None, f"cannot read: {exc}")
    data_parsed, error = parse(name, text)
    return SourceFile(name, stamp, text, data_parsed, error)
