"""Shared fixtures: a lab PKI with innovaphone's exact CA names, built once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from driving import Site

from configserver.lab.pki import CertificateAuthority, IssuedCert, innovaphone_ca_name


@dataclass(frozen=True)
class LabPKI:
    ca1: CertificateAuthority
    ca2: CertificateAuthority
    forged_ca: CertificateAuthority      # CA 1's DN, another key
    other_ca: CertificateAuthority       # an unrelated vendor
    phone: IssuedCert                    # IP232-30-00-af, CA 1
    gateway: IssuedCert                  # IP1202-35-fe-4d, CA 2
    broken: IssuedCert                   # IP222s-30-00-b0, CA 2: served as IP222-30-00-b0
    expired: IssuedCert                  # IP232-30-00-b1, CA 1, expired 30 days ago
    forged: IssuedCert                   # IP232-30-00-af from the forged CA
    unrelated: IssuedCert                # IP232-30-00-b2 from the unrelated CA

    def bundle_pem(self) -> bytes:
        return self.ca1.cert_pem + self.ca2.cert_pem


@pytest.fixture(scope="session")
def pki() -> LabPKI:
    ca1 = CertificateAuthority.innovaphone(1)
    ca2 = CertificateAuthority.innovaphone(2)
    forged_ca = CertificateAuthority(innovaphone_ca_name(1))
    other_ca = CertificateAuthority.named("Other Device CA", "Some Other Vendor")
    return LabPKI(
        ca1=ca1, ca2=ca2, forged_ca=forged_ca, other_ca=other_ca,
        phone=ca1.issue_device("IP232-30-00-af"),
        gateway=ca2.issue_device("IP1202-35-fe-4d"),
        broken=ca2.issue_device("IP222s-30-00-b0"),
        expired=ca1.issue_device("IP232-30-00-b1", expired=True),
        forged=forged_ca.issue_device("IP232-30-00-af"),
        unrelated=other_ca.issue_device("IP232-30-00-b2"),
    )


@pytest.fixture(scope="session")
def ca_bundle(pki: LabPKI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cas") / "innovaphone-device-cas.pem"
    path.write_bytes(pki.bundle_pem())
    return path


@pytest.fixture
def site(tmp_path: Path, ca_bundle: Path) -> Site:
    s = Site(tmp_path, ca_bundle)
    s.templates.mkdir()
    s.vars.mkdir()
    return s
