"""The one settings object every entry point funnels into.

Values come, strongest first, from: explicit overrides (command-line flags), environment
variables `CONFIGSERVER_<KEY>`, the TOML file (`configserver.toml` in the working directory or
`--config PATH`), and the defaults below, which serve the lab out of the box.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .apply_once import FinalCommand
from .caches import POLL_CACHE_MB
from .certificates import CABundleError, load_ca_bundle
from .errors import ConfigserverError
from .innovaphone import DEVICE_CA_DNS, model_fixes
from .names import DNError, parse_dn

DEFAULT_CONFIG_FILE = Path("configserver.toml")

TLSVersionName = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ConfigserverError):
    """A setting is missing, malformed or points at something unusable; the text names it."""


_toml_file: ContextVar[Path] = ContextVar("configserver_toml_file", default=DEFAULT_CONFIG_FILE)


def _comma_list(value: Any) -> Any:
    """Environment variables give lists as `a,b,c` (or JSON); TOML gives real lists."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every option of the service, validated once at start-up. See README, "Settings"."""

    model_config = SettingsConfigDict(env_prefix="CONFIGSERVER_", extra="forbid", frozen=True)

    # Content
    templates: Path = Path("templates")
    vars: Path = Path("vars")
    grace_seconds: float = Field(1.0, ge=0, le=60)
    rescan_seconds: float = Field(600.0, ge=1, le=86400)

    # Listening
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    uds: Path | None = None
    workers: int = Field(1, ge=1, le=64)

    # Who may tell us about client certificates, and which certificates we accept
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    )
    ca_bundle: Path | None = None
    accepted_issuers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEVICE_CA_DNS)
    )
    require_client_cert: bool = False
    # shared with the terminators, which set it as X-Configserver-Proxy-Secret on every request:
    # proves a request came through one of them, not from any other local process
    proxy_secret: SecretStr | None = None
    cn_fixes: dict[str, str] = Field(default_factory=dict)
    # devices that get `403 # revoked`: hwids, MACs or certificate fingerprints, one a line
    revoked: Path | None = None

    # Built-in TLS listener
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_min_version: TLSVersionName = "TLSv1.2"
    tls_security_level: int | None = Field(None, ge=0, le=5)

    # --- Listener limits (both listeners; configserver/limits.py) ---
    # Bound what a client that sends little or too much can hold: time, descriptors, memory.
    tls_handshake_timeout: float = Field(10.0, gt=0, le=300)
    request_head_timeout: float = Field(10.0, gt=0, le=300)
    keep_alive_timeout: float = Field(5.0, gt=0, le=300)
    max_connections: int = Field(1000, ge=16, le=1_000_000)  # per worker; the unit's LimitNOFILE follows
    max_request_head_bytes: int = Field(32768, ge=8192, le=1_048_576)
    # --- end of listener limits ---

    # Applying each change once (mod cmd UP1 check)
    apply_once: bool = True
    final_command: FinalCommand = "iresetn"
    # keys the script digests (CHECK serial, script_sha256): same value on every node
    digest_key: SecretStr | None = None
    groups: dict[str, list[str]] = Field(default_factory=dict)

    # Inventory and audit
    database: str = "sqlite:///configserver.db"
    audit_retention_days: int = Field(90, ge=1)
    audit_queue_size: int = Field(10000, ge=100)

    # Memory: what a worker keeps between a device's polls (certificate verdicts and rendered
    # answers, half each), in MB. A fleet that fits is answered from memory; a larger one costs
    # more CPU per poll (poll.py, admission.py), not more memory
    poll_cache_mb: int = Field(POLL_CACHE_MB, ge=1, le=65536)

    # --- Configuration backups (README "Configuration backups"); added fields only ---
    # the https:// URL the devices upload to, through the terminator; unset: no device is asked
    backup_url: str | None = None
    backup_interval_hours: float = Field(24, ge=0, le=24 * 366)   # 0: only when an admin asks
    backup_facts: bool = True              # also fetch `mod cmd X509/CMD0 xml-info`
    backup_keep: int = Field(10, ge=1, le=1000)
    backup_retention_days: int = Field(365, ge=1)
    backup_max_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    @field_validator("backup_url")
    @classmethod
    def _backup_url(cls, value: str | None) -> str | None:
        from .backups._urls import check_backup_url

        return None if value is None else check_backup_url(value)
    # --- end of the backups block ---

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- Admin page and security log (README "Admin page"); added fields only ---
    # Off until admin_port or admin_uds is set; `configserver admin-serve` listens there, never
    # on the devices' listener. Loopback by default: publish it through a vhost or an SSH tunnel.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = Field(None, ge=1, le=65535)
    admin_uds: Path | None = None
    admin_users: Path = Path("admin-users")
    admin_session_minutes: int = Field(480, ge=1, le=7 * 24 * 60)
    # "journal" (syslog to journald, identifier configserver-security), a file path, or none
    security_log: str | None = None
    # vars keys the device page masks, besides those ending in password, secret, pin or key
    admin_secret_vars: list[str] = Field(default_factory=list)
    # --- end of the admin block ---

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        value = _comma_list(value)
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v).strip(), strict=False) for v in value]
        return value

    @field_validator("accepted_issuers", mode="before")
    @classmethod
    def _issuers(cls, value: Any) -> Any:
        value = _comma_list(value) if isinstance(value, str) and value.strip().startswith("[") else value
        if isinstance(value, str):
            # a single DN: commas belong to it, several DNs come as JSON or a TOML list
            value = [value]
        return value

    @field_validator("accepted_issuers")
    @classmethod
    def _issuers_parse(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one issuer DN is needed")
        for dn in value:
            try:
                parse_dn(dn)
            except DNError as exc:
                raise ValueError(f"{dn!r} is not a distinguished name: {exc}") from None
        return value

    @field_validator("proxy_secret", "digest_key")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters: make one with `openssl rand -hex 32`")
        return value

    @field_validator("proxy_secret")
    @classmethod
    def _header_value(cls, value: SecretStr | None) -> SecretStr | None:
        # a header carries it: bytes beyond ASCII depend on the terminator's encoding, and HTTP
        # drops the spaces around a value, so such a secret would never match
        secret = value.get_secret_value() if value is not None else ""
        if secret and not (secret.isascii() and secret.isprintable() and secret == secret.strip()):
            raise ValueError("must be printable ASCII without spaces around it, as a header carries it: "
                             "make one with `openssl rand -hex 32`")
        return value

    # the CA bundle, parsed once here: everything that verifies certificates takes it from here
    _ca_certificates: list[x509.Certificate] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _bundle(self) -> "Settings":
        if self.ca_bundle is not None:
            try:
                self._ca_certificates = load_ca_bundle(self.ca_bundle)
            except CABundleError as exc:
                raise ValueError(f"ca_bundle: {exc}") from None
        return self

    @property
    def ca_certificates(self) -> list[x509.Certificate] | None:
        """The CA certificates of `ca_bundle` (None without one), as read at validation."""
        return self._ca_certificates

    @property
    def model_fixes(self) -> Mapping[str, str]:
        """innovaphone's broken-model table, extended by `cn_fixes`."""
        return model_fixes(self.cn_fixes)

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @property
    def builtin_tls(self) -> bool:
        """True when the service terminates TLS itself instead of trusting a terminator."""
        return self.tls_cert is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, _toml_file.get())


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings.

    `config_file` names a TOML file that must exist; without it `configserver.toml` in the
    working directory is read when present. `overrides` beat every other source.
    Raises SettingsError naming the key (and the file) at fault.
    """
    path = config_file if config_file is not None else DEFAULT_CONFIG_FILE
    if config_file is not None and not path.is_file():
        raise SettingsError(f"config file {path} not found")
    token = _toml_file.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise SettingsError(_describe(exc, path, overrides)) from None
    finally:
        _toml_file.reset(token)


def _describe(exc: ValidationError, path: Path, overrides: dict[str, Any]) -> str:
    """One `setting 'KEY' (where it came from): what is wrong` per error, so that the admin
    edits the right place: a value from an environment variable is fixed there, not in the file."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        named, colon, rest = message.partition(": ")
        if not error["loc"] and colon and named in Settings.model_fields:   # a check across settings names its key
            key, message = named, rest
        if error["type"] == "extra_forbidden":
            message = f"unknown setting (in {path} or the environment)"
            lines.append(f"setting {key!r}: {message}")
            continue
        source = _source(str(error["loc"][0]), path, overrides) if error["loc"] else ""
        lines.append(f"setting {key!r}{source}: {message}")
    return "; ".join(lines)


def _source(key: str, path: Path, overrides: dict[str, Any]) -> str:
    """Where the value of `key` came from, strongest source first, as Settings reads them."""
    if overrides.get(key) is not None:
        return " (from the command line)"
    variable = environment_variable(key)
    if variable is not None:
        return f" (from the environment variable {variable})"
    if path.is_file():
        return f" (in {path})"
    return ""


def environment_variable(key: str) -> str | None:
    """The name of the `CONFIGSERVER_*` variable that sets `key` now, if any (in any case, as
    Settings reads them): a message about a value from there must name it, not the file."""
    wanted = f"CONFIGSERVER_{key}".upper()
    return next((name for name in os.environ if name.upper() == wanted), None)
