"""What a large fleet costs a worker: start-up, idle CPU, an edit until a device sees it, memory.

    .venv/bin/python bench/fleet.py [--sizes 10,1000,10000,100000] [--idle 20] [--edits 3]

Two kinds of site, each at every size: per-device templates (templates/devices/<hwid>.j2, each
including default.j2) and one default.j2 with a devices.csv of that many rows. For each, in one
run with the sizes interleaved (10, 1,000, ... for one kind, then the other):

* start-up: `configserver serve` (1 worker, unix socket, audit on) from spawn to the first 200;
* idle CPU: the worker's CPU (from /proc) over --idle seconds with nothing changing, plus the
  safety-net rescan's share (one full rescan, timed in the worker's own terms, over rescan_seconds);
* an edit until a device sees it: one device's template (or devices.csv row) rewritten, the
  device polled every 20 ms until the new text comes back; worst of --edits, grace_seconds = 1;
* RSS of the worker after every device of the fleet has polled once, and CPU per poll
  meanwhile, audit included; then a second round, every device polled again in the same order:
  what a fleet polling in turn costs once the caches hold what they can (at 100,000 devices not
  every answer is kept: see configserver/caches.py). The devices poll in groups of CHUNK, each
  group once the audit has written the one before: as fast as the worker goes, but as a fleet
  polling over minutes does, never ahead of its audit. (Polls that outrun the audit wait in
  its queue, bounded by `audit_queue_size`.) Also the highest RSS read (every 0.1 s) while
  either round ran: the worker hands freed heap pages back every 2 s (configserver/allocator.py).

Not a test: it prints figures. Building the 100,000-file site takes a minute the first time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configserver.content import ContentStore  # noqa: E402

GRACE = 1.0
CHUNK = 2000   # devices polled before the audit must catch up
SUBJECT = "CN={hwid},O=innovaphone,C=DE"
ISSUER = "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"
DEFAULT = """# {{ device.hwid }} ({{ device.model }}), configured by configserver
mod cmd UP1 times /allow 0,1,2,3,4 /initial 10
config change SIP0 /server {{ vars.pbx }} /user {{ vars.user | default(device.hwid) }} /pwd {{ vars.password }}
config change NTP0 /server {{ vars.ntp }}
"""


def hwid(n: int) -> str:
    return f"IP232-{n >> 16 & 255:02x}-{n >> 8 & 255:02x}-{n & 255:02x}"


def build_site(root: Path, kind: str, size: int) -> Path:
    """A site of `size` devices of one kind, with its configserver.toml."""
    (root / "templates/devices").mkdir(parents=True)
    (root / "vars").mkdir()
    (root / "templates/default.j2").write_text(DEFAULT)
    (root / "vars/default.toml").write_text('pbx = "pbx.example.com"\npassword = "secret"\nntp = "pool.ntp.org"\n')
    if kind == "templates":
        for n in range(size):
            (root / f"templates/devices/{hwid(n)}.j2").write_text(
                f"{{% include 'default.j2' %}}\nconfig change PHONE /key1 /type line /label {n}\n")
    else:
        rows = "".join(f"{hwid(n)},user{n},{n % 90 + 10}\n" for n in range(size))
        (root / "vars/devices.csv").write_text("hwid,user,ext\n" + rows)
    long_ago = time.time() - 3600
    for path in (root / "templates").rglob("*"):
        os.utime(path, (long_ago, long_ago))
    for path in (root / "vars").rglob("*"):
        os.utime(path, (long_ago, long_ago))
    config = root / "configserver.toml"
    config.write_text(
        f'templates = "{root / "templates"}"\nvars = "{root / "vars"}"\nuds = "{root / "app.sock"}"\n'
        f'database = "sqlite:///{root / "audit.db"}"\ngrace_seconds = {GRACE}\n'
        f'log_level = "info"\n'
    )
    return config


# -- talking to the worker over its unix socket -------------------------------------------------

def request(n: int) -> bytes:
    return (f"GET /init HTTP/1.1\r\nHost: configserver\r\nX-SSL-Client-Verify: SUCCESS\r\n"
            f"X-SSL-Client-S-DN: {SUBJECT.format(hwid=hwid(n))}\r\nX-SSL-Client-I-DN: {ISSUER}\r\n\r\n").encode()


class Client:
    """One keep-alive connection."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def poll(self, n: int) -> tuple[int, bytes]:
        self.sock.sendall(request(n))
        status = int(self.file.readline().split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, self.file.read(length)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


async def _poll_range(path: Path, numbers: range, connections: int) -> None:
    async def one(part: range) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        for n in part:
            writer.write(request(n))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"device {hwid(n)}: {head[:40]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
    step = len(numbers) // connections + 1
    await asyncio.gather(*(one(numbers[i:i + step]) for i in range(0, len(numbers), step)))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rescan_seconds_of(root: Path) -> float:
    """CPU of one full rescan of an unchanged site (what the safety net costs each time)."""
    store = ContentStore(root / "templates", root / "vars", grace_seconds=GRACE)
    store.refresh()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        store.refresh()
        best = min(best, time.process_time() - start)
    return best


def measure(root: Path, config: Path, kind: str, size: int, idle: float, edits: int) -> dict[str, float]:
    sock = root / "app.sock"
    sock.unlink(missing_ok=True)
    (root / "audit.db").unlink(missing_ok=True)
    venv_bin = Path(sys.executable).parent
    started = time.perf_counter()
    server = subprocess.Popen([str(venv_bin / "configserver"), "--config", str(config), "serve"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                client = Client(sock)
                status, _ = client.poll(0)
                if status == 200:
                    break
                client.close()
            except OSError:
                pass
            if server.poll() is not None:
                raise RuntimeError("configserver serve stopped")
            time.sleep(0.01)
        startup = time.perf_counter() - started
        client.close()   # an idle keep-alive connection is closed by the server after 5 s
        time.sleep(2)
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(idle)
        idle_pct = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - t0) * 100

        worst = 0.0
        target = size // 2
        client = Client(sock)
        for attempt in range(edits):
            marker = f"edit{attempt}-{time.time_ns()}"
            if kind == "templates":
                (root / f"templates/devices/{hwid(target)}.j2").write_text(
                    f"{{% include 'default.j2' %}}\nconfig change PHONE /key1 /type line /label {marker}\n")
            else:
                table = root / "vars/devices.csv"
                lines = table.read_text().split("\n")
                lines[1 + target] = f"{hwid(target)},{marker},10"
                table.write_text("\n".join(lines))
            saved = time.time()
            while marker.encode() not in client.poll(target)[1]:
                if time.time() - saved > 30:
                    raise RuntimeError("the edit never showed")
                time.sleep(0.02)
            worst = max(worst, time.time() - saved)
            time.sleep(GRACE + 0.5)
        client.close()

        per_poll, peak = poll_fleet(server.pid, sock, size)
        rss = rss_mb(server.pid)
        per_poll_again, peak_again = poll_fleet(server.pid, sock, size)
        rss_again = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(20)
    return {"startup": startup, "idle": idle_pct, "edit": worst, "rss": rss, "poll_us": per_poll * 1e6,
            "rss_again": rss_again, "poll_again_us": per_poll_again * 1e6, "rss_peak": max(peak, peak_again)}


def poll_fleet(pid: int, sock: Path, size: int) -> tuple[float, float]:
    """Every device polled once, in groups of CHUNK, each once the audit has caught up; the
    worker's CPU per poll, its audit included, and its highest RSS meanwhile (read every 0.1 s)."""
    peak, done = [rss_mb(pid)], threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_mb(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu0 = cpu_seconds(pid)
    try:
        for start in range(0, size, CHUNK):
            asyncio.run(_poll_range(sock, range(start, min(size, start + CHUNK)), 4))
            audit_written(sock)
    finally:
        done.set()
        watcher.join()
    return (cpu_seconds(pid) - cpu0) / size, peak[0]


def audit_written(sock: Path, timeout: float = 120.0) -> None:
    """Wait until the worker's audit queue is empty (its /metrics say so)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock))
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: configserver\r\nConnection: close\r\n\r\n")
            text = b""
            while chunk := conn.recv(65536):
                text += chunk
        queued = [line for line in text.decode().splitlines() if line.startswith('configserver_audit_records{state="queued"}')]
        if queued and float(queued[0].split()[-1]) == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the audit queue was not written in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,1000,10000,100000")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--rescan-seconds", type=float, default=600.0, help="the worker's rescan_seconds")
    parser.add_argument("--keep", type=Path, help="build the sites here and keep them for the next run")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        sites = {}
        for kind in ("templates", "csv"):
            for size in sizes:
                root = base / f"{kind}-{size}"
                config = root / "configserver.toml"
                if not config.exists():
                    print(f"building {kind} site of {size} ...", flush=True)
                    config = build_site(root, kind, size)
                else:
                    text = config.read_text()
                    config.write_text("\n".join(line for line in text.splitlines()   # settings of older runs go
                                                if not line.startswith(("rescan_seconds", "audit_queue_size"))) + "\n")
                config.write_text(config.read_text() + f"rescan_seconds = {args.rescan_seconds}\n")
                sites[kind, size] = (root, config)
        results = {}
        for kind in ("templates", "csv"):
            for size in sizes:
                root, config = sites[kind, size]
                print(f"measuring {kind} at {size} ...", flush=True)
                figures = measure(root, config, kind, size, args.idle, args.edits)
                figures["rescan"] = rescan_seconds_of(root)
                results[kind, size] = figures

    label = {"templates": "per-device templates", "csv": "devices.csv rows"}
    print(f"\n1 worker, unix socket, audit on, grace_seconds = {GRACE}, rescan_seconds = {args.rescan_seconds:g}")
    print(f"{'':44}" + "".join(f"{size:>12,}" for size in sizes))
    rows = [
        ("start-up to first answer, s", "startup", "{:.2f}"),
        ("idle CPU measured, %", "idle", "{:.3f}"),
        ("one full rescan, CPU s", "rescan", "{:.3f}"),
        ("idle CPU with the rescan's share, %", None, "{:.3f}"),
        ("an edit until the device sees it (worst), s", "edit", "{:.2f}"),
        ("RSS after every device polled once, MB", "rss", "{:.0f}"),
        ("server CPU per poll, first poll of each, us", "poll_us", "{:.0f}"),
        ("RSS after a second round, MB", "rss_again", "{:.0f}"),
        ("highest RSS while polled (every 0.1 s), MB", "rss_peak", "{:.0f}"),
        ("server CPU per poll, second round, us", "poll_again_us", "{:.0f}"),
    ]
    for kind in ("templates", "csv"):
        print(f"{label[kind]}:")
        for title, key, form in rows:
            cells = []
            for size in sizes:
                r = results[kind, size]
                value = r["idle"] + r["rescan"] / args.rescan_seconds * 100 if key is None else r[key]
                # CPU is counted in clock ticks (10 ms): a few polls say nothing per poll
                cells.append("-" if key in ("poll_us", "poll_again_us") and size < 1000 else form.format(value))
            print(f"  {title:42}" + "".join(f"{cell:>12}" for cell in cells))


if __name__ == "__main__":
    main()
