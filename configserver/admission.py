"""The checks a poll passes before it may get a script, in order, each with its own reason.

Pure rules: facts and query in, a DeviceIdentity out, or Refused with the reason. `Gate` admits
by the certificate; `NamedDevice` admits the one device an admin names (`configserver render`),
with the same query check a poll passes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections.abc import Callable, Iterable, Mapping

from .caches import BoundedCache, half_of_the_poll_caches
from .certificates import CertificateError, CertificateVerifier, CheckedCert
from .forwarded import ClientFacts
from .identity import (
    DeviceIdentity,
    InvalidDeviceName,
    parse_device_name,
    query_names_other_device,
)
from .innovaphone import BROKEN_MODEL_NAMES
from .names import DistinguishedName, DNError, parse_dn
from .refusals import (
    CERTIFICATE_MISMATCH,
    DEVICE_MISMATCH,
    HTTPS_REQUIRED,
    INVALID_DEVICE_NAME,
    NOT_A_DEVICE,
    NOT_VERIFIED,
    REVOKED,
    WRONG_CA,
    Refused,
)
from .revocation import Revocations

# A fleet's verdicts, bounded by what they weigh (half of poll_cache_mb): a device's verdict is
# about 350 bytes (DN headers) or 750 (a forwarded certificate), so 6 MB hold about 18,000
# devices, or 8,400 when the terminator forwards the certificate (as every sample in deploy/
# does); a miss costs a DN parse (~60 us) or a certificate check (~300 us). Past the bound, a
# fleet polling in turn still finds its share of verdicts kept (caches.py's policy).
_VERDICTS_BYTES = half_of_the_poll_caches()
_DETAIL_CHARS = 300
# what one verdict costs beside its objects: the dict slot and the key (a SHA-256 digest)
_VERDICT_OVERHEAD = 50 + sys.getsizeof(bytes(32))

Verdict = DeviceIdentity | tuple[DeviceIdentity, dt.datetime] | Refused


def _clip(text: str | None) -> str | None:
    """A refusal's detail as it is kept and logged: whatever a client sent, a bounded size."""
    return text if text is None or len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


def device_cn(subject: DistinguishedName) -> str | None:
    """The CN of an innovaphone device subject (exactly C=DE, O=innovaphone, CN=...), else None."""
    rdns = subject.rdns
    if len(rdns) != 3 or any(len(rdn) != 1 for rdn in rdns):
        return None
    (c,), (o,), (cn,) = rdns
    if c != ("C", "DE") or o != ("O", "innovaphone") or cn[0] != "CN":
        return None
    return cn[1]


class Gate:
    """Admits a poll as a device, or refuses it with the reason of the first check it fails."""

    def __init__(
        self,
        accepted_issuers: Iterable[str],
        verifier: CertificateVerifier,
        *,
        require_client_cert: bool = False,
        fixes: Mapping[str, str] = BROKEN_MODEL_NAMES,
        revocations: Callable[[], Revocations] | None = None,
        verdicts_bytes: int = _VERDICTS_BYTES,
    ) -> None:
        self._accepted = frozenset(parse_dn(dn) for dn in accepted_issuers)
        self._revocations = revocations
        self._verifier = verifier
        self._require_cert = require_client_cert
        self._fixes = fixes
        # a fleet's verdicts, each kept small: the device alone, or with the certificate's start
        # of validity when a certificate was forwarded; never the parsed certificate. Bounded by
        # what they weigh alone (no verdict weighs less than its overhead).
        self._verdicts: BoundedCache[bytes, Verdict] = BoundedCache.weighed(
            verdicts_bytes, verdict_weight, _VERDICT_OVERHEAD)

    def admit(self, facts: ClientFacts, query: Mapping[str, list[str]], now: dt.datetime) -> DeviceIdentity:
        """Run the checks in order; return the device, or raise Refused naming the failed check.

        Everything but the clock and the query depends only on the forwarded facts, which repeat
        on every poll of a device: that verdict is computed once and remembered.
        """
        if facts.empty:
            raise Refused(HTTPS_REQUIRED)
        if facts.verify != "SUCCESS":  # cheap, and not worth a place among the verdicts
            raise Refused(NOT_VERIFIED, f"verify={_clip(facts.verify)!r}")
        # a digest, not the values: a key costs the same whatever the headers' size
        key = hashlib.sha256("\0".join(v or "" for v in (facts.subject_dn, facts.issuer_dn, facts.cert)).encode(
            "utf-8", "surrogateescape")).digest()
        verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                device, not_before = self._identify(facts)
                verdict = device if not_before is None else (device, not_before)
            except Refused as refusal:
                verdict = Refused(refusal.reason, _clip(refusal.detail), device=refusal.device, claimed=refusal.claimed)
            self._verdicts.put(key, verdict)
        if type(verdict) is DeviceIdentity:
            device, not_before = verdict, None
        elif isinstance(verdict, Refused):
            raise Refused(verdict.reason, verdict.detail, device=verdict.device, claimed=verdict.claimed)
        else:
            device, not_before = verdict
        if not_before is not None and device.not_after is not None:
            problem = ("certificate not yet valid" if now < not_before
                       else "certificate expired" if now > device.not_after else None)
            if problem:
                raise Refused(CERTIFICATE_MISMATCH, problem, device=device, claimed=True)
        if self._revocations is not None:
            check_revoked(device, self._revocations())
        check_query(device, query, self._fixes)
        return device

    def _identify(self, facts: ClientFacts) -> tuple[DeviceIdentity, dt.datetime | None]:
        """The checks that depend on the forwarded facts alone, up to the certificate's signature."""

        checked: CheckedCert | None = None
        cert_error: str | None = None
        if facts.cert is not None:
            try:
                checked = self._verifier.check(facts.cert)
            except CertificateError as exc:
                cert_error = str(exc)

        issuer = self._dn(facts.issuer_dn, WRONG_CA, "issuer") if facts.issuer_dn else None
        if issuer is None and checked is not None:
            issuer = checked.issuer  # lighttpd exports no issuer DN; the certificate is checked below
        if issuer is None and cert_error is not None:
            # lighttpd forwards no issuer DN: the certificate was all there was, and it is unreadable
            raise Refused(CERTIFICATE_MISMATCH, cert_error)
        if issuer is None:
            raise Refused(WRONG_CA, "no issuer DN and no readable certificate")
        if issuer not in self._accepted:
            raise Refused(WRONG_CA, f"issuer {issuer}")

        subject = self._dn(facts.subject_dn, NOT_A_DEVICE, "subject") if facts.subject_dn else None
        if subject is None and checked is not None:
            subject = checked.subject
        if subject is None:
            raise Refused(NOT_A_DEVICE, "no subject DN and no readable certificate")
        cn = device_cn(subject)
        if cn is None:
            raise Refused(NOT_A_DEVICE, f"subject {subject}")
        try:
            name = parse_device_name(cn, self._fixes)
        except InvalidDeviceName:
            raise Refused(INVALID_DEVICE_NAME, f"CN {cn!r}") from None

        device = DeviceIdentity(
            hwid=name.hwid,
            model=name.model,
            mac=name.mac,
            cn=name.hwid if cn == name.hwid else cn,   # one string for both when they are alike
            issuer=sys.intern(str(issuer)),   # a fleet has two issuers: one string each
            fingerprint_sha256=checked.fingerprint_sha256 if checked else None,
            serial=checked.serial if checked else None,
            not_after=checked.not_after if checked else None,
        )
        if facts.cert is not None:
            problem = (
                cert_error if checked is None
                else checked.signature_problem
                or (f"certificate subject {checked.subject} is not {subject}" if checked.subject != subject else None)
                or (f"certificate issuer {checked.issuer} is not {issuer}" if checked.issuer != issuer else None)
            )
            if checked is None or problem:
                raise Refused(CERTIFICATE_MISMATCH, problem, device=device, claimed=True)
        elif self._require_cert:
            raise Refused(CERTIFICATE_MISMATCH, "no certificate forwarded and require_client_cert is set",
                          device=device, claimed=True)
        return device, checked.not_before if checked else None

    @staticmethod
    def _dn(text: str, reason: str, what: str) -> DistinguishedName:
        try:
            return parse_dn(text)
        except DNError as exc:
            raise Refused(reason, f"unreadable {what} DN: {exc}") from None


def verdict_weight(verdict: Verdict) -> int:
    """About what a kept verdict holds in memory, in bytes: its objects and strings, its key
    and its slot (the model and issuer strings are shared by the fleet and not counted)."""
    if isinstance(verdict, Refused):
        return _VERDICT_OVERHEAD + sum(map(_size, (verdict, verdict.__dict__, verdict.args, *verdict.args, verdict.detail))) + (
            device_weight(verdict.device) if verdict.device is not None else 0)
    if isinstance(verdict, tuple):
        return _VERDICT_OVERHEAD + _size(verdict) + _size(verdict[1]) + device_weight(verdict[0])
    return _VERDICT_OVERHEAD + device_weight(verdict)


def device_weight(device: DeviceIdentity) -> int:
    """The bytes of a DeviceIdentity and of the strings it alone holds."""
    return (_size(device) + _size(device.hwid) + _size(device.mac) + (_size(device.cn) if device.cn is not device.hwid else 0)
            + _size(device.fingerprint_sha256) + _size(device.serial) + _size(device.not_after))


def _size(value: object) -> int:
    return 0 if value is None else sys.getsizeof(value)


def check_revoked(device: DeviceIdentity, revocations: Revocations) -> None:
    """Raise Refused(revoked) when the revoked file names `device`, its MAC or its certificate."""
    entry = revocations.revokes(device)
    if entry:
        raise Refused(REVOKED, f"{entry} is in the revoked file", device=device)


def check_query(device: DeviceIdentity, query: Mapping[str, list[str]], fixes: Mapping[str, str]) -> None:
    """Raise Refused(device mismatch) when the poll's query names a device other than `device`."""
    other = query_names_other_device(device, query, fixes)
    if other:
        raise Refused(DEVICE_MISMATCH, f"query names {_clip(other)}, certificate is {device.hwid}", device=device)


class NamedDevice:
    """Admits the one device an admin names, without a certificate (`configserver render`):
    only the query check of a poll applies, so a preview refuses what the device would be refused."""

    def __init__(
        self, device: DeviceIdentity, fixes: Mapping[str, str] = BROKEN_MODEL_NAMES,
        revocations: Revocations | None = None,
    ) -> None:
        self.device = device
        self._fixes = fixes
        self._revocations = revocations

    def admit(self, facts: ClientFacts | None, query: Mapping[str, list[str]], now: dt.datetime) -> DeviceIdentity:
        if self._revocations is not None:
            check_revoked(self.device, self._revocations)
        if self.device.hwid:   # a device known by its MAC alone names no hwid to compare
            check_query(self.device, query, self._fixes)
        return self.device
