"""Content: what is on disk in the templates and vars folders, and which of it a device gets.

    naming.py     file names and devices.csv rows -> lookup keys (one rule for all)
    variables.py  reading and layering vars files
    analysis.py   what a template's text says before rendering (options, per-poll reads)
    lookup.py     the lookup index of a folder: key -> file, 16 bytes a file
    snapshot.py   one immutable view of both folders, and the choice for a device
    watcher.py    scanning the folders into snapshots, with the grace window
    rendering.py  rendering a template of one snapshot, CRLF line ends
"""

from .naming import (
    DEVICES_CSV,
    TEMPLATE_SUFFIX,
    VARS_SUFFIX,
    csv_row_device,
    device_file_key,
    lookup_key,
)
from .rendering import ConfigurationError, ContentChanged, Renderer, to_crlf
from .snapshot import Choice, ContentRules, Snapshot, SourceFile, build_snapshot
from .watcher import ContentStore

__all__ = [
    "DEVICES_CSV",
    "TEMPLATE_SUFFIX",
    "VARS_SUFFIX",
    "Choice",
    "ConfigurationError",
    "ContentChanged",
    "ContentRules",
    "ContentStore",
    "Renderer",
    "Snapshot",
    "SourceFile",
    "build_snapshot",
    "csv_row_device",
    "device_file_key",
    "lookup_key",
    "to_crlf",
]
