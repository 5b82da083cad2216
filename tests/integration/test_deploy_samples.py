"""What the running servers cannot show about the deploy/ samples: the traps that stay quiet.

A per-location client-certificate check, a conditional header, or a header set inside a nginx
location all pass a test against "/" and still open a hole on the next edit; so do a systemd
unit that no longer parses or lost its hardening, a proxy secret written into a file the
terminator's workers read, or a placeholder secret the app would accept.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from terminator_lab import BEGIN_VALUES, DEPLOY, END_VALUES, fill_in, new_proxy_secret

from configserver.settings import SettingsError, load_settings

IDENTITY = ("x-ssl-client-verify", "x-ssl-client-s-dn", "x-ssl-client-i-dn", "x-ssl-client-cert")
SECRET = "x-configserver-proxy-secret"
# Where each sample takes the proxy secret: a line of its block of values to change.
SECRET_VALUES = {
    "apache/configserver.conf": "Define CONFIGSERVER_PROXY_SECRET",
    "nginx/configserver.conf": "proxy_set_header X-Configserver-Proxy-Secret",
    "lighttpd/50-configserver.conf": "var.configserver_proxy_secret",
    "configserver.production.toml": "proxy_secret",
}


def directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_apache_sample_verifies_devices_for_the_whole_virtual_host_and_sets_headers_unconditionally():
    lines = directives((DEPLOY / "apache" / "configserver.conf").read_text())
    # the devices' virtual host, the first; others (the admin page's) answer people, not devices
    start = next(i for i, line in enumerate(lines) if line.lower().startswith("<virtualhost"))
    lines = lines[start:lines.index("</VirtualHost>", start) + 1]
    # Sections may limit methods or sizes, never verify or set identity headers per path: a
    # per-<Location> SSLVerifyClient or a header set inside <If> leaves the other paths open.
    depth = 0
    for line in lines:
        if re.match(r"</(Location|Directory|Files|If|Else|LimitExcept|Limit)", line, re.I):
            depth -= 1
        elif re.match(r"<(Location|Directory|Files|If|Else|LimitExcept|Limit)", line, re.I):
            depth += 1
        elif depth:
            assert not re.match(r"(SSLVerify|SSLCACertificate|RequestHeader|SSLOptions)", line, re.I), line
    assert depth == 0
    assert [line for line in lines if line.lower().startswith("sslverifyclient")] == ["SSLVerifyClient require"]
    headers = {}
    for line in lines:
        words = shlex.split(line)
        if words[0].lower() == "requestheader":
            headers.setdefault(words[2].lower(), []).append(words)
    for name in (*IDENTITY, SECRET):
        [words] = headers[name]
        assert words[1] == "set" and len(words) == 4, f"{name} must be set unconditionally: {words}"
    assert headers[SECRET][0][3] == "${CONFIGSERVER_PROXY_SECRET}"
    assert [w[1] for w in headers["x-forwarded-for"]] == ["unset"]


def test_nginx_sample_keeps_every_header_at_server_level():
    text = (DEPLOY / "nginx" / "configserver.conf").read_text()
    locations = re.findall(r"location[^{]*\{([^}]*)\}", "\n".join(directives(text)))
    assert locations and not any("proxy_set_header" in body for body in locations)
    lines = directives(text)
    assert "ssl_verify_client on;" in lines
    for name in (*IDENTITY, SECRET):
        assert any(line.lower().startswith(f"proxy_set_header {name} ") for line in lines), name
    code = "\n".join(lines)
    assert "$proxy_add_x_forwarded_for" not in code
    assert not re.search(r"\$ssl_client_cert\b", code)


def test_lighttpd_sample_enforces_client_certificates():
    lines = directives((DEPLOY / "lighttpd" / "50-configserver.conf").read_text())
    assert 'ssl.verifyclient.enforce = "enable"' in lines
    assert 'ssl.verifyclient.exportcert = "enable"' in lines
    lua = (DEPLOY / "lighttpd" / "configserver-client-cert.lua").read_text()
    assert "lighty.c.urlenc(pem)" in lua


def test_lighttpd_sample_sets_the_proxy_secret_in_the_root_only_config_not_in_the_lua_script():
    lines = directives((DEPLOY / "lighttpd" / "50-configserver.conf").read_text())
    assert any('"mod_setenv"' in line for line in lines if line.startswith("server.modules"))
    # "set" replaces the client's value; "add-request-header" would append to it
    assert [line for line in lines if line.startswith("setenv.")] == [
        'setenv.set-request-header = ( "X-Configserver-Proxy-Secret" => var.configserver_proxy_secret )'
    ]
    # www-data reads the Lua script: no secret in it, and it does not touch the header
    code = [line for line in (DEPLOY / "lighttpd" / "configserver-client-cert.lua").read_text().splitlines()
            if not line.strip().startswith("--")]
    assert not any("secret" in line.lower() for line in code)


@pytest.mark.parametrize("sample", sorted(SECRET_VALUES))
def test_each_sample_takes_the_proxy_secret_among_its_values_to_change_and_says_how_to_keep_it(sample):
    text = (DEPLOY / sample).read_text()
    block = text[text.index(BEGIN_VALUES):text.index(END_VALUES)]
    assert "openssl rand -hex 32" in block
    fill_in(text, {SECRET_VALUES[sample]: "x"})       # exactly one marked line
    header = text[:text.index(BEGIN_VALUES)]
    if sample.endswith(".toml"):
        assert "chmod 0640" in header and "root:configserver" in header
    else:
        assert "install -m 0600 -o root -g root" in header and "chmod 0600" in header


def test_the_placeholder_secret_stops_the_app(tmp_path, monkeypatch):
    # An admin who forgets to change it gets an app that does not start, never one that shares
    # the sample's value with every other installation.
    for name in [key for key in os.environ if key.startswith("CONFIGSERVER_")]:
        monkeypatch.delenv(name)
    sample = tomllib.loads((DEPLOY / "configserver.production.toml").read_text())
    placeholder = sample["proxy_secret"]
    for other in ("apache/configserver.conf", "nginx/configserver.conf", "lighttpd/50-configserver.conf"):
        assert placeholder in (DEPLOY / other).read_text()   # the same placeholder everywhere
    config = tmp_path / "configserver.toml"
    config.write_text(f'proxy_secret = "{placeholder}"\n')
    with pytest.raises(SettingsError, match="proxy_secret"):
        load_settings(config_file=config)
    secret = new_proxy_secret()
    config.write_text(f'proxy_secret = "{secret}"\n')
    assert load_settings(config_file=config).proxy_secret.get_secret_value() == secret


def test_the_placeholder_digest_key_stops_the_app(tmp_path, monkeypatch):
    for name in [key for key in os.environ if key.startswith("CONFIGSERVER_")]:
        monkeypatch.delenv(name)
    sample = tomllib.loads((DEPLOY / "configserver.production.toml").read_text())
    config = tmp_path / "configserver.toml"
    config.write_text(f'digest_key = "{sample["digest_key"]}"\n')
    with pytest.raises(SettingsError, match="digest_key"):
        load_settings(config_file=config)


def test_production_settings_require_the_forwarded_certificate():
    settings = tomllib.loads((DEPLOY / "configserver.production.toml").read_text())
    assert settings["require_client_cert"] is True


@pytest.fixture
def unit_file(tmp_path):
    """The unit with its one machine-specific path, the installed command, pointed at this one."""
    command = shutil.which("configserver") or "/bin/true"
    text = (DEPLOY / "systemd" / "configserver.service").read_text()
    assert "ExecStart=/opt/configserver/bin/configserver " in text
    path = tmp_path / "configserver.service"
    path.write_text(text.replace("ExecStart=/opt/configserver/bin/configserver ", f"ExecStart={command} "))
    return path


def test_systemd_unit_runs_unprivileged_restarts_on_failure_and_reads_settings_from_etc(unit_file):
    service = dict(
        line.split("=", 1) for line in directives(unit_file.read_text()) if "=" in line and not line.startswith("[")
    )
    assert service["User"] == "configserver" and service["Group"] == "configserver"
    assert service["Restart"] == "on-failure"
    assert "--config /etc/configserver/configserver.toml" in service["ExecStart"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"


def test_systemd_unit_passes_systemd_analyze(unit_file):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    verify = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(unit_file)], capture_output=True, text=True, timeout=60
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.0, security.stdout


def test_samples_fill_in_only_their_marked_values():
    sample = (DEPLOY / "nginx" / "configserver.conf").read_text()
    filled = fill_in(sample, {"listen": "127.0.0.1:8443 ssl"})
    changed = [(a, b) for a, b in zip(sample.splitlines(), filled.splitlines()) if a != b]
    assert changed == [("    listen 443 ssl;", "    listen 127.0.0.1:8443 ssl;")]


# -- the starter templates and variables ----------------------------------------------------------

STARTER = DEPLOY / "starter"


def _configserver(*args: str, cwd, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    done = subprocess.run([sys.executable, "-m", "configserver", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=60)
    assert not check or done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done


@pytest.fixture
def starter_site(tmp_path):
    """deploy/starter copied as README's install steps do, with settings pointing at it."""
    shutil.copytree(STARTER / "templates", tmp_path / "templates")
    shutil.copytree(STARTER / "vars", tmp_path / "vars")
    (tmp_path / "configserver.toml").write_text(
        f'templates = "{tmp_path / "templates"}"\nvars = "{tmp_path / "vars"}"\n')
    return tmp_path


def _examples(text: str) -> dict[str, str]:
    """The example files a starter file quotes in its comments: a line naming the file and what
    it is for (`templates/models/IP232.j2, firmware for ...:`), then its lines, indented deeper."""
    header = re.compile(r"^((?:templates|vars)/[^\s,]+\.(?:j2|toml))(?: \([^)]*\))?, [^:]*:$")
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        body = line[1:] if line.startswith("#") else line   # TOML comments
        named = header.match(body.strip())
        if named:
            current = found.setdefault(named.group(1), [])
        elif current is not None and body.startswith(" " * 5):
            current.append(body.strip())
        elif body.strip():
            current = None
    return {name: "\n".join(lines) + "\n" for name, lines in found.items()}


def test_the_starter_passes_check_and_answers_a_device(starter_site):
    _configserver("check", cwd=starter_site)
    script = _configserver("render", "IP232-30-00-af", "--path", "/update?sn=0090333000af&ip=10.0.0.5",
                           cwd=starter_site).stdout.decode()
    lines = script.split("\r\n")
    assert lines[1] == "mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 5"
    assert "config add UP1 /url https%3A%2F%2Fconfig.example.com%2Fupdate%3Fsn%3D%23m%26ip%3D%23i" in lines
    assert "config add UP1 /poll 15" in lines
    # the apply-once ending comes from configserver, once
    assert [line for line in lines if line.startswith("config write")] == ["config write"]
    assert lines[-3].startswith("mod cmd UP1 check ser ") and lines[-2:] == ["iresetn", ""]


def test_the_starter_marks_its_values_to_change_as_the_samples_do():
    text = (STARTER / "vars" / "default.toml").read_text()
    filled = fill_in(text, {"update_url": '"https://pbx.example.net/cfg?sn=#m"', "poll_minutes": "30"})
    values = tomllib.loads(filled)
    assert (values["update_url"], values["poll_minutes"]) == ("https://pbx.example.net/cfg?sn=#m", 30)
    # what the lab ships, and what must never reach a device behind a terminator
    code = [str(value) for value in tomllib.loads(text).values()]
    code += [re.sub(r"\{#.*?#\}", "", path.read_text(), flags=re.S) for path in (STARTER / "templates").rglob("*.j2")]
    assert not [line for line in code if "127.0.0.1" in line or ":8443" in line or "localhost" in line]


def test_the_starters_commented_examples_work_once_copied_into_files(starter_site):
    examples = {**_examples((STARTER / "templates" / "default.j2").read_text()),
                **_examples((STARTER / "vars" / "default.toml").read_text())}
    assert sorted(examples) == [
        "templates/devices/IP232-30-00-af.j2", "templates/models/IP232.j2",
        "vars/devices/IP232-30-00-af.toml", "vars/models/IP232.toml",
    ]
    for name, text in examples.items():
        (starter_site / name).parent.mkdir(parents=True, exist_ok=True)
        (starter_site / name).write_text(text)
    _configserver("check", cwd=starter_site)
    device = _configserver("render", "IP232-30-00-af", cwd=starter_site)
    assert b"template: devices/IP232-30-00-af.j2" in device.stderr
    assert b"\r\nconfig add CMD0 /name Reception\r\n" in device.stdout
    assert b"\r\nmod cmd UP0 prot http://firmware.example.com/13r3/ip232.bin ser 138912\r\n" in device.stdout
    assert b"\r\nconfig add UP1 /poll 5\r\n" in device.stdout
    other = _configserver("render", "IP232-30-01-10", cwd=starter_site)
    assert b"template: models/IP232.j2" in other.stderr and b"config add CMD0" not in other.stdout


# -- Apache's error log: why a device was refused, and nothing for those served ------------------

def _log_until(path, text: str, timeout: float = 10.0) -> list[str]:
    """The log's lines once `text` is in it (the filter writes a moment after Apache)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text().splitlines()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.exists() else 'no file'}")


def test_apache_logs_why_a_device_was_refused_and_nothing_for_each_one_served(fresh_terminator):
    apache = fresh_terminator("apache")
    error_log = next(path for path in apache.server.logs if path.name == "configserver-error.log")
    for _ in range(3):
        assert apache.poll("phone").status == 200
    assert apache.poll("expired").status is None and apache.poll(None).status is None
    lines = _log_until(error_log, "peer did not return a certificate")
    device_lines = [line for line in lines if "[client 127.0.0.3:" in line]
    # the reasons, with the device's address and certificate name; no line per served poll
    assert any("certificate has expired [subject: CN=IP232-30-00-af," in line for line in device_lines), lines
    assert not [line for line in device_lines if not re.search(r"AH0(2276|2008):", line)], lines
    # the port the devices poll, not ":443"
    named = re.findall(r"\(server ([^)]*)\)", "\n".join(lines))
    assert named and set(named) == {f"localhost:{apache.port}"}


def test_apache_log_filter_writes_to_a_fresh_file_after_logrotate_and_a_reload(fresh_terminator):
    apache = fresh_terminator("apache")
    error_log = next(path for path in apache.server.logs if path.name == "configserver-error.log")
    assert apache.poll("expired").status is None
    _log_until(error_log, "certificate has expired")
    # what Debian's logrotate does: move the file away, then `systemctl reload apache2` (graceful)
    error_log.rename(error_log.with_name("configserver-error.log.1"))
    apache.server.process.send_signal(signal.SIGUSR1)
    apache.server.wait_until(lambda: error_log.exists(), "a new error log after the reload")
    assert apache.poll("unrelated-ca").status is None
    _log_until(error_log, "unable to get local issuer certificate")
    assert "unable to get local issuer" not in error_log.with_name("configserver-error.log.1").read_text()
