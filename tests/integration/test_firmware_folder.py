"""The firmware folder samples, run by the real servers: a device fetches the file its firmware
line names, from the folder the sample serves, and nothing else is served on that port."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from terminator_lab import (
    DEPLOY,
    Server,
    apache_main_conf,
    fill_in,
    find_binary,
    free_port,
    lighttpd_main_conf,
    nginx_main_conf,
    running_as_root,
    tcp_open,
)

from configserver.firmware import AT_ONCE, decide, resolve

SAMPLES = {
    "apache": "apache/configserver-firmware.conf",
    "nginx": "nginx/configserver-firmware.conf",
    "lighttpd": "lighttpd/51-configserver-firmware.conf",
}


def need(binary: str | None, what: str) -> str:
    if binary:
        return binary
    message = f"{what} is not installed (scripts/install-test-servers installs it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def start(kind: str, root: Path, www: Path, port: int) -> Server:
    """The server `kind` from its firmware sample, its marked values filled in for this test."""
    for sub in ("logs", "run", "tmp", "htdocs"):
        _folder(root / sub)
    if running_as_root():
        for sub in ("logs", "tmp"):
            shutil.chown(root / sub, user="www-data", group="www-data")
    site = root / Path(SAMPLES[kind]).name
    sample = (DEPLOY / SAMPLES[kind]).read_text()
    if kind == "apache":
        binary = need(find_binary("apache2"), "apache2")
        site.write_text(fill_in(sample, {
            "Define CONFIGSERVER_FIRMWARE_ADDRESS": "127.0.0.1", "Define CONFIGSERVER_FIRMWARE_PORT": str(port),
            "Define CONFIGSERVER_FIRMWARE_NAME": "localhost", "Define CONFIGSERVER_FIRMWARE_ROOT": str(www),
        }))
        (root / "apache2.conf").write_text(apache_main_conf(root, site))
        command = [binary, "-d", str(root), "-f", str(root / "apache2.conf"), "-DFOREGROUND"]
        return Server(kind, command, [root / "logs" / "error.log"], {**os.environ, "APACHE_LOG_DIR": str(root / "logs")})
    if kind == "nginx":
        binary = need(find_binary("nginx"), "nginx")
        site.write_text(fill_in(sample, {"listen": f"127.0.0.1:{port}", "server_name": "localhost", "root": str(www)}))
        (root / "nginx.conf").write_text(nginx_main_conf(root, site))
        command = [binary, "-p", f"{root}/", "-c", str(root / "nginx.conf"), "-e", str(root / "logs" / "error.log")]
        return Server(kind, command, [root / "logs" / "error.log"])
    binary = need(find_binary("lighttpd"), "lighttpd")
    site.write_text(fill_in(sample, {
        "var.configserver_firmware_listen": f'"127.0.0.1:{port}"', "var.configserver_firmware_root": f'"{www}"',
    }))
    (root / "lighttpd.conf").write_text(lighttpd_main_conf(root, site, free_port()))
    return Server(kind, [binary, "-D", "-f", str(root / "lighttpd.conf")], [root / "logs" / "error.log"])


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


@pytest.mark.parametrize("kind", ["apache", "nginx", "lighttpd"])
def test_a_device_fetches_the_file_its_firmware_line_names_from_the_sample_folder(kind, lab_root):
    root = _folder(lab_root / f"firmware-{kind}")
    www = _folder(root / "www")
    image = secrets.token_bytes(256 * 1024)
    _folder(_folder(www / "firmware") / "13.4711")
    for name, data in (("ip232.bin", image), ("boot232.bin", image[::-1])):
        (www / "firmware" / "13.4711" / name).write_bytes(data)
        (www / "firmware" / "13.4711" / name).chmod(0o644)
    port = free_port()
    server = start(kind, root, www, port).start(root / "logs" / "output.log")
    try:
        server.wait_until(lambda: tcp_open(port), f"its firmware port {port}")
        declaration = resolve([("default.toml", {"url": f"http://127.0.0.1:{port}/firmware/",
                                                 "prot": "13.4711", "boot": "13.4711"})])
        answer = decide(declaration, "IP232", {"CHECK": "applied", "PROT": "13.4000", "BOOT": "13.4000"},
                        AT_ONCE, dt.datetime.now(dt.UTC))
        urls = [line.split()[4] for line in answer.lines if line.startswith("mod cmd UP0")]
        assert sorted(urls) == [f"http://127.0.0.1:{port}/firmware/13.4711/boot232.bin",
                                f"http://127.0.0.1:{port}/firmware/13.4711/ip232.bin"]
        assert [fetch(url) for url in sorted(urls)] == [(200, image[::-1]), (200, image)]
        # nothing but the files: no listing, no file outside firmware/, no missing file
        (www / "notes.txt").write_text("not for devices")
        (www / "notes.txt").chmod(0o644)
        assert fetch(f"http://127.0.0.1:{port}/firmware/13.4711/ip222.bin")[0] == 404
        assert fetch(f"http://127.0.0.1:{port}/firmware/13.4711/")[0] in (403, 404)
        if kind != "apache":   # Apache serves its DocumentRoot: the sample says to keep only firmware/ there
            assert fetch(f"http://127.0.0.1:{port}/notes.txt")[0] in (403, 404)
    finally:
        server.stop()
