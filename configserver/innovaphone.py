"""innovaphone's facts, in one place: the device CAs, the MAC prefix, broken early model names,
the models innovaphone's own update server knows, and where a device reports its builds.

Pure values: nothing here reads files or imports a library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

# Devices' MACs start with innovaphone's OUI; a device CN carries the last three bytes.
INNOVAPHONE_OUI = "00-90-33"

# The organizational units of innovaphone's device CAs: CA 2 signs devices made since July 2015.
# Both sit under C=DE, O=innovaphone, and both must be accepted.
DEVICE_CA_UNITS: Mapping[int, str] = MappingProxyType({
    1: "innovaphone Device Certification Authority",
    2: "innovaphone Device Certification Authority 2",
})

# The device CAs' subjects in the legacy form, which reads root first and so cannot be
# confused with RFC 4514's leaf-first order: the default of the `accepted_issuers` setting.
DEVICE_CA_DNS: tuple[str, ...] = tuple(
    f"/C=DE/O=innovaphone/OU={unit}" for unit in DEVICE_CA_UNITS.values()
)

# Some early certificates carry a model name that is not the product's ("some early
# certificates where broken", innovaphone's own update server). Only the model part is fixed.
BROKEN_MODEL_NAMES: Mapping[str, str] = MappingProxyType({
    "IP222s": "IP222",
    "IP232s": "IP232",
    "IP240a": "IP240",
    "IP200a": "IP200",
})

# Model names from the class lists of innovaphone's own update server (config.xml, build 2033),
# casefolded. A model missing here can still be used: any file that names it makes it known.
MODELS: frozenset[str] = frozenset(
    """
    ip101 ip102 ip110 ip110a ip111 ip112 ip150 ip150a ip152 ip153 ip154 ip200a ip200b ip222
    ip222a ip230 ip230a ip232 ip240 ip240a ip241 ip242 ip72 swphone mypbxi mypbxa
    ipva ipvadect ip0010 ip0011 ip0013 ip1060 ip1130 ip1200 ip1201 ip1202 ip2000 ip22 ip24 ip28
    ip29 ip29-2 ip29-4 ip3000 ip3010 ip3011 ip302 ip305 ip311 ip38 ip4001 ip400 ip411 ip6000
    ip6010 ip6012 ip6013 ip800 ip810 ip811 ipbs ipbs2 pbl
    """.split()
)


def model_fixes(extra: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The broken-model table in force: innovaphone's, extended (or overridden) by `cn_fixes`."""
    if not extra:
        return BROKEN_MODEL_NAMES
    return MappingProxyType({**BROKEN_MODEL_NAMES, **extra})


# -- firmware (innovaphone's update server, config.xml <nofirmdev>, <nobootdev>, <filenames>) --

# Models that never take a firmware or a boot code update this way: soft phones, apps, DECT bases.
NO_FIRMWARE_MODELS: frozenset[str] = frozenset({"swphone", "mypbxi", "ipbs", "ipbs2", "pbl"})
NO_BOOT_MODELS: frozenset[str] = frozenset(
    {"ipva", "ipvadect", "swphone", "mypbxa", "mypbxi", "ipbs", "ipbs2", "pbl"})
# Files named otherwise than ip<model>.bin / boot<model>.bin.
_FIRMWARE_FILE_NAMES: Mapping[tuple[str, str], str] = MappingProxyType({("mypbxa", "prot"): "mypbx.apk"})


def firmware_file_name(model: str, kind: str) -> str:
    """innovaphone's file name for a model's firmware (`kind` "prot") or boot code ("boot"):
    `ip232.bin`, `boot232.bin`; the model without its `ip` prefix or any `-...` suffix."""
    model = model.casefold()
    named = _FIRMWARE_FILE_NAMES.get((model, kind))
    if named:
        return named
    short = model.split("-", 1)[0].removeprefix("ip")
    return f"ip{short}.bin" if kind == "prot" else f"boot{short}.bin"


# -- the builds a device reports (its own query arguments, innovaphone.md 2.3) --

_BUILD_ARGUMENTS = {"prot": "PROT", "boot": "BOOT"}
_FIRST_BRACKET = re.compile(r"\[([^\]]*)\]")              # IP811[13.A127]: the firmware
_BOOTCODE = re.compile(r"Bootcode\[([^\]]*)\]", re.IGNORECASE)


def reported_build(query: Mapping[str, str], kind: str) -> str | None:
    """The build of `kind` ("prot" firmware, "boot" boot code) a device reports: its `PROT` or
    `BOOT` query argument (any case), else what its `ver` text shows
    (`13r1 dvl IP811[13.A127], Bootcode[113454], Hardware[300]`); None when it shows none.

    The one definition the firmware decision, its failure watch and the inventory share.
    Untrusted text, returned as it came: callers bound or check it.
    """
    value = _argument(query, _BUILD_ARGUMENTS[kind])
    if value:
        return value
    version = _argument(query, "ver")
    if not version:
        return None
    match = (_FIRST_BRACKET if kind == "prot" else _BOOTCODE).search(version)
    return (match.group(1) or None) if match else None


def _argument(query: Mapping[str, str], name: str) -> str | None:
    """A query argument by its name in any case; the name as the device writes it is tried first."""
    value = query.get(name)
    if value is not None:
        return value
    folded = name.casefold()
    for key, found in query.items():
        if key.casefold() == folded:
            return found
    return None
