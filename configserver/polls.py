"""One poll's outcome: the record that becomes the log line, the audit row and the inventory update."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(slots=True)
class PollRecord:
    """What happened on one poll: the log line, the audit row and the inventory update.

    Never holds the script itself: scripts carry passwords. `script_sha256` identifies it.
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

    def log_fields(self) -> dict[str, Any]:
        """The fields of the poll's log line: everything but the device's raw query."""
        out: dict[str, Any] = {"event": "poll"}
        for name in _LOGGED:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_LOGGED = tuple(f.name for f in fields(PollRecord) if f.name != "query")
