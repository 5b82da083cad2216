"""The admin page's users file and `configserver admin-user`."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from configserver.admin import UsersError, add_user, read_users, remove_user
from configserver.admin._users import Users

PASSWORD = "correct horse battery staple"


def test_a_user_added_can_log_in_and_the_file_holds_no_password(tmp_path: Path) -> None:
    path = tmp_path / "admin-users"
    assert add_user(path, "alice", PASSWORD) is True
    text = path.read_text()
    assert PASSWORD not in text and text.startswith("alice:$argon2id$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = Users(path)
    assert users.verify("alice", PASSWORD)
    assert not users.verify("alice", PASSWORD + "!")
    assert not users.verify("bob", PASSWORD)


def test_a_new_password_replaces_the_old_one_and_the_page_sees_it_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "admin-users"
    add_user(path, "alice", PASSWORD)
    users = Users(path)
    assert users.verify("alice", PASSWORD)
    assert add_user(path, "alice", "another long passphrase") is False
    add_user(path, "bob", "bob's long passphrase")
    assert not users.verify("alice", PASSWORD) and users.verify("alice", "another long passphrase")
    assert users.verify("bob", "bob's long passphrase")
    remove_user(path, "bob")
    assert not users.verify("bob", "bob's long passphrase") and sorted(read_users(path)) == ["alice"]


def test_adding_a_user_keeps_the_files_group_and_mode_so_the_service_can_still_read_it(tmp_path: Path) -> None:
    import grp
    import os

    path = tmp_path / "admin-users"
    path.touch()
    group = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()) if os.geteuid() == 0 else os.getgid()
    os.chown(path, -1, group)
    path.chmod(0o640)
    add_user(path, "alice", PASSWORD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.stat().st_gid == group
    path.chmod(0o666)                      # never more than owner rw, group r
    add_user(path, "bob", PASSWORD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(("name", "password", "message"), [
    ("alice:x", PASSWORD, "is not a user name"),
    ("", PASSWORD, "is not a user name"),
    ("alice", "short", "at least 12 characters"),
])
def test_a_bad_name_or_short_password_is_refused_with_the_rule(tmp_path: Path, name, password, message) -> None:
    with pytest.raises(UsersError, match=message):
        add_user(tmp_path / "admin-users", name, password)
    assert not (tmp_path / "admin-users").exists()


def test_a_broken_users_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "admin-users"
    path.write_text("# admins\nalice:plaintext-password\n")
    with pytest.raises(UsersError, match=r"admin-users:2: not 'name:\$argon2"):
        read_users(path)


def run_cli(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "configserver", *args], cwd=tmp_path, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_admin_user_add_reads_the_password_from_stdin(tmp_path: Path) -> None:
    added = run_cli(tmp_path, "admin-user", "add", "alice", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert Users(tmp_path / "admin-users").verify("alice", PASSWORD)
    assert run_cli(tmp_path, "admin-user", "list").stdout == "alice\n"
    short = run_cli(tmp_path, "admin-user", "add", "bob", stdin="short\n")
    assert short.returncode == 1 and "at least 12 characters" in short.stderr


def test_admin_user_names_the_absolute_path_of_the_file_it_wrote(tmp_path: Path) -> None:
    # the default `admin_users` is relative: the path said must be the one written, wherever
    # the command ran, so that it can be compared with the one admin-serve reads
    added = run_cli(tmp_path, "admin-user", "add", "alice", stdin=PASSWORD + "\n")
    assert added.stdout == f"added alice in {tmp_path.resolve() / 'admin-users'}\n"
    again = run_cli(tmp_path, "admin-user", "add", "alice", stdin="another long passphrase\n")
    assert again.stdout == f"new password for alice in {tmp_path.resolve() / 'admin-users'}\n"
    removed = run_cli(tmp_path, "admin-user", "remove", "alice")
    assert removed.stdout == f"removed alice from {tmp_path.resolve() / 'admin-users'}\n"
    (tmp_path / "admin-users").unlink()
    listed = run_cli(tmp_path, "admin-user", "list")
    assert listed.returncode == 0 and listed.stdout == ""
    assert f"no users file {tmp_path.resolve() / 'admin-users'}" in listed.stderr


def test_the_admin_page_warns_at_start_when_its_users_file_is_not_there(tmp_path: Path, caplog) -> None:
    import logging

    from configserver import load_settings
    from configserver.admin import create_admin_app

    settings = load_settings(templates=tmp_path, vars=tmp_path, database=f"sqlite:///{tmp_path}/i.db",
                             admin_users=tmp_path / "nowhere" / "admin-users", admin_port=8081)
    with caplog.at_level(logging.WARNING, logger="configserver.admin"):
        create_admin_app(settings)
    [warning] = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "admin_users_missing"]
    assert warning.fields["admin_users"] == str(tmp_path / "nowhere" / "admin-users")
    assert "absolute path" in warning.fields["fix"] and "admin-user add" in warning.fields["fix"]
    caplog.clear()
    add_user(settings.admin_users, "alice", PASSWORD)
    with caplog.at_level(logging.WARNING, logger="configserver.admin"):
        create_admin_app(settings)
    assert not [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "admin_users_missing"]


def test_the_production_settings_read_the_users_file_the_readme_installs() -> None:
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    production = tomllib.loads((root / "deploy" / "configserver.production.toml").read_text())
    for text in ((root / "README.md").read_text(), (root / "deploy" / "systemd" / "configserver-admin.service").read_text()):
        installed = re.findall(r"install -m 0640 -g configserver /dev/null (\S+)", text)
        assert installed == [production["admin_users"]]


def test_admin_serve_says_how_to_turn_the_page_on(tmp_path: Path) -> None:
    off = run_cli(tmp_path, "admin-serve")
    assert off.returncode == 2
    assert "set admin_port" in off.stderr and "admin_uds" in off.stderr


def test_admin_serve_listens_on_its_unix_socket_and_answers_only_the_page(tmp_path: Path) -> None:
    import http.client
    import os
    import signal
    import socket
    import time

    (tmp_path / "templates").mkdir()
    socket_path = tmp_path / "admin.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    env.update(CONFIGSERVER_ADMIN_UDS=str(socket_path), CONFIGSERVER_DATABASE=f"sqlite:///{tmp_path}/i.db")
    server = subprocess.Popen([sys.executable, "-m", "configserver", "admin-serve"], cwd=tmp_path, env=env,
                              stderr=subprocess.DEVNULL)

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(socket_path))

    def get(path: str) -> http.client.HTTPResponse:
        connection = UnixConnection("localhost", timeout=5)
        connection.request("GET", path)
        return connection.getresponse()

    try:
        deadline = time.time() + 30
        while not socket_path.exists():
            assert server.poll() is None and time.time() < deadline, "admin-serve did not start"
            time.sleep(0.1)
        login = get("/login")
        assert login.status == 200 and b"Log in" in login.read()
        poll = get("/update?hwid=IP232-30-00-af")
        assert poll.status == 303 and poll.getheader("location") == "/login"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
