"""Configuration backups and device facts, uploaded by the devices and kept under the device
their certificate names.

A poll's answer asks a device to upload (`Asking.lines`) on a schedule spread by hwid and when
an admin asks; the device PUTs its configuration, or the output of `xml-info`, to the
`backup_url`; `receive_upload` stores it in the inventory's database (`BackupStore`),
compressed, a new version only when it differs after the lines that change on every upload.

Names load on first use, so the settings can use the pure URL rule without the database layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Asking": "_asking",
    "Backups": "_service",
    "CertificateFacts": "_facts", "DeviceFacts": "_facts", "FactsUnreadable": "_facts",
    "parse_certificate_facts": "_facts", "parse_device_facts": "_facts",
    "ALL": "_schedule", "device_target": "_schedule", "is_due": "_schedule", "model_target": "_schedule",
    "slot_offset": "_schedule", "slot_start": "_schedule",
    "BackupState": "_store", "BackupStore": "_store", "Stored": "_store", "Version": "_store",
    "NotText": "_text", "check_text": "_text", "content_digest": "_text", "lines_changed": "_text",
    "meaningful_lines": "_text", "unified_diff": "_text",
    "BodyIncomplete": "_upload", "BodyTooLarge": "_upload", "UploadOutcome": "_upload", "read_body": "_upload",
    "receive_upload": "_upload", "refused_before_reading": "_upload",
    "check_backup_url": "_urls", "upload_kind": "_urls", "upload_lines": "_urls", "upload_path": "_urls",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ._asking import Asking
    from ._service import Backups
    from ._facts import CertificateFacts, DeviceFacts, FactsUnreadable, parse_certificate_facts, parse_device_facts
    from ._schedule import ALL, device_target, is_due, model_target, slot_offset, slot_start
    from ._store import BackupState, BackupStore, Stored, Version
    from ._text import NotText, check_text, content_digest, lines_changed, meaningful_lines, unified_diff
    from ._upload import (
        BodyIncomplete,
        BodyTooLarge,
        UploadOutcome,
        read_body,
        receive_upload,
        refused_before_reading,
    )
    from ._urls import check_backup_url, upload_kind, upload_lines, upload_path
