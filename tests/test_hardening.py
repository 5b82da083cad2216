"""Start-up warnings about the host: what would let a local process read the proxy secret."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

from configserver.hardening import log_startup_warnings, startup_warnings
from configserver.settings import Settings

SECRET = "0123456789abcdef" * 4


def behind_a_terminator(**values: object) -> Settings:
    return Settings(proxy_secret=SECRET, **values)


def a_proc(tmp_path: Path, ptrace_scope: str | None, *, kernel: bool = True) -> Path:
    """A stand-in for /proc: with or without /proc/sys/kernel, with or without Yama's file."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    if kernel:
        (proc / "sys" / "kernel").mkdir(parents=True)
    if ptrace_scope is not None:
        (proc / "sys" / "kernel" / "yama").mkdir(parents=True)
        (proc / "sys" / "kernel" / "yama" / "ptrace_scope").write_text(ptrace_scope + "\n")
    return proc


@pytest.mark.parametrize(
    "ptrace_scope, kernel, risk",
    [
        (None, True, "no_yama"),
        ("0", True, "ptrace_scope_0"),
        ("x", True, "ptrace_scope_unreadable"),
        (None, False, "kernel_settings_hidden"),
    ],
)
def test_a_kernel_that_lets_www_data_read_nginx_workers_is_named(tmp_path, ptrace_scope, kernel, risk):
    [warning] = startup_warnings(behind_a_terminator(), a_proc(tmp_path, ptrace_scope, kernel=kernel))
    assert warning.risk == risk
    assert "proxy secret" in warning.message and "Apache or lighttpd" in warning.message
    assert warning.certain == (risk in ("no_yama", "ptrace_scope_0"))


@pytest.mark.parametrize("ptrace_scope", ["1", "2", "3"])
def test_yama_at_one_or_more_gives_no_warning(tmp_path, ptrace_scope):
    assert startup_warnings(behind_a_terminator(), a_proc(tmp_path, ptrace_scope)) == []


def test_without_a_proxy_secret_or_behind_no_terminator_there_is_nothing_to_protect(tmp_path):
    proc = a_proc(tmp_path, None)
    assert startup_warnings(Settings(), proc) == []
    (tmp_path / "server.pem").write_text("")
    (tmp_path / "server.key").write_text("")
    builtin = Settings(proxy_secret=SECRET, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    assert startup_warnings(builtin, proc) == []


def test_each_warning_is_one_structured_record(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="configserver.hardening"):
        log_startup_warnings(behind_a_terminator(), a_proc(tmp_path, "0"))
        log_startup_warnings(behind_a_terminator(), a_proc(tmp_path / "hidden", None, kernel=False))
    certain, hidden = caplog.records
    assert (certain.levelno, certain.fields["event"], certain.fields["risk"]) == (
        logging.WARNING, "hardening", "ptrace_scope_0")
    assert "kernel.yama.ptrace_scope = 1" in certain.fields["detail"]
    assert (hidden.levelno, hidden.fields["risk"]) == (logging.INFO, "kernel_settings_hidden")


def test_serve_logs_the_warning_at_start_up(tmp_path):
    # the real /proc of this machine: whatever it says, `serve` must report it before it listens
    expected = startup_warnings(behind_a_terminator())
    (tmp_path / "templates").mkdir()
    (tmp_path / "vars").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    env.update(CONFIGSERVER_PROXY_SECRET=SECRET, CONFIGSERVER_PORT=str(free_port()), CONFIGSERVER_DATABASE="sqlite:///db")
    server = subprocess.Popen([sys.executable, "-m", "configserver", "serve"], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        records = []
        for line in server.stderr:
            if not line.startswith("{"):
                continue   # not ours to judge here: a traceback of a start-up that failed later
            record = json.loads(line)
            records.append(record)
            if "startup complete" in record.get("event", "") or len(records) > 50:
                break
    finally:
        server.terminate()
        server.wait(15)
    logged = [(r["risk"], r["detail"]) for r in records if r.get("event") == "hardening"]
    assert logged == [(w.risk, w.message) for w in expected]
