"""One consistent view of the templates and vars folders, and the choice it makes for a device.

Lookup, first file that exists wins:
    templates/devices/<hwid>.j2, templates/devices/<mac>.j2, templates/models/<model>.j2,
    templates/groups/<group>.j2 (the model's groups in the groups table's order), templates/default.j2
Groups: the `groups` setting, then the `groups` table of vars/default.toml (group -> models).
Variables, later layers override earlier ones (tables merged key by key):
    vars/default.toml, vars/models/<model>.toml, vars/devices/<mac>.toml,
    vars/devices/<hwid>.toml, the row of vars/devices.csv that names the device

A snapshot's files and indexes never change once built; it only memoizes the choices it made.
A new snapshot is the old one with some files changed: it shares every unchanged file (and what
was learned of it) and re-indexes only the names that came or went.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..apply_once import TemplateOptions
from ..caches import BoundedCache
from ..identity import DeviceIdentity
from ..innovaphone import BROKEN_MODEL_NAMES
from . import analysis
from .lookup import KeyIndex
from .naming import DEVICES_CSV, TEMPLATE_SUFFIX, VARS_SUFFIX, lookup_key
from .variables import DeviceRows, freeze, merge

log = logging.getLogger("configserver.content")

# Devices whose choice one snapshot remembers (about 370 bytes each). A choice costs about 12 us
# to redo, so this only spares a small fleet's repeat polls; a large fleet's memory goes to the
# answers (poll.py).
_CHOICES_KEPT = 4096

# A file's version: its modification time, size and inode packed into one number (a different
# stamp is a different version). One int where a tuple of three cost 130 bytes, for each of
# 100,000 device templates; of 48 bytes while it fits in 180 bits (Python's ints grow by 30
# bits), so the size has 52: a file larger than 4 PB counts as that large (it is refused anyway).
Stamp = int
_MTIME_BIAS = 1 << 63   # modification times before 1970 are negative
_INODE_BITS, _SIZE_BITS = 64, 52
_LARGEST = (1 << _SIZE_BITS) - 1


def stamp_of(st: os.stat_result) -> Stamp:
    """The stamp of a file as `os.stat` (or `lstat`, `fstat`) saw it."""
    size = min(st.st_size, _LARGEST)
    return (st.st_mtime_ns + _MTIME_BIAS) << (_SIZE_BITS + _INODE_BITS) | size << _INODE_BITS | st.st_ino


def stamp_mtime_ns(stamp: Stamp) -> int:
    return (stamp >> (_SIZE_BITS + _INODE_BITS)) - _MTIME_BIAS


def stamp_size(stamp: Stamp) -> int:
    return stamp >> _INODE_BITS & _LARGEST


MAX_FILE_BYTES = 4 * 1024 * 1024
_CHANGED = "changed on disk since the folder was listed: the next snapshot, a moment from now, has it"
# Errors that tell nothing of the file, only of this moment: no file descriptor, memory or
# buffer left, a call interrupted. A file that cannot be read for one of them "cannot read now":
# the watcher reads such a vars file again until it can, and lists a folder again (watcher.py).
PASSING_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})
NOT_NOW = "cannot read now: "
# What the template texts held at once may weigh, whatever the fleet's size: a text is needed
# when its template is compiled (and for lint and preview); the compiled templates and the
# answers kept are what the polls use. A text let go is read again in the same version.
TEXTS_HELD_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file as read at one moment: what identifies that version, and its text or parsed data.

    A vars file keeps its text and parsed data. A template file (`folder` set) is read when it
    is first needed, in the version its stamp names; its text is then held while the texts held
    weigh at most TEXTS_HELD_BYTES together (_HeldTexts), and read again, in that version, when
    it is needed once more. `checksum` (CRC-32 of its bytes, from its first reading) tells that
    version from a rewrite that kept size, time and inode. What its text says (`learned`:
    options, includes, per-poll reads) is worked out once by analysis.py. A file found changed
    since it was listed is this version's error (`changed`) until the next snapshot brings the
    new one: a new text is never served under an old version's name. Versions compare by name,
    stamp, data and checksum: an answer kept for one is rendered again for a rewrite of the
    same stamp once that is read."""

    name: str            # path relative to its folder, with '/'
    stamp: Stamp
    content: str | None = field(default=None, compare=False)   # the text; None: not read, or let go
    data: Any = None     # parsed TOML (dict), or devices.csv's rows (variables.DeviceRows)
    problem: str | None = field(default=None, compare=False)
    folder: str | None = field(default=None, compare=False, repr=False)   # a template's, read from there
    learned: Any = field(default=None, compare=False, repr=False)   # analysis.Learned, once worked out
    checksum: int | None = field(default=None, repr=False)   # CRC-32 of the bytes first read

    @property
    def text(self) -> str:
        """The text of this version ("" when it cannot be read: see `error`)."""
        return self.read()[0]

    @property
    def error(self) -> str | None:
        """Why this version cannot be used, if it cannot; a template not read yet is read now,
        and one that cannot be read now (permissions, no file descriptor left) says why."""
        if self.problem is None and self.content is None and self.learned is None and self.folder is not None:
            return analysis.learned(self).unread
        return self.problem

    @property
    def changed(self) -> bool:
        """Whether this version was found changed on disk since it was listed: the watcher
        looks at it again, and a poll that needs it waits for the next snapshot."""
        return self.problem == _CHANGED

    @property
    def passing(self) -> bool:
        """Whether this version's problem may pass (NOT_NOW): the watcher looks at it again. A
        template's never is: its next reading tries again by itself (`read`)."""
        return self.problem is not None and self.problem.startswith(NOT_NOW)

    def read(self) -> tuple[str, str | None]:
        """The text and why this version cannot be used, if it cannot ("" then): the text held,
        or read from the folder in this version (and held). A file no longer this version stays
        this version's error, so a new text is never served under the old version's name. A
        file that could not be opened or read (no file descriptor left, permissions) is this
        read's error only: the next one tries again."""
        content, problem = self.content, self.problem
        if content is not None or problem is not None:
            return content or "", problem
        if self.folder is None:
            found = Read(None, "not read", True, None)
        else:
            found = read_version(f"{self.folder}/{self.name}", self.stamp, self.checksum, self.folder)
        # memos of this frozen version, not changes to it
        if found.problem is None and found.text is not None:
            text = HELD_TEXTS.hold(self, found.text, found.checksum)
            if text is not None:
                return text, None
            found = Read(None, _CHANGED, True, found.checksum)   # not the bytes this version was first read with
        if found.lasting:
            object.__setattr__(self, "problem", found.problem)
        return "", found.problem


def template_version(name: str, stamp: Stamp, folder: str) -> SourceFile | None:
    """The template `name` of `folder` read now in the version `stamp` (its text held, and let
    go like any other), or None when it is being written (it changed while it was read)."""
    source = SourceFile(name, stamp, folder=folder)
    source.read()
    return None if source.changed else source


class _HeldTexts:
    """The texts of the template versions read from their folder, held while they weigh at most
    `max_bytes` together (each with what holding it costs beside the text): the one read
    longest ago is let go first, the one read last never. Used from the event loop and the
    watcher's thread."""

    ENTRY_BYTES = 200   # its slot here, and the version it keeps alive once its snapshot is gone

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._held: dict[int, SourceFile] = {}   # id -> version, in the order they were read
        self._lock = threading.Lock()

    def hold(self, source: SourceFile, text: str, checksum: int | None) -> str | None:
        """Hold `text`, read with `checksum`, as the text of `source`, and return the text that
        version has: this one, or the one another reader stored first; None when the version
        was first read with other bytes (a rewrite that kept its stamp)."""
        with self._lock:
            if source.checksum is None:
                object.__setattr__(source, "checksum", checksum)
            elif source.checksum != checksum:
                return None
            if source.content is not None:
                return source.content
            object.__setattr__(source, "content", text)
            self._held[id(source)] = source
            self.bytes += sys.getsizeof(text) + self.ENTRY_BYTES
            while self.bytes > self.max_bytes and len(self._held) > 1:
                oldest = self._held.pop(next(iter(self._held)))
                self.bytes -= sys.getsizeof(oldest.content) + self.ENTRY_BYTES
                object.__setattr__(oldest, "content", None)
            return text

    def __len__(self) -> int:
        return len(self._held)


HELD_TEXTS = _HeldTexts(TEXTS_HELD_BYTES)


class Read(NamedTuple):
    """One reading of a file in one version (read_version)."""

    text: str | None
    problem: str | None      # why this version cannot be used; None with the text
    lasting: bool            # whether `problem` is the version's for good (not a passing cause)
    checksum: int | None     # CRC-32 of the bytes read


def read_text(path: str, stamp: Stamp, folder: str | None = None) -> tuple[str | None, str | None]:
    """(text, None), ("", the error the admin must fix), or (None, None) when the file is no
    longer the version `stamp` names (it changed or went while, or before, it was read, or it
    is no longer a file inside `folder`)."""
    found = read_version(path, stamp, folder=folder)
    return (None, None) if found.problem == _CHANGED else (found.text if found.problem is None else "", found.problem)


def read_version(path: str, stamp: Stamp, checksum: int | None = None, folder: str | None = None) -> Read:
    """The file at `path` read in the version `stamp` names. Its problem is _CHANGED when the
    file is no longer that version (it changed or went while, or before, it was read, or its
    bytes are not those of `checksum`), or the file opened is not inside `folder` (a folder on
    the way was swapped for a symlink): what is outside is never read; too large or not UTF-8 is the version's for good; a
    file that cannot be opened or read now (permissions, no file descriptor left) may be read
    once that passes. Lean (no Path, no buffer): a fleet's templates are read on their first
    poll, and again when their text was let go."""
    size = stamp_size(stamp)
    if size > MAX_FILE_BYTES:
        return Read(None, f"cannot read: larger than {MAX_FILE_BYTES} bytes", True, None)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # a FIFO put there never blocks a poll
    except FileNotFoundError:
        return Read(None, _CHANGED, True, None)
    except OSError as exc:
        return _unreadable(exc)
    try:
        if folder is not None and not _inside(opened_at(fd, path), folder):
            return Read(None, _CHANGED, True, None)
        chunks, wanted = [], size + 1   # one more byte than the version had: growth shows
        while wanted > 0 and (chunk := os.read(fd, wanted)):
            chunks.append(chunk)
            wanted -= len(chunk)
        after = os.fstat(fd)
    except OSError as exc:
        return _unreadable(exc)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    crc = zlib.crc32(raw)
    if stamp_of(after) != stamp or (checksum is not None and crc != checksum):
        return Read(None, _CHANGED, True, crc)
    try:
        return Read(raw.decode("utf-8-sig"), None, True, crc)  # a byte order mark (Excel's "CSV UTF-8") is no content
    except UnicodeDecodeError as exc:
        return Read(None, f"not UTF-8 text (byte {exc.start}): save it as UTF-8", True, crc)


def opened_at(fd: int, path: str) -> str:
    """The real path of the file open as `fd` (opened at `path`): where it is, whatever symlinks
    led to it, as the kernel knows it (a symlink swapped in after the open changes nothing)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:   # no /proc: the path now, the best that can be known
        return os.path.realpath(path)


_REAL_FOLDERS: dict[str, tuple[int, int, str]] = {}   # folder -> its device, inode and real path


def real_folder(folder: str) -> str:
    """The real path of `folder`, ending in the separator (worked out again once the folder
    is another one, a symlink switched to a new release). Raises OSError when it is gone."""
    st = os.stat(folder)
    known = _REAL_FOLDERS.get(folder)
    if known is not None and known[:2] == (st.st_dev, st.st_ino):
        return known[2]
    real = os.path.realpath(folder) + os.sep
    _REAL_FOLDERS[folder] = (st.st_dev, st.st_ino, real)
    return real


def _inside(real: str, folder: str) -> bool:
    """Whether the real path `real` is in `folder`: by the real path kept for it, else by the one
    it has now (the same folder under a new name, a release renamed and the link switched to it,
    or a new folder on a reused inode)."""
    if real.startswith(real_folder(folder)):
        return True
    _REAL_FOLDERS.pop(folder, None)   # worked out again
    return real.startswith(real_folder(folder))


def _unreadable(exc: OSError) -> Read:
    """A file that cannot be opened or read: for now (PASSING_ERRNOS), or until it is fixed
    (permissions, an I/O error). Neither is kept as the version's for good: a template's next
    reading tries again."""
    return Read(None, f"{NOT_NOW if exc.errno in PASSING_ERRNOS else 'cannot read: '}{exc}", False, None)


@dataclass(frozen=True, slots=True)
class ContentRules:
    """What the settings say about content: fixes of broken model names, groups, apply-once defaults."""

    fixes: Mapping[str, str] = field(default_factory=lambda: BROKEN_MODEL_NAMES)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    apply_once: bool = True
    final_command: str = "iresetn"


@dataclass(frozen=True, slots=True)
class Choice:
    """What a device gets: the template to render, the variables, and where they came from."""

    template: str | None
    vars_files: tuple[str, ...]
    layers: tuple[Mapping[str, Any], ...]   # the variables of each layer, lowest first
    problem: str | None = None   # a file this device reads cannot be used: file and cause
    groups: tuple[str, ...] = ()  # the device's model's groups, in the table's order
    apply_once: bool = True       # wrap the script for applying it once (apply_once.py)
    final_command: str = "iresetn"
    # the template (or one it uses) reads `now`, `request` or randomness: render it on every
    # poll; otherwise its output depends on the device and `sources` alone and may be kept
    per_poll: bool = True
    # every version the output depends on: the template files it renders, the vars files and
    # the devices.csv row. An answer kept for an equal tuple is still the answer.
    sources: tuple[object, ...] = ()
    # `problem` is a template that could not be read (permissions, no file descriptor left...):
    # nothing is known of what it says, so the choice is not kept; the next poll reads it again
    unread: bool = False

    @property
    def variables(self) -> Mapping[str, Any]:
        """The layers merged (later ones win, tables key by key), read-only. Merged anew each
        time (some microseconds, for a script about to be rendered): the choices a snapshot
        keeps, one per device, do not hold a merged copy each."""
        merged: dict[str, Any] = {}
        for layer in self.layers:
            merged = merge(merged, layer)
        return freeze(merged)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Templates and variables as one consistent view, with the indexes a choice needs."""

    templates: Mapping[str, SourceFile]
    vars: Mapping[str, SourceFile]
    rules: ContentRules
    lookup: KeyIndex          # "devices/<key>", "models/<model>", "groups/<g>", "default" -> file
    vars_lookup: KeyIndex
    groups: Mapping[str, tuple[str, ...]]       # group -> models, table order
    model_groups: Mapping[str, tuple[str, ...]]  # casefolded model -> its groups
    groups_problem: str | None
    # keys two or more files stand for: key -> the files not used (the first name, sorted, wins)
    shadowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    vars_shadowed: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    _choices: BoundedCache[tuple[str, str, str], Choice] = field(
        default_factory=lambda: BoundedCache(_CHOICES_KEPT), repr=False)

    @property
    def fixes(self) -> Mapping[str, str]:
        return self.rules.fixes

    @property
    def device_rows(self) -> DeviceRows | None:
        """devices.csv's rows, when it exists and could be read."""
        table = self.vars.get(DEVICES_CSV)
        return table.data if table is not None and isinstance(table.data, DeviceRows) else None

    def choose(self, device: DeviceIdentity) -> Choice:
        """The template and variables for `device`; worked out once per device per snapshot,
        unless a template it needs could not be read (Choice.unread)."""
        key = (device.hwid, device.mac, device.model)   # all a choice reads: a MAC alone has no hwid
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choose(device)
            if not choice.unread:
                self._choices.put(key, choice)
        return choice

    def template_options(self, template: str) -> tuple[bool, str]:
        """(apply once?, final command) for a template a device is given: its options, else the settings'."""
        found = analysis.options(self.templates[template]) if template in self.templates else None
        options = found if isinstance(found, TemplateOptions) else TemplateOptions()
        apply = self.rules.apply_once if options.apply_once is None else options.apply_once
        return apply, options.final_command or self.rules.final_command

    def options_problem(self, template: str) -> str | None:
        """What is wrong with the options of a template a device is given, if anything."""
        source = self.templates.get(template)
        found = analysis.options(source) if source is not None else None
        return found if isinstance(found, str) else None

    def changed(self, templates: Mapping[str, SourceFile | None], variables: Mapping[str, SourceFile | None]) -> "Snapshot":
        """This snapshot with some files new or changed (a SourceFile) or gone (None): every
        other file, and what is known of it, is shared."""
        fixes = self.rules.fixes
        files, lookup, shadowed = _reindexed(self.templates, self.lookup, self.shadowed, templates,
                                             TEMPLATE_SUFFIX, fixes, warn=True)
        vars_files, vars_lookup, vars_shadowed = _reindexed(self.vars, self.vars_lookup, self.vars_shadowed,
                                                            variables, VARS_SUFFIX, fixes, warn=False)
        groups, model_groups, groups_problem = self.groups, self.model_groups, self.groups_problem
        if "default.toml" in variables or not (self.templates or self.vars):
            groups, model_groups, groups_problem = _groups(self.rules, vars_files.get("default.toml"))
        return Snapshot(
            templates=files, vars=vars_files, rules=self.rules, lookup=lookup, vars_lookup=vars_lookup,
            groups=groups, model_groups=model_groups, groups_problem=groups_problem,
            shadowed=shadowed, vars_shadowed=vars_shadowed,
        )

    def _choose(self, device: DeviceIdentity) -> Choice:
        hwid, mac, model = device.hwid.casefold(), device.mac, device.model.casefold()
        groups = self.model_groups.get(model, ())
        template = None
        group_keys = (f"groups/{group.casefold()}" for group in groups)
        for key in (f"devices/{hwid}", f"devices/{mac}", f"models/{model}", *group_keys, "default"):
            template = self.lookup.get(key)
            if template:
                break
        # a template that cannot be read says nothing (options, includes, per-poll reads): never
        # worked out from an empty text, it is the choice's problem, and the choice is not kept
        error = self.templates[template].error if template else None
        unread = f"{template}: {error}" if error else None
        problem = self.groups_problem or unread or (self.options_problem(template) if template else None)
        table = self.vars.get(DEVICES_CSV)
        if table is not None and table.error:
            # every device may have a row in it: none may be served as if it had none
            problem = problem or f"{DEVICES_CSV}: {table.error}"
        used: list[str] = []
        layers: list[Mapping[str, Any]] = []
        versions: list[object] = []
        for key in ("default", f"models/{model}", f"devices/{mac}", f"devices/{hwid}"):
            name = self.vars_lookup.get(key)
            if name is None:
                continue
            source = self.vars[name]
            if source.error:
                problem = problem or f"{name}: {source.error}"
                continue
            used.append(name)
            layers.append(source.data)
            versions.append(source)
        rows = self.device_rows
        for key in (mac, hwid) if rows is not None else ():
            found = rows.row(key)
            if found is not None:
                used.append(DEVICES_CSV)
                layers.append(found[1])
                versions += (rows.columns, found[0])   # the header says what each cell sets
        depends = analysis.dependencies(template, self.templates) if template and not problem else None
        if depends is not None and depends.unread:
            unread = problem = depends.unread   # an include that cannot be read: what it reads is unknown
        files = depends.files if depends is not None else None
        known = template and not unread
        apply, final = self.template_options(template) if known else (self.rules.apply_once, self.rules.final_command)
        return Choice(
            template, tuple(dict.fromkeys(used)), tuple(layers), problem, groups, apply, final,
            per_poll=files is None, sources=(*files, *versions) if files is not None else (),
            unread=unread is not None and problem == unread,
        )


def build_snapshot(
    templates: Mapping[str, SourceFile], variables: Mapping[str, SourceFile], rules: ContentRules,
) -> Snapshot:
    """Index the files of both folders into a snapshot."""
    return empty_snapshot(rules).changed(templates, variables)


def empty_snapshot(rules: ContentRules) -> Snapshot:
    """The snapshot before the first scan: no device gets a template."""
    groups, model_groups, problem = _groups(rules, None)
    return Snapshot(templates={}, vars={}, rules=rules, lookup=KeyIndex(TEMPLATE_SUFFIX, rules.fixes),
                    vars_lookup=KeyIndex(VARS_SUFFIX, rules.fixes),
                    groups=groups, model_groups=model_groups, groups_problem=problem)


def _reindexed(
    files: Mapping[str, SourceFile], lookup: KeyIndex, shadowed: Mapping[str, tuple[str, ...]],
    changes: Mapping[str, SourceFile | None], suffix: str, fixes: Mapping[str, str], *, warn: bool,
) -> tuple[dict[str, SourceFile], KeyIndex, dict[str, tuple[str, ...]]]:
    """`files` with `changes` applied, and the lookup index redone for the names that came or
    went only. Of several files for one key the first name in sorted order is used."""
    files, shadowed = dict(files), dict(shadowed)
    used: dict[str, str | None] = {}   # key -> the file now used for it (None: none), where that changed
    for name, source in changes.items():
        came, went = source is not None and name not in files, source is None and name in files
        if source is None:
            files.pop(name, None)
        else:
            files[name] = source
        if not (came or went):
            continue
        key = lookup_key(name, suffix, fixes)
        if key is None:
            continue
        current = used[key] if key in used else lookup.get(key)
        names = {*shadowed.get(key, ()), *((current,) if current else ())}
        if came:
            names.add(name)
        else:
            names.discard(name)
        ordered = sorted(names)
        used[key] = ordered[0] if ordered else None
        if len(ordered) > 1:
            shadowed[key] = tuple(ordered[1:])
            if warn and came:
                log.warning("two templates for one key", extra={"fields": {
                    "event": "template_conflict", "key": key, "used": ordered[0], "ignored": ", ".join(ordered[1:])}})
        else:
            shadowed.pop(key, None)
    return files, lookup.changed(used), shadowed

def _groups(
    rules: ContentRules, default: SourceFile | None,
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]], str | None]:
    """The groups table (settings, then default.toml), each model's groups, and a problem."""
    table = {name: tuple(models) for name, models in rules.groups.items()}
    problem = None
    data = default.data if default is not None and isinstance(default.data, dict) else {}
    extra = data.get("groups", {})
    if not isinstance(extra, dict) or not all(
        isinstance(models, list) and all(isinstance(m, str) for m in models) for models in extra.values()
    ):
        problem = "default.toml: groups must be a table of group = [model, ...]"
        extra = {}
    for name, models in extra.items():
        table[name] = tuple(dict.fromkeys((*table.get(name, ()), *models)))
    model_groups: dict[str, tuple[str, ...]] = {}
    for name, models in table.items():
        for model in models:
            model = rules.fixes.get(model, model).casefold()
            if name not in model_groups.get(model, ()):
                model_groups[model] = (*model_groups.get(model, ()), name)
    return table, model_groups, problem
