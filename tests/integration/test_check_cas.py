"""`configserver check-cas`: the bundle an admin assembles holds innovaphone's CA 1 and CA 2 and
nothing else, and every other file gets a message that says what to fix."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from configserver.cabundle import check_ca_bundle
from configserver.lab.pki import CertificateAuthority, device_name, innovaphone_ca_name


@pytest.fixture(scope="module")
def cas() -> dict[str, CertificateAuthority]:
    return {
        "ca1": CertificateAuthority.innovaphone(1),
        "ca2": CertificateAuthority.innovaphone(2),
        "forged": CertificateAuthority(innovaphone_ca_name(1)),
        "other": CertificateAuthority.named("Other Device CA", "Some Other Vendor"),
    }


def bundle(tmp_path: Path, *pems: bytes, name: str = "cas.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(pems))
    return path


def test_bundle_with_both_innovaphone_cas_passes_and_shows_their_fingerprints(tmp_path, cas):
    path = bundle(tmp_path, cas["ca1"].cert_pem, cas["ca2"].cert_pem)
    result = subprocess.run(
        [sys.executable, "-m", "configserver", "check-cas", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CA 1 (certificate 1): C=DE, O=innovaphone, OU=innovaphone Device Certification Authority" in result.stdout
    assert "CA 2 (certificate 2): C=DE, O=innovaphone, OU=innovaphone Device Certification Authority 2" in result.stdout
    assert result.stdout.count("SHA-256 ") == 2
    assert "OK: both innovaphone device CAs and nothing else" in result.stdout


def test_missing_second_ca_fails_the_command_and_is_named(tmp_path, cas):
    path = bundle(tmp_path, cas["ca1"].cert_pem)
    result = subprocess.run(
        [sys.executable, "-m", "configserver", "check-cas", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "problem: CA 2 (C=DE, O=innovaphone, OU=innovaphone Device Certification Authority 2) is missing" in result.stdout


def only_problem(report) -> str:
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def test_another_vendors_ca_in_the_bundle_is_a_problem(tmp_path, cas):
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["ca2"].cert_pem, cas["other"].cert_pem))
    assert "certificate 3 (C=DE, O=Some Other Vendor, CN=Other Device CA) is not an innovaphone device CA" in only_problem(report)


def test_second_certificate_with_ca1s_name_and_another_key_is_a_problem(tmp_path, cas):
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["forged"].cert_pem, cas["ca2"].cert_pem))
    assert "CA 1 appears 2 times with different contents" in only_problem(report)


def test_identical_copies_are_only_a_warning(tmp_path, cas):
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["ca1"].cert_pem, cas["ca2"].cert_pem))
    assert report.ok
    assert report.warnings == ["CA 1 is in the file 2 times (identical copies)."]


def test_certificate_with_ca_name_that_is_no_ca_is_a_problem(tmp_path, cas):
    # a leaf certificate whose subject is CA 2's name, issued by CA 1
    impostor = cas["ca1"].issue_device("unused", subject=innovaphone_ca_name(2))
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, impostor.cert_pem))
    assert any("CA 2 (certificate 2) is not a CA certificate" in p for p in report.problems), report.problems
    assert any("CA 2 (certificate 2) is not self-signed" in p for p in report.problems), report.problems


def test_name_close_to_an_innovaphone_ca_is_pointed_out(tmp_path, cas):
    near = CertificateAuthority(device_name("innovaphone Device Certification Authority 2"))  # CN instead of OU
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["ca2"].cert_pem, near.cert_pem))
    assert "looks like an innovaphone device CA, but its name is not exactly" in only_problem(report)


def test_expired_ca_is_a_problem(tmp_path, cas):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30 * 365)
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["ca2"].cert_pem), now=later)
    assert any(p.startswith("CA 1 (certificate 1) expired on") for p in report.problems), report.problems


def test_der_file_gets_the_conversion_command(tmp_path, cas):
    der = cas["ca1"].certificate.public_bytes(serialization.Encoding.DER)
    problem = only_problem(check_ca_bundle(bundle(tmp_path, der, name="ca.der")))
    assert "is one binary (DER) certificate, not PEM" in problem
    assert "openssl x509 -inform der" in problem


def test_private_key_in_the_bundle_is_a_problem(tmp_path, cas):
    report = check_ca_bundle(bundle(tmp_path, cas["ca1"].cert_pem, cas["ca2"].cert_pem, cas["ca1"].key_pem))
    assert "holds a PRIVATE KEY block" in only_problem(report)


def test_file_without_certificates_or_unreadable_is_a_problem(tmp_path):
    assert "holds no PEM certificate" in only_problem(check_ca_bundle(bundle(tmp_path, b"hello\n")))
    assert "cannot read the file" in only_problem(check_ca_bundle(tmp_path / "missing.pem"))


def run_check_cas(path: Path | bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    """`configserver check-cas PATH` in its own process; the timeout guards against a hang."""
    import os

    return subprocess.run([sys.executable, "-m", "configserver", "check-cas", path], capture_output=True,
                          timeout=20, env={**os.environ, **env})


def test_megabytes_of_unclosed_pem_markers_are_answered_at_once(tmp_path):
    # 3.6 MB of BEGIN lines: the lazy PEM pattern searched to the end of the file from each one,
    # some 10^11 steps; the answer now comes in one pass.
    path = bundle(tmp_path, b"-----BEGIN A-----\n" * 200_000)
    result = run_check_cas(path)
    assert result.returncode == 1
    assert b"holds no PEM certificate" in result.stdout
    assert result.stderr == b""


def test_the_certificates_after_an_unclosed_begin_line_are_found(tmp_path, cas):
    path = bundle(tmp_path, b"-----BEGIN CERTIFICATE-----\n" * 1000, cas["ca1"].cert_pem, cas["ca2"].cert_pem)
    report = check_ca_bundle(path)
    assert report.ok, report.problems
    assert [found.label for found in report.found] == ["CA 1", "CA 2"]


def test_a_file_name_that_is_not_utf8_is_shown_not_a_traceback(tmp_path, cas):
    path = bytes(tmp_path) + b"/cas-\xff.pem"
    Path(path.decode(errors="surrogateescape")).write_bytes(cas["ca1"].cert_pem)
    result = run_check_cas(path, PYTHONIOENCODING="utf-8")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == bytes(tmp_path) + b"/cas-\\xff.pem: 1 certificate"
    assert b"CA 2 (C=DE, O=innovaphone, OU=innovaphone Device Certification Authority 2) is missing" in result.stdout
    assert result.stderr == b""
