"""SIGTERM while devices poll: `configserver serve` on the built-in listener finishes every poll
it has taken in, whole, before it exits (systemd's stop, a restart, a deploy)."""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from ports import free_port

from configserver.lab import LabDevice, create_lab, poll

END = b"# end of script\r\n"
# Rendering this takes a good fraction of a second, so that polls are still being answered
# when the signal comes; the marker shows that an answer arrived whole.
SLOW_TAIL = "{% for i in range(4000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}# end of script\n"


class Poll(threading.Thread):
    """One device's poll on its own connection; `sent` is set once the request is on its way."""

    def __init__(self, device: LabDevice, port: int, server_ca: Path) -> None:
        super().__init__(daemon=True)
        self.device, self.port = device, port
        self.context = ssl.create_default_context(cafile=str(server_ca))
        self.context.load_cert_chain(device.cert, device.key)
        self.sent = threading.Event()
        self.answer: tuple[int, bytes] | BaseException | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=60)
            connection.request("GET", "/")
            self.sent.set()
            response = connection.getresponse()
            self.answer = (response.status, response.read())
            connection.close()
        except BaseException as exc:  # recorded, and reported by the test
            self.answer = exc
        self.finished_at = time.monotonic()


def test_polls_in_flight_when_sigterm_arrives_finish_with_complete_scripts(tmp_path: Path) -> None:
    lab = create_lab(tmp_path / "lab")
    for template in lab.templates.rglob("*.j2"):
        template.write_text(template.read_text() + SLOW_TAIL)
    with lab.config.open("a") as config:
        config.write("\napply_once = false\n")  # the marker stays the last line
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGSERVER_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "configserver", "--config", str(lab.config), "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    try:
        accepted = [device for device in lab.devices if device.accepted]
        warm, devices = accepted[0], accepted[1:]
        assert len(devices) >= 3
        deadline = time.monotonic() + 30
        while True:  # up, and its first render done
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                poll(f"https://127.0.0.1:{port}/", cert=warm.cert, key=warm.key, server_ca=lab.server_ca)
                break
            except Exception:
                time.sleep(0.2)

        polls = [Poll(device, port, lab.server_ca) for device in devices]
        for each in polls:
            each.start()
        for each in polls:
            assert each.sent.wait(30), f"{each.device.name}: request not sent"
        # every request is on its way: being answered, read and waiting its turn, or still unread
        server.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        for each in polls:
            each.join(60)
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    for each in polls:
        assert isinstance(each.answer, tuple), f"{each.device.name}: {each.answer!r}\n{log.read_text()}"
        status, body = each.answer
        assert status == 200 and body.endswith(END), (each.device.name, status, body[-200:])
    # the signal really came while polls were being answered
    assert max(each.finished_at for each in polls) > signalled_at
    assert server.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Shutting down" in log.read_text()

