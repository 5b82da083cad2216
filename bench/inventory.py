"""What the inventory costs as the fleet and the audit grow, and what its writer keeps up with. Not a test.

    .venv/bin/python bench/inventory.py writer [--rate 3400] [--seconds 5] [--poll-cpu-us 150]
    .venv/bin/python bench/inventory.py fleet  [--sizes 10000,100000,1000000]
    .venv/bin/python bench/inventory.py audit  [--sizes 0,1000000,10000000] [--rows 20000]

Every part takes `--database URL` (default: a new SQLite file in a temporary folder; a
`postgresql://` URL must name an empty database the run may fill and leave behind).

- writer: polls recorded at `--rate` per second for `--seconds`, in the writer's own event loop,
  each followed by `--poll-cpu-us` of busy CPU (what answering the poll costs the app on the same
  core). Two scenarios: a fleet (every poll another device) and a flood (one device's certificate
  refused as `device mismatch` at the whole rate, while 200 other devices and the flooding
  device itself poll cleanly now and then). Prints rows/s written, polls dropped and folded, and
  whether every clean poll is in `history`. Also the writer alone draining a full queue.
- fleet: a fleet of N devices (one poll each in the audit) written
  straight into the tables, then the commands as an admin runs them (a fresh process each):
  wall time and peak memory; `history` also timed inside one process (without the start-up of
  Python), and the query plan of every lookup.
- audit: the cost of writing one poll (audit row and inventory update, µs per row, through the
  writer) when the audit already holds S rows.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from configserver.inventory import (
    Inventory,
    database_url,
    device_history,
    migrate_database,
)
from configserver.outcome import Outcome

ROOT = Path(__file__).resolve().parents[1]
VER = "13r1 dvl IP232[13.A127], Bootcode[113454], Hardware[300]"
MODELS = ("IP232", "IP222", "IP112", "IP1202", "IP811")


def hwid(n: int, model: str = "IP232") -> str:
    return f"{model}-{(n >> 16) & 255:02x}-{(n >> 8) & 255:02x}-{n & 255:02x}"


def record(n: int, at: float, *, status: int = 200, reason: str | None = None, claimed: bool = False) -> Outcome:
    name = hwid(n)
    served = status == 200
    fields: dict[str, Any] = {
        "time": at, "client_ip": "198.51.100.7", "path": "/update/", "status": status, "reason": reason,
        "hwid": name, "mac": "00-90-33-" + name.split("-", 1)[1], "model": "IP232",
        "template": "models/IP232.j2" if served else None, "script_sha256": "ab" * 32 if served else None,
        "query": {"PROT": "13A127", "BOOT": "113454", "ver": VER, "ip": "10.0.0.5"},
        "duration_ms": 1.5, "decision": "sent" if served else None,
    }
    return Outcome(**fields, claimed=claimed)


def spin(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def fresh_database(args: argparse.Namespace, name: str) -> str:
    """`--database`, or a new SQLite file in a folder removed when the bench ends (the fleet and
    audit parts leave gigabytes otherwise)."""
    if args.database:
        return args.database
    folder = tempfile.mkdtemp(prefix="configserver-bench-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"sqlite:///{folder}/{name}.db"


# -- writer ------------------------------------------------------------------------------------


async def offered(url: str, rate: float, seconds: float, poll_cpu_us: float, flood: bool) -> dict[str, Any]:
    inventory = Inventory(url)
    await inventory.migrate()
    rows_before = await rows_in(url)  # the same --database serves both scenarios
    await inventory.start()
    total = int(rate * seconds)
    others = 200
    clean_at = {int(total * (i + 0.5) / others): i + 1 for i in range(others)}  # other devices' polls
    base = time.time()
    started = time.perf_counter()
    for n in range(total):
        at = base + n / rate
        if flood:
            if n in clean_at:
                inventory.record(record(clean_at[n], at))
            elif n == total // 2:
                inventory.record(record(0, at))  # the flooding device's own clean poll
            else:
                inventory.record(record(0, at, status=403, reason="device mismatch", claimed=True))
        else:
            inventory.record(record(n % 1_000_000, at))
        spin(poll_cpu_us)
        ahead = started + (n + 1) / rate - time.perf_counter()
        if ahead > 0 or n % 50 == 0:
            await asyncio.sleep(max(ahead, 0))  # the loop is the app's: the writer runs in the gaps
    fed = time.perf_counter() - started
    while inventory.stats()["queued"]:
        await asyncio.sleep(0.01)
    drained = time.perf_counter() - started
    await inventory.close()
    stats = inventory.stats()
    found = None
    if flood:
        missing = 0
        async_inventory = Inventory(url)
        for device in range(others + 1):
            kept = await async_inventory.history(hwid(device), limit=1000)
            if not any(poll.status == 200 for poll in kept):
                missing += 1
        await async_inventory.close()
        found = others + 1 - missing
    rows = await rows_in(url) - rows_before
    return {"fed_s": fed, "drained_s": drained, "stats": stats, "clean_found": found, "rows": rows,
            "polls": total, "others": others + 1}


async def rows_in(url: str) -> int:
    engine = create_async_engine(database_url(url))
    async with engine.connect() as connection:
        count = (await connection.execute(sa.text("SELECT count(*) FROM polls"))).scalar()
    await engine.dispose()
    return int(count or 0)


async def drain(url: str, count: int) -> tuple[float, float]:
    inventory = Inventory(url, queue_size=count)
    await inventory.migrate()
    base = time.time()
    for n in range(count):
        inventory.record(record(n, base + n * 1e-3))
    started, cpu = time.perf_counter(), time.process_time()
    await inventory.start()
    while inventory.stats()["queued"]:
        await asyncio.sleep(0.005)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await inventory.close()
    return count / elapsed, cpu / count * 1e6


def run_writer(args: argparse.Namespace) -> None:
    print(f"writer: {args.rate:.0f} polls/s offered for {args.seconds:g} s, {args.poll_cpu_us:g} µs of app CPU each")
    for flood in (False, True):
        url = fresh_database(args, "writer")
        result = asyncio.run(offered(url, args.rate, args.seconds, args.poll_cpu_us, flood))
        stats = result["stats"]
        kind = "flood (1 device refused + 201 clean polls)" if flood else "fleet (every poll a device)"
        line = (f"  {kind:44} offered {result['polls'] / result['fed_s']:7.0f}/s  all written after "
                f"{result['drained_s']:5.2f} s  rows {result['rows']:7d}  written {stats['written']:7d}  "
                f"folded {stats.get('folded', 0):7d}  dropped {stats['dropped']:6d}")
        if flood:
            line += f"  clean polls in history {result['clean_found']}/{result['others']}"
        print(line, flush=True)
    url = fresh_database(args, "drain")
    rate, cpu = asyncio.run(drain(url, 20000))
    print(f"  writer alone, draining a queue of 20000 polls of distinct devices: {rate:7.0f} rows/s, "
          f"{cpu:5.1f} µs of CPU per row")
    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


# -- fleet -------------------------------------------------------------------------------------


def device_tuple(n: int, now: float) -> tuple[Any, ...]:
    model = MODELS[n % len(MODELS)]
    name = hwid(n, model)
    mac = "00-90-33-" + name.split("-", 1)[1]
    seen = now - (n % 20) * 86400 - n % 3600  # a spread of ages: some stale for days
    status = 200 if n % 10 else 403
    return (mac, name, mac, model, name.lower(), seen - 86400 * 30, seen, status,
            None if status == 200 else "wrong CA", "/update/", "198.51.100.7",
            seen, f"models/{model}.j2", "ab" * 32, seen, "13A127", "113454", VER, "10.0.0.5")


DEVICE_COLUMNS = ("device, hwid, mac, model, hwid_key, first_seen, last_seen, status, reason, path, client_ip, "
                  "served_at, template, script_sha256, reported_at, firmware, boot, version, local_ip")
POLL_COLUMNS = "time, device, hwid, mac, model, client_ip, path, status, reason, template, decision, duration_ms, query"


def poll_tuple(n: int, at: float) -> tuple[Any, ...]:
    model = MODELS[n % len(MODELS)]
    name = hwid(n, model)
    mac = "00-90-33-" + name.split("-", 1)[1]
    return (at, mac, name, mac, model, "198.51.100.7", "/update/", 200, None, f"models/{model}.j2", "sent", 1.5,
            '{"PROT": "13A127"}')


def poll_time(n: int, polls: int, now: float) -> float:
    """The n-th of `polls` polls, spread over the 30 days before `now`: within the retention
    period, so the writer's purge has nothing to delete while the writes are measured."""
    return now - 30 * 86400 * (polls - n) / polls


def fill(url: str, devices: range, polls: int, now: float) -> None:
    """Devices (one poll each, round robin) written straight into the tables: fast, not through the writer."""
    migrate_database(url)
    parsed = database_url(url)
    chunk = 50_000
    if parsed.get_backend_name() == "sqlite":
        connection = sqlite3.connect(parsed.database)
        connection.execute("PRAGMA synchronous=OFF")
        marks = ", ".join("?" * len(DEVICE_COLUMNS.split(",")))
        for start in range(devices.start, devices.stop, chunk):
            stop = min(start + chunk, devices.stop)
            connection.executemany(f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES ({marks})",
                                   (device_tuple(n, now) for n in range(start, stop)))
            connection.commit()
        marks = ", ".join("?" * len(POLL_COLUMNS.split(",")))
        size = max(devices.stop, 1)
        for start in range(0, polls, chunk):
            stop = min(start + chunk, polls)
            connection.executemany(f"INSERT INTO polls ({POLL_COLUMNS}) VALUES ({marks})",
                                   (poll_tuple(n % size, poll_time(n, polls, now)) for n in range(start, stop)))
            connection.commit()
        connection.close()
        return
    asyncio.run(_fill_postgresql(parsed, devices, polls, now))


async def _fill_postgresql(parsed: Any, devices: range, polls: int, now: float) -> None:
    import asyncpg

    connection = await asyncpg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False))
    chunk = 50_000
    for start in range(devices.start, devices.stop, chunk):
        stop = min(start + chunk, devices.stop)
        await connection.copy_records_to_table(
            "devices", columns=[c.strip() for c in DEVICE_COLUMNS.split(",")],
            records=[device_tuple(n, now) for n in range(start, stop)])
    size = max(devices.stop, 1)
    for start in range(0, polls, chunk):
        stop = min(start + chunk, polls)
        await connection.copy_records_to_table(
            "polls", columns=[c.strip() for c in POLL_COLUMNS.split(",")],
            records=[poll_tuple(n % size, poll_time(n, polls, now)) for n in range(start, stop)])
    await connection.execute("ANALYZE")
    await connection.close()


def command(url: str, *argv: str) -> tuple[float, float, float]:
    """`configserver ARGV` in a fresh process, output to /dev/null: (wall s, CPU s, peak RSS in MB)."""
    env = {**os.environ, "CONFIGSERVER_DATABASE": url}
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen([sys.executable, "-m", "configserver", *argv], stdout=devnull, env=env, cwd="/")
        _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"configserver {' '.join(argv)} failed ({status})")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def plans(url: str) -> dict[str, str]:
    """The query plan's first line for each lookup, as the database explains it."""
    from configserver.inventory._queries import devices_query

    parsed = database_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
    engine = create_async_engine(parsed)
    dialect = engine.dialect
    queries = {
        "--stale 7d": devices_query(stale=7 * 86400),
        "--model ip232": devices_query(model="ip232"),
        "--status 403": devices_query(status=403),
        "history (hwid)": sa.text("SELECT device FROM devices WHERE hwid_key = 'ip232-00-00-07' OR device = 'x'"),
    }

    async def ask() -> dict[str, str]:
        out = {}
        async with engine.connect() as connection:
            for name, query in queries.items():
                sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                rows = [" ".join(str(c) for c in row) for row in await connection.execute(sa.text(explain + sql))]
                out[name] = " | ".join(row.strip() for row in rows[:3])[:110]
        await engine.dispose()
        return out

    return asyncio.run(ask())


def run_fleet(args: argparse.Namespace) -> None:
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    url = fresh_database(args, "fleet")
    now = time.time()
    print(f"fleet: {url.split('://')[0]}; each command in a fresh process (Python start-up included); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'devices':>9}  {'fill s':>7}  {'command':38} {'wall s':>7}  {'CPU s':>7}  {'peak MB':>7}")
    filled = 0
    for size in sizes:
        started = time.perf_counter()
        fill_url = url
        if filled == 0:
            migrate_database(fill_url)
        fill(fill_url, range(filled, size), size - filled, now)
        filled = size
        fill_s = time.perf_counter() - started
        target = hwid(7, MODELS[7 % len(MODELS)])
        for argv in (["devices", "--json"], ["devices", "--stale", "7d", "--json"],
                     ["devices", "--model", "ip232", "--status", "403", "--json"],
                     ["devices", "--model", "ip232", "--status", "403"], ["history", target]):
            wall, cpu, peak = command(url, *argv)
            print(f"  {size:>9,}  {fill_s:7.1f}  {' '.join(argv):38} {wall:7.2f}  {cpu:7.2f}  {peak:7.0f}", flush=True)
            fill_s = 0.0
        started = time.perf_counter()
        for _ in range(10):
            device_history(url, target)
        print(f"  {size:>9,}  {'':7}  {'history, in-process (one call)':38} {(time.perf_counter() - started) / 10:7.3f}")
    for name, plan in plans(url).items():
        print(f"  plan {name:16} {plan}")


# -- audit -------------------------------------------------------------------------------------


async def write_cost(url: str, rows: int, fleet: int) -> tuple[float, float]:
    inventory = Inventory(url, queue_size=rows)
    await inventory.migrate()
    base = time.time()
    picks = random.Random(1)
    for n in range(rows):
        inventory.record(record(picks.randrange(fleet), base + n * 1e-2))
    started, cpu = time.perf_counter(), time.process_time()
    await inventory.start()
    while inventory.stats()["queued"]:
        await asyncio.sleep(0.005)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await inventory.close()
    return elapsed / rows * 1e6, cpu / rows * 1e6


def run_audit(args: argparse.Namespace) -> None:
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    url = fresh_database(args, "audit")
    now = time.time() - 86400
    fleet = 100_000
    print(f"audit: {url.split('://')[0]}; {args.rows} polls of a fleet of {fleet:,} written through the writer")
    print(f"  {'audit rows':>11}  {'fill s':>7}  {'wall µs/poll':>12}  {'CPU µs/poll':>11}  "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    migrate_database(url)
    fill(url, range(fleet), 0, now)
    filled = 0
    for size in sizes:
        started = time.perf_counter()
        if size > filled:
            fill(url, range(0), size - filled, now)
            filled = size
        fill_s = time.perf_counter() - started
        wall, cpu = asyncio.run(write_cost(url, args.rows, fleet))
        filled += args.rows
        print(f"  {size:>11,}  {fill_s:7.1f}  {wall:12.1f}  {cpu:11.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", help="a database URL to fill (default: a new SQLite file)")
    parts = parser.add_subparsers(dest="part", required=True)
    writer = parts.add_parser("writer")
    writer.add_argument("--rate", type=float, default=3400)
    writer.add_argument("--seconds", type=float, default=5)
    writer.add_argument("--poll-cpu-us", type=float, default=150)
    fleet = parts.add_parser("fleet")
    fleet.add_argument("--sizes", default="10000,100000,1000000")
    audit = parts.add_parser("audit")
    audit.add_argument("--sizes", default="0,1000000,3000000")
    audit.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    {"writer": run_writer, "fleet": run_fleet, "audit": run_audit}[args.part](args)


if __name__ == "__main__":
    main()
