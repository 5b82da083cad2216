"""What the host must provide for the proxy secret to stay a secret, checked where we can see it.

The proxy secret proves that a request came through the terminator. It is only as safe as the
terminator's memory: nginx's workers mark themselves dumpable after dropping root, so a process
of their user (www-data, which also runs PHP-FPM and CGI scripts) may read `/proc/PID/mem` of a
worker and find the secret there, unless the kernel's Yama module forbids it
(`kernel.yama.ptrace_scope` 1 or more). Apache's workers and lighttpd refused such reads in the
lab. The app cannot tell which terminator it sits behind, so it warns whenever the kernel would
allow it.

    for warning in startup_warnings(settings):   # `configserver serve` logs these at start-up
        print(warning.risk, warning.message)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["HardeningWarning", "log_startup_warnings", "startup_warnings"]

PROC = Path("/proc")
PTRACE_SCOPE = Path("sys/kernel/yama/ptrace_scope")

_ADVICE = (
    "behind nginx, a process running as the terminator's user (www-data: PHP-FPM, CGI scripts) can read "
    "the proxy secret out of nginx's workers. Prefer Apache or lighttpd, or run nginx's workers as a user "
    "and group of their own (README, \"The proxy secret\")"
)

log = logging.getLogger("configserver.hardening")


@dataclass(frozen=True)
class HardeningWarning:
    """One thing about the host that weakens the service, in an admin's words."""

    risk: str       # a short fixed name for logs and tests: "no_yama", "ptrace_scope_0", ...
    message: str    # what it means and what to do
    certain: bool   # False when we could not look, only say where to look


def startup_warnings(settings: "Settings", proc: Path = PROC) -> list[HardeningWarning]:
    """The risks to the proxy secret that can be seen from here, given the settings and the
    `/proc` to look in (a parameter so tests can hand another). Empty when there is no proxy
    secret to protect (no secret, or built-in TLS, which reads no headers) or nothing is wrong.
    Never raises: a file it cannot read becomes an uncertain warning."""
    if settings.proxy_secret is None or settings.builtin_tls:
        return []
    scope_file = proc / PTRACE_SCOPE
    if not (proc / "sys" / "kernel").is_dir():
        # systemd's ProcSubset=pid (in our unit) hides /proc/sys from the service; so may a container
        return [HardeningWarning(
            "kernel_settings_hidden",
            f"cannot see {proc / 'sys'} from here, so cannot tell whether the kernel stops processes of one "
            f"user reading each other's memory: on the host, `cat /proc/sys/kernel/yama/ptrace_scope` must "
            f"say 1 or more; otherwise {_ADVICE}",
            certain=False,
        )]
    try:
        text = scope_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return [HardeningWarning(
            "no_yama",
            f"{scope_file} does not exist: this kernel (or container) has no Yama, and nothing stops a "
            f"process reading the memory of another of its user; {_ADVICE}",
            certain=True,
        )]
    except (OSError, UnicodeDecodeError) as exc:
        return [HardeningWarning(
            "ptrace_scope_unreadable",
            f"cannot read {scope_file} ({exc}): it must say 1 or more; otherwise {_ADVICE}",
            certain=False,
        )]
    if text == "0":
        return [HardeningWarning(
            "ptrace_scope_0",
            f"{scope_file} is 0: a process may read the memory of any other of its user; set "
            f"kernel.yama.ptrace_scope = 1 in /etc/sysctl.d/ (then `sysctl --system`), or else {_ADVICE}",
            certain=True,
        )]
    if not text.isdigit():
        return [HardeningWarning(
            "ptrace_scope_unreadable", f"{scope_file} says {text!r}, not a number: it must say 1 or more; otherwise {_ADVICE}",
            certain=False,
        )]
    return []


def log_startup_warnings(settings: "Settings", proc: Path = PROC) -> list[HardeningWarning]:
    """Log each of `startup_warnings` as one record (`event=hardening`, `risk`, `detail`): a
    warning when it is certain, info when we could only say where to look. Returns them."""
    found = startup_warnings(settings, proc)
    for warning in found:
        log.log(
            logging.WARNING if warning.certain else logging.INFO,
            warning.risk,
            extra={"fields": {"event": "hardening", "risk": warning.risk, "detail": warning.message}},
        )
    return found
