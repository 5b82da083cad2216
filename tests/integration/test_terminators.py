"""The deploy/ samples on the real Apache, nginx and lighttpd, with the app behind each.

Every test that takes `terminator` runs against all three. A device polls over TLS from
127.0.0.3 with a lab certificate; the terminator listens on 127.0.0.1 and talks to the app over
a unix socket (Apache, lighttpd) or loopback TCP (nginx). A refused device gets no script: a
failed handshake (Apache, lighttpd) or nginx's own "400 Bad Request"; the app never sees it.
"""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import urllib.parse

import pytest

from configserver.certificates import decode_forwarded_cert
from configserver.lab.pki import IssuedCert

from terminator_lab import VICTIM, Outcome, Terminator, TLSLab, http_get, running_as_root

DEVICE_ADDRESS = "127.0.0.3"
CA1 = "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"
CA2 = "OU=innovaphone Device Certification Authority 2,O=innovaphone,C=DE"

tls_versions = pytest.mark.parametrize(
    "tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)


def assert_script(outcome: Outcome, hwid: str, issuer: str) -> None:
    assert outcome.status == 200, outcome
    assert outcome.lines[0] == f"# script for {hwid}", outcome.body
    assert f"# hwid {hwid}" in outcome.lines
    assert f"# issued by {issuer}" in outcome.lines
    # the device's own address, passed on by the terminator, not the terminator's
    assert f"# client {DEVICE_ADDRESS}" in outcome.lines


def assert_no_script(terminator: Terminator, outcome: Outcome) -> None:
    assert "# script for" not in outcome.body
    assert outcome.status == terminator.refusal, (
        f"{terminator.name} should refuse with "
        f"{'a failed handshake' if terminator.refusal is None else terminator.refusal}, got {outcome}"
    )


@tls_versions
def test_device_from_first_ca_gets_its_own_script(terminator: Terminator, tls_version):
    assert_script(terminator.poll("phone", tls_version=tls_version), VICTIM, CA1)


@tls_versions
def test_device_from_second_ca_gets_its_own_script(terminator: Terminator, tls_version):
    # lighttpd forwards no issuer DN: "issued by CA 2" comes from the certificate the Lua script passed on
    assert_script(terminator.poll("gateway", tls_version=tls_version), "IP1202-35-fe-4d", CA2)


def test_device_with_broken_early_cn_is_served_under_its_fixed_name(terminator: Terminator):
    # CN IP222s-30-00-b0, as early certificates were made: the script is that of IP222-30-00-b0
    assert_script(terminator.poll("broken-cn"), "IP222-30-00-b0", CA2)


@tls_versions
@pytest.mark.parametrize("device", [None, "unrelated-ca", "forged-ca", "expired"],
                         ids=["no-certificate", "unrelated-ca", "forged-ca-with-ca1-dn", "expired"])
def test_device_without_a_valid_certificate_gets_no_script(terminator: Terminator, device, tls_version):
    # every certificate here claims to be IP232-30-00-af, whose script exists
    assert_no_script(terminator, terminator.poll(device, tls_version=tls_version))


def forged_identity(victim: IssuedCert) -> list[tuple[str, str]]:
    """Everything a client could send to pass for `victim`: its real (public) certificate, its
    DNs in several forms and letter cases, and a made-up address."""
    cert = victim.certificate
    legacy = "".join(f"/{a.rfc4514_attribute_name}={a.value}" for a in cert.subject)
    return [
        ("X-SSL-Client-Verify", "SUCCESS"),
        ("X-SSL-Client-S-DN", cert.subject.rfc4514_string()),
        ("x-ssl-client-s-dn", legacy),
        ("X_SSL_Client_S_DN", cert.subject.rfc4514_string()),
        ("X-SSL-Client-I-DN", cert.issuer.rfc4514_string()),
        ("X-SSL-Client-S-DN-CN", VICTIM),
        ("X-SSL-Client-Cert", urllib.parse.quote(victim.cert_pem.decode(), safe="")),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
    ]


def test_device_sending_another_devices_identity_headers_gets_only_its_own_script(
    terminator: Terminator, tls_lab: TLSLab
):
    outcome = terminator.poll("gateway", headers=forged_identity(tls_lab.devices["phone"].issued))
    # Had the terminator appended instead of replacing, the app would refuse the duplicate (403).
    assert_script(outcome, "IP1202-35-fe-4d", CA2)
    assert VICTIM not in outcome.body
    assert "6.6.6.6" not in outcome.body


IDENTITY_HEADERS = ("X-SSL-Client-Verify", "X-SSL-Client-S-DN", "X-SSL-Client-I-DN", "X-SSL-Client-Cert")


def test_terminator_replaces_every_header_the_client_sent_under_the_names_the_app_reads(
    echo_terminator: Terminator, tls_lab: TLSLab
):
    outcome = echo_terminator.poll("gateway", headers=forged_identity(tls_lab.devices["phone"].issued))
    assert outcome.status == 200, outcome
    head = [line.partition(":") for line in outcome.lines[1:] if line]
    received = [(name.strip(), value.strip()) for name, _, value in head]

    def values(name: str) -> list[str]:
        return [value for key, value in received if key.lower() == name.lower()]

    assert values("X-SSL-Client-Verify") == ["SUCCESS"]
    [subject] = values("X-SSL-Client-S-DN")
    assert "IP1202-35-fe-4d" in subject
    if echo_terminator.name == "lighttpd":
        assert values("X-SSL-Client-I-DN") == []          # lighttpd has none; the app reads the certificate
    else:
        assert values("X-SSL-Client-I-DN") == [CA2]
    [cert] = values("X-SSL-Client-Cert")
    assert decode_forwarded_cert(cert) == tls_lab.devices["gateway"].issued.certificate
    assert values("X-Forwarded-For") == [DEVICE_ADDRESS]
    assert values("X-Real-IP") == [DEVICE_ADDRESS]
    assert values("Forwarded") == []
    for name, value in received:
        # The underscore spelling passes Apache and lighttpd (nginx drops it) under its own name,
        # which the app never reads: ASGI keeps "x_ssl_client_s_dn" apart from "x-ssl-client-s-dn".
        if "_" not in name:
            assert VICTIM not in value and "6.6.6.6" not in value, (name, value)


def need_old_device(lab: TLSLab) -> None:
    if "old-device" not in lab.devices:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not installed: no SHA-1 certificate for an old device")
        pytest.skip("openssl is not installed: no SHA-1 certificate for an old device")


def test_old_tls_versions_are_refused(terminator: Terminator):
    # The client itself would accept anything; the sample's defaults decide (see its "Old devices" notes).
    outcome = terminator.poll("phone", tls_version=ssl.TLSVersion.TLSv1_1, legacy=True)
    assert outcome.status is None, outcome


def test_old_device_certificate_is_refused(terminator: Terminator):
    # X.509 v1, RSA-1024, SHA-1-signed by CA 1, over TLS 1.2 with a client that accepts anything
    need_old_device(terminator.lab)
    assert_no_script(terminator, terminator.poll("old-device", legacy=True))


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2], ids=["tls1.0", "tls1.2"])
def test_old_device_settings_quoted_in_the_sample_let_old_devices_through(old_devices_terminator: Terminator, tls_version):
    need_old_device(old_devices_terminator.lab)
    outcome = old_devices_terminator.poll("old-device", tls_version=tls_version, legacy=True)
    assert outcome.status == 200, outcome
    assert "X-SSL-Client-Verify: SUCCESS" in outcome.lines
    assert any("IP222s-30-00-b1" in line for line in outcome.lines if line.lower().startswith("x-ssl-client-s-dn:"))
    # and they still refuse what is not a device
    assert_no_script(old_devices_terminator, old_devices_terminator.poll("forged-ca", legacy=True))


def test_app_behind_tcp_refuses_forged_headers_from_a_peer_outside_trusted_proxies(nginx: Terminator, tls_lab: TLSLab):
    # nginx's app listens on 127.0.0.1 and trusts 127.0.0.1/32 only; this peer is 127.0.0.2
    status, body = http_get(
        "/update", port=nginx.backend.port, source="127.0.0.2", headers=forged_identity(tls_lab.devices["phone"].issued)
    )
    assert (status, body) == (403, b"# untrusted proxy\n")


def connect_as(user: str, socket_path) -> str:
    """Connect to a unix socket as another local user (in a forked child); say what happened."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(socket_path))
            result = "connected"
        except OSError as exc:
            result = type(exc).__name__
        finally:
            os.write(write, result.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = pipe.read()
    os.waitpid(child, 0)
    return result


@pytest.mark.parametrize("name", ["apache", "lighttpd"])
def test_app_socket_admits_the_terminators_user_and_no_other_local_user(request, name):
    if not running_as_root():
        pytest.skip("needs root to act as other users")
    socket_path = request.getfixturevalue(name).backend.uds
    assert connect_as("www-data", socket_path) == "connected"
    assert connect_as("nobody", socket_path) == "PermissionError"
