"""Logged-in admins, their CSRF tokens, and how failed logins are slowed down.

A session lives in this process only: the cookie carries a random session id signed with a key
made at start-up (itsdangerous), the server keeps who it belongs to, its CSRF token and when it
ends. Logging out ends it here, whatever the browser keeps; a restart ends them all.

A session also ends when its user is removed from the users file or given a new password: it
keeps a digest of the password hash it was opened with (never the hash, and nothing of it goes
into a cookie) and is found only while the user's current hash has that digest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import BadSignature, TimestampSigner

from ..errors import ConfigserverError

SESSIONS_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    """One admin's login: who, the token every state-changing form must carry, when it ends,
    and the digest of the password hash it was opened with."""

    user: str
    csrf: str
    expires: float
    credential: bytes


def credential_of(hashed: str) -> bytes:
    """The digest a session keeps of a user's password hash: enough to tell the hash changed."""
    return hashlib.sha256(hashed.encode("utf-8")).digest()


class Sessions:
    """Sessions by signed cookie value. `lifetime` in seconds; `hash_of` gives a user's current
    password hash (None when there is no such user; while it raises ConfigserverError, no
    session is found);
    `clock` for tests."""

    def __init__(self, lifetime: float, hash_of: Callable[[str], str | None],
                 clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.lifetime = lifetime
        self._hash_of = hash_of
        self._clock = clock
        self._signer = TimestampSigner(secrets.token_bytes(32), salt="configserver-admin-session")
        self._login_signer = TimestampSigner(secrets.token_bytes(32), salt="configserver-admin-login")
        self._by_id: dict[str, Session] = {}

    def start(self, user: str, hashed: str) -> tuple[str, Session]:
        """A new session for `user`, who logged in with the password whose hash is `hashed`:
        the cookie value to set, and the session."""
        now = self._clock()
        if len(self._by_id) >= SESSIONS_KEPT:
            self._by_id = {key: s for key, s in self._by_id.items() if s.expires > now}
            while len(self._by_id) >= SESSIONS_KEPT:   # still full: the oldest go first
                self._by_id.pop(next(iter(self._by_id)))
        session_id = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), now + self.lifetime, credential_of(hashed))
        self._by_id[session_id] = session
        return self._signer.sign(session_id).decode(), session

    def find(self, cookie: str | None) -> Session | None:
        """The live session the cookie names, or None (absent, forged, expired, logged out,
        its user removed or given a new password since)."""
        session_id = self._unsign(cookie)
        if session_id is None:
            return None
        session = self._by_id.get(session_id)
        if session is None or session.expires <= self._clock():
            self._by_id.pop(session_id, None)
            return None
        try:
            hashed = self._hash_of(session.user)
        except ConfigserverError:
            # the users file cannot be read now (half edited by hand?): no access until it can,
            # but the session is kept for when the file is whole again with the same hash
            return None
        if hashed is None or not hmac.compare_digest(credential_of(hashed), session.credential):
            self._by_id.pop(session_id, None)
            return None
        return session

    def end(self, cookie: str | None) -> None:
        """Log out: the session the cookie names is gone, here, at once."""
        session_id = self._unsign(cookie)
        if session_id is not None:
            self._by_id.pop(session_id, None)

    def _unsign(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            return self._signer.unsign(cookie, max_age=self.lifetime).decode()
        except (BadSignature, UnicodeDecodeError):
            return None

    # The login form has no session yet: its token is a signed random value that the browser
    # holds both as a cookie and in the form (double submit), good for an hour.
    def login_token(self) -> str:
        return self._login_signer.sign(secrets.token_urlsafe(16)).decode()

    def login_token_valid(self, cookie: str | None, form: str | None) -> bool:
        if not cookie or not form or not secrets.compare_digest(cookie, form):
            return False
        try:
            self._login_signer.unsign(form, max_age=3600)
        except BadSignature:
            return False
        return True


FAILURE_WINDOW = 15 * 60.0
FIRST_DELAY = 0.5
MAX_DELAY = 8.0


def failure_delay(recent_failures: int) -> float:
    """Seconds to hold the answer to a failed login, given the failures from that address in
    the last FAILURE_WINDOW (this one included): 0.5 s, doubling, at most 8 s."""
    if recent_failures < 1:
        return 0.0
    return min(FIRST_DELAY * 2 ** (recent_failures - 1), MAX_DELAY)


class Throttle:
    """Login attempts per client address: one at a time, and none until the wait its failures
    earned (failure_delay over the last FAILURE_WINDOW seconds) is over.

    An attempt refused here costs no password hash: parallel guesses from one address are not
    queued behind each other but refused (429), so they are no faster than guesses in a row.
    """

    def __init__(self, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}    # address -> until when it may not try
        self._trying: set[str] = set()          # addresses with an attempt being checked

    def begin(self, client: str) -> float:
        """Start an attempt from `client`: 0.0 when it may go ahead (then `failed` or `done`
        must follow), else the seconds until it may try again (at least 1, for Retry-After)."""
        now = self._clock()
        until = self._blocked.get(client, 0.0)
        if client in self._trying or until > now:
            return max(1.0, float(int(until - now + 0.999)))
        self._trying.add(client)
        return 0.0

    def done(self, client: str) -> None:
        """The attempt from `client` ended without a failed password (logged in, or a stale form)."""
        self._trying.discard(client)

    def failed(self, client: str) -> float:
        """Count a failed login from `client`; return the seconds it may not try again (the
        failed answer is held as long, so a person never meets a refusal). `done` still ends
        the attempt."""
        now = self._clock()
        if len(self._failures) > 10_000:   # bounded: forget the quiet addresses first
            self._failures = {k: v for k, v in self._failures.items() if v and v[-1] > now - FAILURE_WINDOW}
            self._blocked = {k: v for k, v in self._blocked.items() if v > now}
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= now - FAILURE_WINDOW:
            times.popleft()
        times.append(now)
        delay = failure_delay(len(times))
        self._blocked[client] = now + delay
        return delay
