"""A lab on disk: CAs, device certificates, a server certificate, templates, variables, settings.

    lab = create_lab(Path("lab"))             # LabExists if there is one, unless force=True
    lab.device("IP232-30-00-af").cert         # Path of that device's certificate
    open_lab(Path("lab")).config              # the configserver.toml that serves it

Everything here is for trying and testing. Nothing in a lab may ever be trusted in production:
the CA keys lie next to the certificates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigserverError
from ..identity import InvalidDeviceName, parse_device_name
from .pki import CertificateAuthority

__all__ = [
    "Lab", "LabDevice", "LabError", "LabExists", "NotALab", "UnknownDevice", "create_lab", "find_lab", "open_lab",
]

MANIFEST = "lab.json"
LAB_HOST = "127.0.0.1"
LAB_PORT = 8443


class LabError(ConfigserverError):
    """Something about a lab is wrong; the text says what to do."""


class LabExists(LabError):
    """`create_lab` found a lab (or other files) where it should write one."""


class NotALab(LabError):
    """The folder holds no lab made by `create_lab`."""


class UnknownDevice(LabError):
    """The lab has no device of that name or hwid."""


@dataclass(frozen=True)
class LabDevice:
    """One device certificate of the lab, and what a server should do with it."""

    name: str        # what `lab poll` takes, and the stem of its files
    cn: str          # as in the certificate
    hwid: str        # the CN after the broken-name fix
    issuer: str      # which lab CA issued it: "innovaphone CA 1", "forged CA 1", ...
    expired: bool
    accepted: bool   # whether the lab server lets it finish the TLS handshake
    expected: str    # what the server does with it, in words
    cert: Path
    key: Path


@dataclass(frozen=True)
class Lab:
    """A lab folder made by `create_lab`."""

    root: Path
    devices: tuple[LabDevice, ...]

    @property
    def config(self) -> Path:
        """The configserver.toml that serves this lab with built-in TLS on 127.0.0.1:8443."""
        return self.root / "configserver.toml"

    @property
    def ca_bundle(self) -> Path:
        """innovaphone CA 1 and CA 2 (the lab's stand-ins): the devices the server accepts."""
        return self.root / "ca" / "device-cas.pem"

    @property
    def server_ca(self) -> Path:
        """The CA that issued the server certificate: what a lab device trusts."""
        return self.root / "ca" / "server-ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def vars(self) -> Path:
        return self.root / "vars"

    def device(self, name: str) -> LabDevice:
        """The device whose name or hwid is `name` (the hwid as the server knows it: broken
        early CNs fixed, hex without regard to case); the genuine one when a forged device
        shares its CN. Raises UnknownDevice listing the lab's devices.
        """
        try:
            hwid = parse_device_name(name).hwid
        except InvalidDeviceName:
            hwid = None
        for device in self.devices:
            if name == device.name or device.hwid == hwid:
                return device
        known = ", ".join(d.name for d in self.devices)
        raise UnknownDevice(f"the lab in {self.root} has no device {name!r}; it has: {known}")


# name, CN, issuing CA, expired, what the server does with it. A genuine device comes before a
# forged one with the same CN, so that `Lab.device(hwid)` finds the genuine one.
_DEVICES = (
    ("IP232-30-00-af", "IP232-30-00-af", "innovaphone CA 1", False,
     "its own script: templates/devices/IP232-30-00-af.j2"),
    ("IP232-30-01-10", "IP232-30-01-10", "innovaphone CA 2", False,
     "the IP232 model script: templates/models/IP232.j2"),
    ("IP1202-35-fe-4d", "IP1202-35-fe-4d", "innovaphone CA 2", False, "the default script: templates/default.j2"),
    ("IP112-30-03-01", "IP112-30-03-01", "innovaphone CA 1", False, "the default script: templates/default.j2"),
    ("IP222s-30-00-b0", "IP222s-30-00-b0", "innovaphone CA 1", False,
     "broken early CN, served as IP222-30-00-b0: templates/models/IP222.j2"),
    ("IP232-30-00-e1", "IP232-30-00-e1", "innovaphone CA 1", True, "refused in the TLS handshake: expired"),
    ("forged-IP232-30-00-af", "IP232-30-00-af", "forged CA 1", False,
     "refused in the TLS handshake: a CA with CA 1's name but another key"),
    ("unrelated-IP232-30-00-f0", "IP232-30-00-f0", "unrelated CA", False,
     "refused in the TLS handshake: a CA that is not innovaphone's"),
)
_ACCEPTED_CAS = ("innovaphone CA 1", "innovaphone CA 2")


def create_lab(root: Path, *, force: bool = False) -> Lab:
    """Make a complete lab in `root`, in a few seconds, and return it.

    Writes the CAs (innovaphone CA 1 and 2 stand-ins with the vendor's exact names, a forged
    CA 1, an unrelated CA, the lab server CA), device certificates and keys, a server certificate
    for localhost and 127.0.0.1, sample templates and variables, and `configserver.toml` with
    absolute paths, serving built-in TLS on 127.0.0.1:8443. Raises LabExists when `root` holds a
    lab (unless `force`, which replaces it) or any other files (always).
    """
    root = Path(root).absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not (root / MANIFEST).is_file():
            raise LabExists(f"{root} exists and is not an empty folder or a lab: choose another folder")
        if not force:
            raise LabExists(f"{root} already holds a lab: use it, or replace it with --force")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and move it in at the end: an interrupted run leaves no half lab.
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        staging.chmod(0o755)  # as a plain mkdir would make it; the keys inside are 0600
        _write_lab(staging, final_root=root)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_lab(root)


def open_lab(root: Path) -> Lab:
    """The lab in `root`. Raises NotALab when `create_lab` did not make one there."""
    root = Path(root).absolute()
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        devices = tuple(
            LabDevice(
                name=d["name"], cn=d["cn"], hwid=d["hwid"], issuer=d["issuer"], expired=d["expired"],
                accepted=d["accepted"], expected=d["expected"], cert=root / d["cert"], key=root / d["key"],
            )
            for d in manifest["devices"]
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotALab(f"{root} holds no lab ({exc}); make one with `configserver lab init {root}`") from None
    return Lab(root=root, devices=devices)


def find_lab(given: Path | None, *, settings_file: Path | None, cwd: Path) -> Lab:
    """The lab a command means: `given` when there is one (`--lab`); else the lab whose
    `configserver.toml` is the settings file in use (every lab holds its own); else the lab the
    working folder is; else `lab/` in it, where `scripts/run` makes one.

    Raises NotALab naming the folders it looked in.
    """
    if given is not None:
        return open_lab(given)
    candidates = []
    if settings_file is not None:
        candidates.append(Path(settings_file).absolute().parent)
    candidates += [Path(cwd).absolute(), Path(cwd).absolute() / "lab"]
    for folder in dict.fromkeys(candidates):   # in order, each once
        if (folder / MANIFEST).is_file():
            return open_lab(folder)
    looked = ", ".join(str(folder) for folder in dict.fromkeys(candidates))
    raise NotALab(f"found no lab in {looked}: name one with --lab DIR, or make one with `configserver lab init DIR`")


def _write_lab(root: Path, *, final_root: Path) -> None:
    for folder in ("ca", "server", "devices", "templates/models", "templates/devices", "vars/models", "vars/devices"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    cas = {
        "innovaphone CA 1": (CertificateAuthority.innovaphone(1), "innovaphone-device-ca-1"),
        "innovaphone CA 2": (CertificateAuthority.innovaphone(2), "innovaphone-device-ca-2"),
    }
    forged = CertificateAuthority(cas["innovaphone CA 1"][0].subject)
    cas["forged CA 1"] = (forged, "forged-device-ca-1")
    cas["unrelated CA"] = (CertificateAuthority.named("Other Device CA", "Some Other Vendor"), "unrelated-ca")
    server_ca = CertificateAuthority.named("configserver lab server CA")
    cas["server CA"] = (server_ca, "server-ca")
    for ca, stem in cas.values():
        (root / "ca" / f"{stem}.pem").write_bytes(ca.cert_pem)
        _write_private(root / "ca" / f"{stem}.key", ca.key_pem)
    (root / "ca" / "device-cas.pem").write_bytes(cas["innovaphone CA 1"][0].cert_pem + cas["innovaphone CA 2"][0].cert_pem)

    server_ca.issue_server(["localhost", LAB_HOST]).write(root / "server" / "server.pem", root / "server" / "server.key")

    manifest = []
    for name, cn, issuer, expired, expected in _DEVICES:
        device = cas[issuer][0].issue_device(cn, expired=expired)
        device.write(root / "devices" / f"{name}.pem", root / "devices" / f"{name}.key")
        manifest.append(
            {
                "name": name, "cn": cn, "hwid": parse_device_name(cn).hwid, "issuer": issuer,
                "expired": expired, "accepted": issuer in _ACCEPTED_CAS and not expired,
                "expected": expected, "cert": f"devices/{name}.pem", "key": f"devices/{name}.key",
            }
        )
    (root / MANIFEST).write_text(json.dumps({"devices": manifest}, indent=2) + "\n", encoding="utf-8")

    for relative, text in _SAMPLE_FILES.items():
        (root / relative).write_text(text, encoding="utf-8")
    (root / "configserver.toml").write_text(_settings_text(final_root), encoding="utf-8")
    (root / "README.txt").write_text(_readme_text(final_root, manifest), encoding="utf-8")


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _toml_string(value: object) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(str(value))


def _settings_text(root: Path) -> str:
    return f"""\
# configserver lab, made by `configserver lab init`. For trying and testing only:
# never trust these certificates in production (their CA keys lie next to them).
#
#   configserver --config {root / "configserver.toml"} serve
#   configserver lab poll IP232-30-00-af --lab {root}

templates = {_toml_string(root / "templates")}
vars = {_toml_string(root / "vars")}

# Built-in TLS: devices must show a certificate from CA 1 or CA 2 (the lab's stand-ins).
host = {_toml_string(LAB_HOST)}
port = {LAB_PORT}
tls_cert = {_toml_string(root / "server" / "server.pem")}
tls_key = {_toml_string(root / "server" / "server.key")}
ca_bundle = {_toml_string(root / "ca" / "device-cas.pem")}

database = {_toml_string("sqlite:///" + str(root / "configserver.db"))}
"""


def _readme_text(root: Path, manifest: list[dict[str, str]]) -> str:
    rows = "\n".join(f"  {d['name']:<26} {d['issuer']:<18} {d['expected']}" for d in manifest)
    return f"""\
configserver lab
================

Made by `configserver lab init`. NEVER TRUST ANYTHING IN HERE IN PRODUCTION: these CAs only
imitate innovaphone's names, and their private keys lie next to them in ca/.

Serve it:   configserver --config {root / "configserver.toml"} serve
Poll it:    configserver lab poll IP232-30-00-af --lab {root}

Devices (devices/<name>.pem and .key):
{rows}

ca/device-cas.pem is the CA bundle the server trusts (innovaphone CA 1 and CA 2 stand-ins).
ca/server-ca.pem issued server/server.pem (localhost, 127.0.0.1); lab devices trust it.
Edit templates/ and vars/ freely: the server picks up changes on the next poll.
"""


_SAMPLE_FILES = {
    "templates/default.j2": """\
# {{ device.hwid }}: lab default script
mod cmd UP1 times /allow {{ vars.update_hours }} /initial {{ vars.initial_minutes }}
# configserver: every poll above
config change UP1 /url {{ vars.update_url }} /poll {{ vars.poll_minutes }}
mod cmd UP1 setvar site {{ vars.site }}
""",
    "templates/models/IP232.j2": """\
{% include "default.j2" -%}
# firmware for every IP232
mod cmd UP0 prot {{ vars.firmware_url }}/ip232.bin ser {{ vars.firmware_build }}
""",
    "templates/models/IP222.j2": """\
{% include "default.j2" -%}
# firmware for every IP222
mod cmd UP0 prot {{ vars.firmware_url }}/ip222.bin ser {{ vars.firmware_build }}
""",
    "templates/devices/IP232-30-00-af.j2": """\
{% include "models/IP232.j2" -%}
# only for {{ device.hwid }} (MAC {{ device.mac }})
mod cmd UP1 setvar desk {{ vars.desk }}
""",
    "vars/default.toml": """\
# Every device sees these; vars/models/<model>.toml and vars/devices/<hwid>.toml override them.
update_url = "https://127.0.0.1:8443/update"
poll_minutes = 15
update_hours = "0,1,2,3,4,5"
initial_minutes = 5
site = "lab"
firmware_url = "http://firmware.lab.invalid/13r3"
firmware_build = "138900"
""",
    "vars/models/IP232.toml": """\
firmware_build = "138912"
""",
    "vars/devices/IP232-30-00-af.toml": """\
poll_minutes = 1
desk = "reception"
""",
}
