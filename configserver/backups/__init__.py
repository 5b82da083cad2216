"""Configuration backups and device facts, uploaded by the devices and kept under the device
their certificate names.

A poll's answer asks a device to upload (`Asking.lines`) on a schedule spread by hwid and when
an admin asks; the device PUTs its configuration, or the output of `xml-info`, to the
`backup_url`; `receive_upload` stores it in the inventory's database (`BackupStore`),
compressed, a new version only when it differs after the lines that change on every upload.

Names load on first use (lazy_loader, from the list in __init__.pyi), so the settings can use
the pure URL rule without the database layer.
"""

from __future__ import annotations

import lazy_loader

# The names and their modules are listed once, in __init__.pyi.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
