"""Who may log in to the admin page: a file of `name:argon2-hash` lines, one user each.

    add_user(Path("/etc/configserver/admin-users"), "alice", "a long passphrase")
    Users(path).verify("alice", "a long passphrase")   # True

The file holds no password, only Argon2id hashes (argon2-cffi's defaults, RFC 9106's second
recommended profile), and is read again whenever it changes, so `configserver admin-user add`
takes effect without a restart.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import ConfigserverError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 12

_hasher = PasswordHasher()
# Verified when the name is unknown, so that a wrong name costs as long as a wrong password.
_DUMMY = _hasher.hash("no such user: the answer takes as long as for a real one")


class UsersError(ConfigserverError):
    """The users file or a user's name or password is unusable; the text says what to fix."""


def check_name(name: str) -> str:
    """Return `name` if it is a usable user name (letters, digits, `.`, `_`, `@`, `-`; up to 64),
    else raise UsersError saying so."""
    if not _NAME.fullmatch(name):
        raise UsersError(
            f"{name!r} is not a user name: use letters, digits, '.', '_', '@' and '-' (up to 64), "
            "starting with a letter or digit")
    return name


def read_users(path: Path) -> dict[str, str]:
    """Name → hash, from the users file. A file that is not there holds no users.

    Raises UsersError naming the file and line of anything that is not `name:hash`.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"setting 'admin_users': cannot read {path}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, hashed = line.partition(":")
        if not colon or not _NAME.fullmatch(name) or not hashed.startswith("$argon2"):
            raise UsersError(
                f"{path}:{number}: not 'name:$argon2...': add users with `configserver admin-user add NAME`")
        users[name] = hashed
    return users


def add_user(path: Path, name: str, password: str) -> bool:
    """Add `name` with `password` to the users file, or give it the new password.

    Returns True when the user is new. The file is replaced whole (never half written) and made
    readable by its owner only. Raises UsersError for a bad name, a password shorter than
    MIN_PASSWORD characters, or a file that cannot be written.
    """
    check_name(name)
    if len(password) < MIN_PASSWORD:
        raise UsersError(f"the password must be at least {MIN_PASSWORD} characters long")
    users = read_users(path)
    new = name not in users
    users[name] = _hasher.hash(password)
    _write(path, users)
    return new


def remove_user(path: Path, name: str) -> None:
    """Remove `name` from the users file. Raises UsersError when there is no such user."""
    users = read_users(path)
    if name not in users:
        raise UsersError(f"no user {name!r} in {path}")
    del users[name]
    _write(path, users)


def _write(path: Path, users: dict[str, str]) -> None:
    text = "".join(f"{name}:{hashed}\n" for name, hashed in sorted(users.items()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # The replacement keeps the file's owner, group and mode (root:configserver 0640, so
            # that the service can read what root wrote); a new file is its owner's alone.
            old = path.stat()
            keep: tuple[int, int, int] | None = (old.st_mode & 0o777, old.st_uid, old.st_gid)
        except FileNotFoundError:
            keep = None
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(temporary, keep[0] & 0o640 if keep else 0o600)
            if keep and (os.stat(temporary).st_uid, os.stat(temporary).st_gid) != keep[1:]:
                os.chown(temporary, keep[1], keep[2])
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise UsersError(f"setting 'admin_users': cannot write {path}: {exc.strerror or exc}") from None


class Users:
    """The users file as the admin page reads it: again whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}

    def _current(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._users = read_users(self.path)
            self._stamp = stamp
        return self._users

    def __len__(self) -> int:
        return len(self._current())

    def hash_of(self, name: str) -> str | None:
        """The current password hash of `name`, None when there is no such user. Raises
        UsersError when the file cannot be read."""
        return self._current().get(name)

    def check(self, name: str, password: str) -> str | None:
        """The hash `password` matched when `name` exists and it is its password, else None.
        Costs one Argon2 hash either way."""
        hashed = self.hash_of(name)
        try:
            matched = _hasher.verify(hashed or _DUMMY, password) and hashed is not None
        except (VerificationError, InvalidHashError):
            return None
        return hashed if matched else None

    def verify(self, name: str, password: str) -> bool:
        """True when `name` exists and `password` is its password. Costs one Argon2 hash either way."""
        return self.check(name, password) is not None
