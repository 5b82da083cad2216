"""What a page of the admin page's fleet costs at 100,000 devices, and why it pages by key. Not a test.

    .venv/bin/python bench/admin_pages.py [--devices 100000] [--repeat 20]

Builds an SQLite inventory of `--devices` devices (and one poll each), then times, per query,
the median of `--repeat` runs:

1. the first page of each order and filter the page offers (what an admin sees first);
2. the last page of the fleet, reached by key (`after` the previous page's last row, as the
   page does) and, for comparison, by OFFSET, which counts past every row before it;
3. the problems summary at the top of the page.

The figure to quote is the ratio of the last page by OFFSET to the last page by key: paging by
key costs the same on page 1 and page 2,000; OFFSET grows with the page number.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# the tests' own generator of a fleet, so that the benchmark measures what the tests check
from test_admin_queries import NOW, backup_rows, fill_sqlite, fleet_rows

from configserver.admin._fleet import (
    FleetFilter,
    fleet_page,
    page_query,
    read_cursor,
    summary,
)
from configserver.inventory._database import database_url, open_engine


async def median_ms(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def run(devices: int, repeat: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="admin-bench-"))
    started = time.perf_counter()
    fleet_devices, fleet_polls = fleet_rows(devices)   # and a backup row for four devices in five
    url = await asyncio.to_thread(fill_sqlite, folder / "inventory.db", fleet_devices, fleet_polls,
                                  backup_rows(fleet_devices))
    print(f"{devices} devices written in {time.perf_counter() - started:.1f} s")
    engine = open_engine(database_url(url))
    try:
        print("\nfirst page (50 rows, with the count of all matches), median ms:")
        for name, fleet in [
            ("newest first", FleetFilter()),
            ("model IP232", FleetFilter(model="IP232")),
            ("status 500", FleetFilter(status=500)),
            ("stale 7d", FleetFilter(stale=7 * 86400)),
            ("by hwid", FleetFilter(sort="hwid", descending=False)),
            ("text '30-00-a'", FleetFilter(text="30-00-a")),
            ("no backup 3d", FleetFilter(no_backup=3 * 86400)),
            ("IP232, no bk 5d", FleetFilter(model="IP232", no_backup=5 * 86400)),
        ]:
            ms = await median_ms(lambda fleet=fleet: fleet_page(engine, fleet, now=NOW), repeat)
            print(f"  {name:<16} {ms:8.2f}")

        # the last page: walk by key to find its cursor, then time that page alone
        fleet, after, pages = FleetFilter(), None, 0
        while True:
            page = await fleet_page(engine, fleet, now=NOW, after=after)
            pages += 1
            if page.after is None:
                break
            last_cursor, after = after, page.after
        by_key = await median_ms(lambda: fleet_page(engine, fleet, now=NOW, after=last_cursor), repeat)

        def rows(query):
            async def fetch() -> None:
                async with engine.connect() as connection:
                    list(await connection.execute(query))
            return fetch

        key_rows = await median_ms(rows(page_query(fleet, NOW, after=read_cursor(last_cursor, fleet.sort))), repeat)
        offset_rows = await median_ms(rows(page_query(fleet, NOW).offset((pages - 1) * 50)), repeat)
        first_rows = await median_ms(rows(page_query(fleet, NOW)), repeat)
        print(f"\npage {pages} of {pages} (the last), median ms:")
        print(f"  whole page by key, as the page asks   {by_key:8.2f}  (rows, count of all, applied)")
        print(f"  its rows by key                       {key_rows:8.2f}  (page 1: {first_rows:.2f})")
        print(f"  its rows by OFFSET {(pages - 1) * 50:<18} {offset_rows:8.2f}")
        print(f"  OFFSET / key for the last page's rows: {offset_rows / key_rows:.0f}x")

        ms = await median_ms(lambda: summary(engine, now=NOW), repeat)
        print(f"\nproblems summary: {ms:.2f} ms")
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.devices, args.repeat))


if __name__ == "__main__":
    main()
