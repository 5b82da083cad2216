"""A lab PKI that looks like innovaphone's: device CAs with the vendor's exact names.

For trying and testing only. Nothing made here may ever be trusted in production.

    ca = CertificateAuthority.innovaphone(1)
    phone = ca.issue_device("IP232-30-00-af")
    phone.cert_pem, phone.key_pem
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_CA_NAMES = {
    1: "innovaphone Device Certification Authority",
    2: "innovaphone Device Certification Authority 2",
}

_DAY = dt.timedelta(days=1)


def innovaphone_ca_name(generation: int) -> x509.Name:
    """The subject of innovaphone's device CA number `generation` (1, or 2 since July 2015)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "innovaphone"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, DEVICE_CA_NAMES[generation]),
        ]
    )


def device_name(cn: str) -> x509.Name:
    """The subject innovaphone devices carry: C=DE, O=innovaphone, CN=<cn>."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "innovaphone"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _new_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCert:
    """A certificate with its private key, as a lab device or server holds it."""

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey
    issuer_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.private_key)

    @property
    def chain_pem(self) -> bytes:
        """Leaf followed by its issuer: what a server presents (lighttpd needs both)."""
        return self.cert_pem + self.issuer_pem

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate and its key (the key readable by the owner only)."""
        cert_path.write_bytes(self.cert_pem)
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem)


class CertificateAuthority:
    """A self-signed CA that issues device and server certificates."""

    def __init__(self, subject: x509.Name, *, key_bits: int = 2048) -> None:
        self.subject = subject
        self.private_key = _new_key(key_bits)
        now = dt.datetime.now(dt.timezone.utc)
        public = self.private_key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 20 * 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )

    @classmethod
    def innovaphone(cls, generation: int = 1) -> "CertificateAuthority":
        """A lab stand-in for innovaphone's device CA 1 or 2, with the vendor's exact DN."""
        return cls(innovaphone_ca_name(generation))

    @classmethod
    def named(cls, common_name: str, organization: str = "configserver lab") -> "CertificateAuthority":
        """Any other CA, such as an unrelated vendor's or the lab's server CA."""
        return cls(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.private_key)

    def issue_device(
        self,
        cn: str,
        *,
        subject: x509.Name | None = None,
        expired: bool = False,
        key_bits: int = 2048,
        client_auth: bool = True,
    ) -> IssuedCert:
        """A device certificate for `cn` (or for a whole `subject`), valid for ten years.

        `expired` makes one whose validity ended thirty days ago.
        """
        now = dt.datetime.now(dt.timezone.utc)
        if expired:
            not_before, not_after = now - 400 * _DAY, now - 30 * _DAY
        else:
            not_before, not_after = now - _DAY, now + 3650 * _DAY
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        if not client_auth:
            usage = [ExtendedKeyUsageOID.SERVER_AUTH]
        return self._issue(
            subject or device_name(cn), not_before, not_after, key_bits,
            [(x509.ExtendedKeyUsage(usage), False)],
        )

    def issue_server(self, hosts: list[str]) -> IssuedCert:
        """A TLS server certificate for host names and IP addresses."""
        now = dt.datetime.now(dt.timezone.utc)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        return self._issue(
            subject, now - _DAY, now + 825 * _DAY, 2048,
            [
                (x509.SubjectAlternativeName(names), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            ],
        )

    def _issue(
        self,
        subject: x509.Name,
        not_before: dt.datetime,
        not_after: dt.datetime,
        key_bits: int,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> IssuedCert:
        key = _new_key(key_bits)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        certificate = builder.sign(self.private_key, hashes.SHA256())
        return IssuedCert(certificate, key, self.cert_pem)
