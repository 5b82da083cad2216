"""Running the admin page: its own uvicorn server on `admin_host:admin_port` or `admin_uds`."""

from __future__ import annotations

import ipaddress

from ..errors import ConfigserverError
from ..settings import Settings


class AdminNotConfigured(ConfigserverError):
    """The admin page is off: neither `admin_port` nor `admin_uds` is set."""


def listener(settings: Settings) -> str:
    """Where the admin page listens, in words: `http://127.0.0.1:8081` or `unix:/run/...`.

    Raises AdminNotConfigured when it is off.
    """
    if settings.admin_uds is not None:
        return f"unix:{settings.admin_uds}"
    if settings.admin_port is None:
        raise AdminNotConfigured(
            "the admin page is off: set admin_port (it listens on admin_host, 127.0.0.1 by default) "
            "or admin_uds in the settings")
    host = f"[{settings.admin_host}]" if ":" in settings.admin_host else settings.admin_host
    return f"http://{host}:{settings.admin_port}"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or `localhost`): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> None:
    """Serve the admin page until stopped. One process: sessions live in its memory.

    Raises AdminNotConfigured when neither `admin_port` nor `admin_uds` is set, and
    SettingsError for a users file or database it cannot use.
    """
    import uvicorn

    from ..logs import configure_logging, logging_config
    from ._web import create_admin_app

    where = listener(settings)
    configure_logging(settings.log_level)
    app = create_admin_app(settings)
    if settings.admin_uds is None and not is_loopback(settings.admin_host):
        import logging

        # Plain HTTP with passwords and session cookies: keep it on this machine.
        logging.getLogger("configserver.admin").warning("admin page off loopback", extra={"fields": {
            "event": "admin_not_loopback", "listener": where,
            "fix": "listen on 127.0.0.1 and publish through a terminator's admin vhost with TLS, or an SSH tunnel"}})
    uvicorn.run(
        app,
        host=settings.admin_host,
        port=settings.admin_port or 0,
        uds=str(settings.admin_uds) if settings.admin_uds else None,
        lifespan="on",
        # the admin's address comes from our trusted-proxy rules, never from uvicorn's
        proxy_headers=False,
        access_log=False,
        server_header=False,
        log_config=logging_config(settings.log_level),
    )
