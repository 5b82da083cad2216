"""The settings resolved once into what the service runs on: the certificate verifier and
admission, the trusted proxies, the content store and the poll pipeline.

The web layer, `configserver render` and `configserver check` all start from here, so each
resolves the settings the same way and none of them imports another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .admission import Gate
from .caches import half_of_the_poll_caches
from .certificates import CertificateVerifier
from .content import ContentRules, ContentStore
from .forwarded import TrustedProxies
from .poll import AskForUploads, Pipeline
from .revocation import RevocationError, RevocationFile
from .settings import Settings, SettingsError


def content_rules(settings: Settings) -> ContentRules:
    """What the settings say about content: model fixes, groups, apply-once defaults."""
    return ContentRules(
        fixes=settings.model_fixes,
        groups={name: tuple(models) for name, models in settings.groups.items()},
        apply_once=settings.apply_once,
        final_command=settings.final_command,
    )


def content_store(settings: Settings, *, grace_seconds: float | None = None) -> ContentStore:
    """The templates and vars folders of `settings`. Raises SettingsError when templates is no folder."""
    if not settings.templates.is_dir():
        # every device would get 404: a wrong path, not an empty fleet
        raise SettingsError(f"setting 'templates': {settings.templates.absolute()} is not a folder")
    return ContentStore(
        settings.templates, settings.vars, content_rules(settings),
        grace_seconds=settings.grace_seconds if grace_seconds is None else grace_seconds,
    )


@dataclass(frozen=True)
class Service:
    """Everything a poll needs, built from the settings once."""

    settings: Settings
    fixes: Mapping[str, str]
    gate: Gate
    trusted: TrustedProxies
    store: ContentStore
    pipeline: Pipeline
    revoked: RevocationFile

    @classmethod
    def from_settings(
        cls, settings: Settings, *, grace_seconds: float | None = None, backups: AskForUploads | None = None,
    ) -> "Service":
        """Resolve `settings`. `backups` asks devices for their configuration (the web layer's,
        or a preview's). Raises SettingsError naming the setting at fault."""
        fixes = settings.model_fixes
        try:
            revoked = RevocationFile(settings.revoked, fixes)
        except RevocationError as exc:
            raise SettingsError(f"setting 'revoked': {exc}") from None
        half_of_the_caches = half_of_the_poll_caches(settings.poll_cache_mb)   # verdicts, then answers
        gate = Gate(
            settings.accepted_issuers,
            CertificateVerifier(settings.ca_certificates),
            require_client_cert=settings.require_client_cert,
            fixes=fixes,
            revocations=revoked.current,
            verdicts_bytes=half_of_the_caches,
        )
        trusted = TrustedProxies(
            settings.trusted_proxies, settings.proxy_secret.get_secret_value() if settings.proxy_secret else None,
        )
        store = content_store(settings, grace_seconds=grace_seconds)
        digest_key = settings.digest_key.get_secret_value().encode() if settings.digest_key else None
        return cls(settings, fixes, gate, trusted, store, Pipeline(gate, store, digest_key=digest_key, backups=backups,
                                                                    answers_bytes=half_of_the_caches), revoked)
