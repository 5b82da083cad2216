"""Checking the device CA bundle an admin assembled: innovaphone's CA 1 and CA 2, nothing else.

The real CA certificates cannot ship with the project (certs/README.md says where to get them),
so the admin builds the file by hand. Every TLS terminator trusts each CA in it, so a wrong file
fails silently: a missing CA locks out its devices, an extra one lets another vendor's
certificates through the handshake. `check_ca_bundle` reads the file and says what is wrong.

    report = check_ca_bundle(Path("/etc/configserver/innovaphone-device-cas.pem"))
    print("\\n".join(report.lines()))
    report.ok
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .certificates import pem_blocks

__all__ = ["DEVICE_CAS", "BundleReport", "FoundCA", "check_ca_bundle", "run_check"]


def _innovaphone_ca(unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "innovaphone"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        ]
    )


# innovaphone's device CAs; CA 2 signs devices made since July 2015. Both must be accepted.
DEVICE_CAS: Mapping[str, x509.Name] = {
    "CA 1": _innovaphone_ca("innovaphone Device Certification Authority"),
    "CA 2": _innovaphone_ca("innovaphone Device Certification Authority 2"),
}

_WEAK_HASHES = ("md5", "sha1")


def format_dn(name: x509.Name) -> str:
    """`C=DE, O=innovaphone, OU=...`: attributes in certificate order, as admins read them."""
    return ", ".join(f"{a.rfc4514_attribute_name}={a.value}" for a in name)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex, the way most tools show it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


@dataclass(frozen=True)
class FoundCA:
    """One of the expected CAs, found in the bundle at `position` (1 = first certificate)."""

    label: str
    position: int
    certificate: x509.Certificate


@dataclass
class BundleReport:
    """What `check_ca_bundle` found. `problems` make the file unfit; `warnings` deserve a look."""

    path: Path
    count: int = 0
    found: list[FoundCA] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as text lines for a terminal."""
        out = [f"{self.path}: {self.count} certificate{'s' if self.count != 1 else ''}"]
        for ca in self.found:
            cert = ca.certificate
            out.append(f"  {ca.label} (certificate {ca.position}): {format_dn(cert.subject)}")
            out.append(f"    SHA-256 {fingerprint(cert)}")
            out.append(
                f"    valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
                f"{_key_description(cert)}"
            )
        out += [f"warning: {text}" for text in self.warnings]
        out += [f"problem: {text}" for text in self.problems]
        if self.ok:
            out.append("OK: both innovaphone device CAs and nothing else. Compare the fingerprints above "
                       "with those of a device's trust list before you rely on this file.")
        else:
            n = len(self.problems)
            out.append(f"NOT OK: {n} problem{'s' if n != 1 else ''}; do not give this file to a terminator or the app.")
        return out


def check_ca_bundle(path: Path, *, now: dt.datetime | None = None) -> BundleReport:
    """Check that the PEM file at `path` holds innovaphone's device CA 1 and CA 2, nothing else.

    Each must be there exactly once, carry the exact DN, be a CA certificate (self-signed, able
    to sign certificates) and be valid at `now` (default: the current time). Never raises for
    what the file holds or for an unreadable file: every finding goes into the report.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    report = BundleReport(Path(path))
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        report.problems.append(f"cannot read the file: {exc.strerror or exc}")
        return report

    certificates = _read_certificates(data, report)
    report.count = len(certificates)
    if not certificates and report.problems:
        return report  # the file itself is wrong: listing both CAs as missing would add nothing
    by_label: dict[str, list[tuple[int, x509.Certificate]]] = {label: [] for label in DEVICE_CAS}
    for position, cert in certificates:
        label = next((label for label, name in DEVICE_CAS.items() if cert.subject == name), None)
        if label is not None:
            by_label[label].append((position, cert))
        else:
            report.problems.append(_extra(position, cert))

    for label, name in DEVICE_CAS.items():
        candidates = by_label[label]
        distinct = {fingerprint(cert): (position, cert) for position, cert in reversed(candidates)}
        if not candidates:
            report.problems.append(
                f"{label} ({format_dn(name)}) is missing. Devices it certified would fail the handshake; "
                "certs/README.md says where to get it."
            )
            continue
        if len(distinct) > 1:
            listed = "; ".join(
                f"certificate {position}: SHA-256 {fingerprint(cert)}"
                for position, cert in sorted(distinct.values(), key=lambda item: item[0])
            )
            report.problems.append(
                f"{label} appears {len(distinct)} times with different contents ({listed}). A second "
                "certificate with the same name but another key is what a forged CA looks like: keep "
                "only the one a device's trust list shows."
            )
        elif len(candidates) > 1:
            report.warnings.append(f"{label} is in the file {len(candidates)} times (identical copies).")
        for position, cert in sorted(distinct.values(), key=lambda item: item[0]):
            report.found.append(FoundCA(label, position, cert))
            _check_ca(label, position, cert, now, report)
    return report


def run_check(path: Path, out: TextIO) -> int:
    """`configserver check-cas PATH`: print the report to `out`; 0 when the bundle is fit, else 1."""
    report = check_ca_bundle(path)
    out.write(printable("\n".join(report.lines()) + "\n", getattr(out, "encoding", None)))
    return 0 if report.ok else 1


def printable(text: str, encoding: str | None) -> str:
    """`text` as a terminal in `encoding` can show it, whatever bytes a file name held.

    A file name that is not UTF-8 reaches Python with its bytes as lone surrogates, and a CA's
    name may hold characters the terminal lacks: either made `print` raise UnicodeEncodeError.
    Bytes become `\\xff`, characters `\\u00fc`, so the admin still sees which file and which name.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    if encoding:
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    return text


def _read_certificates(data: bytes, report: BundleReport) -> list[tuple[int, x509.Certificate]]:
    blocks = pem_blocks(data)
    if not blocks:
        try:
            x509.load_der_x509_certificate(data)
        except ValueError:
            report.problems.append("holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line).")
        else:
            report.problems.append(
                "is one binary (DER) certificate, not PEM. Convert it with "
                "'openssl x509 -inform der -in FILE -out FILE.pem' and add the other CA."
            )
        return []
    certificates: list[tuple[int, x509.Certificate]] = []
    position = 0
    for block in blocks:
        kind = block.label
        if kind != "CERTIFICATE":
            report.problems.append(
                f"holds a {kind} block: a CA bundle holds certificates only (is this the right file?)."
            )
            continue
        position += 1
        try:
            certificates.append((position, x509.load_pem_x509_certificate(block.text)))
        except ValueError as exc:
            report.problems.append(f"certificate {position} cannot be read: {exc}")
    return certificates


def _extra(position: int, cert: x509.Certificate) -> str:
    subject = format_dn(cert.subject)
    if any("Device Certification Authority" in str(attribute.value) for attribute in cert.subject):
        expected = " or ".join(f"'{format_dn(name)}'" for name in DEVICE_CAS.values())
        return (
            f"certificate {position} ({subject}) looks like an innovaphone device CA, but its name is "
            f"not exactly {expected}. Terminators would trust it, the app would refuse every device it "
            "certified: get the file again from a device's trust list, or remove this certificate."
        )
    return (
        f"certificate {position} ({subject}) is not an innovaphone device CA. A terminator trusts every "
        "CA in this file, so its certificates would pass the handshake: remove it."
    )


def _check_ca(label: str, position: int, cert: x509.Certificate, now: dt.datetime, report: BundleReport) -> None:
    where = f"{label} (certificate {position})"
    try:
        constraints: x509.BasicConstraints | None = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None

    if constraints is not None and not constraints.ca:
        report.problems.append(
            f"{where} is not a CA certificate (basicConstraints CA:FALSE): it carries the CA's name "
            "but cannot have issued any device certificate."
        )
    elif constraints is None and cert.version != x509.Version.v1:
        report.problems.append(
            f"{where} is not marked as a CA (no basicConstraints extension): OpenSSL will not accept it "
            "as the issuer of device certificates."
        )
    if usage is not None and not usage.key_cert_sign:
        report.problems.append(f"{where} may not sign certificates (keyUsage without keyCertSign).")

    if cert.issuer != cert.subject:
        report.problems.append(
            f"{where} is not self-signed (issued by {format_dn(cert.issuer)}): innovaphone's device CAs "
            "are roots; this is some other certificate with the same name."
        )
    else:
        try:
            cert.verify_directly_issued_by(cert)
        except (InvalidSignature, ValueError, TypeError):
            report.problems.append(f"{where}: its self-signature does not verify; the file is damaged.")

    if now < cert.not_valid_before_utc:
        report.problems.append(f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.")
    if cert.not_valid_after_utc < now:
        report.problems.append(
            f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}: OpenSSL refuses every device it "
            "certified. Get the current certificate (certs/README.md)."
        )

    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        report.warnings.append(
            f"{where} has an RSA key of {key.key_size} bits. Debian's OpenSSL (security level 2) refuses "
            "chains to keys under 2048 bits: see the notes on old devices in the deploy/ samples."
        )
    algorithm = cert.signature_hash_algorithm
    if algorithm is not None and algorithm.name in _WEAK_HASHES and cert.issuer == cert.subject:
        report.warnings.append(
            f"{where} signs itself with {algorithm.name.upper()}. Harmless for a trusted root (its own "
            "signature is not checked), but devices it signed with the same hash need the old-device settings."
        )


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")
