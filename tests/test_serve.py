"""configserver serve as ops run it: several workers behind one port, one set of metrics."""

import glob
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from ports import free_port

HEADERS = {
    "X-SSL-Client-Verify": "SUCCESS",
    "X-SSL-Client-S-DN": "CN=IP232-30-00-af,O=innovaphone,C=DE",
    "X-SSL-Client-I-DN": "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE",
}


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_add_up_every_worker(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates/default.j2").write_text("config change SIP0 /user {{ device.hwid }}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIGSERVER_", "PROMETHEUS_"))}
    env["CONFIGSERVER_GRACE_SECONDS"] = "0"
    before = set(glob.glob("/tmp/configserver-metrics-*"))
    server = subprocess.Popen(
        [sys.executable, "-m", "configserver", "serve", "--port", str(port), "--workers", "2"],
        cwd=tmp_path, env=env, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                if get(port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "serve did not start"
            time.sleep(0.1)
        for _ in range(24):   # fresh connections: both workers answer some of them
            assert get(port, "/", HEADERS)[0] == 200
        status, text = get(port, "/metrics")
        assert status == 200
        assert 'configserver_polls_total{reason="",status="200"} 24.0' in text
        assert get(port, "/metrics", HEADERS)[0] == 404   # not for devices behind a terminator
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert set(glob.glob("/tmp/configserver-metrics-*")) == before  # the workers' files are gone


def test_serve_hands_the_listener_the_app_that_answers_polls_at_once(tmp_path):
    # polls are answered at once only when uvicorn gives the listener's protocol the app itself,
    # with no wrapper of its own in between (proxy_headers, trace logging): limits.AnsweredAtOnce
    import types

    import uvicorn

    from configserver import cli, create_app, load_settings
    from configserver.limits import GuardedHttpToolsProtocol
    from configserver.tls import uvicorn_options

    (tmp_path / "templates").mkdir()
    settings = load_settings(templates=tmp_path / "templates", vars=tmp_path / "vars",
                             database=f"sqlite:///{tmp_path / 'inventory.db'}")
    handed = {}
    runner = types.SimpleNamespace(run=lambda app, **options: handed.update(app=app, options=options))
    cli._run_uvicorn(runner, settings, uvicorn_options(settings), create_app(settings))   # as serve runs it
    config = uvicorn.Config(handed["app"], **dict(handed["options"], log_config=None))
    config.load()
    assert config.http_protocol_class.func is GuardedHttpToolsProtocol
    assert callable(getattr(config.loaded_app, "answer_at_once", None))
