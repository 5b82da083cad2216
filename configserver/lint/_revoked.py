"""The revoked file: lines that revoke nothing, and fingerprints that cannot match."""

from __future__ import annotations

import re

from ..revocation import RevocationError, read_revocations
from ._findings import Findings

_FINGERPRINT_ENTRY = re.compile(r"\s*(?:[0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}\b|\s*[0-9a-fA-F]{64}\b")


def check_revoked(found: Findings) -> None:
    path = found.settings.revoked
    if path is None:
        return
    try:
        revocations = read_revocations(path, found.fixes)
    except RevocationError as error:
        found.add(str(path), 1, str(error).removeprefix(f"{path}: "))
        return
    for line, why in revocations.problems:
        found.add(str(path), line, why)
    if revocations.fingerprints and not (found.settings.require_client_cert or found.settings.builtin_tls):
        text = path.read_text(encoding="utf-8-sig")
        line = next((number for number, entry in enumerate(text.splitlines(), 1) if _FINGERPRINT_ENTRY.match(entry)), 1)
        found.add(str(path), line, "a certificate fingerprint revokes only polls whose certificate reaches "
                  "the app: set require_client_cert (behind a terminator) or revoke the hwid or MAC")
