"""configserver: each innovaphone device gets its own update script, identified by its certificate."""

from .app import ConfigServer, create_app
from .settings import Settings, SettingsError, load_settings

__all__ = ["ConfigServer", "Settings", "SettingsError", "create_app", "load_settings"]
