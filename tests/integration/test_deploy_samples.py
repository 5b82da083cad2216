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
import subprocess
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
    assert not any(re.match(r"<(Location|Directory|Files|If)", line, re.I) for line in lines)
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
