"""Behind the terminator: a poll through us beside a static 1 KB file, from the same mutual-TLS setup.

    .venv/bin/python bench/terminator.py [--seconds 10] [--clients 4] [--rounds 2] [--kinds nginx,apache]

For nginx and for Apache, side by side in one run (alternating, best of --rounds):

* static: the terminator's sample from deploy/ with mutual TLS as shipped, but its location
  serving a 1 KB file from disk instead of forwarding;
* poll: the sample as shipped, forwarding over its keep-alive upstream to `configserver serve`
  on a unix socket with the production settings (deploy/configserver.production.toml: proxy
  secret, require_client_cert with the forwarded PEM verified again, digest key, audit on).

Clients: `openssl s_time -new`, one per lab device certificate, --clients at once, each making a
fresh TLS handshake per request as a device does. Server CPU is read from /proc (the terminator's
processes, and the app's) over the run. Printed: CPU per request (and the app's part of it), requests/s, and the ratios
poll / static (targets: CPU at most 1.15x, requests/s at least 0.90x). Of the rounds, the CPU
figures are those of the round with the least CPU per request, the rate the highest.

* floor: the same sample forwarding to a constant 1 KB answer served the way the app is (uvicorn
  with httptools and uvloop, the listener's protocol and limits, a unix socket, the answer given
  at once as a poll's is): what serving costs before the poll's own work.

Then keep-alive straight to the app's socket with nginx's header forms, the app's CPU per poll
(target: at most 80 us), and the same for the floor.

Not a test: it prints figures. Needs nginx and apache2 (scripts/install-test-servers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "integration")]

import importlib.util  # noqa: E402

# the integration tests' own way of starting the app and the terminators (tests/integration/conftest.py)
_spec = importlib.util.spec_from_file_location("integration_conftest", REPO / "tests" / "integration" / "conftest.py")
lab_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_fixtures)
DEPLOY, Started, need_terminator = lab_fixtures.DEPLOY, lab_fixtures.Started, lab_fixtures.need_terminator
start_app, start_nginx, start_apache = lab_fixtures.start_app, lab_fixtures.start_nginx, lab_fixtures.start_apache
_readable_dir, _start, _terminator_root = lab_fixtures._readable_dir, lab_fixtures._start, lab_fixtures._terminator_root
_give_to_terminator_group = lab_fixtures._give_to_terminator_group

from terminator_lab import (  # noqa: E402
    Credential,
    Server,
    TLSLab,
    apache_main_conf,
    fill_in,
    free_port,
    new_proxy_secret,
    nginx_main_conf,
    write_secret_file,
)

from configserver.lab.pki import CertificateAuthority  # noqa: E402

TEMPLATE = """# {{ device.hwid }} ({{ device.model }}), configured by configserver
mod cmd UP1 times /allow 0,1,2,3,4 /initial 10
config change SIP0 /server {{ vars.pbx }} /user {{ device.hwid }} /pwd {{ vars.password }}
config change NTP0 /server {{ vars.ntp }}
{% for n in range(vars.line_keys) %}config change PHONE /key{{ n }} /type line
{% endfor %}"""
STATIC = ("# a static file of 1 KB, for comparison\n" + "config change PHONE /key0 /type line\n" * 30)[:1024]


# -- the lab ---------------------------------------------------------------------------------------

def make_lab(root: Path, devices: int) -> TLSLab:
    folder = _readable_dir(root / "pki")
    ca1, ca2 = CertificateAuthority.innovaphone(1), CertificateAuthority.innovaphone(2)
    server_ca = CertificateAuthority.named("configserver lab server CA")

    def keep(name: str, issued) -> Credential:
        credential = Credential(issued, folder / f"{name}.crt", folder / f"{name}.key")
        issued.write(credential.cert, credential.key)
        return credential

    fleet = {f"IP232-30-01-{n:02x}": keep(f"device{n}", (ca1, ca2)[n % 2].issue_device(f"IP232-30-01-{n:02x}"))
             for n in range(devices)}
    server = keep("server", server_ca.issue_server(["localhost", "127.0.0.1"]))
    (folder / "server-chain.pem").write_bytes(server.issued.chain_pem)
    (folder / "innovaphone-device-cas.pem").write_bytes(ca1.cert_pem + ca2.cert_pem)
    (folder / "server-ca.pem").write_bytes(server_ca.cert_pem)
    return TLSLab(device_cas=folder / "innovaphone-device-cas.pem", server_ca=folder / "server-ca.pem",
                  server=server, server_chain=folder / "server-chain.pem", devices=fleet)


def make_site(root: Path) -> Path:
    site = _readable_dir(root / "site")
    _readable_dir(site / "templates")
    _readable_dir(site / "vars")
    (site / "templates" / "default.j2").write_text(TEMPLATE)
    (site / "vars" / "default.toml").write_text('pbx = "pbx.example.com"\npassword = "secret"\nntp = "pool.ntp.org"\nline_keys = 8\n')
    return site


def start_static(kind: str, root: Path, lab: TLSLab, secret: str) -> Started:
    """The terminator's own sample, mutual TLS as shipped, answering with a 1 KB file from disk."""
    need_terminator(kind)
    folder = _terminator_root(root, f"{kind}-static")
    (folder / "htdocs" / "static.txt").write_text(STATIC)
    port = free_port()
    if kind == "nginx":
        sample = fill_in((DEPLOY / "nginx" / "configserver.conf").read_text(), {
            "server": "unix:/nonexistent.sock", "listen": f"127.0.0.1:{port} ssl", "server_name": "localhost",
            "ssl_certificate": str(lab.server.cert), "ssl_certificate_key": str(lab.server.key),
            "ssl_client_certificate": str(lab.device_cas), "proxy_set_header X-Configserver-Proxy-Secret": secret,
        })
        static, count = re.subn(r"location / \{.*?\n    \}", f"location / {{ root {folder / 'htdocs'}; try_files /static.txt =404; }}",
                                sample, count=1, flags=re.DOTALL)
        assert count == 1, "the nginx sample's location / changed: adapt bench/terminator.py"
        write_secret_file(folder / "configserver.conf", static)
        (folder / "nginx.conf").write_text(nginx_main_conf(folder, folder / "configserver.conf"))
        command = ["nginx", "-p", f"{folder}/", "-c", str(folder / "nginx.conf"), "-e", str(folder / "logs" / "error.log")]
        server = Server(f"{kind} static", command, [folder / "logs" / "error.log"])
    else:
        sample = fill_in((DEPLOY / "apache" / "configserver.conf").read_text(), {
            "Define CONFIGSERVER_ADDRESS": "127.0.0.1", "Define CONFIGSERVER_PORT": str(port),
            "Define CONFIGSERVER_NAME": "localhost", "Define CONFIGSERVER_CERT": str(lab.server.cert),
            "Define CONFIGSERVER_KEY": str(lab.server.key), "Define CONFIGSERVER_DEVICE_CAS": str(lab.device_cas),
            "Define CONFIGSERVER_BACKEND": "unix:/nonexistent.sock|http://localhost/",
            "Define CONFIGSERVER_PROXY_SECRET": secret,
        })
        static, count = re.subn(r"^    ProxyPass / .*$",
                                f'    AliasMatch ^/ "{folder / "htdocs" / "static.txt"}"\n'
                                f'    <Directory "{folder / "htdocs"}">\n        Require all granted\n    </Directory>',
                                sample, count=1, flags=re.MULTILINE)
        assert count == 1, "the Apache sample's ProxyPass changed: adapt bench/terminator.py"
        write_secret_file(folder / "configserver.conf", static)
        main = apache_main_conf(folder, folder / "configserver.conf").replace(
            "LoadModule headers_module", f"LoadModule alias_module /usr/lib/apache2/modules/mod_alias.so\nLoadModule headers_module")
        (folder / "apache2.conf").write_text(main)
        env = {**os.environ, "APACHE_LOG_DIR": str(folder / "logs")}
        command = ["apache2", "-d", str(folder), "-f", str(folder / "apache2.conf"), "-DFOREGROUND"]
        server = Server(f"{kind} static", command, [folder / "logs" / "error.log"], env)
    return Started(_start(server, folder, port), port, folder / "configserver.conf")


CONSTANT_APP = f"""
import sys

import uvicorn

from configserver.limits import AnsweredAtOnce
from configserver.settings import Settings
from configserver.tls import uvicorn_options

BODY = {STATIC.encode()!r}
HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(BODY)),
           (b"cache-control", b"no-store")]


class Constant:
    # the same answer to every request, given at once as the app answers a poll

    def answer_at_once(self, scope):
        return AnsweredAtOnce(200, HEADERS, BODY, self.then)

    def then(self):
        pass

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
            await send({{"type": "http.response.body", "body": BODY}})


# served as `configserver serve` serves: uvicorn with the listener's protocol and limits
uvicorn.run(Constant(), uds=sys.argv[1], access_log=False, server_header=False, log_level="warning",
            proxy_headers=False, **uvicorn_options(Settings()))
"""


class Floor(NamedTuple):
    """A constant answer, served the way the app is (uvicorn with the listener's protocol and
    limits, configserver/limits.py): what serving costs before the poll's own work."""

    server: Server
    uds: Path
    port: int | None = None


def start_floor(root: Path) -> Floor:
    folder = _readable_dir(root / "floor", 0o750)
    _give_to_terminator_group(folder)
    (folder / "constant_app.py").write_text(CONSTANT_APP)
    uds = folder / "app.sock"
    server = Server("constant app", [sys.executable, str(folder / "constant_app.py"), str(uds)], [],
                    {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")})
    server.start(folder / "output.log")
    server.wait_until(uds.exists, "its unix socket")
    return Floor(server, uds)


# -- measuring -------------------------------------------------------------------------------------

def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and every process below it (and the children they have reaped)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        fields = stats.get(current)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15])
        pending.extend(children.get(current, ()))
    return total / os.sysconf("SC_CLK_TCK")


def s_time(port: int, path: str, lab: TLSLab, clients: int, seconds: float) -> tuple[int, float]:
    """Fresh mutual-TLS handshakes, one openssl s_time per device certificate: (requests, wall seconds)."""
    devices = list(lab.devices.values())[:clients]
    started = time.perf_counter()
    runs = [subprocess.Popen(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(int(seconds)),
         "-cert", str(device.cert), "-key", str(device.key), "-CAfile", str(lab.server_ca), "-www", path],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for device in devices]
    outputs = [run.communicate()[0] for run in runs]
    wall = time.perf_counter() - started
    total = 0
    for output in outputs:
        found = re.search(r"(\d+) connections in [\d.]+s", output)
        if not found:
            raise RuntimeError(f"openssl s_time said:\n{output[-2000:]}")
        total += int(found.group(1))
    return total, wall


def measure(pids: list[int], port: int, path: str, lab: TLSLab, clients: int, seconds: float) -> tuple[float, float, float]:
    """(server CPU seconds per request, requests per second, the last pid's share of that CPU)."""
    s_time(port, path, lab, clients, 2)   # warm-up: workers started, files and templates cached
    before = [tree_cpu(pid) for pid in pids]
    requests, wall = s_time(port, path, lab, clients, seconds)
    used = [tree_cpu(pid) - start for pid, start in zip(pids, before)]
    return sum(used) / requests, requests / wall, used[-1] / requests


async def _keep_alive(uds: Path, requests: list[bytes], n: int, connections: int) -> None:
    async def one(count: int, offset: int) -> None:
        reader, writer = await asyncio.open_unix_connection(str(uds))
        for i in range(count):
            writer.write(requests[(i + offset) % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the app answered {head[:60]!r}")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
    await asyncio.gather(*(one(n // connections, k) for k in range(connections)))


def keep_alive_cpu(app_pid: int, uds: Path, lab: TLSLab, secret: str, n: int) -> float:
    """The app's CPU per poll with keep-alive connections straight to its socket, nginx's headers."""
    requests = []
    for hwid, device in lab.devices.items():
        pem = device.issued.cert_pem.decode()
        subject = device.issued.certificate.subject.rfc4514_string()
        issuer = device.issued.certificate.issuer.rfc4514_string()
        requests.append((
            "GET /init HTTP/1.1\r\nHost: localhost\r\nX-SSL-Client-Verify: SUCCESS\r\n"
            f"X-SSL-Client-S-DN: {subject}\r\nX-SSL-Client-I-DN: {issuer}\r\nX-SSL-Client-S-DN-CN: {hwid}\r\n"
            f"X-SSL-Client-Cert: {urllib.parse.quote(pem, safe='')}\r\nX-Forwarded-For: 127.0.0.1\r\n"
            f"X-Real-IP: 127.0.0.1\r\nX-Configserver-Proxy-Secret: {secret}\r\n\r\n").encode())
    asyncio.run(_keep_alive(uds, requests, 2000, 4))   # warm-up
    best = float("inf")
    for _ in range(3):
        before = tree_cpu(app_pid)
        asyncio.run(_keep_alive(uds, requests, n, 4))
        best = min(best, (tree_cpu(app_pid) - before) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default="nginx,apache")
    parser.add_argument("--keep-alive-polls", type=int, default=20000)
    args = parser.parse_args()
    if not shutil.which("openssl"):
        sys.exit("needs openssl")
    root = Path(tempfile.mkdtemp(prefix="configserver-bench-"))
    root.chmod(0o755)
    stop: list[Server] = []
    try:
        lab = make_lab(root, max(args.clients, 8))
        site = make_site(root)
        secret = new_proxy_secret()
        results: dict[str, dict[str, tuple[float, float, float]]] = {}
        app = start_app("bench", root, site, lab, secret, uds=True)
        stop.append(app.server)
        app_pid = app.server.process.pid
        floor = start_floor(root)
        stop.append(floor.server)
        floor_pid = floor.server.process.pid
        for kind in args.kinds.split(","):
            starter = {"nginx": start_nginx, "apache": start_apache}[kind]
            proxied = starter(kind, root, lab, app, secret)
            stop.append(proxied.server)
            to_floor = starter(f"{kind}-floor", root, lab, floor, secret)
            stop.append(to_floor.server)
            static = start_static(kind, root, lab, secret)
            stop.append(static.server)
            best: dict[str, tuple[float, float, float]] = {}
            for _ in range(args.rounds):   # alternate, keep the best of each: the machine is shared
                for name, started, path, pids in (
                    ("static", static, "/static.txt", [static.server.process.pid]),
                    ("poll", proxied, "/init", [proxied.server.process.pid, app_pid]),
                    ("floor", to_floor, "/init", [to_floor.server.process.pid, floor_pid]),
                ):
                    cpu, rate, app_cpu = measure(pids, started.port, path, lab, args.clients, args.seconds)
                    old = best.get(name)
                    if old is None or cpu < old[0]:
                        old = (cpu, old[1] if old else 0.0, app_cpu)
                    best[name] = (old[0], max(rate, old[1]), old[2])
            results[kind] = best
            for server in (proxied.server, to_floor.server, static.server):
                server.stop()
        keep_alive = keep_alive_floor = float("inf")
        for _ in range(args.rounds):   # alternate, keep the best of each
            keep_alive = min(keep_alive, keep_alive_cpu(app_pid, app.uds, lab, secret, args.keep_alive_polls))
            keep_alive_floor = min(keep_alive_floor, keep_alive_cpu(floor_pid, floor.uds, lab, secret,
                                                                    args.keep_alive_polls))
    finally:
        for server in stop:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nfresh mutual-TLS handshake per request, openssl s_time -new, {args.clients} clients, "
          f"{args.seconds:g} s, best of {args.rounds}; server CPU from /proc")
    print(f"  {'':28} {'CPU/request':>12} {'of it the app':>14} {'requests/s':>11} {'CPU ratio':>10} {'rate ratio':>11}")
    for kind, best in results.items():
        static_cpu, static_rate, _ = best["static"]
        poll_cpu, poll_rate, app_cpu = best["poll"]
        print(f"  {kind + ', static 1 KB file':28} {static_cpu * 1e6:9.0f} us {'':14} {static_rate:11.0f}")
        for name, label in (("poll", " -> configserver"), ("floor", " -> constant answer")):
            cpu, rate, app_cpu = best[name]
            print(f"  {kind + label:28} {cpu * 1e6:9.0f} us {app_cpu * 1e6:11.0f} us {rate:11.0f} "
                  f"{cpu / static_cpu:9.2f}x {rate / static_rate:10.2f}x")
    print(f"\nkeep-alive straight to the app (unix socket, nginx's headers, 4 connections): "
          f"{keep_alive * 1e6:.0f} us of app CPU per poll; the constant answer: {keep_alive_floor * 1e6:.0f} us")


if __name__ == "__main__":
    main()
