"""The root of the project's own errors: `except ConfigserverError` catches every one of them.

Each module raises its own named error (SettingsError, ConfigurationError, CertificateError...),
and each derives from ConfigserverError, so a caller can be as precise or as broad as it needs.
Errors that are also a kind of ValueError keep that base too.
"""

from __future__ import annotations


class ConfigserverError(Exception):
    """Something an admin, a device or a file got wrong; the text says what to fix."""
