"""A soak: thousands of lab devices polling through a real TLS terminator for minutes. Not a test.

    .venv/bin/python bench/soak.py [--terminator apache|nginx|lighttpd] [--devices 3000]
                                   [--duration 90] [--clients 4] [--max-polls 200000]

Everything runs on loopback, bounded in time (`--duration` seconds after the warm-up, and twice
`--duration` in all) and in count (`--max-polls`):

* a lab PKI (CA 1 and CA 2, a server CA) and `--devices` device certificates, half from each CA;
* `configserver serve` as a subprocess with deploy/configserver.production.toml filled in
  (unix socket, proxy secret, require_client_cert, audit on SQLite), started as the integration
  tests start it (tests/integration/conftest.py);
* the terminator from its deploy/ sample, in front of the app's socket;
* `--clients` processes, each owning a share of the fleet, each poll a fresh mutual-TLS
  handshake with the device's own certificate (no session resumption), from its own loopback
  address.

Every device has its own secret (`vars/devices.csv`), some their own template or vars file, so
every answer is compared, byte for byte but for the serial, with the script that device alone
may get. A device that polled with the serial of its script gets the short answer, also
compared. Figures printed: polls/s, latency, errors, mismatches (must be 0), the RSS of the
configserver process over time, and the audit rows written against the polls the app answered.
After the warm-up (every device has polled once: its certificate verified, its answer kept)
RSS should grow only as SQLite's page cache takes in the audit table's new pages, up to its
bound (`PRAGMA cache_size`); the database's size is printed beside it for that reason.

Certificates are cheap here: a device key costs ~40 ms (RSA-2048; 1024-bit keys would be
refused by the samples' OpenSSL security level 2), so the fleet shares a pool of `--key-pool`
keys and each device gets its own certificate, signed by its CA in ~0.4 ms. The terminators
and the app verify every certificate as they would any other; a shared key changes nothing they
check.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import multiprocessing
import random
import re
import secrets
import shutil
import signal
import sqlite3
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "integration"))

# How the integration tests start the app and the terminators; conftest says that a server is not
# installed by pytest.skip or pytest.fail.
import conftest
import pytest
from terminator_lab import Credential, TLSLab, http_get

from configserver.lab import pki
from configserver.lab.pki import CertificateAuthority

MODELS = ("IP232", "IP1202", "IP112", "IP222")
OWN_TEMPLATE_EVERY = 10   # every 10th device has templates/devices/<hwid>.j2
OWN_VARS_EVERY = 7        # every 7th has vars/devices/<hwid>.toml (more line keys)
SECRET = re.compile(rb"pw-[0-9a-f]{24}")
SERIAL = re.compile(r"mod cmd UP1 check ser ([0-9a-f]{32})\r\niresetn\r\n\Z")


# -- the fleet ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    hwid: str
    mac: str
    cert: Path
    key: Path
    secret: str
    template: str        # which template the server must choose
    line_keys: int       # from vars/default.toml, or the device's own vars file

    @property
    def model(self) -> str:
        return self.hwid.split("-")[0]

    def path(self, serial: str | None) -> str:
        """The poll URL an admin configures (`?sn=#m&type=#t&hwid=#h&ip=#i`), plus what the
        device appends itself."""
        query = f"sn={self.mac.replace('-', '')}&type={self.model.lower()}&hwid={self.hwid}&ip=10.0.0.7"
        query += "&ver=13r3%20sr1%20" + self.model + "[13.4567]"
        if serial is not None:
            query += f"&CHECK={serial}"
        return f"/update?{query}"

    def script(self) -> str:
        """The script this device alone may get, up to its serial: what the templates below render."""
        lines = [f"mod cmd UP1 setvar soak-device {self.hwid}",
                 f"# {self.template} for {self.hwid}",
                 f"config change SIP0 /user {self.hwid} /pwd {self.secret}",
                 "config change NTP0 /server ntp.lab.invalid",
                 *(f"config change PHONE /key{n} /type line" for n in range(self.line_keys)),
                 "config write", "config activate"]
        return "".join(line + "\r\n" for line in lines)

    def unchanged(self, serial: str) -> bytes:
        return (f"mod cmd UP1 setvar soak-device {self.hwid}\r\n"
                f"# unchanged: the device has applied this script (CHECK {serial})\r\n").encode()


BODY = """\
mod cmd UP1 setvar soak-device {{ device.hwid }}
# configserver: every poll above
# {{ template_name }} for {{ device.hwid }}
config change SIP0 /user {{ device.hwid }} /pwd {{ vars.secret }}
config change NTP0 /server {{ vars.ntp }}
{% for n in range(vars.line_keys) %}config change PHONE /key{{ n }} /type line
{% endfor %}"""


def _template(name: str) -> str:
    return f'{{% set template_name = "{name}" %}}{{% include "soak-body.j2" %}}'


@contextlib.contextmanager
def _keys_from(pool: Sequence[object]) -> Iterator[None]:
    """Let the lab CA hand out keys from `pool` in turn instead of making a new one per device."""
    keys = itertools.cycle(pool)
    made = pki._new_key
    pki._new_key = lambda bits: next(keys)
    try:
        yield
    finally:
        pki._new_key = made


def build_lab(root: Path, devices: int, key_pool: int) -> tuple[TLSLab, list[Device]]:
    """CAs, the terminator's certificate, `devices` device certificates, and each device's
    templates and vars, all under `root`."""
    pki_dir = conftest._readable_dir(root / "pki")
    keys_dir = conftest._readable_dir(root / "pki" / "keys", 0o700)
    certs_dir = conftest._readable_dir(root / "pki" / "devices")
    cas = [CertificateAuthority.innovaphone(1), CertificateAuthority.innovaphone(2)]
    server_ca = CertificateAuthority.named("configserver lab server CA")
    server = server_ca.issue_server(["localhost", "127.0.0.1"])
    server_cred = Credential(server, pki_dir / "server.crt", pki_dir / "server.key")
    server.write(server_cred.cert, server_cred.key)
    (pki_dir / "server-chain.pem").write_bytes(server.chain_pem)
    (pki_dir / "device-cas.pem").write_bytes(cas[0].cert_pem + cas[1].cert_pem)
    (pki_dir / "server-ca.pem").write_bytes(server_ca.cert_pem)
    lab = TLSLab(pki_dir / "device-cas.pem", pki_dir / "server-ca.pem", server_cred, pki_dir / "server-chain.pem", {})

    pool = [pki._new_key(2048) for _ in range(key_pool)]
    key_files = []
    for i, key in enumerate(pool):
        key_files.append(keys_dir / f"device-{i}.key")
        key_files[-1].write_bytes(pki._key_pem(key))
        key_files[-1].chmod(0o600)

    site = conftest._readable_dir(root / "site")
    templates, variables = site / "templates", site / "vars"
    for folder in (templates / "devices", templates / "models", variables / "devices"):
        conftest._readable_dir(folder)
    (templates / "soak-body.j2").write_text(BODY)
    (templates / "default.j2").write_text(_template("default"))
    (templates / "models" / "IP232.j2").write_text(_template("model IP232"))
    (variables / "default.toml").write_text('ntp = "ntp.lab.invalid"\nline_keys = 4\n')
    csv = ["hwid,secret"]
    fleet = []
    with _keys_from(pool):
        for n in range(devices):
            tail = 0x400000 + n
            mac_tail = f"{tail >> 16 & 255:02x}-{tail >> 8 & 255:02x}-{tail & 255:02x}"
            hwid = f"{MODELS[n % len(MODELS)]}-{mac_tail}"
            issued = cas[n % 2].issue_device(hwid)
            cert = certs_dir / f"{hwid}.crt"
            cert.write_bytes(issued.cert_pem)
            template = "model IP232" if hwid.startswith("IP232-") else "default"
            if n % OWN_TEMPLATE_EVERY == 0:
                template = f"own template of {hwid}"
                (templates / "devices" / f"{hwid}.j2").write_text(_template(template))
            line_keys = 4
            if n % OWN_VARS_EVERY == 0:
                line_keys = 4 + n % 5
                (variables / "devices" / f"{hwid}.toml").write_text(f"line_keys = {line_keys}\n")
            secret = f"pw-{secrets.token_hex(12)}"
            csv.append(f"{hwid},{secret}")
            fleet.append(Device(hwid, f"00-90-33-{mac_tail}", cert, key_files[n % key_pool], secret, template, line_keys))
    (variables / "devices.csv").write_text("\n".join(csv) + "\n")
    return lab, fleet


# -- one client process ---------------------------------------------------------------------------

@dataclass
class Shared:
    """What the client processes and the sampler share."""

    polls: object        # multiprocessing.Array('q'): polls answered or failed, per client
    problems: object     # multiprocessing.Array('q'): errors + mismatches, per client
    warmed: object       # multiprocessing.Array('b'): 1 once each of a client's devices polled once
    stop: object         # multiprocessing.Event


def _context(device: Device, server_ca: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(server_ca)
    context.load_cert_chain(device.cert, device.key)
    return context


def _get(port: int, context: ssl.SSLContext, source: str, path: str) -> tuple[int, bytes]:
    """One poll on a new connection: a full handshake (no session is offered for resumption)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=15, source_address=(source, 0))
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.putheader("User-Agent", "innovaphone-soak/13r3")
        connection.putheader("Connection", "close")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check(device: Device, body: bytes, serial_sent: str | None) -> tuple[str | None, str | None]:
    """(what is wrong or None, the serial of the script sent). Only the device's own script or
    its own short answer is right; any other device's secret in the body is a mismatch."""
    foreign = {s.decode() for s in SECRET.findall(body)} - {device.secret}
    if foreign:
        return f"another device's secret in the answer to {device.hwid}", None
    if serial_sent is not None and body == device.unchanged(serial_sent):
        return None, serial_sent
    text = body.decode("utf-8", errors="replace")
    script = device.script()
    match = SERIAL.search(text)
    if not text.startswith(script) or match is None or match.start() != len(script):
        return f"{device.hwid} got something other than its script: {text[:120]!r}", None
    return None, match.group(1)


def client(index: int, devices: list[Device], port: int, server_ca: Path, source: str, shared: Shared, results) -> None:
    """Poll `devices` until told to stop: first each once (the warm-up), then in shuffled rounds,
    half the time reporting the serial the device got last (the short answer comes back)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    rng = random.Random(index)
    contexts: dict[str, ssl.SSLContext] = {}
    serials: dict[str, str] = {}
    tally: Counter[str] = Counter()
    latencies: list[float] = []
    examples: list[str] = []

    def poll(device: Device, report_serial: bool) -> None:
        context = contexts.get(device.hwid) or contexts.setdefault(device.hwid, _context(device, server_ca))
        serial = serials.get(device.hwid) if report_serial else None
        started = time.perf_counter()
        try:
            status, body = _get(port, context, source, device.path(serial))
        except (OSError, http.client.HTTPException) as exc:
            tally[f"error {type(exc).__name__}"] += 1
            shared.problems[index] += 1
            if len(examples) < 5:
                examples.append(f"{device.hwid}: {type(exc).__name__}: {exc}")
        else:
            latencies.append(time.perf_counter() - started)
            if status != 200:
                tally[f"error status {status}"] += 1
                shared.problems[index] += 1
                if len(examples) < 5:
                    examples.append(f"{device.hwid}: {status} {body[:80]!r}")
            else:
                wrong, got = check(device, body, serial)
                if wrong:
                    tally["mismatch"] += 1
                    shared.problems[index] += 1
                    if len(examples) < 5:
                        examples.append(wrong)
                else:
                    tally["short answer" if got == serial else "script"] += 1
                    serials[device.hwid] = got
        shared.polls[index] += 1

    for device in devices:
        if shared.stop.is_set():
            break
        poll(device, report_serial=False)
    shared.warmed[index] = 1
    order = list(devices)
    while not shared.stop.is_set():
        rng.shuffle(order)
        for device in order:
            if shared.stop.is_set():
                break
            poll(device, report_serial=rng.random() < 0.5)
    results.put((index, dict(tally), latencies, examples))


# -- the configserver process, seen from /proc ----------------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its children (none with one worker), in KiB."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total


def file_kib(database: Path) -> int:
    """The size of a SQLite database with its WAL, in KiB."""
    total = 0
    for path in (database, database.with_name(database.name + "-wal")):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total // 1024


def page_cache_bound_kib() -> int | None:
    """The page cache (KiB) each SQLite connection of the inventory may fill, as the app sets it up
    (None if that can no longer be asked)."""
    try:
        from configserver.inventory import _database

        with contextlib.closing(sqlite3.connect(":memory:")) as connection:
            _database._sqlite_pragmas(connection, None)
            size = connection.execute("PRAGMA cache_size").fetchone()[0]
            page = connection.execute("PRAGMA page_size").fetchone()[0]
    except (ImportError, AttributeError, sqlite3.Error):
        return None
    return -size if size < 0 else size * page // 1024


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`, from Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# -- the run --------------------------------------------------------------------------------------

@dataclass
class Sample:
    at: float
    polls: int
    problems: int
    rss: int             # KiB, configserver serve
    terminator: int      # KiB, the terminator's processes together
    database: int        # KiB, the SQLite file and its WAL
    warm: bool


def run(args: argparse.Namespace, root: Path) -> int:
    print(f"soak: {args.devices} devices, {args.clients} client processes, {args.terminator}, "
          f"{args.duration:g} s after the warm-up (at most {args.max_polls} polls)", flush=True)
    t0 = time.perf_counter()
    lab, fleet = build_lab(root, args.devices, args.key_pool)
    print(f"  lab: {len(fleet)} device certificates, templates and vars in {time.perf_counter() - t0:.1f} s "
          f"({args.key_pool} RSA-2048 keys shared, one certificate each)", flush=True)

    with contextlib.ExitStack() as stack:
        try:
            conftest.need_terminator(args.terminator)
        except (pytest.skip.Exception, pytest.fail.Exception) as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        secret = conftest.new_proxy_secret()
        app = conftest.start_app("soak", root, root / "site", lab, secret, uds=True)
        stack.callback(app.server.stop)
        server, port, _ = conftest.STARTERS[args.terminator](f"soak-{args.terminator}", root, lab, app, secret)
        stack.callback(server.stop)
        pid = app.server.process.pid
        print(f"  configserver serve (pid {pid}) on {app.uds}, {args.terminator} on 127.0.0.1:{port}", flush=True)

        ctx = multiprocessing.get_context("fork")
        shared = Shared(ctx.Array("q", args.clients, lock=False), ctx.Array("q", args.clients, lock=False),
                        ctx.Array("b", args.clients, lock=False), ctx.Event())
        results = ctx.Queue()
        shares = [fleet[i::args.clients] for i in range(args.clients)]
        workers = [
            ctx.Process(target=client, name=f"soak client {i}",
                        args=(i, shares[i], port, lab.server_ca, f"127.0.0.{10 + i}", shared, results))
            for i in range(args.clients)
        ]
        front = server.process.pid
        database = root / "soak-app" / "configserver.db"

        def sample(at: float, warm: bool) -> Sample:
            return Sample(at, sum(shared.polls), sum(shared.problems), rss_kib(pid), rss_kib(front),
                          file_kib(database), warm)

        samples = [sample(0.0, False)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        warm_at = None
        try:
            while True:
                time.sleep(args.sample)
                now = time.perf_counter() - started
                warm = all(shared.warmed)
                if warm and warm_at is None:
                    warm_at = now
                samples.append(sample(now, warm))
                if (warm_at is not None and now >= warm_at + args.duration) or now >= 2 * args.duration \
                        or samples[-1].polls >= args.max_polls:
                    break
                if not all(w.is_alive() for w in workers):
                    print("soak: a client process ended early", file=sys.stderr)
                    break
        except KeyboardInterrupt:
            print("soak: interrupted, reporting what ran", file=sys.stderr)
        shared.stop.set()
        outcomes = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
        ended = time.perf_counter() - started
        samples.append(sample(ended, warm_at is not None))

        # The app's own count of what it answered, and of its audit records, before it stops.
        metrics = http_get("/metrics", uds=app.uds)[1].decode()
        answered = int(metric(metrics, "configserver_polls_total"))
        server.stop()
        app.server.stop()   # SIGTERM: the audit queue is written before the app exits
        with contextlib.closing(sqlite3.connect(database)) as db:
            rows = db.execute("SELECT count(*) FROM polls").fetchone()[0]
            known = db.execute("SELECT count(*) FROM devices").fetchone()[0]

    report(args, fleet, samples, warm_at, outcomes, answered, metrics, rows, known)
    tally = Counter()
    for _, counts, _, _ in outcomes:
        tally.update(counts)
    problems = sum(n for kind, n in tally.items() if kind.startswith(("error", "mismatch")))
    return 1 if problems or rows != answered or warm_at is None else 0


def report(args, fleet, samples: list[Sample], warm_at, outcomes, answered: int, metrics: str, rows: int, known: int) -> None:
    tally: Counter[str] = Counter()
    latencies: list[float] = []
    examples: list[str] = []
    for _, counts, lat, ex in sorted(outcomes, key=lambda o: o[0]):
        tally.update(counts)
        latencies += lat
        examples += ex
    polls = sum(tally.values())
    errors = sum(n for kind, n in tally.items() if kind.startswith("error"))
    end = samples[-1].at

    print(f"\nmemory (RSS of configserver serve, and of the {args.terminator} processes together), polls/s and "
          f"problems (errors + mismatches) so far, sampled every {args.sample:g} s; "
          f"each # is 0.5 MiB of configserver's RSS above the start:")
    print(f"  {'s':>6} {'polls':>8} {'polls/s':>8} {'problems':>8} {'RSS MiB':>8} {args.terminator + ' MiB':>13}"
          f" {'db MiB':>7}  phase")
    step = max(1, round(args.print_every / args.sample))
    shown = [s for i, s in enumerate(samples) if i % step == 0 or i == len(samples) - 1]
    previous = shown[0]
    for s in shown:
        rate = (s.polls - previous.polls) / (s.at - previous.at) if s.at > previous.at else 0.0
        phase = "steady" if s.warm else "warm-up"
        print(f"  {s.at:6.0f} {s.polls:8d} {rate:8.0f} {s.problems:8d} {s.rss / 1024:8.1f} {s.terminator / 1024:13.1f}"
              f" {s.database / 1024:7.1f}"
              f"  {phase:7}  {'#' * max(0, round((s.rss - samples[0].rss) / 512))}")
        previous = s

    print("\npolls:")
    print(f"  made {polls} in {end:.0f} s ({polls / end:.0f}/s overall)", end="")
    steady = [s for s in samples if s.warm]
    if warm_at is not None and len(steady) >= 2:
        rate = (steady[-1].polls - steady[0].polls) / (steady[-1].at - steady[0].at)
        print(f"; warm-up (every device once) took {warm_at:.0f} s; after it {rate:.0f} polls/s")
    else:
        print("; the warm-up did not finish")
    print(f"  answered with the device's full script: {tally['script']}, with its short answer: {tally['short answer']}")
    print(f"  mismatches (an answer not the device's own): {tally['mismatch']}")
    print(f"  errors: {errors}" + "".join(f", {k}: {n}" for k, n in sorted(tally.items()) if k.startswith("error")))
    for example in examples[:5]:
        print(f"    e.g. {example}")
    if latencies:
        latencies.sort()
        pct = {p: latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000 for p in (50, 90, 99)}
        print(f"  latency per poll, handshake included: p50 {pct[50]:.1f} ms, p90 {pct[90]:.1f} ms, "
              f"p99 {pct[99]:.1f} ms, max {latencies[-1] * 1000:.0f} ms")

    if len(steady) >= 2:
        rss = [s.rss / 1024 for s in steady]
        first, last, top = rss[0], rss[-1], max(rss)
        slope = _slope([s.at for s in steady], rss) * 60
        print(f"\nRSS after the warm-up ({len(steady)} samples over {steady[-1].at - steady[0].at:.0f} s): "
              f"first {first:.1f} MiB, last {last:.1f} MiB, max {top:.1f} MiB; "
              f"growth {last - first:+.1f} MiB ({(last - first) / first * 100:+.1f} %), "
              f"trend {slope:+.2f} MiB/min")
        grown = (steady[-1].database - steady[0].database) / 1024
        bound = page_cache_bound_kib()
        if bound is not None:
            cache = min(grown, bound / 1024)
            print(f"  SQLite's page cache takes in the audit table's new pages up to {bound / 1024:.1f} MiB "
                  f"(PRAGMA cache_size, configserver/inventory/_database.py); the database grew {grown:+.1f} MiB "
                  f"meanwhile, so up to {cache:.1f} MiB of the growth is that cache; growth beyond it: "
                  f"{last - first - cache:+.1f} MiB")
    print(f"  (before the first poll: {samples[0].rss / 1024:.1f} MiB)")

    written = metric(metrics, "configserver_audit_records", state="written")
    dropped = metric(metrics, "configserver_audit_records", state="dropped")
    print("\naudit:")
    print(f"  polls the app answered (configserver_polls_total): {answered}; answers the devices received: "
          f"{polls - sum(n for k, n in tally.items() if k.startswith('error ') and 'status' not in k)}")
    print(f"  rows in the polls table after the app stopped: {rows} "
          f"({'none dropped' if rows == answered else f'{answered - rows} missing'}); "
          f"before stopping: written {written:.0f}, dropped {dropped:.0f}")
    print(f"  devices in the inventory: {known} of {len(fleet)}")


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (per second)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terminator", choices=sorted(conftest.STARTERS), default="apache")
    parser.add_argument("--devices", type=int, default=3000)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of polling after the warm-up")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--max-polls", type=int, default=200_000, help="stop after this many polls")
    parser.add_argument("--key-pool", type=int, default=16, help="RSA-2048 keys the devices share")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--print-every", type=float, default=5.0, help="seconds between printed samples")
    parser.add_argument("--keep", action="store_true", help="keep the lab folder (logs, database) and say where")
    args = parser.parse_args()
    if args.devices < args.clients or args.clients < 1 or args.duration <= 0 or args.key_pool < 1:
        parser.error("need --clients >= 1, --devices >= --clients, --duration > 0, --key-pool >= 1")
    root = Path(tempfile.mkdtemp(prefix="configserver-soak-"))
    root.chmod(0o755)   # the terminator's workers (www-data under root) read certificates here
    try:
        status = run(args, root)
    finally:
        if args.keep:
            print(f"\nlab kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
