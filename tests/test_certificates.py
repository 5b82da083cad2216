"""Forwarded certificates: the four encodings terminators use, and verification against the CAs."""

import base64
import shutil
import subprocess
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from driving import call, terminator_headers
from needs import need_server

from configserver.certificates import (
    CertificateError,
    CertificateVerifier,
    decode_forwarded_cert,
    load_ca_bundle,
)
from configserver.lab.pki import CertificateAuthority, IssuedCert


def encodings(cert):
    pem = cert.cert_pem.decode()
    der = cert.certificate.public_bytes(serialization.Encoding.DER)
    return {
        "plain PEM (built-in listener)": pem,
        "Apache: PEM with spaces": pem.replace("\n", " "),
        "nginx: URL-escaped PEM": urllib.parse.quote(pem, safe=""),
        "lighttpd: URL-escaped PEM, '/' literal": urllib.parse.quote(pem, safe="/"),
        "Apache escape: lower-case, '+' literal": urllib.parse.quote(pem, safe="/+").replace("%0A", "%0a"),
        "HAProxy: base64 DER": base64.b64encode(der).decode(),
    }


def test_every_encoding_decodes_to_the_same_certificate(pki):
    for name, value in encodings(pki.phone).items():
        assert decode_forwarded_cert(value) == pki.phone.certificate, name


@pytest.mark.parametrize(
    "value",
    ["", "(null)", "   ", "spoofed-cert", "-----BEGIN CERTIFICATE----- !!! -----END CERTIFICATE-----",
     base64.b64encode(b"not DER").decode(), "x" * 20000],
)
def test_what_is_not_one_certificate_is_refused(value):
    with pytest.raises(CertificateError):
        decode_forwarded_cert(value)


def test_two_certificates_in_one_header_are_refused(pki):
    with pytest.raises(CertificateError, match="more than one"):
        decode_forwarded_cert((pki.phone.cert_pem + pki.gateway.cert_pem).decode())


def test_signature_decides_not_the_issuer_name(pki, ca_bundle):
    verifier = CertificateVerifier(load_ca_bundle(ca_bundle))
    assert verifier.check(pki.phone.cert_pem.decode()).signature_problem is None
    assert verifier.check(pki.gateway.cert_pem.decode()).signature_problem is None
    assert "not signed" in verifier.check(pki.forged.cert_pem.decode()).signature_problem
    assert "not signed" in verifier.check(pki.unrelated.cert_pem.decode()).signature_problem


def test_validity_is_judged_against_the_clock(pki, ca_bundle):
    import datetime as dt

    verifier = CertificateVerifier(load_ca_bundle(ca_bundle))
    now = dt.datetime.now(dt.timezone.utc)
    assert verifier.check(pki.expired.cert_pem.decode()).problem(now) == "certificate expired"
    phone = verifier.check(pki.phone.cert_pem.decode())
    assert phone.problem(now) is None
    assert phone.problem(now - dt.timedelta(days=30)) == "certificate not yet valid"
    assert phone.problem(now + dt.timedelta(days=365 * 30)) == "certificate expired"


def test_without_a_ca_bundle_nothing_verifies(pki):
    assert "no ca_bundle" in CertificateVerifier(None).check(pki.phone.cert_pem.decode()).signature_problem


def test_sha1_signed_device_certificate_verifies(tmp_path):
    # Early device certificates are SHA-1-signed; admitting them is the terminator's decision.
    need_server(shutil.which("openssl") is not None, "openssl")
    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-sha1", "-subj", "/C=DE/O=innovaphone/OU=innovaphone Device Certification Authority")
    run("req", "-newkey", "rsa:1024", "-nodes", "-keyout", "d.key", "-out", "d.csr", "-subj",
        "/C=DE/O=innovaphone/CN=IP222s-30-00-b0")
    run("x509", "-req", "-in", "d.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "d.pem",
        "-days", "30", "-sha1")
    verifier = CertificateVerifier(load_ca_bundle(tmp_path / "ca.pem"))
    assert verifier.check((tmp_path / "d.pem").read_text()).signature_problem is None
    run("x509", "-req", "-in", "d.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-out", "md5.pem", "-days", "30", "-md5")
    assert verifier.check((tmp_path / "md5.pem").read_text()).signature_problem is not None


def test_ca_bundle_must_hold_a_ca(tmp_path, pki):
    (tmp_path / "b.pem").write_bytes(pki.phone.cert_pem + pki.ca1.cert_pem)
    assert load_ca_bundle(tmp_path / "b.pem") == [pki.ca1.certificate]


def with_bytes_patched(device: IssuedCert, ca: CertificateAuthority, old: bytes, new: bytes) -> IssuedCert:
    """`device`'s certificate with `old` replaced by `new` (same length) in its to-be-signed part,
    signed again by `ca`: a well-signed certificate holding bytes no certificate library writes."""
    assert len(old) == len(new)
    cert = device.certificate
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(old) == 1
    patched = tbs.replace(old, new)
    signature = ca.private_key.sign(patched, padding.PKCS1v15(), hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER).replace(tbs, patched).replace(cert.signature, signature)
    return IssuedCert(x509.load_der_x509_certificate(der), device.private_key, device.issuer_pem)


def test_a_name_that_is_not_utf8_is_a_certificate_problem_not_a_crash(pki, ca_bundle):
    bad_subject = with_bytes_patched(pki.phone, pki.ca1, b"IP232-30-00-af", b"IP232-30-00-\xff\xfe")
    bad_issuer = with_bytes_patched(pki.phone, pki.ca1, b"Authority", b"Authorit\xff")
    verifier = CertificateVerifier(load_ca_bundle(ca_bundle))
    for device, part in ((bad_subject, "subject"), (bad_issuer, "issuer")):
        for value in encodings(device).values():
            with pytest.raises(CertificateError, match=f"the certificate's {part} cannot be read"):
                verifier.check(value)


@pytest.mark.parametrize("style, refusal", [
    ("apache", b"# certificate mismatch\n"), ("nginx", b"# certificate mismatch\n"),
    ("haproxy", b"# certificate mismatch\n"),
    # lighttpd forwards no issuer DN: the certificate is all there is, and it cannot be read
    ("lighttpd", b"# certificate mismatch\n"),
])
def test_a_forwarded_certificate_with_a_name_that_is_not_utf8_is_refused(pki, site, style, refusal):
    site.write("templates/default.j2", "# hello {{ device.hwid }}\n")
    bad = with_bytes_patched(pki.phone, pki.ca1, b"IP232-30-00-af", b"IP232-30-00-\xff\xfe")
    # the DN headers as the terminator prints them (from the genuine certificate), the bad one forwarded
    encoded = encodings(bad)[{"apache": "Apache: PEM with spaces", "nginx": "nginx: URL-escaped PEM",
                              "lighttpd": "lighttpd: URL-escaped PEM, '/' literal",
                              "haproxy": "HAProxy: base64 DER"}[style]]
    headers = [(name, encoded if name == "X-SSL-Client-Cert" else value)
               for name, value in terminator_headers(pki.phone, style)]
    app = site.app()
    for _ in range(2):  # the verdict is remembered: the second poll is refused the same way
        answer = call(app, "/", headers)
        assert (answer.status, answer.body) == (403, refusal)
