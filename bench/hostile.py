"""What a few connections with huge request heads cost a worker, with and without the listener
limits. Not a test; loopback only, bounded in bytes and time.

    .venv/bin/python bench/hostile.py [--connections 4] [--megabytes 150] [--protocol httptools]

Serves the app on the header path (plain HTTP on loopback, as behind a terminator) in a child
process, twice, as `configserver serve` runs uvicorn: with uvicorn's defaults (what `serve` did
before), and with the listener's limits (configserver/limits.py: a head over
max_request_head_bytes is answered 431).
Each time, `--connections` clients each send a GET whose one header line grows to `--megabytes`
MB, all at once; the worker's resident memory (VmRSS, /proc) is sampled before, at its peak
during the flood, and after the clients have gone. The app never sees such a request either way:
the cost is the HTTP parser's buffering, before the proxy secret could be checked.

Without the limits, httptools joins the header's pieces over and over: the default run takes
some minutes for that half; with them, the flood is cut off after the first 32 KB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Both servers as `configserver serve` runs uvicorn (cli.py), one without the listener's options.
SERVE = """
import sys, uvicorn
from configserver.settings import load_settings
from configserver.tls import uvicorn_options
guarded = sys.argv[3] == "guarded"
options = uvicorn_options(load_settings(), http=sys.argv[2]) if guarded else {"http": sys.argv[2]}
uvicorn.run("configserver.app:create_app_from_environment", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
            proxy_headers=False, access_log=False, log_level="warning", **options)
"""

CHUNK = b"a" * 65536


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server stopped"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if s.recv(100).startswith(b"HTTP/1.1"):
                return
        time.sleep(0.2)
    raise RuntimeError("the server did not start")


def flood(port: int, megabytes: int, sent: list[int]) -> None:
    """One connection: a head whose one header line grows to `megabytes` MB, or until refused."""
    total = 0
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
        while total < megabytes * 1024 * 1024:
            total += s.send(CHUNK)
        s.sendall(b"\r\n\r\n")
        s.recv(100)
    sent.append(total)


def measure(label: str, command: list[str], port: int, env: dict[str, str], connections: int,
            megabytes: int) -> dict[str, float]:
    server = subprocess.Popen(command, env=env, cwd=env["BENCH_DIR"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until_serving(port, server)
        before = rss_mb(server.pid)
        sent: list[int] = []
        clients = [threading.Thread(target=flood, args=(port, megabytes, sent)) for _ in range(connections)]
        start = time.monotonic()
        for client in clients:
            client.start()
        peak = before
        while any(client.is_alive() for client in clients):
            peak = max(peak, rss_mb(server.pid))
            time.sleep(0.05)
        seconds = time.monotonic() - start
        time.sleep(1.0)
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    result = {"before": before, "peak": peak, "after": after, "sent_mb": sum(sent) / 2**20, "seconds": seconds}
    print(f"{label:<38} worker RSS before {before:6.0f} MB   peak {peak:6.0f} MB   after {after:6.0f} MB   "
          f"({result['sent_mb']:.1f} MB accepted from the clients in {seconds:.1f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=4, help="clients at once (default 4)")
    parser.add_argument("--megabytes", type=int, default=150, help="head size each client tries (default 150)")
    parser.add_argument("--protocol", choices=["httptools", "h11"], default="httptools")
    args = parser.parse_args()
    if args.connections * args.megabytes > 2000:
        parser.error("keep it under 2000 MB in all: this runs on the machine it measures")

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "templates").mkdir()
        (site / "templates" / "default.j2").write_text("# script for {{ device.hwid }}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
        env.update(BENCH_DIR=tmp, PYTHONPATH=str(ROOT), CONFIGSERVER_TEMPLATES=str(site / "templates"),
                   CONFIGSERVER_VARS=str(site / "vars"), CONFIGSERVER_DATABASE=f"sqlite:///{site / 'inventory.db'}",
                   CONFIGSERVER_LOG_LEVEL="warning")
        print(f"{args.connections} connections x {args.megabytes} MB of request head, {args.protocol}, loopback\n")
        port = free_port()
        without = measure("uvicorn defaults (before)", [sys.executable, "-c", SERVE, str(port), args.protocol, "-"],
                          port, env, args.connections, args.megabytes)
        port = free_port()
        guarded = measure("listener limits (configserver serve)",
                          [sys.executable, "-c", SERVE, str(port), args.protocol, "guarded"],
                          port, env, args.connections, args.megabytes)
        grown = (without["peak"] - without["before"], guarded["peak"] - guarded["before"])
        print(f"\npeak growth: {grown[0]:.0f} MB before, {grown[1]:.0f} MB with the limits"
              + (f" ({grown[0] / grown[1]:.0f}x less)" if grown[1] >= 1 else " (under 1 MB)"))


if __name__ == "__main__":
    main()
