"""The fleet's inventory and the audit of every poll, in SQLite (default) or PostgreSQL.

The app records each poll with `Inventory.record()`, which only queues; a writer task stores the
queue in batches, folding a flood of one device's polls into counted rows. The CLI asks with
`list_devices()` (or streams them with `write_devices_json()` and `write_devices_table()`) and `device_history()`.

    inventory = Inventory.from_settings(settings)
    await inventory.start()
    inventory.record(poll_record)   # never blocks, never raises
    await inventory.close()
"""

from ._commands import (
    age,
    device_history,
    device_json,
    devices_json,
    devices_table,
    history_table,
    list_devices,
    migrate_database,
    table,
    when,
    write_devices_json,
    write_devices_table,
)

# The database itself, for packages that keep tables of their own beside the inventory's
# (firmware/): the engine, the migrations and the devices table they join with.
from ._database import (
    SCHEMA_VERSION,
    InventoryError,
    database_url,
    devices,
    explain,
    migrate,
    open_engine,
)
from ._queries import Device, Poll, check_status, parse_duration
from ._recorder import Inventory

__all__ = [
    "age",
    "check_status",
    "table",
    "when",
    "SCHEMA_VERSION",
    "Device",
    "Inventory",
    "InventoryError",
    "Poll",
    "database_url",
    "device_history",
    "device_json",
    "devices",
    "devices_json",
    "devices_table",
    "explain",
    "history_table",
    "list_devices",
    "migrate",
    "migrate_database",
    "open_engine",
    "parse_duration",
    "write_devices_json",
    "write_devices_table",
]
