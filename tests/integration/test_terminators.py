"""The deploy/ samples on the real Apache, nginx and lighttpd, with the app behind each.

Every test that takes `terminator` runs against all three. A device polls over TLS from
127.0.0.3 with a lab certificate; the terminator listens on 127.0.0.1 and talks to the app over
a unix socket (Apache, lighttpd) or loopback TCP (nginx). A refused device gets no script: a
failed handshake (Apache, lighttpd) or nginx's own "400 Bad Request"; the app never sees it.

Each terminator adds the session's proxy secret to every request; the app answers no poll
without it. Requests straight to the app stand for any other local program that reaches its
socket or port: as root, the tests make them as the terminators' own user, www-data.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import ssl
import stat
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from terminator_lab import (
    PROXY_SECRET_HEADER,
    VICTIM,
    Outcome,
    Terminator,
    TLSLab,
    http_get,
    new_proxy_secret,
    running_as_root,
    tcp_open,
    write_secret_file,
)

from configserver.certificates import decode_forwarded_cert
from configserver.lab.pki import IssuedCert

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


def run_as(user: str, action: Callable[[], str]) -> str:
    """Run `action` as another local user, in a forked child with only that user's primary group
    (as the terminators' workers run); its result, or the name of the OSError it raised."""
    entry = pwd.getpwnam(user)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        result = "?"
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            result = action()
        except OSError as exc:
            result = type(exc).__name__
        finally:
            with os.fdopen(write, "w") as out:
                out.write(result)
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = pipe.read()
    os.waitpid(child, 0)
    return result


def connect_as(user: str, socket_path) -> str:
    """Connect to a unix socket as another local user; say what happened."""
    def connect() -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(socket_path))
        return "connected"
    return run_as(user, connect)


@pytest.mark.parametrize("name", ["apache", "lighttpd"])
def test_app_socket_admits_the_terminators_user_and_no_other_local_user(request, name):
    if not running_as_root():
        pytest.skip("needs root to act as other users")
    socket_path = request.getfixturevalue(name).backend.uds
    assert connect_as("www-data", socket_path) == "connected"
    assert connect_as("nobody", socket_path) == "PermissionError"


# -- the proxy secret ----------------------------------------------------------------------------

def perfect_forgery(victim: IssuedCert) -> list[tuple[str, str]]:
    """Exactly what a terminator forwards for `victim`, each header once: its real (public)
    certificate, its DNs, a verify result and an address. Only the proxy secret is missing."""
    cert = victim.certificate
    return [
        ("X-SSL-Client-Verify", "SUCCESS"),
        ("X-SSL-Client-S-DN", cert.subject.rfc4514_string()),
        ("X-SSL-Client-I-DN", cert.issuer.rfc4514_string()),
        ("X-SSL-Client-S-DN-CN", VICTIM),
        ("X-SSL-Client-Cert", urllib.parse.quote(victim.cert_pem.decode(), safe="")),
        ("X-Forwarded-For", DEVICE_ADDRESS),
        ("X-Real-IP", DEVICE_ADDRESS),
    ]


def straight_to_app(terminator: Terminator, path: str = "/update", headers=()) -> tuple[int, bytes]:
    """GET `path` from the app behind `terminator`, on its socket or port, bypassing the terminator.

    As root, the request is made as www-data: the terminators' own user, whose group the socket's
    folder admits, and which PHP-FPM and CGI scripts run as on Debian. Otherwise as the test's user.
    """
    app = terminator.backend

    def get() -> str:
        status, body = http_get(path, port=app.port, uds=app.uds, headers=headers)
        return json.dumps([status, body.decode("latin-1")])

    answer = run_as("www-data", get) if running_as_root() else get()
    try:
        status, body = json.loads(answer)
    except ValueError:
        raise AssertionError(f"no answer from the {terminator.name} app: {answer}") from None
    return status, body.encode("latin-1")


def test_forged_headers_with_a_genuine_certificate_straight_to_the_app_are_refused_without_the_secret(
    terminator: Terminator, tls_lab: TLSLab
):
    # Everything a terminator would forward for the phone, its real certificate included; the
    # Apache and lighttpd apps are reached through their socket, as www-data, whose group the
    # socket's folder admits; the nginx app on 127.0.0.1, a trusted proxy address.
    forged = perfect_forgery(tls_lab.devices["phone"].issued)
    assert straight_to_app(terminator, headers=forged) == (403, b"# untrusted proxy\n")
    wrong = [*forged, (PROXY_SECRET_HEADER, new_proxy_secret())]
    assert straight_to_app(terminator, headers=wrong) == (403, b"# untrusted proxy\n")
    # one character off, and the right secret in other letter case (it is hex: case matters)
    secret = terminator.proxy_secret
    near = secret[:-1] + ("0" if secret[-1] != "0" else "1")
    assert straight_to_app(terminator, headers=[*forged, (PROXY_SECRET_HEADER, near)]) == (403, b"# untrusted proxy\n")
    upper = [*forged, (PROXY_SECRET_HEADER, secret.upper())]
    assert secret.upper() != secret and straight_to_app(terminator, headers=upper) == (403, b"# untrusted proxy\n")


def test_the_same_forged_request_with_the_secret_is_served(terminator: Terminator, tls_lab: TLSLab):
    # The control for the test above: the forged headers are perfect, only the secret was missing.
    # This is what any local program could do before the proxy secret.
    forged = perfect_forgery(tls_lab.devices["phone"].issued)
    status, body = straight_to_app(terminator, headers=[*forged, (PROXY_SECRET_HEADER, terminator.proxy_secret)])
    assert status == 200, body
    assert body.split(b"\r\n")[0] == f"# script for {VICTIM}".encode(), body


def secret_twice(terminator: Terminator, tls_lab: TLSLab) -> list[tuple[int, bytes]]:
    """The phone's perfect forgery straight to the app with the right secret twice, and with the
    right one and a wrong one: what the app sees behind a terminator that appends."""
    forged = perfect_forgery(tls_lab.devices["phone"].issued)
    secret = terminator.proxy_secret
    return [
        straight_to_app(terminator, headers=[*forged, (PROXY_SECRET_HEADER, secret), (PROXY_SECRET_HEADER.lower(), second)])
        for second in (secret, new_proxy_secret())
    ]


def test_proxy_secret_sent_twice_straight_to_the_app_is_refused(terminator: Terminator, tls_lab: TLSLab):
    for status, body in secret_twice(terminator, tls_lab):
        assert status == 403 and b"# script for" not in body, body


def test_proxy_secret_sent_twice_is_a_duplicate_header(apache: Terminator, tls_lab: TLSLab):
    assert secret_twice(apache, tls_lab) == [(403, b"# duplicate header\n")] * 2


FORGED_SECRETS = [
    (PROXY_SECRET_HEADER, "0" * 64),
    ("x-configserver-proxy-secret", "0" * 64),
    ("X-CONFIGSERVER-PROXY-SECRET", "1" * 64),
    ("X_Configserver_Proxy_Secret", "2" * 64),
]


@pytest.mark.parametrize("extra", [[], FORGED_SECRETS], ids=["client-sends-none", "client-sends-its-own"])
def test_terminator_sets_the_proxy_secret_once_replacing_whatever_the_client_sent(
    echo_terminator: Terminator, extra
):
    outcome = echo_terminator.poll("gateway", headers=extra)
    assert outcome.status == 200, outcome
    received = [line.partition(":") for line in outcome.lines[1:] if line]
    secrets_received = [value.strip() for name, _, value in received if name.strip().lower() == PROXY_SECRET_HEADER.lower()]
    assert secrets_received == [echo_terminator.proxy_secret]
    # The underscore spelling passes Apache and lighttpd (nginx drops it) under its own name,
    # which the app never reads.
    for name, _, value in received:
        if "_" not in name:
            assert value.strip() not in ("0" * 64, "1" * 64), (name, value)


def test_device_sending_a_proxy_secret_of_its_own_is_served_as_itself(terminator: Terminator, tls_lab: TLSLab):
    # Had the terminator passed the client's value on, the app would refuse it ("untrusted
    # proxy"); had it appended, the app would see the header twice ("duplicate header").
    headers = [*forged_identity(tls_lab.devices["phone"].issued), *FORGED_SECRETS]
    outcome = terminator.poll("gateway", headers=headers)
    assert_script(outcome, "IP1202-35-fe-4d", CA2)
    assert VICTIM not in outcome.body


# -- metrics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/metrics", "/metrics?name[]=configserver_polls", "/%6detrics"])
def test_metrics_are_not_served_through_the_terminator(terminator: Terminator, path):
    outcome = terminator.poll("phone", path=path)
    assert outcome.status == 404, outcome
    assert "configserver_polls" not in outcome.body


def test_metrics_are_served_straight_from_the_app(terminator: Terminator):
    # a scrape of the socket or port itself: no terminator headers, no secret
    status, body = straight_to_app(terminator, "/metrics")
    assert status == 200, body
    assert b"configserver_polls_total" in body


# -- where the secret is, and where it is not --------------------------------------------------

def test_sample_holding_the_proxy_secret_is_readable_by_root_only_and_the_server_runs_from_it(
    terminator: Terminator
):
    config = terminator.config
    assert terminator.proxy_secret in config.read_text()
    info = config.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert_script(terminator.poll("phone"), VICTIM, CA1)     # read at start-up, by root
    if not running_as_root():
        pytest.skip("needs root to show that www-data cannot read it")
    assert info.st_uid == 0 and info.st_gid == 0
    assert run_as("www-data", lambda: config.read_text()[:0] + "read") == "PermissionError"


def test_proxy_secret_is_in_no_file_the_terminators_user_can_read(request, lab_root: Path, proxy_secret: str):
    if not running_as_root():
        pytest.skip("needs root to act as www-data")
    for name in ("apache", "nginx", "lighttpd"):
        request.getfixturevalue(name)   # every sample filled in and running
    needle = proxy_secret.encode()

    def search() -> str:
        readable, leaks = [], []
        for folder, _, files in os.walk(lab_root):
            for file in files:
                path = os.path.join(folder, file)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                readable.append(path)
                if needle in data:
                    leaks.append(path)
        return json.dumps({"readable": readable, "leaks": leaks})

    found = json.loads(run_as("www-data", search))
    assert found["leaks"] == []
    # the search saw what the workers read: the Lua script, certificates, logs
    assert any(path.endswith("configserver-client-cert.lua") for path in found["readable"]), found["readable"]


def test_proxy_secret_is_never_logged(request, lab_root: Path, proxy_secret: str, tls_lab: TLSLab):
    terminators = [request.getfixturevalue(name) for name in ("apache", "nginx", "lighttpd")]
    wrong = new_proxy_secret()
    marker = f"/never-logged-{new_proxy_secret()[:12]}"
    forged = perfect_forgery(tls_lab.devices["phone"].issued)
    for terminator in terminators:
        # served, refused for a wrong secret, refused for none, and a device sending its own
        assert straight_to_app(terminator, marker, [*forged, (PROXY_SECRET_HEADER, proxy_secret)])[0] == 200
        assert straight_to_app(terminator, marker, [*forged, (PROXY_SECRET_HEADER, wrong)])[0] == 403
        assert straight_to_app(terminator, marker, forged)[0] == 403
        assert terminator.poll("gateway", path=marker, headers=[(PROXY_SECRET_HEADER, wrong)]).status == 200
    # the app writes its log lines in batches: wait until every poll above is in
    outputs = [t.backend.server.output for t in terminators]
    deadline = time.monotonic() + 10
    while any(out.read_text().count(marker) < 4 for out in outputs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(out.read_text().count(marker) >= 4 for out in outputs), [out.read_text()[-2000:] for out in outputs]
    logs = [p for p in lab_root.rglob("*") if p.is_file() and (p.suffix in (".log", ".db") or "-wal" in p.name)]
    assert any(p.suffix == ".db" for p in logs) and len(logs) > 6
    for path in logs:
        data = path.read_bytes()
        assert proxy_secret.encode() not in data, path
        assert wrong.encode() not in data, path


# -- reloading a configuration that only root can read ------------------------------------------

# What `systemctl reload` sends on Debian: apache2ctl graceful, nginx -s reload, kill -USR1 (lighttpd).
RELOAD_SIGNALS = {"apache": signal.SIGUSR1, "nginx": signal.SIGHUP, "lighttpd": signal.SIGUSR1}


def secret_arriving(terminator: Terminator) -> str | None:
    """The proxy secret that reaches the echo backend when a device polls (None: not served)."""
    if not tcp_open(terminator.port):
        return None
    outcome = terminator.poll("gateway")
    if outcome.status != 200:
        return None
    return next((line.partition(":")[2].strip() for line in outcome.lines
                 if line.lower().startswith(PROXY_SECRET_HEADER.lower() + ":")), None)


def change_secret(terminator: Terminator) -> str:
    """Put a new secret into the terminator's root-only config file, as an admin rotating it would."""
    new = new_proxy_secret()
    write_secret_file(terminator.config, terminator.config.read_text().replace(terminator.proxy_secret, new))
    return new


@pytest.mark.parametrize("kind", ["apache", "nginx"])
def test_apache_and_nginx_reload_their_root_only_config(fresh_terminator, kind):
    terminator = fresh_terminator(kind)
    assert secret_arriving(terminator) == terminator.proxy_secret
    new = change_secret(terminator)
    terminator.server.process.send_signal(RELOAD_SIGNALS[kind])
    # the master process, still root, read the file again: the new secret arrives, and only it
    terminator.server.wait_until(lambda: secret_arriving(terminator) == new, "the new secret after a reload")
    assert terminator.server.process.poll() is None


def test_lighttpd_shuts_down_on_reload_and_must_be_restarted(fresh_terminator):
    # README: restart lighttpd, never reload it
    if not running_as_root():
        pytest.skip("lighttpd drops privileges only when started as root")
    terminator = fresh_terminator("lighttpd")
    new = change_secret(terminator)
    terminator.server.process.send_signal(RELOAD_SIGNALS["lighttpd"])
    # it reads its configuration again as www-data, which cannot read it, and stops
    terminator.server.process.wait(timeout=15)
    log = terminator.server.tail()
    assert f"opening configfile {terminator.config} failed: Permission denied" in log, log
    # a restart, as root, reads it and serves with the new secret
    terminator.server.start(terminator.server.output.with_name("output-restarted.log"))
    terminator.server.wait_until(lambda: secret_arriving(terminator) == new, "the new secret after a restart")
