"""What the firmware stage adds to a poll. Not a test.

    .venv/bin/python bench/firmware.py [--devices 2000] [--requests 40000]

The poll pipeline (web-free: admission, choice, render or kept answer, apply-once, firmware
stage) answers a fleet's polls, CPU time per poll, for the same site three times:

1. no [firmware] table (the stage finds nothing and adds nothing);
2. targets, window and a rollout in waves, every device reporting the target: no line sent;
3. the same, every device reporting an old build inside its open wave: lines sent, sends noted.

The ratios against (1) are the figures to quote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configserver import create_app, load_settings  # noqa: E402
from configserver.firmware import Send  # noqa: E402
from configserver.poll import PollRequest  # noqa: E402

NOW = dt.datetime(2026, 12, 5, 1, 0, tzinfo=dt.UTC)   # 02:00 in Berlin: inside the window
ISSUER = "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"
FIRMWARE = """
[firmware]
url = "http://fw.example.com/firmware/"
prot = "13.4711"
boot = "13.4711"
allow = [22, 23, 0, 1, 2, 3, 4]
initial = 10
timezone = "Europe/Berlin"
[firmware.rollout]
start = 2026-12-01T22:00:00Z
first = ["IP232-30-00-01"]
waves = [{ after = "1d", share = 5 }, { after = "2d", share = 25 }, { after = "3d", share = 100 }]
"""


class Ledger:
    """Notes sends in memory, as RolloutState does on the poll path."""

    def __init__(self) -> None:
        self.sends: list[Send] = []

    def note(self, send: Send) -> None:
        self.sends.append(send)

    def halted(self, model: str, kind: str, build: str) -> bool:
        return False


def run(root: Path, firmware: str, reported: str, devices: int, requests: int) -> float:
    (root / "vars" / "default.toml").write_text('pbx = "192.0.2.1"\n' + firmware)
    app = create_app(load_settings(templates=root / "templates", vars=root / "vars", grace_seconds=0,
                                   database=f"sqlite:///{root / 'inventory.db'}"))
    app.store.refresh()
    app.pipeline.firmware.state = Ledger()
    hwids = [f"IP232-30-{i // 256:02x}-{i % 256:02x}" for i in range(devices)]
    polls = []
    for hwid in hwids:
        facts_headers = [(b"x-ssl-client-verify", b"SUCCESS"),
                         (b"x-ssl-client-s-dn", f"CN={hwid},O=innovaphone,C=DE".encode()),
                         (b"x-ssl-client-i-dn", ISSUER.encode())]
        scope = {"type": "http", "headers": facts_headers, "client": ("127.0.0.1", 40000)}
        facts = app._facts(scope)   # the transport facts the web layer would hand the pipeline
        query = urllib.parse.parse_qs(f"hwid={hwid}&PROT={reported}&BOOT={reported}&CHECK=applied")
        polls.append(PollRequest("GET", "/update", query, facts, "127.0.0.1", NOW.timestamp()))
    for request in polls:   # warm: every answer rendered and kept once
        app.pipeline.answer(request, NOW)
    started = time.process_time()
    for n in range(requests):
        outcome = app.pipeline.answer(polls[n % devices], NOW)
        assert outcome.status == 200, outcome.body
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=40000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "templates").mkdir()
        (root / "vars").mkdir()
        (root / "templates" / "default.j2").write_text(
            "config change SIP0 /server {{ vars.pbx }} /user {{ device.hwid }}\nconfig change NTP0 /server 192.0.2.2\n")
        plain = run(root, "", "13.4711", args.devices, args.requests)
        current = run(root, FIRMWARE, "13.4711", args.devices, args.requests)
        sending = run(root, FIRMWARE, "13.4000", args.devices, args.requests)
    print(f"{args.devices} devices, {args.requests} polls each, pipeline CPU time per poll:")
    print(f"  no [firmware] table           {plain:8.1f} us")
    print(f"  firmware declared, on target  {current:8.1f} us   ratio {current / plain:.2f}")
    print(f"  firmware declared, lines sent {sending:8.1f} us   ratio {sending / plain:.2f}")


if __name__ == "__main__":
    main()
