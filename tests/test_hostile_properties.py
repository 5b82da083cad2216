"""Hostile input, generated: whatever arrives, a device only ever gets its own script.

Property-based tests over the header path (in-process, many cases) and the built-in listener
(real TLS, fewer cases). Invariants, for every request:
- a script only for the device whose verified certificate was shown, never another's;
- never a 5xx except `500 # configuration error` (never `internal error`, never a traceback);
- every refusal one of the documented reasons;
- no file opened outside the templates and vars folders while a poll is answered.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import urllib.parse

import pytest
from driving import call, terminator_headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configserver.refusals import REASONS

ANSWERED = {"no configuration", "configuration error", "method not allowed"}
DEVICES = ("IP232-30-00-af", "IP1202-35-fe-4d", "IP222-30-00-b0", "IP232-30-00-b1", "IP232-30-00-b2")
HEADER_NAMES = ("X-SSL-Client-Verify", "X-SSL-Client-S-DN", "X-SSL-Client-I-DN", "X-SSL-Client-Cert",
                "X-Forwarded-For", "X-Real-IP", "X-Configserver-Proxy-Secret")

# -- files opened while a poll is answered --------------------------------------------------------

# what a poll may open besides the two folders: code being imported, the time zone database
ALLOWED = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/share/zoneinfo")}
                | {os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "configserver"))})
_watching = threading.local()
_opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and getattr(_watching, "on", False) and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def polled(app, *args, **kwargs):
    """`call`, noting every file the poll opens."""
    _opened.clear()
    _watching.on = True
    try:
        return call(app, *args, **kwargs)
    finally:
        _watching.on = False


# -- the site -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile_app(pki, tmp_path_factory, ca_bundle):
    from configserver import create_app, load_settings

    root = tmp_path_factory.mktemp("hostile")
    (root / "templates/devices").mkdir(parents=True)
    (root / "vars/devices").mkdir(parents=True)
    (root / "templates/default.j2").write_text("# for {{ device.hwid }}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    (root / "templates/devices/IP232-30-00-af.j2").write_text(
        "# own {{ device.hwid }} via {{ request.path }} {{ request.query }}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    (root / "vars/default.toml").write_text('pwd = "no-secret"\n')
    for hwid in DEVICES:
        (root / f"vars/devices/{hwid}.toml").write_text(f'pwd = "secret-of-{hwid}"\n')
    app = create_app(load_settings(templates=root / "templates", vars=root / "vars", ca_bundle=ca_bundle,
                                   grace_seconds=0, require_client_cert=True, database="sqlite:///:memory:"))
    app.store.refresh()
    app.recorders.clear()   # the audit is not what is tested here
    return app, root


def certs(pki):
    return {"phone": pki.phone, "gateway": pki.gateway, "broken": pki.broken, "expired": pki.expired,
            "forged": pki.forged, "unrelated": pki.unrelated}


def dn_text() -> st.SearchStrategy[str]:
    parts = st.sampled_from(["C=DE", "O=innovaphone", "CN=IP232-30-00-af", "CN=IP1202-35-fe-4d", "/C=DE/O=innovaphone",
                             "OU=innovaphone Device Certification Authority", "CN=IP232-30-00-af\\,O=x", "CN=ІР232-30-00-af",
                             "CN=IP232-30-00-af\n", "CN=#0c0e", "CN=\"a,b\"", "/CN=IP232-30-00-af/"])
    return st.one_of(st.lists(parts, max_size=5).map(", ".join), st.text(max_size=200))


def cert_text(pki) -> st.SearchStrategy[str]:
    pems = [c.cert_pem.decode() for c in certs(pki).values()]
    return st.one_of(
        st.sampled_from(pems).map(lambda pem: pem.replace("\n", " ")),
        st.sampled_from(pems).map(lambda pem: urllib.parse.quote(pem, safe="")),
        st.sampled_from(pems).flatmap(lambda pem: st.integers(0, len(pem)).map(lambda n: pem[:n])),
        st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()),
        st.text(max_size=300),
        st.just("(null)"),
    )


def mutations(pki):
    return st.lists(
        st.tuples(st.sampled_from(HEADER_NAMES), st.one_of(dn_text(), cert_text(pki), st.sampled_from(["SUCCESS", "NONE", "FAILED:21", ""]))),
        max_size=3,
    )


QUERY_KEYS = st.sampled_from(["hwid", "HWID", "sn", "Sn", "mac", "CHECK", "ver", "PROT", "x", ""])
QUERY_VALUES = st.one_of(st.sampled_from(list(DEVICES) + ["0090333000af", "00:90:33:35:fe:4d", "a%0airesetn"]),
                         st.text(max_size=40))
PATHS = st.one_of(st.sampled_from(["/", "/update", "/../../etc/passwd", "/templates/default.j2", "/%2e%2e/x",
                                   "/metrics", "/healthz"]),
                  st.text(min_size=0, max_size=60).map(lambda t: "/" + t))


def query_string(pairs) -> str:
    return urllib.parse.urlencode(pairs)


def check_invariants(answer, shown_hwid: str | None, opened: list[str], root) -> None:
    text = answer.body.decode("utf-8", "replace")
    assert answer.status in (200, 403, 404, 405, 500) or answer.status == 200, answer.status
    if answer.status == 500:
        assert text == "# configuration error\n", text
    if answer.status == 403:
        assert text.startswith("# ") and text[2:-1] in REASONS, text
    for hwid in DEVICES:
        if f"secret-of-{hwid}" in text:
            assert answer.status == 200 and hwid == shown_hwid, (hwid, shown_hwid, text)
    if answer.status == 200 and shown_hwid is not None:
        assert f"secret-of-{shown_hwid}" in text
    for path in opened:
        assert os.path.realpath(path).startswith(ALLOWED + (str(root),)), path


GOOD = {"phone": "IP232-30-00-af", "gateway": "IP1202-35-fe-4d", "broken": "IP222-30-00-b0"}


def shown_device(pki, header: str) -> str | None:
    """The hwid of the valid device certificate `header` carries, in whatever encoding, else None."""
    from configserver.certificates import CertificateError, decode_forwarded_cert

    try:
        der = decode_forwarded_cert(header).tbs_certificate_bytes
    except (CertificateError, ValueError):
        return None
    return next((GOOD[name] for name in GOOD if certs(pki)[name].certificate.tbs_certificate_bytes == der), None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_header_path_never_gives_another_devices_script(hostile_app, pki, data):
    app, root = hostile_app
    who = data.draw(st.sampled_from(sorted(certs(pki))))
    style = data.draw(st.sampled_from(["apache", "nginx", "lighttpd", "haproxy", "dn-only"]))
    headers = terminator_headers(certs(pki)[who], style)
    for name, value in data.draw(mutations(pki)):
        if data.draw(st.booleans()):
            headers = [(k, v) for k, v in headers if k != name]
        headers.append((name, value))
    path = data.draw(PATHS)
    pairs = data.draw(st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4))
    method = data.draw(st.sampled_from(["GET", "GET", "POST"]))
    try:
        headers = [(k, v.encode("latin-1", "replace").decode("latin-1")) for k, v in headers]
        answer = polled(app, path, headers, query=query_string(pairs), method=method)
    except UnicodeEncodeError:
        return
    if path in ("/metrics", "/healthz"):
        return
    # the only device that may be served is the one whose valid certificate was forwarded, alone
    cert_headers = [v for k, v in headers if k == "X-SSL-Client-Cert"]
    shown = shown_device(pki, cert_headers[0]) if len(cert_headers) == 1 else None
    check_invariants(answer, shown if answer.status == 200 else None, list(_opened), root)
    if answer.status == 200:
        assert shown is not None, (who, style, headers)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 300_000), name=st.sampled_from(HEADER_NAMES + ("X-Junk",)))
def test_header_sizes_change_nothing(hostile_app, pki, size, name):
    app, root = hostile_app
    headers = terminator_headers(pki.phone, "nginx") + [(name, "A" * size)]
    answer = polled(app, "/", headers)
    check_invariants(answer, "IP232-30-00-af" if answer.status == 200 else None, list(_opened), root)


# -- the built-in listener, over real TLS ---------------------------------------------------------

from test_tls import built_in_tls, device_context, files, get  # noqa: E402,F401  (fixtures and helpers)

SAFE_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e, exclude_characters="%#?"),
                    max_size=40)


@pytest.fixture(scope="module")
def builtin_port(files, pki, tmp_path_factory):
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("hostile-tls")
    (root / "templates").mkdir()
    (root / "vars/devices").mkdir(parents=True)
    (root / "templates/default.j2").write_text(
        "# for {{ device.hwid }} at {{ request.path }}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    (root / "vars/default.toml").write_text('pwd = "no-secret"\n')
    for hwid in DEVICES:
        (root / f"vars/devices/{hwid}.toml").write_text(f'pwd = "secret-of-{hwid}"\n')
    site = SimpleNamespace(root=root, templates=root / "templates", vars=root / "vars")
    with built_in_tls(files, site) as port:
        yield port


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(who=st.sampled_from(["phone", "gateway", "broken"]), path=SAFE_TEXT,
       pairs=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3),
       spoof=st.sampled_from(["IP232-30-00-af", "IP1202-35-fe-4d", "IP232-30-00-b1"]))
def test_builtin_listener_never_gives_another_devices_script(builtin_port, files, pki, who, path, pairs, spoof):
    device = certs(pki)[who]
    spoofed = {"X-SSL-Client-Verify": "SUCCESS", "X-SSL-Client-S-DN": f"CN={spoof},O=innovaphone,C=DE",
               "X-SSL-Client-I-DN": "OU=innovaphone Device Certification Authority,O=innovaphone,C=DE"}
    target = "/" + urllib.parse.quote(path) + ("?" + query_string(pairs) if pairs else "")
    [(status, body)] = get(builtin_port, device_context(files, device), target, headers=spoofed)
    text = body.decode("utf-8", "replace")
    assert status in (200, 403), (status, text)
    if status == 403:
        assert text == "# device mismatch\n", text
    for hwid in DEVICES:
        if f"secret-of-{hwid}" in text:
            assert hwid == GOOD[who]
    if status == 200:
        assert f"secret-of-{GOOD[who]}" in text


def test_metrics_are_not_served_over_the_built_in_listener(builtin_port, files, pki):
    [(status, body)] = get(builtin_port, device_context(files, pki.phone), "/metrics")
    assert (status, body) == (404, b"# not found\n")
