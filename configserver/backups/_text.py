"""What counts in an uploaded configuration: text or not, the lines that change on every upload,
the digest that decides whether a version is new, and the diff an admin reads.

Pure functions on bytes and text. An upload holds the device's passwords and keys: nothing here
logs, and no error raised here quotes the upload.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Sequence

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
    """How many lines went or came between two lists of meaningful lines (a changed line counts two)."""
    changed = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag != "equal":
            changed += (i2 - i1) + (j2 - j1)
    return changed


def unified_diff(old: Sequence[str], new: Sequence[str], old_label: str, new_label: str, context: int = 3) -> str:
    """A unified diff of two lists of meaningful lines, as `diff -u` prints it; '' when equal."""
    return "".join(
        line if line.endswith("\n") else line + "\n"
        for line in difflib.unified_diff(list(old), list(new), old_label, new_label, n=context, lineterm="")
    )
