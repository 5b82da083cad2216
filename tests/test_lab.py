"""`configserver lab init` and `lab poll`: a lab made in seconds, served and polled end to end."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from ports import free_port

from configserver import load_settings
from configserver.cli import main
from configserver.lab import (
    Lab,
    LabExists,
    UnknownDevice,
    create_lab,
    find_lab,
    innovaphone_ca_name,
    open_lab,
    with_path,
)

REPO = Path(__file__).resolve().parent.parent


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return create_lab(tmp_path_factory.mktemp("made") / "lab")


# -- lab init --------------------------------------------------------------------------------------


def test_lab_init_makes_a_lab_in_a_few_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    made = create_lab(tmp_path / "lab")
    assert time.monotonic() - started < 10
    assert made.root == tmp_path / "lab"
    assert "never trust" in (made.root / "README.txt").read_text().lower()


def test_the_lab_cas_carry_innovaphones_exact_names(lab: Lab) -> None:
    ca1, ca2 = _cert(lab.root / "ca/innovaphone-device-ca-1.pem"), _cert(lab.root / "ca/innovaphone-device-ca-2.pem")
    assert ca1.subject == innovaphone_ca_name(1)
    assert ca2.subject == innovaphone_ca_name(2)
    bundle = x509.load_pem_x509_certificates(lab.ca_bundle.read_bytes())
    assert bundle == [ca1, ca2]
    forged = _cert(lab.root / "ca/forged-device-ca-1.pem")
    assert forged.subject == ca1.subject and forged.public_key() != ca1.public_key()
    unrelated = _cert(lab.root / "ca/unrelated-ca.pem")
    assert unrelated.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Some Other Vendor"


def test_the_lab_devices_are_what_the_lab_says(lab: Lab) -> None:
    issuers = {
        "innovaphone CA 1": _cert(lab.root / "ca/innovaphone-device-ca-1.pem"),
        "innovaphone CA 2": _cert(lab.root / "ca/innovaphone-device-ca-2.pem"),
        "forged CA 1": _cert(lab.root / "ca/forged-device-ca-1.pem"),
        "unrelated CA": _cert(lab.root / "ca/unrelated-ca.pem"),
    }
    now = dt.datetime.now(dt.timezone.utc)
    for device in lab.devices:
        cert = _cert(device.cert)
        cert.verify_directly_issued_by(issuers[device.issuer])
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device.cn
        assert (cert.not_valid_after_utc < now) == device.expired
        assert stat.S_IMODE(device.key.stat().st_mode) == 0o600
    accepted = {d.name for d in lab.devices if d.accepted}
    assert accepted == {"IP232-30-00-af", "IP232-30-01-10", "IP1202-35-fe-4d", "IP112-30-03-01", "IP222s-30-00-b0"}
    assert {d.issuer for d in lab.devices if d.accepted} == {"innovaphone CA 1", "innovaphone CA 2"}
    assert {d.name for d in lab.devices if d.expired} == {"IP232-30-00-e1"}
    assert lab.device("forged-IP232-30-00-af").cn == lab.device("IP232-30-00-af").cn


def test_lab_devices_are_found_by_hwid_as_the_server_knows_them(lab: Lab) -> None:
    assert lab.device("IP222-30-00-B0").name == "IP222s-30-00-b0"
    assert lab.device("IP232-30-00-af").issuer == "innovaphone CA 1"
    with pytest.raises(UnknownDevice, match="IP232-30-00-af"):
        lab.device("IP999-00-00-00")


def test_the_server_certificate_is_for_localhost_from_the_lab_server_ca(lab: Lab) -> None:
    server = _cert(lab.server_cert)
    server.verify_directly_issued_by(_cert(lab.server_ca))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(lab.server_key.stat().st_mode) == 0o600


def test_the_lab_settings_serve_built_in_tls_from_the_lab(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    settings = load_settings(lab.config)
    assert settings.builtin_tls
    assert (settings.host, settings.port) == ("127.0.0.1", 8443)
    assert (settings.tls_cert, settings.tls_key, settings.ca_bundle) == (lab.server_cert, lab.server_key, lab.ca_bundle)
    assert (settings.templates, settings.vars) == (lab.templates, lab.vars)
    assert settings.database == f"sqlite:///{lab.root}/configserver.db"


def test_lab_init_refuses_to_overwrite_a_lab_unless_forced(tmp_path: Path) -> None:
    first = create_lab(tmp_path / "lab")
    ca = (first.root / "ca/innovaphone-device-ca-1.pem").read_bytes()
    with pytest.raises(LabExists, match="--force"):
        create_lab(tmp_path / "lab")
    assert (first.root / "ca/innovaphone-device-ca-1.pem").read_bytes() == ca
    second = create_lab(tmp_path / "lab", force=True)
    assert (second.root / "ca/innovaphone-device-ca-1.pem").read_bytes() != ca
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab"]


def test_lab_init_never_replaces_a_folder_that_is_not_a_lab(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LabExists):
        create_lab(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_lab_init_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "init", str(tmp_path / "lab")]) == 0
    out = capsys.readouterr().out
    assert "lab poll IP232-30-00-af" in out and "never trust" in out
    assert open_lab(tmp_path / "lab").device("IP232-30-00-af")
    assert main(["lab", "init", str(tmp_path / "lab")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["lab", "init", str(tmp_path / "lab"), "--force"]) == 0


# -- lab poll, against `configserver serve` of the lab -------------------------------------------


def _clean_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    env.update(extra)
    return env


@dataclass
class Served:
    lab: Lab
    port: int


@pytest.fixture(scope="module")
def served(lab: Lab) -> Iterator[Served]:
    """The lab served by `configserver serve` exactly as its settings say, on a free port."""
    port = free_port()
    log = lab.root / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "configserver", "--config", str(lab.config), "serve"],
            stdout=out, stderr=subprocess.STDOUT, cwd=lab.root,
            env=_clean_environment(CONFIGSERVER_PORT=str(port), CONFIGSERVER_GRACE_SECONDS="0"),
        )
    try:
        deadline = time.monotonic() + 30
        while "Application startup complete" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Served(lab, port)
    finally:
        server.terminate()
        server.wait(15)


def lab_poll(served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[bytes],
             *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("CONFIGSERVER_PORT", str(served.port))
    status = main(["lab", "poll", *args, "--lab", str(served.lab.root)])
    out, err = capsys.readouterr()
    return status, out.decode(), err.decode()


@pytest.mark.parametrize(
    "hwid, template",
    [
        ("IP232-30-00-af", "devices/IP232-30-00-af"),
        ("IP232-30-01-10", "models/IP232"),
        ("IP1202-35-fe-4d", "default"),
        ("IP222-30-00-b0", "models/IP222"),
    ],
)
def test_lab_poll_prints_the_status_line_and_the_devices_script(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes],
    hwid: str, template: str,
) -> None:
    status, out, err = lab_poll(served, monkeypatch, capsysbinary, hwid)
    assert (status, err) == (0, "")
    status_line, script = out.split("\n", 1)
    assert status_line == "HTTP/1.1 200 OK"
    assert script.startswith(f"# {hwid}: lab default script\r\n")
    assert script.endswith("\r\n") and "\n" not in script.replace("\r\n", "")
    assert ("mod cmd UP1 setvar desk reception" in script) == (template == "devices/IP232-30-00-af")
    assert ("mod cmd UP0 prot" in script) == template.startswith(("models/", "devices/"))


@pytest.mark.parametrize("name", ["IP232-30-00-e1", "forged-IP232-30-00-af", "unrelated-IP232-30-00-f0"])
def test_lab_poll_shows_refused_devices_get_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes], name: str
) -> None:
    status, out, err = lab_poll(served, monkeypatch, capsysbinary, name)
    assert (status, out) == (1, "")
    assert "refused this device's certificate in the TLS handshake" in err


def test_lab_poll_path_reaches_the_server(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    status, out, _ = lab_poll(served, monkeypatch, capsysbinary, "IP232-30-00-af", "--path", "/update?hwid=IP232-30-01-10")
    assert (status, out) == (1, "HTTP/1.1 403 Forbidden\n# device mismatch\n")


def test_lab_poll_url_names_another_server(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    plain = tmp_path / "behind-a-terminator.toml"
    plain.write_text("port = 1\n")
    monkeypatch.setenv("CONFIGSERVER_PORT", "1")
    args = ["--config", str(plain), "lab", "poll", "IP232-30-00-af", "--lab", str(served.lab.root)]
    assert main(args) == 1
    assert "--url" in capsysbinary.readouterr().err.decode()
    assert main([*args, "--url", f"https://127.0.0.1:{served.port}/update"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"HTTP/1.1 200 OK\n# IP232-30-00-af")


def test_lab_poll_says_when_nothing_listens(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONFIGSERVER_PORT", str(free_port()))
    assert main(["lab", "poll", "IP232-30-00-af", "--lab", str(lab.root)]) == 1
    assert "nothing listens" in capsys.readouterr().err


def test_lab_poll_names_the_lab_devices_when_it_does_not_know_one(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lab", "poll", "IP999-00-00-01", "--lab", str(lab.root)]) == 1
    assert "IP222s-30-00-b0" in capsys.readouterr().err


def test_lab_poll_inside_the_lab_folder_polls_that_lab(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    # where `lab init DIR` leaves a user who then does `cd DIR`: its configserver.toml is read too
    monkeypatch.chdir(served.lab.root)
    monkeypatch.setenv("CONFIGSERVER_PORT", str(served.port))
    assert main(["lab", "poll", "IP232-30-00-af"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"HTTP/1.1 200 OK\n# IP232-30-00-af: lab default script")


def test_lab_poll_finds_the_lab_its_settings_file_belongs_to(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFIGSERVER_PORT", str(served.port))
    assert main(["--config", str(served.lab.config), "lab", "poll", "IP232-30-01-10"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"HTTP/1.1 200 OK\n# IP232-30-01-10")


def test_a_lab_named_with_lab_wins_over_the_folder_it_is_run_in(lab: Lab, tmp_path: Path) -> None:
    other = create_lab(tmp_path / "other")
    assert find_lab(other.root, settings_file=lab.config, cwd=lab.root).root == other.root
    assert find_lab(None, settings_file=other.config, cwd=lab.root).root == other.root
    assert find_lab(None, settings_file=None, cwd=lab.root).root == lab.root
    assert find_lab(None, settings_file=None, cwd=lab.root.parent).root == lab.root   # lab/ in it


def test_lab_poll_without_a_lab_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lab", "poll", "IP232-30-00-af"]) == 1
    err = capsys.readouterr().err
    assert f"found no lab in {tmp_path}, {tmp_path / 'lab'}" in err and "--lab" in err


def _into_a_closed_pipe(*args: str, buffered: bool = True, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command with its stdout on a pipe whose reader has already gone, as `| head -1`
    leaves it once head has its line. Buffered, the write fails when Python flushes; unbuffered,
    at once."""
    environment = {k: v for k, v in _clean_environment(**env).items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environment["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "configserver", *args], stdout=write,
                              stderr=subprocess.PIPE, env=environment, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_command_whose_reader_went_away_leaves_quietly(lab: Lab, buffered: bool) -> None:
    done = _into_a_closed_pipe("trust-value", str(lab.server_cert), buffered=buffered)
    assert (done.returncode, done.stderr) == (141, b"")     # 128 + SIGPIPE, as the shell reports for cat


def test_help_into_a_closed_pipe_leaves_quietly() -> None:
    assert _into_a_closed_pipe("--help").stderr == b""


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_lab_poll_into_head_leaves_quietly(served: Served, buffered: bool) -> None:
    done = _into_a_closed_pipe("lab", "poll", "IP232-30-00-af", "--lab", str(served.lab.root), buffered=buffered,
                               CONFIGSERVER_PORT=str(served.port))
    assert (done.returncode, done.stderr) == (141, b"")


def test_with_path_replaces_path_and_query() -> None:
    assert with_path("https://h:1/a?b=c", None) == "https://h:1/a?b=c"
    assert with_path("https://h:1/a?b=c", "/update?hwid=x") == "https://h:1/update?hwid=x"
    assert with_path("https://h:1", "update") == "https://h:1/update"


# -- scripts/run, the way a new user starts -------------------------------------------------------


def test_scripts_run_creates_a_lab_serves_it_and_prints_a_poll_command_that_works(tmp_path: Path) -> None:
    # scripts/run installs into $CONFIGSERVER_VENV; reuse this interpreter's environment when
    # scripts/venv.sh made it (as `scripts/test` does), rather than installing another one.
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    if not stamp.exists() or (REPO / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        pytest.skip("runs inside the environment scripts/venv.sh made (scripts/test)")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "scripts", checkout / "scripts")
    shutil.copy2(REPO / "pyproject.toml", checkout / "pyproject.toml")
    port = str(free_port())
    env = _clean_environment(CONFIGSERVER_VENV=str(venv), CONFIGSERVER_PORT=port, CONFIGSERVER_GRACE_SECONDS="0")
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(["scripts/run"], cwd=checkout, stdout=out, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Application startup complete" not in log.read_text():
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert (checkout / "lab/lab.json").is_file()
        assert "https://127.0.0.1:8443" in text  # what the user is told (the test moved the port)
        [command] = [line.strip() for line in text.splitlines() if "lab poll" in line]
        poll = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        assert poll.returncode == 0, poll.stderr
        assert poll.stdout.startswith(b"HTTP/1.1 200 OK\n# IP232-30-00-af: lab default script\r\n")
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(15)
    assert "created a lab in lab/" in log.read_text()
