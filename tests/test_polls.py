"""A device polls through a terminator and gets its own script; nothing else gets anything."""

import asyncio
import json
import logging

import pytest
from driving import acall, call, terminator_headers
from prometheus_client import CONTENT_TYPE_LATEST

from configserver.apply_once import digest


def applied(script: str) -> str:
    """The whole answer to a device that has not applied `script` yet (see test_apply_once.py)."""
    return script + f"config write\r\nconfig activate\r\nmod cmd UP1 check ser {digest(script)}\r\niresetn\r\n"


MODEL = "# model {{ device.model }} for {{ device.hwid }}\nconfig change SIP0 /pwd {{ vars.password }}\n"
OWN = "# own script of {{ device.hwid }}\nconfig change SIP0 /pwd {{ vars.password }}\n"


@pytest.fixture
def app(site):
    site.write("templates/models/IP232.j2", MODEL)
    site.write("templates/devices/IP232-30-00-af.j2", OWN)
    site.write("templates/models/IP1202.j2", MODEL)
    site.write("templates/devices/IP222-30-00-b0.j2", OWN)
    site.write("vars/default.toml", 'password = "default-secret"\n')
    site.write("vars/devices/IP232-30-00-af.toml", 'password = "phone-secret"\n')
    return site.app()


@pytest.mark.parametrize("style", ["apache", "nginx", "lighttpd", "haproxy", "dn-only"])
def test_device_gets_its_own_script_through_every_terminator(app, pki, style):
    answer = call(app, "/init", terminator_headers(pki.phone, style))
    assert answer.status == 200, answer.text
    assert answer.text == applied("# own script of IP232-30-00-af\r\nconfig change SIP0 /pwd phone-secret\r\n")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.headers["cache-control"] == "no-store"


def test_other_device_of_the_model_gets_the_model_script(app, pki, ca_bundle):
    other = pki.ca1.issue_device("IP232-30-00-c4")
    answer = call(app, "/", terminator_headers(other))
    assert answer.status == 200
    assert answer.text == applied("# model IP232 for IP232-30-00-c4\r\nconfig change SIP0 /pwd default-secret\r\n")


def test_device_from_second_ca_is_served(app, pki):
    answer = call(app, "/", terminator_headers(pki.gateway, "nginx"))
    assert answer.status == 200
    assert "IP1202-35-fe-4d" in answer.text


def test_broken_early_cn_is_served_under_its_fixed_name(app, pki):
    answer = call(app, "/", terminator_headers(pki.broken, "lighttpd"))
    assert answer.status == 200
    assert answer.text.startswith("# own script of IP222-30-00-b0\r\n")


def test_head_answers_headers_only(app, pki):
    answer = call(app, "/", terminator_headers(pki.phone), method="HEAD")
    assert answer.status == 200 and answer.body == b""
    assert int(answer.headers["content-length"]) > 0


@pytest.mark.parametrize("way", ["listener", "asgi"])
@pytest.mark.parametrize("method", ["PUT", "OPTIONS", "DELETE"])
def test_other_methods_are_refused_saying_which_are_allowed(app, pki, method, way):
    answer = asyncio.run(acall(app, "/", terminator_headers(pki.phone), method=method, way=way))
    assert (answer.status, answer.headers.get("allow")) == (405, "GET, HEAD")   # RFC 9110 15.5.6


# -- every refusal reason, in the order the checks run ------------------------------------

def refused(answer, reason):
    assert answer.status == 403, answer.text
    assert answer.text == f"# {reason}\n"
    assert "secret" not in answer.text


def test_untrusted_proxy_is_refused_whatever_it_carries(app, pki):
    refused(call(app, "/", terminator_headers(pki.phone), client=("192.0.2.7", 5000)), "untrusted proxy")
    refused(call(app, "/", [], client=("192.0.2.7", 5000)), "untrusted proxy")


def test_unix_socket_peer_is_trusted(app, pki):
    answer = call(app, "/", terminator_headers(pki.phone), client=None, server=("/run/configserver/app.sock", None))
    assert answer.status == 200


def test_trusted_proxies_setting_admits_other_networks(site, pki):
    site.write("templates/default.j2", "ok\n")
    app = site.app(trusted_proxies="10.0.0.0/8, 192.0.2.7")
    assert call(app, "/", terminator_headers(pki.phone), client=("192.0.2.7", 1)).status == 200
    assert call(app, "/", terminator_headers(pki.phone), client=("10.9.8.7", 1)).status == 200
    refused(call(app, "/", terminator_headers(pki.phone), client=("127.0.0.1", 1)), "untrusted proxy")


@pytest.mark.parametrize("name", ["X-SSL-Client-Verify", "X-SSL-Client-S-DN", "X-SSL-Client-I-DN", "x-ssl-client-cert"])
def test_identity_header_sent_twice_is_refused(app, pki, name):
    headers = terminator_headers(pki.phone)
    smuggled = [(name, dict(terminator_headers(pki.gateway)).get(name.title().replace("Ssl", "SSL").replace("-Dn", "-DN"), "x"))]
    refused(call(app, "/", smuggled + headers), "duplicate header")


def test_a_duplicate_header_refusal_names_the_client_the_terminator_named(app, pki, tmp_path):
    # for fail2ban: the client, not the terminator (which is in its ignoreip, or would be banned)
    from configserver import securitylog
    headers = [("X-SSL-Client-Verify", "SUCCESS"), *terminator_headers(pki.phone), ("X-Forwarded-For", "198.51.100.9")]
    securitylog.configure(tmp_path / "security.log")
    try:
        refused(call(app, "/", headers), "duplicate header")
    finally:
        securitylog.configure(None)
    assert [line.split()[3] for line in (tmp_path / "security.log").read_text().splitlines()] == ["client=198.51.100.9"]


def test_no_certificate_facts_means_https_required(app):
    refused(call(app, "/", [("User-Agent", "innovaphone")]), "https required")


@pytest.mark.parametrize("verify", ["NONE", "GENEROUS", "FAILED:unable to verify the first certificate", "success", ""])
def test_anything_but_success_is_not_verified(app, pki, verify):
    headers = [("X-SSL-Client-Verify", verify)] + terminator_headers(pki.phone)[1:]
    refused(call(app, "/", headers), "certificates not verified")


def test_missing_verify_header_is_not_verified(app, pki):
    refused(call(app, "/", terminator_headers(pki.phone)[1:]), "certificates not verified")


def test_certificate_from_a_foreign_ca_is_wrong_ca(app, pki):
    refused(call(app, "/", terminator_headers(pki.unrelated)), "wrong CA")
    refused(call(app, "/", terminator_headers(pki.unrelated, "lighttpd")), "wrong CA")


def test_no_issuer_and_no_certificate_is_wrong_ca(app, pki):
    headers = [("X-SSL-Client-Verify", "SUCCESS"), ("X-SSL-Client-S-DN", "C = DE, O = innovaphone, CN = IP232-30-00-af")]
    refused(call(app, "/", headers), "wrong CA")


@pytest.mark.parametrize(
    "subject",
    [
        "CN=IP232-30-00-af,O=Other,C=DE",
        "CN=IP232-30-00-af,O=innovaphone,C=US",
        "CN=IP232-30-00-af,CN=IP232-30-00-b0,O=innovaphone,C=DE",
        "CN=IP232-30-00-af+OU=x,O=innovaphone,C=DE",
        "O=innovaphone,C=DE",
        "C=DE,O=innovaphone,CN=IP232-30-00-af",   # RFC 4514 order reversed: root last
        "this is no DN",
    ],
)
def test_subject_that_is_not_an_innovaphone_device(app, pki, subject):
    headers = terminator_headers(pki.phone, "dn-only")
    headers[1] = ("X-SSL-Client-S-DN", subject)
    refused(call(app, "/", headers), "not an innovaphone device")


@pytest.mark.parametrize("cn", ["IP232-30-00-zz", "..%2F..%2Fetc", "IP232-30-00-\u0430f", "IP232-30-00-af\\ ", "../../x-30-00-af"])
def test_cn_that_is_no_device_name(app, pki, cn):
    headers = terminator_headers(pki.phone, "dn-only")
    headers[1] = ("X-SSL-Client-S-DN", f"CN={cn},O=innovaphone,C=DE".encode().decode("latin-1"))
    refused(call(app, "/", headers), "invalid device name")


def test_forged_ca_certificate_with_genuine_dns_is_a_mismatch(app, pki):
    # The forged CA has CA 1's exact name: only the signature tells them apart.
    refused(call(app, "/", terminator_headers(pki.forged)), "certificate mismatch")
    refused(call(app, "/", terminator_headers(pki.forged, "lighttpd")), "certificate mismatch")


def test_expired_certificate_is_a_mismatch(app, pki):
    refused(call(app, "/", terminator_headers(pki.expired, "haproxy")), "certificate mismatch")


def test_certificate_of_another_device_under_these_dns_is_a_mismatch(app, pki):
    headers = terminator_headers(pki.phone)
    headers[3] = terminator_headers(pki.gateway)[3]
    refused(call(app, "/", headers), "certificate mismatch")


def test_undecodable_certificate_is_a_mismatch(app, pki):
    headers = terminator_headers(pki.phone)
    headers[3] = ("X-SSL-Client-Cert", "-----BEGIN CERTIFICATE----- bm9wZQ== -----END CERTIFICATE-----")
    refused(call(app, "/", headers), "certificate mismatch")


def test_require_client_cert_refuses_dn_only_polls(site, pki):
    site.write("templates/default.j2", "ok\n")
    app = site.app(require_client_cert=True)
    refused(call(app, "/", terminator_headers(pki.phone, "dn-only")), "certificate mismatch")
    assert call(app, "/", terminator_headers(pki.phone)).status == 200


def test_forwarded_certificate_without_ca_bundle_is_refused(site, pki):
    site.write("templates/default.j2", "ok\n")
    app = site.app(ca_bundle=None)
    refused(call(app, "/", terminator_headers(pki.phone)), "certificate mismatch")


@pytest.mark.parametrize("query", ["hwid=IP232-30-00-b0", "sn=0090333000b0", "mac=00-90-33-30-00-b0", "hwid=IP232-30-00-af&hwid=IP1202-35-fe-4d"])
def test_query_naming_another_device_is_a_device_mismatch(app, pki, query):
    refused(call(app, "/", terminator_headers(pki.phone), query=query), "device mismatch")


@pytest.mark.parametrize("query", [
    "hw%00id=IP232-30-00-b0",                       # a control character in the name
    "hwid=IP232-30-00-af&hw%01id=IP232-30-00-b0",   # ... a second value for the name checked
    "s%1Fn=009033300ab0",
    "hwid=IP232-30-00-%00b0",                       # ... in the value
])
def test_a_query_naming_another_device_behind_control_characters_is_a_device_mismatch(site, pki, query):
    # the check and the template see the same names and values: control characters dropped from both
    site.write("templates/default.j2", "hwid={{ request.query.hwid }} sn={{ request.query.sn }}\n")
    refused(call(site.app(apply_once=False), "/", terminator_headers(pki.phone), query=query), "device mismatch")


def test_a_query_with_control_characters_reaches_the_template_without_them(site, pki):
    site.write("templates/default.j2", "{{ request.query | dictsort }}\n")
    answer = call(site.app(apply_once=False), "/", terminator_headers(pki.phone), query="hw%0Aid=IP232-30-00-af&t%7Fype=a%0Db")
    assert answer.text == "[('hwid', 'IP232-30-00-af'), ('type', 'ab')]\r\n"


def test_query_in_innovaphone_form_naming_the_device_itself_is_served(app, pki):
    query = "sn=0090333000AF&hwid=IP232-30-00-AF&type=IP232&CHECK=&PROT=13r3"
    assert call(app, "/", terminator_headers(pki.phone), query=query).status == 200


# -- answers when the content is missing or broken ----------------------------------------

def test_no_template_is_404(site, pki):
    answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.status == 404
    assert answer.text == "# no configuration for IP232-30-00-af\n"


@pytest.mark.parametrize(
    "template, where",
    [
        ("line one\n{% if %}\n", "syntax error"),
        ("line one\n{{ vars.nope }}\n", "nope"),
        ("line one\n{% include 'common/missing.j2' %}\n", "common/missing.j2"),
        ("{{ 1 / 0 }}\n", "ZeroDivisionError"),
    ],
)
def test_broken_template_is_500_and_never_a_partial_script(site, pki, caplog, template, where):
    site.write("templates/devices/IP232-30-00-af.j2", template)
    site.write("templates/default.j2", "fine for {{ device.hwid }}\n")
    app = site.app()
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        answer = call(app, "/", terminator_headers(pki.phone))
    assert answer.status == 500
    assert answer.text == "# configuration error\n"
    record = caplog.records[-1].fields
    assert record["template"] == "devices/IP232-30-00-af.j2"
    assert where in record["detail"]
    assert "devices/IP232-30-00-af.j2:" in record["detail"]  # file and line for the admin
    # other devices are unaffected
    assert call(app, "/", terminator_headers(pki.gateway)).text == applied("fine for IP1202-35-fe-4d\r\n")


def test_error_names_the_line_of_the_included_template(site, pki, caplog):
    site.write("templates/common/sip.j2", "ok\nok\n{{ vars.missing }}\n")
    site.write("templates/default.j2", "first\n{% include 'common/sip.j2' %}\n")
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        assert call(site.app(), "/", terminator_headers(pki.phone)).status == 500
    assert caplog.records[-1].fields["detail"].startswith("common/sip.j2:3: ")


def test_broken_vars_file_is_a_configuration_error(site, pki):
    site.write("templates/default.j2", "{{ vars.x }}\n")
    site.write("vars/default.toml", "x = \n")
    assert call(site.app(), "/", terminator_headers(pki.phone)).status == 500


def test_templates_may_include_and_extend_others(site, pki):
    site.write("templates/base.j2", "head\n{% block body %}{% endblock %}tail\n")
    site.write("templates/parts/sip.j2", "config change SIP0 /user {{ device.hwid }}\n")
    site.write("templates/models/IP232.j2", "{% extends 'base.j2' %}{% block body %}{% include 'parts/sip.j2' %}{% endblock %}")
    answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.text == applied("head\r\nconfig change SIP0 /user IP232-30-00-af\r\ntail\r\n")


def test_every_line_ends_in_crlf_whatever_the_template_file_has(site, pki):
    site.write("templates/default.j2", "a\r\nb\rc\nd")
    assert call(site.app(), "/", terminator_headers(pki.phone)).body == applied("a\r\nb\r\nc\r\nd\r\n").encode()


def test_template_context_carries_device_request_and_time(site, pki):
    site.write(
        "templates/default.j2",
        "{{ device.hwid }} {{ device.mac }} {{ device.model }} {{ device.cn }}\n"
        "{{ device.issuer }}\n{{ device.serial == '%x' % 0 }} {{ device.fingerprint_sha256 | length }}\n"
        "{{ request.path }} {{ request.query.type }} {{ request.client_ip }}\n{{ now.tzinfo }}\n",
    )
    headers = terminator_headers(pki.broken) + [("X-Forwarded-For", "6.6.6.6, 198.51.100.4")]
    answer = call(site.app(), "/phones/update", headers, query="type=IP222&sn=0090333000B0")
    assert answer.text.split("\r\n")[:5] == [
        "IP222-30-00-b0 00-90-33-30-00-b0 IP222 IP222s-30-00-b0",
        "OU=innovaphone Device Certification Authority 2,O=innovaphone,C=DE",
        "False 64",
        "/phones/update IP222 198.51.100.4",   # the right-most X-Forwarded-For entry
        "UTC",
    ]


def test_poll_log_line_has_the_facts_and_never_the_script(app, pki, caplog):
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        answer = call(app, "/init", terminator_headers(pki.phone) + [("X-Forwarded-For", "203.0.113.9")])
    fields = caplog.records[-1].fields
    assert fields["hwid"] == "IP232-30-00-af" and fields["status"] == 200 and fields["client_ip"] == "203.0.113.9"
    assert fields["path"] == "/init" and fields["template"] == "devices/IP232-30-00-af.j2"
    import hashlib
    assert fields["script_sha256"] == hashlib.sha256(answer.body).hexdigest()
    assert "duration_ms" in fields
    assert "phone-secret" not in json.dumps(fields)


def test_refusal_log_line_names_the_reason(app, pki, caplog):
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        call(app, "/", terminator_headers(pki.forged))
    fields = [record for record in caplog.records if record.name == "configserver.poll"][-1].fields
    assert fields["reason"] == "certificate mismatch" and fields["status"] == 403
    assert "not signed" in fields["detail"]


def test_metrics_count_polls_by_reason(app, pki):
    call(app, "/", terminator_headers(pki.phone))
    call(app, "/", terminator_headers(pki.unrelated))
    text = call(app, "/metrics").text
    assert 'configserver_polls_total{reason="",status="200"} 1.0' in text
    assert 'configserver_polls_total{reason="wrong CA",status="403"} 1.0' in text


def test_healthz_is_the_service_own(app):
    answer = call(app, "/healthz", client=("192.0.2.1", 1))
    assert answer.status == 200 and answer.text == "ok\n"


def test_service_routes_answer_get_and_head_and_refuse_other_methods(app):
    head = call(app, "/healthz", method="HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")
    assert call(app, "/metrics").headers["content-type"] == CONTENT_TYPE_LATEST   # what Prometheus reads
    for path in ("/healthz", "/metrics"):
        refused = call(app, path, method="POST")
        assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD")


# -- what is kept between polls ----------------------------------------------------------

def count_renders(app, monkeypatch):
    calls = []
    renderer = app.pipeline.renderer
    render = renderer.render

    def counting(snapshot, template, context):
        calls.append(template)
        return render(snapshot, template, context)

    monkeypatch.setattr(renderer, "render", counting)
    return calls


def test_a_script_that_depends_on_device_and_vars_only_is_rendered_once(site, pki, monkeypatch):
    site.write("templates/default.j2", "config change SIP0 /user {{ device.hwid }} /pwd {{ vars.pwd }}\n")
    site.write("vars/default.toml", 'pwd = "x"\n')
    app = site.app()
    calls = count_renders(app, monkeypatch)
    first = call(app, "/", terminator_headers(pki.phone))
    second = call(app, "/", terminator_headers(pki.phone))
    assert first.body == second.body and len(calls) == 1
    call(app, "/", terminator_headers(pki.gateway))
    assert len(calls) == 2  # another device: its own rendering


@pytest.mark.parametrize(
    "template",
    [
        "# at {{ now }}\n",
        "# polled {{ request.path }}\n",
        "{{ [1, 2] | random }}\n",
        "{{ [[1, 2], [3, 4]] | map('random') | list }}\n",
        "{% include 'parts/' ~ device.model ~ '.j2' ignore missing %}\n",   # named at render time
        "{% include 'parts/ip.j2' %}\n",                                     # an include reads request
    ],
)
def test_a_script_that_reads_the_poll_is_rendered_on_every_poll(site, pki, monkeypatch, template):
    site.write("templates/parts/ip.j2", "# from {{ request.client_ip }}\n")
    site.write("templates/default.j2", template)
    app = site.app()
    calls = count_renders(app, monkeypatch)
    call(app, "/", terminator_headers(pki.phone))
    call(app, "/", terminator_headers(pki.phone))
    assert len(calls) == 2


def test_a_new_certificate_for_the_same_device_is_not_served_the_old_answer(site, pki):
    site.write("templates/default.j2", "# certificate {{ device.serial }}\n")
    app = site.app(apply_once=False)
    renewed = pki.ca2.issue_device("IP232-30-00-af")
    first = call(app, "/", terminator_headers(pki.phone)).text
    second = call(app, "/", terminator_headers(renewed)).text
    assert first == f"# certificate {pki.phone.certificate.serial_number:x}\r\n"
    assert second == f"# certificate {renewed.certificate.serial_number:x}\r\n"


def test_kept_answers_are_dropped_with_the_files_they_came_from(site, pki):
    site.write("templates/default.j2", "config change SIP0 /pwd {{ vars.pwd }}\n")
    site.write("vars/default.toml", 'pwd = "old"\n')
    app = site.app(apply_once=False)
    assert "old" in call(app, "/", terminator_headers(pki.phone)).text
    path = site.write("vars/default.toml", 'pwd = "new"\n')
    import os
    import time
    os.utime(path, (time.time() + 5, time.time() + 5))  # a different version, whatever the clock's grain
    app.store.refresh()
    assert "new" in call(app, "/", terminator_headers(pki.phone)).text


# -- the proxy secret, the service's own routes, keyed digests ---------------------------

SECRET = "s3cret-" + "0123456789abcdef" * 2


def test_with_a_proxy_secret_only_requests_carrying_it_are_trusted(site, pki):
    site.write("templates/default.j2", "ok\n")
    app = site.app(proxy_secret=SECRET)
    with_secret = terminator_headers(pki.phone) + [("X-Configserver-Proxy-Secret", SECRET)]
    assert call(app, "/", with_secret).status == 200
    assert call(app, "/", with_secret, client=None, server=("/run/configserver/app.sock", None)).status == 200
    refused(call(app, "/", terminator_headers(pki.phone)), "untrusted proxy")
    refused(call(app, "/", terminator_headers(pki.phone), client=None, server=("/run/x.sock", None)), "untrusted proxy")
    refused(call(app, "/", terminator_headers(pki.phone) + [("X-Configserver-Proxy-Secret", SECRET[:-1] + "x")]),
            "untrusted proxy")
    # a client's own value in front of the terminator's: the terminator appends, never trusted
    refused(call(app, "/", [("X-Configserver-Proxy-Secret", "guess")] + with_secret), "duplicate header")


def test_proxy_secret_must_be_long(site):
    from configserver.settings import SettingsError

    with pytest.raises(SettingsError, match="'proxy_secret'.*at least 32"):
        site.app(proxy_secret="short")


@pytest.mark.parametrize("secret", ["€" * 32, "ü" * 32, "x" * 32 + " ", " " + "x" * 32, "x" * 16 + "\t" + "x" * 16])
def test_a_proxy_secret_no_header_could_carry_is_refused_at_start(site, secret):
    # beyond ASCII it would depend on the terminator's encoding; HTTP drops the spaces around a value
    from configserver.settings import SettingsError

    with pytest.raises(SettingsError, match="'proxy_secret'.*printable ASCII"):
        site.app(proxy_secret=secret)
    site.app(proxy_secret="x" * 16 + " " + "x" * 16)   # a space inside is carried as it is


def test_metrics_are_not_served_through_a_terminator(app, pki):
    assert call(app, "/metrics", terminator_headers(pki.phone)).status == 404
    assert call(app, "/metrics").status == 200


def test_with_a_digest_key_serials_and_hashes_are_keyed(site, pki):
    import hashlib
    import hmac

    site.write("templates/default.j2", "config change SIP0 /pwd 7391\n")
    plain = call(site.app(), "/", terminator_headers(pki.phone)).text
    keyed = call(site.app(digest_key=SECRET), "/", terminator_headers(pki.phone)).text
    assert plain != keyed
    serial = keyed.split("mod cmd UP1 check ser ")[1].split("\r\n")[0]
    assert serial == hmac.new(SECRET.encode(), b"config change SIP0 /pwd 7391", hashlib.sha256).hexdigest()[:32]
    assert call(site.app(digest_key=SECRET), "/", terminator_headers(pki.phone), query=f"CHECK={serial}").text.startswith(
        "# unchanged"
    )


def lifespan_messages(app) -> list[dict]:
    """What the app tells the server over one start-up and shutdown."""
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    messages: list[dict] = []

    async def receive():
        return inbox.pop(0)

    async def send(message):
        messages.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    return messages


async def broken() -> None:
    raise RuntimeError("the database file is not writable")


def test_the_app_answers_the_lifespan_protocol(site):
    assert lifespan_messages(site.app()) == [{"type": "lifespan.startup.complete"},
                                             {"type": "lifespan.shutdown.complete"}]


def test_a_failed_start_up_is_reported_to_the_server_with_its_cause(site):
    app = site.app()
    app.firmware.start = broken
    assert lifespan_messages(app) == [{"type": "lifespan.startup.failed",
                                       "message": "RuntimeError: the database file is not writable"}]
    assert app.inventory._closed   # what had started is stopped again


def test_a_failed_shutdown_is_reported_to_the_server_with_its_cause(site):
    app = site.app()
    app.firmware.close = broken
    assert lifespan_messages(app) == [{"type": "lifespan.startup.complete"},
                                      {"type": "lifespan.shutdown.failed",
                                       "message": "RuntimeError: the database file is not writable"}]
    assert app.inventory._closed   # the rest is stopped all the same: the audit is written


def test_a_start_up_and_a_stop_that_both_fail_report_the_start_up(site, caplog):
    app = site.app()
    app.firmware.start = broken

    async def also_broken() -> None:
        raise RuntimeError("the firmware watch could not let go")

    app.firmware.close = also_broken
    assert lifespan_messages(app) == [{"type": "lifespan.startup.failed",
                                       "message": "RuntimeError: the database file is not writable"}]
    assert app.inventory._closed
    assert "the firmware watch could not let go" in caplog.text   # logged, not lost


def test_what_is_remembered_about_clients_stays_small(app, pki):
    big = "A" * 200_000
    for n in range(20):
        call(app, "/", [("X-SSL-Client-Verify", "FAILED:21"), ("X-SSL-Client-Cert", big + str(n))])
    assert len(app.service.gate._verdicts) == 0  # refused before anything is remembered
    for n in range(5):
        headers = terminator_headers(pki.phone)
        headers[3] = ("X-SSL-Client-Cert", big + str(n))
        refused(call(app, "/", headers), "certificate mismatch")
    assert len(app.service.gate._verdicts) == 5
    assert all(len(key) == 32 for key in app.service.gate._verdicts)
    assert all(len(v.detail or "") < 400 for v in app.service.gate._verdicts.values())


def test_the_readme_explains_every_refusal_reason():
    from pathlib import Path

    from configserver.refusals import REASONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = [line.split("`")[1] for line in readme.splitlines() if line.startswith("   | `")]
    assert tuple(table) == REASONS  # in the order the checks run


# -- answered at once (limits.AnsweredAtOnce) and the ASGI way: one poll -------------------------

def _both_ways(app, caplog, path, headers, **transport):
    """The answer, log line and record of one request taken the ASGI way, then the listener's."""
    recorded = []
    app.recorders.append(recorded.append)
    seen = []
    for way in ("asgi", "listener"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="configserver.poll"):
            answer = call(app, path, headers, way=way, **transport)
        lines = [{k: v for k, v in record.fields.items() if k not in ("time", "duration_ms")}
                 for record in caplog.records if record.name == "configserver.poll"]
        seen.append((answer, lines))
    records = [{f: getattr(r, f) for f in r.__dataclass_fields__ if f not in ("time", "duration_ms")} for r in recorded]
    return seen, records


@pytest.mark.parametrize("case", ["served", "HEAD", "model script", "refused", "device mismatch", "PUT", "broken"])
def test_a_poll_answered_at_once_is_the_poll_answered_the_asgi_way(site, pki, caplog, case):
    site.write("templates/models/IP232.j2", MODEL)
    site.write("templates/devices/IP232-30-00-af.j2", OWN if case != "broken" else "{{ vars.password | nosuch }}\n")
    site.write("vars/default.toml", 'password = "default-secret"\n')
    app = site.app()
    cert = {"model script": pki.ca1.issue_device("IP232-30-00-c4"), "refused": pki.forged}.get(case, pki.phone)
    transport = {"HEAD": {"method": "HEAD"}, "PUT": {"method": "PUT"},
                 "device mismatch": {"query": "hwid=IP232-30-01-10"}}.get(case, {})
    [(asgi, asgi_lines), (at_once, at_once_lines)], _ = _both_ways(app, caplog, "/init",
                                                                  terminator_headers(cert, "nginx"), **transport)
    assert at_once == asgi
    assert at_once_lines == asgi_lines and len(at_once_lines) == 1
    status = {"served": 200, "HEAD": 200, "model script": 200, "refused": 403, "device mismatch": 403,
              "PUT": 405, "broken": 500}[case]
    assert at_once.status == status, at_once.text


def test_both_ways_record_the_same_poll(site, pki, caplog):
    site.write("templates/devices/IP232-30-00-af.j2", OWN)
    site.write("vars/default.toml", 'password = "default-secret"\n')
    app = site.app()
    _, records = _both_ways(app, caplog, "/init", terminator_headers(pki.phone, "nginx"), query="CHECK=1")
    assert len(records) == 2 and records[0] == records[1]
    assert records[0]["status"] == 200 and records[0]["check_reported"] == "1"


def test_only_polls_are_answered_at_once(app, pki, monkeypatch):
    asked = []
    answer = app._answer
    monkeypatch.setattr(app, "_answer", lambda scope: asked.append(scope["path"]) or answer(scope))
    for path in ("/healthz", "/metrics", "/init"):
        call(app, path, terminator_headers(pki.phone))
    assert asked == ["/init"]


def test_a_poll_whose_wait_for_a_changed_template_fails_is_answered_500(app, pki, monkeypatch, caplog):
    import dataclasses

    from configserver.poll import CONFIGURATION_CHANGING

    answer = app.pipeline.answer
    monkeypatch.setattr(app.pipeline, "answer", lambda request, now: dataclasses.replace(
        answer(request, now), status=503, reason=CONFIGURATION_CHANGING))

    async def broken(*args):
        raise RuntimeError("the store failed")

    monkeypatch.setattr(app.store, "newer_than", broken)
    recorded = []
    app.recorders.append(recorded.append)
    with caplog.at_level(logging.ERROR):
        reply = call(app, "/", terminator_headers(pki.phone))
    assert reply.status == 500 and reply.text == "# internal error\n"
    assert [outcome.status for outcome in recorded] == [500]
    assert "poll failed" in caplog.text and "the store failed" in caplog.text


def failing(text):
    async def fail(*args, **kwargs):
        raise RuntimeError(text)
    return fail


def failing_after(close, text):
    async def fail(*args, **kwargs):
        await close(*args, **kwargs)
        raise RuntimeError(text)
    return fail


def test_of_parts_that_fail_to_stop_the_first_is_told_and_every_other_logged(site, caplog):
    app = site.app()
    app.firmware.close = failing("the firmware watch could not let go")
    app.inventory.close = failing_after(app.inventory.close, "the audit could not be written")
    assert lifespan_messages(app)[-1] == {"type": "lifespan.shutdown.failed",
                                          "message": "RuntimeError: the firmware watch could not let go"}
    assert "the audit could not be written" in caplog.text


def test_a_failed_start_up_is_told_even_when_the_inventory_fails_to_stop(site, caplog):
    app = site.app()
    app.firmware.start = broken
    app.inventory.close = failing_after(app.inventory.close, "the audit could not be written")
    assert lifespan_messages(app) == [{"type": "lifespan.startup.failed",
                                       "message": "RuntimeError: the database file is not writable"}]
    assert "the audit could not be written" in caplog.text


def cancelled_while_serving(app, again=None) -> str:
    """Cancel the lifespan while it serves (at its yield), and with `again` once more while it
    stops; how the lifespan ended."""
    async def main() -> str:
        serving, never = asyncio.Event(), asyncio.Event()
        inbox = [{"type": "lifespan.startup"}]

        async def receive():
            if inbox:
                return inbox.pop()
            serving.set()
            await never.wait()

        async def send(message):
            pass

        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        await serving.wait()
        task.cancel()
        if again is not None:
            await asyncio.sleep(again)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "returned"
    return asyncio.run(main())


def test_a_lifespan_cancelled_while_serving_stops_everything_and_stays_cancelled(site):
    app = site.app()
    app.inventory.close = failing_after(app.inventory.close, "the audit could not be written")
    assert cancelled_while_serving(app) == "cancelled"
    assert app.inventory._closed


def test_a_stop_cancelled_half_way_still_writes_the_audit(site):
    app = site.app()
    close = app.firmware.close

    async def slow_close():
        await asyncio.sleep(0.2)
        await close()

    app.firmware.close = slow_close
    assert cancelled_while_serving(app, again=0.05) == "cancelled"
    assert app.inventory._closed
