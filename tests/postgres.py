"""A throwaway PostgreSQL for tests: Debian's server binaries, a temporary data directory, a
loopback port. Runs as the `postgres` system user when the tests run as root (PostgreSQL refuses
root). Missing binaries skip the test, or fail it when `CI=true`.

    with PostgresServer.create() as server:
        url = server.create_database("inventory")
        server.stop(); server.start()       # a database that goes away and comes back
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ports import free_port


def _missing(why: str) -> None:
    message = f"PostgreSQL is needed for this test: {why} (scripts/install-test-servers installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _bindir() -> Path:
    """The newest installed server's bin directory."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    candidates = [d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()]
    if not candidates:
        _missing("no /usr/lib/postgresql/*/bin/postgres")
    return max(candidates, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


class PostgresServer:
    """One PostgreSQL instance in its own directory; `cleanup()` (or leaving `with`) removes it."""

    def __init__(self, bindir: Path, root: Path, port: int, as_user: list[str]) -> None:
        self.bindir, self.root, self.port, self._as_user = bindir, root, port, as_user
        self.data = root / "data"
        self.running = False
        self._databases: set[str] = set()

    @classmethod
    def create(cls) -> PostgresServer:
        """initdb a fresh cluster and start it on a free loopback port."""
        bindir = _bindir()
        as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                _missing("no 'postgres' system user to run the server as")
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            if os.path.exists(runuser):
                as_user = [runuser, "-u", "postgres", "--"]
            else:
                as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        # Not pytest's tmp_path: that is private to root, and the server's user must reach it.
        root = Path(tempfile.mkdtemp(prefix="configserver-pg-"))
        if os.geteuid() == 0:
            os.chown(root, user.pw_uid, user.pw_gid)
        server = cls(bindir, root, free_port(), as_user)
        atexit.register(server.cleanup)  # an interrupted test run leaves no server behind
        try:
            server._run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync")
            server.start()
        except BaseException:
            server.cleanup()
            raise
        return server

    def _run(self, tool: str, *args: str) -> None:
        # Clients (psql, createdb) need no other user; the server tools do.
        server_tool = tool in ("initdb", "pg_ctl")
        command = [*(self._as_user if server_tool else []), str(self.bindir / tool), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=self.root)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.root} "
            # Durability is not what these tests are about; speed is.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", "30", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, disconnecting its clients (`fast`) or not even that (`immediate`)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        """A `postgresql://` URL for one of its databases."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def empty_database(self, name: str = "scratch") -> str:
        """A database with nothing in it, created on first use and wiped after (CREATE DATABASE
        costs a third of a second; wiping its one schema, a few milliseconds). Returns its URL."""
        if name not in self._databases:
            self.create_database(name)
            self._databases.add(name)
        else:
            self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", name, "-q",
                      "-v", "ON_ERROR_STOP=1", "-c", "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        return self.url(name)

    def cleanup(self) -> None:
        """Stop the server and delete its directory. Safe to call twice."""
        with contextlib.suppress(Exception):  # already gone; the directory goes anyway
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
