"""The lab: a PKI that imitates innovaphone's, sample content, and a device that polls.

For trying and testing only; nothing made here may ever be trusted in production.

    lab = create_lab(Path("lab"))                       # configserver lab init lab
    device = lab.device("IP232-30-00-af")
    answer = poll("https://127.0.0.1:8443/", cert=device.cert, key=device.key,
                  server_ca=lab.server_ca)              # configserver lab poll IP232-30-00-af
"""

from .client import Answer, NoAnswer, poll, server_url, with_path
from .pki import CertificateAuthority, IssuedCert, device_name, innovaphone_ca_name
from .workspace import Lab, LabDevice, LabError, LabExists, NotALab, UnknownDevice, create_lab, find_lab, open_lab

__all__ = [
    "Answer",
    "CertificateAuthority",
    "IssuedCert",
    "Lab",
    "LabDevice",
    "LabError",
    "LabExists",
    "NoAnswer",
    "NotALab",
    "UnknownDevice",
    "create_lab",
    "device_name",
    "find_lab",
    "innovaphone_ca_name",
    "open_lab",
    "poll",
    "server_url",
    "with_path",
]
