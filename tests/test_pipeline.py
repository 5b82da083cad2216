"""The poll pipeline: one snapshot per poll, one devices.csv rule, refusals that name their
device, and nothing a device sends becoming a line of its script."""

from __future__ import annotations

import os

import pytest
from driving import call, terminator_headers

from configserver.cli import main
from configserver.content import ContentRules, Renderer, Snapshot, SourceFile, build_snapshot


def recorded(app) -> list:
    outcomes: list = []
    app.recorders.append(outcomes.append)
    return outcomes


# -- one devices.csv rule for the server, render and check ---------------------------------

def test_a_devices_csv_row_named_by_mac_alone_is_used_by_server_render_and_check(site, pki, capsysbinary, monkeypatch):
    site.write("templates/default.j2", "config change SIP0 /user {{ vars.user }}\n")
    site.write("vars/default.toml", 'user = "nobody"\n')
    site.write("vars/devices.csv", "hwid,mac,user\n  ,00-90-33-30-00-af,alice\n")
    answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.status == 200 and "/user alice\r\n" in answer.text

    monkeypatch.chdir(site.root)
    site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n')
    assert main(["render", "IP232-30-00-af"]) == 0
    assert b"/user alice\r\n" in capsysbinary.readouterr().out
    assert main(["check"]) == 0


# -- one snapshot from start to end -----------------------------------------------------------

def test_a_reload_between_choosing_and_rendering_never_mixes_two_versions(site, pki, monkeypatch):
    site.write("templates/default.j2", "{% include 'part.j2' %}\nconfig change SIP0 /pwd {{ vars.pwd }}\n")
    site.write("templates/part.j2", "# part one")
    site.write("vars/default.toml", 'pwd = "one"\n')
    app = site.app()
    first = call(app, "/", terminator_headers(pki.phone))
    assert "# part one\r\nconfig change SIP0 /pwd one\r\n" in first.text

    site.write("templates/part.j2", "# part two")
    site.write("vars/default.toml", 'pwd = "two"\n')
    for path in (site.templates / "part.j2", site.vars / "default.toml"):
        os.utime(path, (1, 1))   # settled long ago: the next refresh publishes them
    choose = Snapshot.choose

    def choose_then_reload(snapshot, device):
        choice = choose(snapshot, device)
        app.store.refresh()   # a reload lands while this poll is under way
        return choice

    monkeypatch.setattr(Snapshot, "choose", choose_then_reload)
    racing = call(app, "/", terminator_headers(pki.gateway))
    assert "# part one\r\nconfig change SIP0 /pwd one\r\n" in racing.text   # all old, nothing of the new
    monkeypatch.undo()
    after = call(app, "/", terminator_headers(pki.gateway))
    assert "# part two\r\nconfig change SIP0 /pwd two\r\n" in after.text


def test_a_template_is_rendered_from_the_snapshot_given_even_after_a_newer_one_was_compiled(tmp_path):
    def snapshot(part: str, stamp: int) -> Snapshot:
        templates = {
            "default.j2": SourceFile("default.j2", (1, 1, 1), "{% include 'part.j2' %}"),
            "part.j2": SourceFile("part.j2", (stamp, 1, 1), part),
        }
        return build_snapshot(templates, {}, ContentRules())

    old, new = snapshot("old", 1), snapshot("new", 2)
    renderer = Renderer(tmp_path)
    assert renderer.render(new, "default.j2", {}) == "new\r\n"
    assert renderer.render(old, "default.j2", {}) == "old\r\n"
    assert renderer.render(new, "default.j2", {}) == "new\r\n"


# -- refusals that name a device ----------------------------------------------------------------

def test_a_refused_certificate_that_names_a_device_is_recorded_under_it_as_claimed(site, pki):
    site.write("templates/default.j2", "# hello\n")
    app = site.app()
    outcomes = recorded(app)
    assert call(app, "/", terminator_headers(pki.expired, "haproxy")).status == 403
    expired = outcomes[-1]
    assert (expired.reason, expired.hwid, expired.claimed) == ("certificate mismatch", "IP232-30-00-b1", True)
    assert "claimed" in expired.log_fields()


def test_a_device_mismatch_names_the_proven_device(site, pki):
    site.write("templates/default.j2", "# hello\n")
    app = site.app()
    outcomes = recorded(app)
    assert call(app, "/", terminator_headers(pki.phone), query="hwid=IP232-30-00-b0").status == 403
    mismatch = outcomes[-1]
    assert (mismatch.reason, mismatch.hwid, mismatch.claimed) == ("device mismatch", "IP232-30-00-af", False)


def test_a_refusal_that_names_no_device_records_none(site, pki):
    site.write("templates/default.j2", "# hello\n")
    app = site.app()
    outcomes = recorded(app)
    call(app, "/", terminator_headers(pki.unrelated))
    assert (outcomes[-1].reason, outcomes[-1].hwid) == ("wrong CA", None)


@pytest.mark.parametrize("query", ["HWID=IP232-30-00-b0", "Sn=0090333000b0", "MAC=00:90:33:30:00:b0"])
def test_query_keys_naming_another_device_are_caught_in_any_case(site, pki, query):
    site.write("templates/default.j2", "# hello\n")
    answer = call(site.app(), "/", terminator_headers(pki.phone), query=query)
    assert (answer.status, answer.text) == (403, "# device mismatch\n")


# -- nothing a device sends starts a line -------------------------------------------------------

@pytest.mark.parametrize("query", ["ver=a%0airesetn", "ver=a%0d%0airesetn", "ver=a%0diresetn", "ver=a%00b%0a%0biresetn"])
def test_control_characters_from_the_device_never_start_a_line(site, pki, query):
    site.write("templates/default.j2", "# firmware {{ request.query.ver }} at {{ request.path }}\nconfig change X\n")
    answer = call(site.app(), "/up\niresetn", terminator_headers(pki.phone), query=query)
    assert answer.status == 200
    lines = answer.text.split("\r\n")
    assert lines[0].startswith("# firmware a") and lines[0].endswith("iresetn")
    assert lines[1] == "config change X"
    assert lines.count("iresetn") == 1   # the wrap's own final command, nothing injected


def test_the_every_poll_marker_cannot_be_injected(site, pki):
    site.write("templates/default.j2", "# {{ request.query.x }}\nconfig change X\n")
    answer = call(site.app(), "/", terminator_headers(pki.phone),
                  query="x=%0a%23%20configserver%3A%20every%20poll%20above")
    assert "\r\n# configserver: every poll above\r\n" not in answer.text
    assert answer.text.startswith("# # configserver: every poll above\r\nconfig change X\r\n")


# -- nothing outside the two folders --------------------------------------------------------------

def test_a_symlink_out_of_the_folders_is_never_read(site, pki, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("root:x:0:0\n")
    (site.templates / "models").mkdir()
    (site.templates / "models" / "IP232.j2").symlink_to(outside)
    site.write("templates/shared.j2", "# shared for {{ device.hwid }}\n")
    (site.templates / "devices").mkdir()
    (site.templates / "devices" / "IP1202-35-fe-4d.j2").symlink_to(site.templates / "shared.j2")
    app = site.app()
    assert call(app, "/", terminator_headers(pki.phone)).status == 404   # the link out is not a template
    gateway = call(app, "/", terminator_headers(pki.gateway))
    assert gateway.status == 200 and gateway.text.startswith("# shared for IP1202-35-fe-4d\r\n")


# -- the security log -------------------------------------------------------------------------------

def test_every_refused_poll_is_one_security_log_line_with_the_real_client(site, pki, tmp_path):
    from configserver import securitylog
    from configserver.app import configure_security_log
    from configserver.settings import load_settings

    site.write("templates/default.j2", "# hello\n")
    app = site.app()
    configure_security_log(load_settings(security_log=str(tmp_path / "security.log")))
    try:
        call(app, "/update", terminator_headers(pki.phone) + [("X-Forwarded-For", "198.51.100.7")])
        call(app, "/update", terminator_headers(pki.unrelated) + [("X-Forwarded-For", "198.51.100.8")])
        call(app, "/update", terminator_headers(pki.phone) + [("X-Forwarded-For", "198.51.100.9")],
             query="hwid=IP232-30-00-b0")
    finally:
        securitylog.configure(None)
    lines = (tmp_path / "security.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        'refusal client=198.51.100.8 reason="wrong CA" hwid=- path=/update',
        'refusal client=198.51.100.9 reason="device mismatch" hwid=IP232-30-00-af path=/update',
    ]


def test_a_security_log_that_cannot_be_written_stops_start_up(tmp_path):
    from configserver.app import configure_security_log
    from configserver.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="security_log.*cannot append"):
        configure_security_log(load_settings(security_log=str(tmp_path / "missing" / "security.log")))


def test_a_devices_csv_header_change_reaches_the_devices_whose_rows_did_not_change(site, pki):
    site.write("templates/default.j2", "# A={{ vars.a }} B={{ vars.b }}\n")
    table = site.write("vars/devices.csv", "hwid,a,b\nIP232-30-00-af,1,2\n")
    app = site.app()
    assert "# A=1 B=2\r\n" in call(app, "/", terminator_headers(pki.phone)).text
    table.write_text("hwid,b,a\nIP232-30-00-af,1,2\n")
    os.utime(table, (2, 2))
    app.store.refresh()
    assert "# A=2 B=1\r\n" in call(app, "/", terminator_headers(pki.phone)).text


# -- the sandbox: a second wall behind the admins who write templates -------------------------------

@pytest.mark.parametrize("text, refused", [
    ("{{ device.__class__.__mro__ }}", "SecurityError"),
    ("{{ vars.__class__.__init__.__globals__ }}", "SecurityError"),
    ("{{ 2 ** 1000000000 }}", "SecurityError"),
    ("{% for n in range(10000000) %}x{% endfor %}", "OverflowError: Range too big"),
    # what ** and * build, not only each exponent
    ("{{ (3 ** 1000 ** 1000 ** 1000) > 1 }}",
     "SecurityError: the power would be a number of 1,584,001 bits or more (at most 100,000)"),
    ("{{ 'x' * 10 ** 9 }}",
     "SecurityError: repeating a text (length 1) 1,000,000,000 times would make 1,000,000,000 characters"),
    ("{{ 'x' * 1000000000 }}", "SecurityError: repeating a text (length 1) 1,000,000,000 times"),   # never folded while compiling
    ("{{ (10 ** 9) * 'ab' }}", "SecurityError: repeating a text (length 2) 1,000,000,000 times"),
    ("{{ [0] * 1000 * 1000 * 1000 }}",
     "SecurityError: repeating a list (length 1,000,000) 1,000 times would make 1,000,000,000 items"),
    ("{% set a = 2 ** 999 %}{{ " + " * ".join(["a"] * 101) + " }}",
     "SecurityError: the product would be a number of 100,900 bits"),
    # the widths that pad a text, and what joins or adds texts and lists
    ("{{ '%0200000000d' % 1 }}",   # never folded while compiling
     "SecurityError: a % width or precision of 200,000,000 is too large (at most 1,000,000)"),
    ("{{ '%.*f' % (200000000, 1.5) }}", "SecurityError: a % width or precision of 200,000,000 is too large"),
    ("{{ '%0200000000d' | format(1) }}", "SecurityError: a % width or precision of 200,000,000 is too large"),
    ("{{ '{:>200000000}'.format(1) }}",
     "SecurityError: a format() width or precision of 200,000,000 is too large (at most 1,000,000)"),
    ("{{ '{:>{w}}'.format(1, w=200000000) }}", "SecurityError: a format() width or precision of 200,000,000"),
    ("{{ 'x' | center(200000000) }}", "SecurityError: a center width of 200,000,000 is too large"),
    ("{{ 'x'.ljust(200000000) }}", "SecurityError: a ljust() width of 200,000,000 is too large"),
    ("{{ ('x\\n' * 1000) | indent(2000) }}", "SecurityError: indent would make a text of 2,004,000 characters"),
    ("{{ (['x' * 1000000] * 200) | join }}", "SecurityError: join would make more than 1,000,000 characters"),
    ("{{ ''.join(['x' * 1000000] * 200) }}", "SecurityError: join() would make more than 1,000,000 characters"),
    ("{{ [0] * 1000000 + [0] }}", "SecurityError: a sum would make a list of 1,000,001 items (at most 1,000,000)"),
    ("{% for n in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
     "SecurityError: the script would be longer than 8,000,000 characters"),
])
def test_a_template_reaching_for_internals_or_endless_work_is_a_configuration_error(site, pki, text, refused):
    site.write("templates/default.j2", text + "\n")
    app = site.app()
    outcomes: list = []
    app.recorders.append(outcomes.append)
    answer = call(app, "/", terminator_headers(pki.phone))
    assert (answer.status, answer.text) == (500, "# configuration error\n")
    assert outcomes[-1].detail.startswith(f"default.j2:1: {refused}"), outcomes[-1].detail


def test_arithmetic_within_the_sandbox_bounds_renders(site, pki):
    site.write("templates/default.j2", "{{ 2 ** 1000 > 1 }} {{ 'ab' * 3 }} {{ [1] * 3 }} {{ 6 * 7 }} {{ 2 ** -1 }} {{ 1.5 ** 2 }}\n")
    answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.status == 200 and answer.text.startswith("True ababab [1, 1, 1] 42 0.5 2.25\r\n"), answer.text


def test_formatting_padding_and_joining_within_the_sandbox_bounds_renders(site, pki):
    site.write("templates/default.j2",
               "{{ '%05d|%-3s|%.2f|%%|%*d' % (42, 'a', 1.5, 3, 7) }} {{ '%(x)s' % {'x': 1} }} {{ 7 % 4 }}"
               " {{ '{:>4}|{:{w}}'.format(1.25, 'b', w=2) }}|{{ '{0:.1f}'.format(1.25) }} {{ '{a}'.format_map({'a': 2}) }}"
               " {{ 'x' | center(3) }}|{{ 'y'.rjust(2) }}|{{ [1, 2] | join(',') }}|{{ '-'.join(['a', 'b']) }}"
               " {{ [1] + [2] }} {{ 'a' + 'b' }} {{ 1 + 2 }} {{ '%s=%s' | format('k', 'v') }}\n")
    answer = call(site.app(), "/", terminator_headers(pki.phone))
    assert answer.status == 200 and answer.text.startswith(
        "00042|a  |1.50|%|  7 1 3 1.25|b |1.2 2  x | y|1,2|a-b [1, 2] ab 3 k=v\r\n"), answer.text
