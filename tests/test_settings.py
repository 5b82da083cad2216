"""One validated settings object: TOML, environment overrides, and errors that name the key."""

import ipaddress
import subprocess
import sys

import pytest

from configserver.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("CONFIGSERVER_"):
            monkeypatch.delenv(key)


def test_defaults_serve_the_lab():
    s = load_settings()
    assert (s.host, s.port, str(s.templates), str(s.vars)) == ("127.0.0.1", 8080, "templates", "vars")
    assert ipaddress.ip_address("127.0.0.1") in s.trusted_proxies[0]
    assert s.ca_bundle is None and not s.require_client_cert and not s.builtin_tls


def test_toml_file_in_the_working_directory_is_read(tmp_path):
    (tmp_path / "configserver.toml").write_text('port = 9000\ntrusted_proxies = ["10.0.0.0/8"]\n')
    s = load_settings()
    assert s.port == 9000
    assert s.trusted_proxies == [ipaddress.ip_network("10.0.0.0/8")]


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    (tmp_path / "configserver.toml").write_text("port = 9000\n")
    monkeypatch.setenv("CONFIGSERVER_PORT", "9100")
    monkeypatch.setenv("CONFIGSERVER_TRUSTED_PROXIES", "10.0.0.1, 192.0.2.0/24")
    s = load_settings()
    assert s.port == 9100
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.1/32", "192.0.2.0/24"]


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(config_file=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "toml, key",
    [
        ("port = 0\n", "port"),
        ("port = 'x'\n", "port"),
        ("trusted_proxies = ['not-an-ip']\n", "trusted_proxies"),
        ("accepted_issuers = ['no dn here']\n", "accepted_issuers"),
        ("ca_bundle = 'missing.pem'\n", "ca_bundle"),
        ("tls_min_version = 'SSLv3'\n", "tls_min_version"),
        ("final_command = 'reboot'\n", "final_command"),
        ("templtes = 'typo'\n", "templtes"),
    ],
)
def test_bad_setting_names_the_key(tmp_path, toml, key):
    (tmp_path / "configserver.toml").write_text(toml)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert repr(key) in str(error.value)


def test_ca_bundle_without_a_ca_stops_start_up(tmp_path, pki):
    (tmp_path / "leaf.pem").write_bytes(pki.phone.cert_pem)
    (tmp_path / "junk.pem").write_text("hello")
    for name, message in (("leaf.pem", "no CA certificate"), ("junk.pem", "no PEM certificate")):
        with pytest.raises(SettingsError, match=message):
            load_settings(ca_bundle=tmp_path / name)


def test_broken_toml_names_the_file(tmp_path):
    (tmp_path / "configserver.toml").write_text("port = \n")
    with pytest.raises(SettingsError, match="configserver.toml: not valid TOML"):
        load_settings()


def test_serve_with_a_bad_setting_exits_with_the_message(tmp_path):
    (tmp_path / "configserver.toml").write_text("port = 70000\n")
    result = subprocess.run([sys.executable, "-m", "configserver", "serve"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "setting 'port'" in result.stderr


def test_settings_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "configserver.toml").write_bytes("# M\xfcnchen\nport = 9000\n".encode("latin-1"))
    with pytest.raises(SettingsError, match="configserver.toml: not UTF-8"):
        load_settings()


def test_serve_without_the_templates_folder_names_the_setting(tmp_path):
    result = subprocess.run([sys.executable, "-m", "configserver", "serve"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "setting 'templates'" in result.stderr and "is not a folder" in result.stderr


def test_check_without_the_templates_folder_is_a_problem(tmp_path):
    result = subprocess.run([sys.executable, "-m", "configserver", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "templates" in result.stdout and "is not a folder" in result.stdout


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(tmp_path, monkeypatch):
    (tmp_path / "configserver.toml").write_text("port = 9000\n")
    monkeypatch.setenv("CONFIGSERVER_PORT", "eighty")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("setting 'port' (from the environment variable CONFIGSERVER_PORT): ")
    assert "configserver.toml" not in message


def test_a_bad_value_from_the_file_names_the_file(tmp_path):
    (tmp_path / "configserver.toml").write_text("port = 'eighty'\n")
    with pytest.raises(SettingsError, match=r"^setting 'port' \(in configserver.toml\): "):
        load_settings()


def test_a_bad_command_line_value_says_so():
    with pytest.raises(SettingsError, match=r"^setting 'workers' \(from the command line\): "):
        load_settings(workers=0)


def test_check_names_the_variable_that_set_a_missing_templates_folder(tmp_path):
    (tmp_path / "configserver.toml").write_text('templates = "templates"\n')
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CONFIGSERVER_")}
    env["CONFIGSERVER_TEMPLATES"] = str(tmp_path / "nowhere")
    result = subprocess.run([sys.executable, "-m", "configserver", "check"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.startswith("CONFIGSERVER_TEMPLATES:1: templates: ") and "configserver.toml" not in result.stdout


def test_the_production_settings_name_every_file_whose_default_is_relative_by_an_absolute_path():
    # A relative path is looked for in the working directory: / under systemd, root's shell's
    # folder for `configserver --config ...`; the two would read different files.
    import tomllib
    from pathlib import Path

    from configserver.settings import Settings

    production_file = Path(__file__).resolve().parent.parent / "deploy" / "configserver.production.toml"
    production = tomllib.loads(production_file.read_text())
    relative = [name for name, field in Settings.model_fields.items()
                if isinstance(field.default, Path) and not field.default.is_absolute()]
    assert {"templates", "vars", "admin_users"} <= set(relative)
    for name in relative:
        assert Path(production[name]).is_absolute(), name
    assert production["database"].startswith("sqlite:////")   # four slashes: an absolute file
    commented = {line.lstrip("# ").split(" = ")[0]: line.split(" = ", 1)[1].strip('"')
                 for line in production_file.read_text().splitlines() if line.startswith("# ") and " = " in line}
    assert commented["security_log"] == "journal" and Path(commented["revoked"]).is_absolute()
