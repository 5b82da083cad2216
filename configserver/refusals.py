"""Why a poll got no script: the reasons, in the order the checks run.

The same reason text goes into the answer body (`# wrong CA`), the log record and the metrics
label, so an admin reading any of them knows which check failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigserverError

if TYPE_CHECKING:
    from .identity import DeviceIdentity

UNTRUSTED_PROXY = "untrusted proxy"
DUPLICATE_HEADER = "duplicate header"
HTTPS_REQUIRED = "https required"
NOT_VERIFIED = "certificates not verified"
WRONG_CA = "wrong CA"
NOT_A_DEVICE = "not an innovaphone device"
INVALID_DEVICE_NAME = "invalid device name"
CERTIFICATE_MISMATCH = "certificate mismatch"
REVOKED = "revoked"
DEVICE_MISMATCH = "device mismatch"

REASONS = (
    UNTRUSTED_PROXY, DUPLICATE_HEADER, HTTPS_REQUIRED, NOT_VERIFIED, WRONG_CA,
    NOT_A_DEVICE, INVALID_DEVICE_NAME, CERTIFICATE_MISMATCH, REVOKED, DEVICE_MISMATCH,
)


class Refused(ConfigserverError):
    """A poll must not get a script. `reason` is one of REASONS; `detail` is for the log only.

    `device` is the device the certificate names, when it names one; `claimed` says that the
    refusal came from the certificate's own checks, so that name is not proven. `client_ip` is
    the client a trusted terminator named, for a refusal of what that terminator forwarded.
    """

    def __init__(
        self, reason: str, detail: str | None = None, *, device: DeviceIdentity | None = None, claimed: bool = False,
        client_ip: str | None = None,
    ) -> None:
        super().__init__(reason if detail is None else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device = device
        self.claimed = claimed and device is not None
        self.client_ip = client_ip
