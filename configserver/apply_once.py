"""Applying each change once: the serial of a rendered script, and the answer built around it.

An innovaphone device stores the serial of the last script it applied (`UPDATE/CHECK`) and
reports it as the query argument `CHECK` on every poll. We compare that with a digest of the
device's rendered script, the way innovaphone's own update server does:

* `CHECK` equals the digest: the device gets its every-poll lines and a comment, nothing else.
* otherwise: every-poll lines, the script, `config write`, `config activate`,
  `mod cmd UP1 check ser <digest>` (which only stores the new serial: it is the last line, so it
  skips nothing), then the final command (`iresetn` resets only where a setting needs it).

A template marks its every-poll lines by putting them above one line that reads exactly
`# configserver: every poll above` (the marker may come from an include). Those lines run on
every poll, changed or not, and are left out of the digest. A template's own options sit in a
Jinja comment anywhere in the template file a device is given:

    {# configserver: apply_once=false final=reset #}

Pure functions on text: nothing here reads files or knows about requests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import ConfigserverError

EVERY_POLL_MARKER = "# configserver: every poll above"
# What the device does once a changed script is applied (innovaphone.md 1.2): reset when idle,
# reset now, each "only if the change needs it" (n), or nothing (ser).
FinalCommand = Literal["iresetn", "ireset", "resetn", "reset", "ser"]
FINAL_COMMANDS: tuple[str, ...] = get_args(FinalCommand)
SENT = "sent"
UNCHANGED = "unchanged"

_OPTIONS_COMMENT = re.compile(r"\{#-?\s*configserver:(?P<body>.*?)-?#\}", re.DOTALL)
_BOOLEANS = {"true": True, "false": False}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class OptionsError(ConfigserverError, ValueError):
    """A template's `{# configserver: ... #}` comment cannot be understood; `line` is where it is."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message, self.line = message, line


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    """What a template says about applying itself once. None: the setting decides."""

    apply_once: bool | None = None
    final_command: str | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    """The answer to send, the script's serial, and whether the script was sent or found unchanged."""

    script: str
    digest: str
    decision: str   # SENT or UNCHANGED


def parse_options(source: str) -> TemplateOptions:
    """The options in a template's source: `{# configserver: apply_once=true|false final=<command> #}`.

    Raises OptionsError (with the line) for an unknown option or value, or a second such comment:
    a typo must never silently fall back to the default.
    """
    found = list(_OPTIONS_COMMENT.finditer(source))
    if not found:
        return TemplateOptions()
    if len(found) > 1:
        line = line_of(source, found[1].start())
        raise OptionsError("a second {# configserver: ... #} comment: give all options in one", line)
    match = found[0]
    line = line_of(source, match.start())
    apply_once: bool | None = None
    final: str | None = None
    for word in match["body"].split():
        key, _, value = word.partition("=")
        if key == "apply_once" and value in _BOOLEANS:
            apply_once = _BOOLEANS[value]
        elif key == "final" and value in FINAL_COMMANDS:
            final = value
        elif key == "apply_once":
            raise OptionsError(f"apply_once={value!r}: give true or false", line)
        elif key == "final":
            raise OptionsError(f"final={value!r}: give one of {', '.join(FINAL_COMMANDS)}", line)
        else:
            raise OptionsError(f"unknown option {word!r} (options: apply_once=true|false, final=<command>)", line)
    return TemplateOptions(apply_once, final)


def digest(text: str, key: bytes | None = None) -> str:
    """The serial of a script: 32 hex digits over its meaningful lines.

    Meaningful means neither blank nor a comment (`#...`), with the whitespace at either end
    of a line ignored; so editing a comment or re-indenting never makes a device apply its
    script again, and every other change does. 32 digits: the length of the MD5 serials that
    innovaphone's own server stores on devices.

    With `key` (the `digest_key` setting) it is an HMAC: the serial travels in every poll URL
    and lands in logs, and a plain hash of a script would let anyone who reads it try
    passwords (a short PIN in a few seconds) offline.
    """
    return _digest_lines(_LINE_BREAK.split(text), key)


def apply_once(
    script: str, reported: str | None, final_command: str = "iresetn", key: bytes | None = None,
) -> Applied:
    """Wrap a rendered script (CRLF lines) for a device that reported the serial `reported`.

    Returns the answer (CRLF lines), the digest of the script's applied-once part, and the
    decision. `final_command` is one of FINAL_COMMANDS; `ser` adds no final line. With `key`
    the digest is keyed (see `digest`).
    """
    lines = script.split("\r\n")
    if lines[-1] == "":
        lines.pop()
    every_poll: list[str] = []
    if EVERY_POLL_MARKER in script:
        for index, line in enumerate(lines):
            if line.strip() == EVERY_POLL_MARKER:
                every_poll, lines = lines[:index], lines[index + 1:]
                break
    serial = _digest_lines(lines, key)
    if reported == serial:
        out = [*every_poll, f"# unchanged: the device has applied this script (CHECK {serial})"]
        return Applied("\r\n".join(out) + "\r\n", serial, UNCHANGED)
    out = [*every_poll, *lines, "config write", "config activate", f"mod cmd UP1 check ser {serial}"]
    if final_command != "ser":
        out.append(final_command)
    return Applied("\r\n".join(out) + "\r\n", serial, SENT)


def _digest_lines(lines: list[str], key: bytes | None = None) -> str:
    meaningful = [text for text in (line.strip() for line in lines) if text and not text.startswith("#")]
    data = "\n".join(meaningful).encode("utf-8")
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(data).hexdigest()[:32]


def line_of(text: str, offset: int) -> int:
    """The 1-based line of `text` on which `offset` lies."""
    return text.count("\n", 0, offset) + 1
