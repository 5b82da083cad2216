"""Revoking a stolen device: the file's entries, the refusal, and the file picked up live."""

from __future__ import annotations

import os

import pytest
from driving import call, terminator_headers

from configserver.cli import main
from configserver.identity import DeviceIdentity
from configserver.revocation import RevocationError, RevocationFile, parse_revocations, read_revocations
from configserver.settings import SettingsError

PHONE = DeviceIdentity("IP232-30-00-af", "IP232", "00-90-33-30-00-af", "IP232-30-00-af", "CA 1",
                       fingerprint_sha256="ab" * 32)


@pytest.mark.parametrize(("entry", "revoked"), [
    ("IP232-30-00-af", True),
    ("ip232-30-00-AF", True),
    ("IP232s-30-00-af", True),                       # a broken early name matches its fixed form
    ("00-90-33-30-00-af", True),
    ("00:90:33:30:00:AF", True),
    ("0090333000af", True),
    ("ab" * 32, True),
    (":".join(["AB"] * 32), True),
    ("IP232-30-00-af   # stolen 2026-11-02", True),
    ("IP232-30-00-b0", False),
    ("00-90-33-30-00-b0", False),
    ("cd" * 32, False),
    ("# IP232-30-00-af", False),
    ("", False),
])
def test_each_form_of_entry(entry, revoked):
    assert (parse_revocations(entry + "\n").revokes(PHONE) is not None) is revoked


def test_lines_that_revoke_nothing_are_problems_with_their_line():
    found = parse_revocations("IP232-30-00-af\n\nnot a device\n00-11-22-33-44-55\n")
    assert found.problems == (
        (3, "'not a device' is neither a hwid, an innovaphone MAC nor a SHA-256 fingerprint: revokes nothing"),
        (4, "00-11-22-33-44-55 is no innovaphone MAC (they start 00-90-33): revokes nothing"),
    )
    assert found.revokes(PHONE) == "hwid IP232-30-00-af"


def test_a_file_that_is_not_text_cannot_be_read(tmp_path):
    (tmp_path / "revoked.txt").write_bytes(b"IP232-30-00-af\n\xff\xfe\n")
    with pytest.raises(RevocationError, match="not UTF-8"):
        read_revocations(tmp_path / "revoked.txt")


@pytest.fixture
def revoked_site(site):
    site.write("templates/default.j2", "# hello {{ device.hwid }}\n")
    site.write("revoked.txt", "IP232-30-00-af\n")
    return site


def test_a_revoked_device_gets_403_revoked_before_device_mismatch(revoked_site, pki):
    app = revoked_site.app(revoked=revoked_site.root / "revoked.txt")
    outcomes: list = []
    app.recorders.append(outcomes.append)
    answer = call(app, "/", terminator_headers(pki.phone), query="hwid=IP232-30-00-b0")
    assert (answer.status, answer.text) == (403, "# revoked\n")
    assert (outcomes[-1].hwid, outcomes[-1].claimed, outcomes[-1].detail) == (
        "IP232-30-00-af", False, "hwid IP232-30-00-af is in the revoked file")
    assert call(app, "/", terminator_headers(pki.gateway)).status == 200


def test_a_certificate_fingerprint_revokes_that_certificate_only(revoked_site, pki):
    from cryptography.hazmat.primitives import hashes

    fingerprint = pki.gateway.certificate.fingerprint(hashes.SHA256()).hex(":")
    revoked_site.write("revoked.txt", fingerprint + "\n")
    app = revoked_site.app(revoked=revoked_site.root / "revoked.txt")
    assert call(app, "/", terminator_headers(pki.gateway)).text == "# revoked\n"
    assert call(app, "/", terminator_headers(pki.phone)).status == 200


def test_the_file_is_picked_up_without_a_restart_and_a_bad_save_keeps_the_last_list(tmp_path):
    path = tmp_path / "revoked.txt"
    path.write_text("IP232-30-00-b0\n")
    now = [0.0]
    live = RevocationFile(path, clock=lambda: now[0])
    assert live.current().revokes(PHONE) is None
    path.write_text("IP232-30-00-af\n")
    os.utime(path, (1, 1))
    assert live.current().revokes(PHONE) is None          # looked at no more than once a second
    now[0] = 1.0
    assert live.current().revokes(PHONE) == "hwid IP232-30-00-af"
    path.write_bytes(b"\xff")                               # a save that cannot be read
    now[0] = 2.0
    assert live.current().revokes(PHONE) == "hwid IP232-30-00-af"
    path.unlink()
    now[0] = 3.0
    assert live.current().revokes(PHONE) == "hwid IP232-30-00-af"


def test_a_missing_file_stops_start_up(site):
    with pytest.raises(SettingsError, match="setting 'revoked'.*cannot read"):
        site.app(revoked=site.root / "missing.txt")


def test_render_and_check_know_the_revoked_file(revoked_site, capsysbinary, monkeypatch):
    monkeypatch.chdir(revoked_site.root)
    revoked_site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\nrevoked = "revoked.txt"\n')
    assert main(["render", "IP232-30-00-af"]) == 1
    out = capsysbinary.readouterr()
    assert out.out == b"# revoked\n" and b"status: 403 revoked" in out.err
    assert main(["check"]) == 0
    revoked_site.write("revoked.txt", "IP232-30-00-af\nIP232-30-00-zz\n")
    assert main(["check"]) == 1
    assert b"revoked.txt:2: 'IP232-30-00-zz' is neither" in capsysbinary.readouterr().out


def test_check_says_a_fingerprint_needs_the_certificate_to_reach_the_app(revoked_site, capsysbinary, monkeypatch):
    monkeypatch.chdir(revoked_site.root)
    revoked_site.write("revoked.txt", "IP232-30-00-b0\n" + "ab" * 32 + "  # stolen\n")
    revoked_site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\nrevoked = "revoked.txt"\n')
    assert main(["check"]) == 1
    assert b"revoked.txt:2: a certificate fingerprint revokes only polls whose certificate reaches" in \
        capsysbinary.readouterr().out
    revoked_site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\nrevoked = "revoked.txt"\n'
                                            'require_client_cert = true\n')
    assert main(["check"]) == 0
