"""What configuration backups cost: storing an upload, and asking for one in a poll. Not a test.

    .venv/bin/python bench/backups.py [--lines 2000] [--uploads 200] [--database URL]

1. Storing: one device's upload of a configuration of `--lines` lines, as a new version (a few
   lines changed), as an unchanged one (only the volatile lines differ: what most uploads are),
   and the size stored against the size uploaded (zlib). SQLite in a temporary folder unless
   `--database` names another (a PostgreSQL URL).
2. Asking: the schedule's decision for one device in a poll (Asking.lines), for a fleet of
   10,000 devices of which none is due, against a plain dict lookup of the same fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configserver.backups import Asking, BackupStore  # noqa: E402


def configuration(lines: int, version: int, ticket: int) -> bytes:
    """A gateway-sized configuration: users, routes, the volatile lines innovaphone's server drops."""
    out = [f"config change IP0 /addr 10.0.{version % 250}.5 /mask 255.255.255.0"]
    for i in range(lines - 6):
        out.append(f"config add PBX0/USER /cn user-{i} /e164 {1000 + i} /pwd secret-{i * 7919 % 100000} "
                   f"/node root /loc site-{i % 17}")
    out += [
        f"vars create TLS0/TICKET/0 pb {ticket:064x}",
        f"vars create UPDATE/CHECK p {ticket:032x}",
        f"mod cmd FLASHDIR0 add-item 101 (cn=Alice)(type=call)(info=2026-11-{ticket % 28 + 1:02d})",
        "config change UP1 /url https://config.example.com/update /poll 15",
        "config write",
    ]
    return ("\r\n".join(out) + "\r\n").encode()


async def storing(database: str, lines: int, uploads: int) -> None:
    store = BackupStore(database, keep=10)
    await store.migrate()
    body = configuration(lines, 0, 0)
    await store.store_config(mac="00-90-33-30-00-af", hwid="IP1202-30-00-af", model="IP1202", body=body)
    timings: dict[str, float] = {}
    for kind in ("unchanged", "changed"):
        started = time.perf_counter()
        for n in range(1, uploads + 1):
            version = n if kind == "changed" else 0
            upload = configuration(lines, version, n)
            stored = await store.store_config(mac="00-90-33-30-00-af", hwid="IP1202-30-00-af", model="IP1202",
                                              body=upload)
            assert stored.kept == (kind == "changed")
        timings[kind] = (time.perf_counter() - started) / uploads * 1000
    [newest, *_] = await store.versions("00-90-33-30-00-af")
    stored_bytes = len(__import__("zlib").compress(configuration(lines, 1, 1), 6))
    await store.close()
    print(f"configuration: {lines} lines, {len(body) / 1024:.0f} KiB uploaded, {stored_bytes / 1024:.1f} KiB stored "
          f"(zlib: {len(body) / stored_bytes:.1f}x smaller)")
    print(f"upload stored as a new version:  {timings['changed']:.2f} ms  ({newest.lines_changed} lines changed)")
    print(f"upload found unchanged:          {timings['unchanged']:.2f} ms")
    print(f"ratio changed / unchanged:       {timings['changed'] / timings['unchanged']:.2f}")


def asking(devices: int = 10_000, rounds: int = 20) -> None:
    store = BackupStore("sqlite:///unused.db")   # never touched: the decision reads memory only
    now = time.time()
    ask = Asking(store, url="https://config.example.com/backup", interval_seconds=86400, clock=lambda: now)
    fleet = [(f"00-90-33-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}",
              f"IP232-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}") for i in range(devices)]
    for mac, _ in fleet:
        ask.uploaded(mac, now)   # all backed up just now: nobody due
    ask.ready = True
    started = time.perf_counter()
    for _ in range(rounds):
        for mac, hwid in fleet:
            assert not ask.lines(mac, hwid, "IP232")
    decision = (time.perf_counter() - started) / (rounds * devices) * 1e6
    table = dict(fleet)
    started = time.perf_counter()
    for _ in range(rounds):
        for mac, _ in fleet:
            table.get(mac)
    lookup = (time.perf_counter() - started) / (rounds * devices) * 1e6
    print(f"asking, per poll, {devices} devices none due: {decision:.2f} us "
          f"(a dict lookup: {lookup:.3f} us; ratio {decision / lookup:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--database", help="default: SQLite in a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        database = args.database or f"sqlite:///{folder}/bench.db"
        asyncio.run(storing(database, args.lines, args.uploads))
    asking()


if __name__ == "__main__":
    main()
