"""What counts in an uploaded configuration: text or not, the lines that change on every upload,
the digest that decides whether a version is new, and the diff an admin reads.

Pure functions on bytes and text. An upload holds the device's passwords and keys: nothing here
logs, and no error raised here quotes the upload.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence

from ..errors import ConfigserverError

# The lines innovaphone's own update server drops before comparing two backups (innovaphone.md
# 1.6, `saveBackup()`): call-list entries, the update client's variables and its own
# configuration line, and TLS session tickets. Each changes on every upload.
VOLATILE_LINES: tuple[re.Pattern[str], ...] = (
    re.compile(r"mod cmd FLASHDIR0 add-item .*\)\(type=.*\(info=.*"),
    re.compile(r"vars create UPDATE/.*"),
    re.compile(r"config change UP1 /.*"),
    re.compile(r"vars create TLS0/TICKET/.*"),
)

# Every volatile line starts with one of these: most lines are ruled out without a regex.
_VOLATILE_STARTS = ("mod cmd FLASHDIR0 add-item ", "vars create UPDATE/", "config change UP1 /", "vars create TLS0/TICKET/")

# The most lines, on either side, that a diff places once the common head and tail are trimmed.
# difflib's matcher grows with the lines of one side times the repeats of a line on the other,
# once per block it places: measured on repeated lines (the worst case a device can upload),
# 1,000 lines against 199 alternating ones take half a second, 1,600 against 1,600 a third, and
# 12,000 against 12,000 of ~125 lines repeated just under difflib's 1% junk rule 45 s. Beyond
# this the diff lists the lines gone and come without placing them, in linear time.
DIFF_PLACED_LINES = 1000

# innovaphone's parser splits on CRLF, LF or CR alike.
_LINE_BREAK = re.compile(r"\r\n|\n|\r")
# Control characters have no place in a configuration or an XML document; tab, LF, CR do.
_NOT_TEXT = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class NotText(ConfigserverError, ValueError):
    """The upload is not text: it holds control characters. The message never quotes it."""


def check_text(body: bytes) -> None:
    """Raise NotText when `body` holds a control character other than tab, LF or CR.

    The message says where (byte offset) and which byte, never the content around it.
    """
    found = _NOT_TEXT.search(body)
    if found is not None:
        raise NotText(f"byte 0x{body[found.start()]:02x} at offset {found.start()} is a control character")


def decode(body: bytes) -> str:
    """The upload as text: UTF-8, else Latin-1 (innovaphone's own server declares ISO-8859-1).

    Latin-1 decodes any bytes, so this never fails; `check_text` decides what is text.
    """
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("latin-1")


def split_lines(text: str) -> list[str]:
    """The lines of `text`, split on CRLF, LF or CR, without a trailing empty line."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def is_volatile(line: str) -> bool:
    """Whether `line` is one of those that change on every upload (see VOLATILE_LINES)."""
    return line.startswith(_VOLATILE_STARTS) and any(pattern.fullmatch(line) for pattern in VOLATILE_LINES)


def meaningful_lines(text: str) -> list[str]:
    """The lines that decide whether a configuration changed: neither volatile nor empty.

    Like innovaphone's own server, which compares backups after the same two steps.
    """
    return [line for line in split_lines(text) if line and not is_volatile(line)]


def content_digest(lines: Sequence[str]) -> str:
    """SHA-256 (hex) of the meaningful lines: equal digests, same configuration."""
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def lines_changed(old: Sequence[str], new: Sequence[str]) -> int:
    """How many lines went or came between two lists of meaningful lines: the lines of `old`
    that `new` holds fewer times, plus the reverse (a changed line counts two). Where a line
    stands does not count: a line that only moved is not a change. Linear in the lines, whatever
    they repeat: it runs while the upload holds the database's write lock."""
    before, after = Counter(old), Counter(new)
    return (before - after).total() + (after - before).total()


def unified_diff(old: Sequence[str], new: Sequence[str], old_label: str, new_label: str, context: int = 3) -> str:
    """A unified diff of two lists of meaningful lines, as `diff -u` prints it; '' when equal.

    When the lines that differ, once the common head and tail are left aside, are more than
    DIFF_PLACED_LINES on either side, placing them would take too long: the diff then says so in
    its one hunk line and lists the lines gone (`-`) and come (`+`), each in its version's order,
    without their places (`changed_lines`)."""
    head = 0
    while head < len(old) and head < len(new) and old[head] == new[head]:
        head += 1
    tail = 0
    while tail < len(old) - head and tail < len(new) - head and old[-1 - tail] == new[-1 - tail]:
        tail += 1
    if max(len(old), len(new)) - head - tail <= DIFF_PLACED_LINES:
        # the common head and tail beyond the context do not reach the matcher
        start = max(head - context, 0)
        trimmed_old = old[start:len(old) - max(tail - context, 0)]
        trimmed_new = new[start:len(new) - max(tail - context, 0)]
        return "".join(
            _shifted(line, start) + "\n"
            for line in difflib.unified_diff(list(trimmed_old), list(trimmed_new), old_label, new_label,
                                             n=context, lineterm="")
        )
    return "".join(line + "\n" for line in changed_lines(old, new, old_label, new_label))


def changed_lines(old: Sequence[str], new: Sequence[str], old_label: str, new_label: str) -> Iterator[str]:
    """The lines gone from `old` and come in `new` (as `lines_changed` counts them), under a diff's
    file lines and one hunk line that says they are not placed, in linear time."""
    before, after = Counter(old), Counter(new)
    gone, come = before - after, after - before
    yield f"--- {old_label}"
    yield f"+++ {new_label}"
    yield (f"@@ too many changed lines to place here: {gone.total()} gone, {come.total()} come, of "
           f"{len(old)} and {len(new)}; each listed in its version's order, without its place "
           "(`configserver backups DEVICE --show N` prints a version whole) @@")
    for line in old:
        if gone[line] > 0:
            gone[line] -= 1
            yield "-" + line
    for line in new:
        if come[line] > 0:
            come[line] -= 1
            yield "+" + line


_HUNK = re.compile(r"@@ -(\d+)((?:,\d+)?) \+(\d+)((?:,\d+)?) @@")


def _shifted(line: str, by: int) -> str:
    """A hunk line of a diff of lists cut `by` lines from their start, numbered as in the whole
    lists (an empty range is numbered by the line before it, which shifts alike)."""
    found = _HUNK.fullmatch(line) if by and line.startswith("@@ ") else None
    if found is None:
        return line
    return f"@@ -{int(found[1]) + by}{found[2]} +{int(found[3]) + by}{found[4]} @@"
