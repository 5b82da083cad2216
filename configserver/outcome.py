"""What one poll came to: the answer sent, and the record that becomes the log line, the audit
row and the inventory update.

A frozen value, built once, at the end of the poll pipeline (poll.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one poll and everything the log, the metrics and the inventory keep of it.

    `body` is the answer itself; it never reaches a log line, a repr or the audit, since scripts
    carry passwords: `script_sha256` identifies the script sent.
    """

    time: float                 # unix seconds, when the request arrived
    client_ip: str | None
    path: str
    status: int                 # HTTP status sent
    reason: str | None          # refusal reason ("wrong CA", ...) or None when served
    hwid: str | None = None     # e.g. "IP232-30-00-af" (after CN fix); None when unknown
    mac: str | None = None      # "00-90-33-30-00-af"
    model: str | None = None    # "IP232"
    template: str | None = None # template file used, relative to the templates folder
    script_sha256: str | None = None
    query: dict[str, str] = field(default_factory=dict)  # the device's untrusted query args
    duration_ms: float = 0.0
    detail: str | None = None   # admin-facing detail of a refusal or error
    check_reported: str | None = None  # CHECK serial the device reported
    check_digest: str | None = None    # digest of the script's meaningful lines
    decision: str | None = None        # "sent" | "unchanged" | None
    # hwid, mac and model come from a certificate that was refused: the device is named, not proven
    claimed: bool = False
    body: bytes = field(default=b"", repr=False, compare=False)

    def log_fields(self) -> dict[str, Any]:
        """The fields of the poll's log line: everything but the device's raw query and the body."""
        out: dict[str, Any] = {"event": "poll"}
        for name in _LOGGED:
            value = getattr(self, name)
            if value is not None and value is not False:
                out[name] = value
        return out


_LOGGED = tuple(f.name for f in fields(Outcome) if f.name not in ("query", "body"))
