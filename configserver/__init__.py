"""configserver: each innovaphone device gets its own update script, identified by its certificate.

Importing the package loads nothing else: `create_app`, `load_settings` and the rest are loaded
when first used, so a command such as `configserver --help` never starts the web stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigServer": "configserver.app",
    "create_app": "configserver.app",
    "Settings": "configserver.settings",
    "SettingsError": "configserver.settings",
    "load_settings": "configserver.settings",
    "ConfigserverError": "configserver.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'configserver' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
