"""The admin page: the fleet, its problems and each device, for people, on a listener of its own.

    app = create_admin_app(settings)       # an ASGI app; nothing listens yet
    serve(settings)                        # what `configserver admin-serve` runs

It never shares the devices' listener: the devices' app answers none of its paths, and it
answers no poll. Users come from the `admin_users` file (`configserver admin-user add NAME`).
"""

from __future__ import annotations

from ._serve import AdminNotConfigured, serve
from ._users import UsersError, add_user, read_users, remove_user
from ._web import create_admin_app

__all__ = ["AdminNotConfigured", "UsersError", "add_user", "create_admin_app", "read_users", "remove_user", "serve"]
