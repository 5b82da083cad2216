"""Firmware and boot code for the fleet: targets per model, rollout waves, maintenance windows.

    _declaration.py  the `[firmware]` table of the vars files, layered into one device's declaration
    _rollout.py      which wave a device is in (a stable hash of its hwid) and when it opens
    _decision.py     declaration, reported build, wave, window -> the lines a poll gets
    _stage.py        the poll pipeline's stage: a device's declaration from a content snapshot
    _check.py        what `configserver check` finds in the `[firmware]` tables
    _state.py        sends and halts in the inventory's database (imported only where served)

The rules are pure functions on values; `configserver firmware` and the poll pipeline call them.
"""

from ._check import FirmwareProblem, check_firmware
from ._decision import (
    HALTED,
    HALTS_UNKNOWN,
    NO_LINES,
    NO_TARGET,
    ON_TARGET,
    OUTSIDE_WINDOW,
    SENT,
    TAKES_NONE,
    WAITING,
    FirmwareAnswer,
    decide,
    differs,
    file_url,
    takes,
    times_line,
    window_open,
)
from ._declaration import (
    BUILD,
    KINDS,
    NOTHING,
    Declaration,
    FirmwareError,
    Rollout,
    Wave,
    Window,
    check_url,
    resolve,
)
from ._rollout import AT_ONCE, FIRST, Placement, place, position
from ._stage import FirmwareStage, KnownHalts, Ledger, Send, firmware_layers, model_declaration

__all__ = [
    "AT_ONCE",
    "BUILD",
    "FIRST",
    "HALTED",
    "HALTS_UNKNOWN",
    "KINDS",
    "NOTHING",
    "NO_LINES",
    "NO_TARGET",
    "ON_TARGET",
    "OUTSIDE_WINDOW",
    "SENT",
    "TAKES_NONE",
    "WAITING",
    "Declaration",
    "FirmwareAnswer",
    "FirmwareError",
    "FirmwareProblem",
    "FirmwareStage",
    "KnownHalts",
    "Ledger",
    "Placement",
    "Rollout",
    "Send",
    "Wave",
    "Window",
    "check_firmware",
    "check_url",
    "decide",
    "differs",
    "file_url",
    "firmware_layers",
    "model_declaration",
    "place",
    "position",
    "resolve",
    "takes",
    "times_line",
    "window_open",
]

# What only a serving process (the devices' app, the admin page) needs: sends and halts in the
# inventory's database. Loaded on first use, so the poll pipeline, `render` and `check` never
# import the database layer.
_SERVED = {"Halt": "_state", "RolloutState": "_state", "firmware_sent": "_tables"}


def __getattr__(name: str) -> object:
    home = _SERVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
