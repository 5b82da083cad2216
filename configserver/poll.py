"""The poll pipeline: from what a device sent to the answer it gets, with no web framework in sight.

    answer(request, now) -> Outcome

Each stage returns a value, top to bottom:

    admission   the request's certificate facts and query -> the device (or a refusal)
    choice      the device -> template, variables and options, from one content snapshot
    script      the template rendered for the device (kept while what it was rendered from holds)
    wrap        the script wrapped to be applied once (apply_once.py), for the CHECK reported
    above       backup requests and firmware lines, above the script and outside its digest
    outcome     status, reason, body, digests: one frozen value for the log, metrics and audit

The web layer (app.py) only turns ASGI into a PollRequest and the Outcome into bytes;
`configserver render` runs the same pipeline with an admission that names a device.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .apply_once import SENT, UNCHANGED, apply_once
from .caches import BoundedCache, half_of_the_poll_caches
from .content import Choice, ConfigurationError, ContentChanged, ContentStore, Renderer, Snapshot
from .firmware import FirmwareError, FirmwareStage
from .forwarded import ClientFacts
from .identity import DeviceIdentity
from .outcome import Outcome
from .refusals import Refused

# What kept answers may weigh together, whatever the fleet's size (half of poll_cache_mb). A
# kept answer is about 1.1 KB (a 340-byte script), so 6 MB hold about 5,500 devices' answers:
# past the bound a fleet polling in turn finds its share of answers kept (caches.py's policy),
# and the others are rendered again (a compiled template: ~50 us; a device's own template
# compiled anew: ~300 us).
ANSWERS_BYTES = half_of_the_poll_caches()
# bytes an entry holds beside its bodies and sources: its tuple and dict slot, the Answers, the
# bodies' headers, two SHA-256 and one digest in hex, the sources tuple's header
_ANSWER_OVERHEAD = 560
METHOD_NOT_ALLOWED = "method not allowed"
NO_CONFIGURATION = "no configuration"
CONFIGURATION_ERROR = "configuration error"
# a template the poll needs changed on disk since the snapshot in use listed it, and its text
# in that version is no longer held: the web layer waits for the next snapshot and asks again
CONFIGURATION_CHANGING = "configuration changing"
INTERNAL_ERROR = "internal error"

# What a device sends may never start a line of its script: control characters are dropped
# from everything `request` shows a template (CR and LF would end a line after the CRLF pass),
# and from the query before anything reads it (`query_arguments`).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Admission(Protocol):
    """The first stage: who is polling. Returns the device or raises Refused."""

    def admit(self, facts: ClientFacts, query: Mapping[str, list[str]], now: dt.datetime) -> DeviceIdentity: ...


class AskForUploads(Protocol):
    """Configuration backups (configserver/backups/): the `mod cmd UP0 scfg` lines this poll's
    answer carries, none when the device is not due."""

    def lines(self, mac: str, hwid: str, model: str, now: float | None = None) -> list[str]: ...


def query_arguments(query_string: str, added: Iterable[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """The arguments of a request's query, every value of each in order, then `added`.

    Control characters are dropped from names and values here, before anything reads them: the
    admission's check that the query names no other device (`hw%00id=`, `s%1Fn=`) sees the very
    names and values a template sees in `request.query`.
    """
    arguments: dict[str, list[str]] = {}
    pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True) if query_string else []
    for key, value in (*pairs, *added):
        arguments.setdefault(_CONTROL.sub("", key), []).append(_CONTROL.sub("", value))
    return arguments


@dataclass(frozen=True, slots=True)
class PollRequest:
    """What the transport saw of one poll."""

    method: str
    path: str
    query: Mapping[str, list[str]]     # every value of every argument (query_arguments)
    facts: ClientFacts | None          # the certificate facts (headers or the TLS connection)
    client_ip: str | None              # the device's address as far as it is known
    time: float                        # unix seconds, when the request arrived
    started: float = 0.0               # time.perf_counter() at arrival, for the duration

    def first_values(self) -> dict[str, str]:
        return {key: values[0] for key, values in self.query.items()}


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """`request` in templates: what the device asked for, without control characters.
    `query` is the device's word only, never proof of anything."""

    path: str
    query: Mapping[str, str]
    client_ip: str | None

    @classmethod
    def of(cls, request: PollRequest) -> "RequestInfo":
        return cls(_CONTROL.sub("", request.path), request.first_values(), request.client_ip)


@dataclass(frozen=True, slots=True)
class Answers:
    """What a device gets from one rendering of its template: the script to send, and, when it
    is applied once, its digest and the short answer for a device that reports that digest."""

    sent: bytes
    sent_sha256: str
    digest: str | None = None
    unchanged: bytes = b""
    unchanged_sha256: str = ""


# a kept answer: Choice.sources, apply_once and final_command (what it was rendered and wrapped
# from), and the answer
_Kept = tuple[tuple[object, ...], bool, str, Answers]


class Pipeline:
    """Answers polls from the snapshots of one content store."""

    def __init__(
        self, admission: Admission, store: ContentStore, renderer: Renderer | None = None,
        *, digest_key: bytes | None = None, answers_kept: int | None = None,
        answers_bytes: int = ANSWERS_BYTES, firmware: FirmwareStage | None = None, backups: AskForUploads | None = None,
    ) -> None:
        self.admission = admission
        self.store = store
        self.renderer = renderer or Renderer(store.templates_dir)
        self._digest_key = digest_key
        # device -> (what its answer was rendered from: Choice.sources, how it was wrapped: its
        # apply_once and final_command, the answer). Kept across snapshots: an edit re-renders
        # only the devices whose sources or wrap it changed. Bounded by what the answers weigh,
        # unless `answers_kept` also bounds how many (no entry weighs less than its overhead).
        self._answers: BoundedCache[DeviceIdentity, _Kept] = BoundedCache.weighed(
            answers_bytes, _weight, _ANSWER_OVERHEAD, size=answers_kept)
        self.firmware = firmware or FirmwareStage()   # the web layer's watch gives it the rollout state
        self.backups = backups                        # None unless backup_url is set

    def with_admission(self, admission: Admission, firmware: FirmwareStage | None = None) -> "Pipeline":
        """The same content, renderer and stages, another first stage (for `render`), and
        another firmware stage when given one (a preview's, which knows the halts)."""
        return Pipeline(admission, self.store, self.renderer, digest_key=self._digest_key, answers_kept=1,
                        firmware=firmware or self.firmware, backups=self.backups)

    # -- the stages -------------------------------------------------------------------------

    def answer(self, request: PollRequest, now: dt.datetime) -> Outcome:
        """The answer to one poll: the device's own script, or a one-line `# reason` comment."""
        if request.method not in ("GET", "HEAD"):
            return self._outcome(request, 405, METHOD_NOT_ALLOWED, b"# method not allowed\n")
        try:
            device = self.admission.admit(request.facts, request.query, now)  # type: ignore[arg-type]
        except Refused as refusal:
            return self.refuse(request, refusal)
        return self.serve(device, request, now)

    def refuse(self, request: PollRequest, refusal: Refused) -> Outcome:
        """The answer to a poll that gets no script: `403 # reason`, with the device the
        certificate names, if any, marked as claimed where the name is not proven."""
        return self._outcome(request, 403, refusal.reason, f"# {refusal.reason}\n".encode(), detail=refusal.detail,
                             device=refusal.device, claimed=refusal.claimed)

    def serve(self, device: DeviceIdentity, request: PollRequest, now: dt.datetime) -> Outcome:
        """The answer for an admitted device, from the snapshot in use when it is called."""
        snapshot = self.store.snapshot
        choice = snapshot.choose(device)
        query = request.first_values()
        reported = query.get("CHECK")
        if choice.problem:
            if (changed := self._changed(snapshot, choice)) is not None:
                return self._changing(request, changed, query=query, device=device, choice=choice, reported=reported)
            return self._outcome(request, 500, CONFIGURATION_ERROR, b"# configuration error\n", query=query,
                                 detail=choice.problem, device=device, choice=choice, reported=reported)
        if choice.template is None:
            return self._outcome(request, 404, NO_CONFIGURATION, f"# no configuration for {device.hwid}\n".encode(),
                                 query=query, device=device, choice=choice, reported=reported)
        try:
            answers = None if choice.per_poll else self._kept(device, choice)
            if answers is None:
                answers = self.wrap(self.script(snapshot, choice, device, RequestInfo.of(request), now), choice, reported)
                if not choice.per_poll:
                    self._answers.put(device, (choice.sources, choice.apply_once, choice.final_command, answers))
            above = self.above_script(snapshot, choice, device, query, request.time, now)
        except ContentChanged as changed:
            return self._changing(request, changed.template, query=query, device=device, choice=choice,
                                  reported=reported)
        except (ConfigurationError, FirmwareError) as error:
            return self._outcome(request, 500, CONFIGURATION_ERROR, b"# configuration error\n", query=query,
                                 detail=str(error), device=device, choice=choice, reported=reported)
        if answers.digest is not None and reported == answers.digest:
            body, sha, decision = answers.unchanged, answers.unchanged_sha256, UNCHANGED
        else:
            body, sha, decision = answers.sent, answers.sent_sha256, SENT if answers.digest is not None else None
        # script_sha256 and the digest stay the script's own: what is above it changes nothing there
        return self._outcome(request, 200, None, above + body, query=query, device=device, choice=choice,
                             reported=reported, digest=answers.digest, decision=decision, script_sha256=sha)

    def above_script(
        self, snapshot: Snapshot, choice: Choice, device: DeviceIdentity, query: Mapping[str, str],
        arrived: float, now: dt.datetime,
    ) -> bytes:
        """The lines that go above the script: the backup requests (configserver/backups/), then
        the maintenance window, fast polling and firmware lines (configserver/firmware/).

        Above it, so before its check line (which skips what follows) and outside its digest: a
        firmware rollout or a backup request never makes a device apply its script again.
        Raises FirmwareError for a `[firmware]` table that cannot be used.
        """
        firmware = self.firmware.answer(snapshot, choice, device, query, now)
        asked = self.backups.lines(device.mac, device.hwid, device.model, arrived) if self.backups else ()
        return ("".join(line + "\r\n" for line in asked) + firmware.text).encode()

    def script(
        self, snapshot: Snapshot, choice: Choice, device: DeviceIdentity, request: RequestInfo, now: dt.datetime,
    ) -> str:
        """The device's template rendered (CRLF lines). Raises ConfigurationError."""
        context = {
            "device": dataclasses.replace(device, groups=choice.groups) if choice.groups else device,
            "vars": choice.variables,
            "request": request,
            "now": now,
        }
        return self.renderer.render(snapshot, choice.template, context)  # type: ignore[arg-type]

    def wrap(self, script: str, choice: Choice, reported: str | None) -> Answers:
        """The script as sent. An answer that will be kept holds both forms (sent and unchanged);
        one rendered for this poll only holds the form that `reported` calls for."""
        key = self._digest_key
        if not choice.apply_once:
            body = script.encode("utf-8")
            return Answers(body, script_hash(body, key))
        if choice.per_poll:
            applied = apply_once(script, reported, choice.final_command, key)
            body = applied.script.encode("utf-8")
            if applied.decision == UNCHANGED:
                return Answers(b"", "", applied.digest, body, script_hash(body, key))
            return Answers(body, script_hash(body, key), applied.digest)
        sent = apply_once(script, None, choice.final_command, key)
        unchanged = apply_once(script, sent.digest, choice.final_command, key)
        sent_body, unchanged_body = sent.script.encode("utf-8"), unchanged.script.encode("utf-8")
        return Answers(sent_body, script_hash(sent_body, key), sent.digest, unchanged_body, script_hash(unchanged_body, key))

    # -- helpers ----------------------------------------------------------------------------

    def _changing(self, request: PollRequest, template: str, **fields: Any) -> Outcome:
        """`503 # configuration changing`: `template` changed on disk since the snapshot in use
        listed it. The watcher is told to look at it now; the web layer asks again once the
        next snapshot is published."""
        self.store.look_again(template)
        return self._outcome(request, 503, CONFIGURATION_CHANGING, b"# configuration changing\n",
                             detail=f"{template}: changed on disk since the folder was listed", **fields)

    @staticmethod
    def _changed(snapshot: Snapshot, choice: Choice) -> str | None:
        """The template of `choice`, when its problem is that the template was found changed
        on disk since `snapshot` listed it."""
        source = snapshot.templates.get(choice.template) if choice.template else None
        if source is None or not source.changed or not (choice.problem or "").startswith(f"{choice.template}: "):
            return None
        return choice.template

    def _kept(self, device: DeviceIdentity, choice: Choice) -> Answers | None:
        """The answer kept for `device`, while every version it was rendered from is unchanged
        and it is to be wrapped as it was."""
        kept = self._answers.get(device)
        if kept is None or kept[:3] != (choice.sources, choice.apply_once, choice.final_command):
            return None
        return kept[3]

    @staticmethod
    def _outcome(
        request: PollRequest, status: int, reason: str | None, body: bytes, *, query: dict[str, str] | None = None,
        detail: str | None = None,
        device: DeviceIdentity | None = None, claimed: bool = False, choice: Choice | None = None,
        reported: str | None = None, digest: str | None = None, decision: str | None = None,
        script_sha256: str | None = None,
    ) -> Outcome:
        return Outcome(
            time=request.time, client_ip=request.client_ip, path=request.path, status=status, reason=reason,
            hwid=device.hwid if device else None, mac=device.mac if device else None,
            model=device.model if device else None, template=choice.template if choice else None,
            script_sha256=script_sha256, query=request.first_values() if query is None else query,
            duration_ms=round((time.perf_counter() - request.started) * 1000, 3) if request.started else 0.0,
            detail=detail, check_reported=reported, check_digest=digest, decision=decision, claimed=claimed,
            body=body,
        )


def _weight(kept: _Kept) -> int:
    sources, _, _, answers = kept
    # the file versions in `sources` are the snapshot's; a devices.csv row's text is the entry's own
    return (len(answers.sent) + len(answers.unchanged) + _ANSWER_OVERHEAD + 8 * len(sources)
            + sum(49 + len(source) for source in sources if type(source) is str))


def script_hash(body: bytes, key: bytes | None) -> str:
    """`script_sha256` of the log and the audit: SHA-256, or HMAC-SHA256 with `digest_key`."""
    return hmac.new(key, body, hashlib.sha256).hexdigest() if key else hashlib.sha256(body).hexdigest()
