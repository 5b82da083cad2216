"""`configserver trust-value`: the hex DER that openssl gives for the same certificate, and clear refusals."""

import os
import shutil
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization

from configserver.cli import main
from configserver.lab.pki import CertificateAuthority


@pytest.fixture(scope="module")
def server():
    ca = CertificateAuthority.named("Trust Value Test CA")
    return ca, ca.issue_server(["config.example.com", "192.0.2.1"])


def openssl_hex(path) -> str:
    """`openssl x509 -outform der | xxd -p`, joined into one line (xxd wraps at 60 digits)."""
    der = subprocess.run(["openssl", "x509", "-in", str(path), "-outform", "der"], capture_output=True, check=True).stdout
    if shutil.which("xxd"):
        text = subprocess.run(["xxd", "-p"], input=der, capture_output=True, check=True).stdout.decode()
    elif shutil.which("od"):
        text = subprocess.run(["od", "-An", "-v", "-tx1"], input=der, capture_output=True, check=True).stdout.decode()
    else:
        text = der.hex()
    return "".join(text.split())


def trust_value(capsys, path, *options) -> tuple[int, str, str]:
    status = main(["trust-value", str(path), *options])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_the_value_is_the_hex_der_openssl_gives(server, tmp_path, capsys):
    _, cert = server
    path = tmp_path / "server.pem"
    path.write_bytes(cert.cert_pem)
    expected = openssl_hex(path)
    assert expected.startswith("30") and len(expected) > 1000
    assert trust_value(capsys, path) == (0, expected + "\n", "")


def test_a_der_file_gives_the_same_value(server, tmp_path, capsys):
    _, cert = server
    (tmp_path / "server.pem").write_bytes(cert.cert_pem)
    (tmp_path / "server.der").write_bytes(cert.cert_der)
    assert trust_value(capsys, tmp_path / "server.der")[1] == openssl_hex(tmp_path / "server.pem") + "\n"


@pytest.mark.parametrize("given, prefix", [("type,ip", "type,ip"), ("type, ip", "type,ip"), ("*", "*"), (" * ", "*")])
def test_properties_prefix_the_value(server, tmp_path, capsys, given, prefix):
    _, cert = server
    path = tmp_path / "server.pem"
    path.write_bytes(b"subject=CN = config.example.com\n" + cert.cert_pem)   # text around the PEM is fine
    status, out, _ = trust_value(capsys, path, "--properties", given)
    assert (status, out) == (0, f"{prefix}:{openssl_hex(path)}\n")


@pytest.mark.parametrize("given", ["type,", "type;ip", "*,type", "ty pe", ""])
def test_a_malformed_property_list_is_refused(server, tmp_path, capsys, given):
    _, cert = server
    path = tmp_path / "server.pem"
    path.write_bytes(cert.cert_pem)
    status, out, err = trust_value(capsys, path, "--properties", given)
    assert (status, out) == (1, "")
    assert "is no property name; give names like type,ip or *" in err


def test_a_chain_is_refused(server, tmp_path, capsys):
    ca, cert = server
    path = tmp_path / "chain.pem"
    path.write_bytes(cert.cert_pem + ca.cert_pem)
    assert trust_value(capsys, path) == (
        1, "", f"configserver trust-value: {path}: the file holds 2 certificates (a chain?): give the server certificate alone\n")


@pytest.mark.parametrize("form", ["key alone", "key with certificate", "der key", "encrypted der key"])
def test_a_private_key_is_refused(server, tmp_path, capsys, form):
    _, cert = server
    der = serialization.PrivateFormat.PKCS8
    data = {
        "key alone": cert.key_pem,
        "key with certificate": cert.cert_pem + cert.key_pem,
        "der key": cert.private_key.private_bytes(serialization.Encoding.DER, der, serialization.NoEncryption()),
        "encrypted der key": cert.private_key.private_bytes(
            serialization.Encoding.DER, der, serialization.BestAvailableEncryption(b"secret")),
    }[form]
    path = tmp_path / "file"
    path.write_bytes(data)
    status, out, err = trust_value(capsys, path)
    assert (status, out) == (1, "")
    assert err.endswith(": the file holds a private key: give the certificate alone, and keep the key private\n")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the file holds no certificate (neither PEM nor DER)"),
        (b"hello\n", "the file holds no certificate (neither PEM nor DER)"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "the file holds no certificate, only PUBLIC KEY"),
        (b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n", "the certificate cannot be read"),
    ],
)
def test_a_file_without_a_certificate_is_refused(tmp_path, capsys, data, message):
    path = tmp_path / "file"
    path.write_bytes(data)
    status, out, err = trust_value(capsys, path)
    assert (status, out) == (1, "")
    assert err.startswith(f"configserver trust-value: {path}: {message}")


def test_a_missing_file_is_refused(tmp_path, capsys):
    status, out, err = trust_value(capsys, tmp_path / "nothere.pem")
    assert (status, out) == (1, "") and "No such file" in err


def test_megabytes_of_unclosed_pem_markers_are_answered_at_once(tmp_path):
    # The lazy PEM pattern searched to the end of the file from each BEGIN line: minutes for 3.6 MB.
    path = tmp_path / "begins.pem"
    path.write_bytes(b"-----BEGIN A-----\n" * 200_000)
    result = subprocess.run([sys.executable, "-m", "configserver", "trust-value", str(path)],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr == f"configserver trust-value: {path}: the file holds no certificate (neither PEM nor DER)\n"


def test_a_certificate_after_an_unclosed_begin_line_is_found(server, tmp_path, capsys):
    _, cert = server
    path = tmp_path / "server.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + cert.cert_pem)
    assert trust_value(capsys, path) == (0, cert.cert_der.hex() + "\n", "")


def test_arguments_that_are_not_utf8_get_one_line_not_a_traceback(server, tmp_path):
    _, cert = server
    path = bytes(tmp_path) + b"/server-\xff.pem"
    with open(path, "wb") as file:
        file.write(cert.cert_pem)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "configserver", "trust-value"]
    named = subprocess.run([*command, path], capture_output=True, timeout=20, env=env)
    assert (named.returncode, named.stdout) == (0, cert.cert_der.hex().encode() + b"\n")
    listed = subprocess.run([*command, path, "--properties", b"ty\xffpe"], capture_output=True, timeout=20, env=env)
    assert listed.returncode == 1 and listed.stdout == b""
    assert listed.stderr.count(b"\n") == 1 and b"is no property name" in listed.stderr
