"""Each change is applied once: the script's serial, the answers around it, and the CHECK round trip."""

import logging
import re

import pytest
from driving import call, terminator_headers

from configserver.apply_once import (
    EVERY_POLL_MARKER,
    OptionsError,
    TemplateOptions,
    apply_once,
    digest,
    parse_options,
)

SCRIPT = "# SIP for the reception desk\r\nconfig change SIP0 /user 100\r\nconfig change SIP0 /pwd secret\r\n"


# -- the digest ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "variant",
    [
        "config change SIP0 /user 100\r\nconfig change SIP0 /pwd secret\r\n",                      # comment gone
        "# another comment\r\nconfig change SIP0 /user 100\r\n#\r\nconfig change SIP0 /pwd secret\r\n",
        "\r\n\r\nconfig change SIP0 /user 100\r\n\r\nconfig change SIP0 /pwd secret\r\n\r\n",        # blank lines
        "  config change SIP0 /user 100\t\r\n\tconfig change SIP0 /pwd secret   \r\n",              # indentation
        "   # indented comment\r\nconfig change SIP0 /user 100\r\nconfig change SIP0 /pwd secret",  # no final CRLF
        "config change SIP0 /user 100\nconfig change SIP0 /pwd secret\n",                           # LF only
    ],
)
def test_digest_ignores_comments_blank_lines_and_whitespace_at_line_ends(variant):
    assert digest(variant) == digest(SCRIPT)


@pytest.mark.parametrize(
    "variant",
    [
        "config change SIP0 /user 101\r\nconfig change SIP0 /pwd secret\r\n",                 # a value
        "config change SIP0 /pwd secret\r\nconfig change SIP0 /user 100\r\n",                 # the order
        "config change SIP0 /user 100\r\n",                                                    # a line removed
        "config change SIP0 /user 100\r\nconfig change SIP0 /pwd secret\r\nconfig write\r\n",  # a line added
        "config change SIP0 /user 100\r\nconfig change SIP0 /pwd  secret\r\n",                # space inside a line
        "config change SIP0 /user 100 # x\r\nconfig change SIP0 /pwd secret\r\n",             # '#' inside a line
        "config change SIP0 /user 100config change SIP0 /pwd secret\r\n",                      # two lines joined
    ],
)
def test_digest_changes_with_every_meaningful_change(variant):
    assert digest(variant) != digest(SCRIPT)


def test_digest_has_the_length_of_the_serials_devices_already_store():
    assert re.fullmatch(r"[0-9a-f]{32}", digest(SCRIPT))
    assert digest("") == digest("# only a comment\r\n\r\n")


# -- the two answers ------------------------------------------------------------------------

def test_a_device_without_the_serial_gets_the_script_then_write_activate_check_and_reset():
    applied = apply_once(SCRIPT, None)
    assert applied.decision == "sent" and applied.digest == digest(SCRIPT)
    assert applied.script == SCRIPT + (
        "config write\r\nconfig activate\r\n"
        f"mod cmd UP1 check ser {applied.digest}\r\n"
        "iresetn\r\n"
    )


def test_a_device_with_another_serial_gets_the_script_again():
    assert apply_once(SCRIPT, "0123456789abcdef0123456789abcdef").decision == "sent"
    assert apply_once(SCRIPT, "").decision == "sent"


def test_a_device_that_reports_the_serial_gets_a_comment_only():
    applied = apply_once(SCRIPT, digest(SCRIPT))
    assert applied.decision == "unchanged"
    assert applied.script == f"# unchanged: the device has applied this script (CHECK {digest(SCRIPT)})\r\n"
    assert "secret" not in applied.script


def test_every_poll_lines_come_first_in_both_answers_and_are_not_in_the_digest():
    every_poll = "mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 5\r\n"
    script = every_poll + EVERY_POLL_MARKER + "\r\n" + SCRIPT
    sent = apply_once(script, None)
    assert sent.digest == digest(SCRIPT)
    assert sent.script == every_poll + apply_once(SCRIPT, None).script   # the marker itself is not sent
    unchanged = apply_once(script, sent.digest)
    assert unchanged.script == every_poll + apply_once(SCRIPT, sent.digest).script
    # a change above the marker is sent on every poll anyway: it does not make the device apply the rest again
    other = apply_once("mod cmd UP1 times /allow 1\r\n  " + EVERY_POLL_MARKER + " \r\n" + SCRIPT, sent.digest)
    assert other.decision == "unchanged" and other.script.startswith("mod cmd UP1 times /allow 1\r\n# unchanged")


def test_only_the_first_marker_counts():
    script = f"a\r\n{EVERY_POLL_MARKER}\r\nb\r\n{EVERY_POLL_MARKER}\r\nc\r\n"
    assert apply_once(script, None).script.startswith(f"a\r\nb\r\n{EVERY_POLL_MARKER}\r\nc\r\nconfig write\r\n")


@pytest.mark.parametrize("final", ["iresetn", "ireset", "resetn", "reset"])
def test_the_final_command_is_the_last_line(final):
    assert apply_once(SCRIPT, None, final).script.endswith(f"mod cmd UP1 check ser {digest(SCRIPT)}\r\n{final}\r\n")


def test_final_command_ser_adds_no_line():
    assert apply_once(SCRIPT, None, "ser").script.endswith(f"mod cmd UP1 check ser {digest(SCRIPT)}\r\n")


@pytest.mark.parametrize("reported", [None, "x"])
def test_every_line_of_both_answers_ends_in_crlf(reported):
    text = apply_once("a\r\n" + EVERY_POLL_MARKER + "\r\n" + SCRIPT, reported).script
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", "") and "\r" not in text.replace("\r\n", "")


# -- a template's options -------------------------------------------------------------------

@pytest.mark.parametrize(
    "source, options",
    [
        ("config change X\n", TemplateOptions()),
        ("{# configserver: apply_once=false #}\nx\n", TemplateOptions(apply_once=False)),
        ("{#- configserver: apply_once=true final=reset -#}\nx\n", TemplateOptions(True, "reset")),
        ("x\n{# configserver:\n   final=ser\n#}\n", TemplateOptions(final_command="ser")),
        ("{# an ordinary comment #}\n", TemplateOptions()),
    ],
)
def test_options_comment(source, options):
    assert parse_options(source) == options


@pytest.mark.parametrize(
    "source, line, words",
    [
        ("{# configserver: apply_once=no #}", 1, "true or false"),
        ("x\ny\n{# configserver: final=rest #}", 3, "iresetn"),
        ("{# configserver: apply-once=false #}", 1, "unknown option"),
        ("{# configserver: final=reset #}\n{# configserver: apply_once=false #}", 2, "second"),
    ],
)
def test_an_options_comment_that_cannot_be_understood_is_an_error(source, line, words):
    with pytest.raises(OptionsError) as error:
        parse_options(source)
    assert error.value.line == line and words in error.value.message


# -- the round trip through the service -----------------------------------------------------

def poll(app, pki, check=None):
    return call(app, "/", terminator_headers(pki.phone), query="" if check is None else f"CHECK={check}&CHECKdate=1700000000")


def serial_in(answer) -> str:
    return re.search(r"^mod cmd UP1 check ser ([0-9a-f]{32})\r$", answer.text, re.MULTILINE)[1]


def test_check_round_trip(site, pki):
    site.write("templates/models/IP232.j2", "# phone\nconfig change SIP0 /pwd {{ vars.password }}\n")
    site.write("vars/default.toml", 'password = "one"\n')
    app = site.app()

    first = poll(app, pki)
    assert first.status == 200
    assert first.text == (
        "# phone\r\nconfig change SIP0 /pwd one\r\nconfig write\r\nconfig activate\r\n"
        f"mod cmd UP1 check ser {serial_in(first)}\r\niresetn\r\n"
    )
    serial = serial_in(first)

    second = poll(app, pki, serial)
    assert second.text == f"# unchanged: the device has applied this script (CHECK {serial})\r\n"

    site.write("templates/models/IP232.j2", "# the phones, edited\n\n   config change SIP0 /pwd {{ vars.password }}\n")
    app.store.refresh()
    assert poll(app, pki, serial).text == second.text          # a comment and whitespace are no change

    site.write("templates/models/IP232.j2", "config change SIP0 /pwd {{ vars.password }}\nconfig change SIP0 /user x\n")
    app.store.refresh()
    third = poll(app, pki, serial)
    assert third.text.startswith("config change SIP0 /pwd one\r\nconfig change SIP0 /user x\r\nconfig write\r\n")
    assert serial_in(third) != serial
    assert poll(app, pki, serial_in(third)).text.startswith("# unchanged")

    site.write("vars/default.toml", 'password = "two"\n')         # the same template, other vars
    app.store.refresh()
    fourth = poll(app, pki, serial_in(third))
    assert "config change SIP0 /pwd two\r\n" in fourth.text and serial_in(fourth) != serial_in(third)


def test_the_digest_is_the_devices_own(site, pki):
    site.write("templates/default.j2", "config change SIP0 /user {{ device.hwid }}\n")
    app = site.app()
    phone = serial_in(poll(app, pki))
    gateway = serial_in(call(app, "/", terminator_headers(pki.gateway)))
    assert phone != gateway
    assert call(app, "/", terminator_headers(pki.gateway), query=f"CHECK={phone}").text.startswith("config change")


def test_the_every_poll_block_is_sent_on_every_poll(site, pki):
    site.write("templates/common/times.j2", "mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 5\n" + EVERY_POLL_MARKER + "\n")
    site.write("templates/default.j2", "{% include 'common/times.j2' %}config change SIP0 /user {{ device.hwid }}\n")
    app = site.app()
    first = poll(app, pki)
    assert first.text.startswith("mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 5\r\nconfig change SIP0 /user IP232")
    assert EVERY_POLL_MARKER not in first.text
    assert poll(app, pki, serial_in(first)).text == (
        "mod cmd UP1 times /allow 22,23,0,1,2,3,4 /initial 5\r\n"
        f"# unchanged: the device has applied this script (CHECK {serial_in(first)})\r\n"
    )


def test_poll_log_record_has_the_reported_serial_the_digest_and_the_decision(site, pki, caplog):
    site.write("templates/default.j2", "config change SIP0 /user {{ device.hwid }}\n")
    app = site.app()
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        first = poll(app, pki)
        poll(app, pki, serial_in(first))
    sent, unchanged = caplog.records[-2].fields, caplog.records[-1].fields
    assert sent["decision"] == "sent" and sent["check_digest"] == serial_in(first) and "check_reported" not in sent
    assert unchanged == {**unchanged, "decision": "unchanged", "check_digest": serial_in(first), "check_reported": serial_in(first)}


def test_switched_off_globally_the_script_is_sent_as_rendered(site, pki, caplog):
    site.write("templates/default.j2", f"a\n{EVERY_POLL_MARKER}\nmod cmd UP1 check iresetn 42\nb\n")
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        answer = poll(site.app(apply_once=False), pki, "42")
    assert answer.text == f"a\r\n{EVERY_POLL_MARKER}\r\nmod cmd UP1 check iresetn 42\r\nb\r\n"
    assert "decision" not in caplog.records[-1].fields and "check_digest" not in caplog.records[-1].fields
    assert caplog.records[-1].fields["check_reported"] == "42"


def test_a_template_switches_it_off_for_itself(site, pki):
    site.write("templates/devices/IP232-30-00-af.j2", "{# configserver: apply_once=false -#}\nmod cmd UP1 check iresetn 7\nown\n")
    site.write("templates/default.j2", "shared\n")
    app = site.app()
    assert poll(app, pki).text == "mod cmd UP1 check iresetn 7\r\nown\r\n"
    assert serial_in(call(app, "/", terminator_headers(pki.gateway)))     # the others still apply once


def test_a_template_switches_it_on_when_the_setting_is_off(site, pki):
    site.write("templates/default.j2", "{# configserver: apply_once=true final=reset #}\nx\n")
    assert poll(site.app(apply_once=False), pki).text.endswith(f"mod cmd UP1 check ser {digest('x')}\r\nreset\r\n")


def test_the_final_command_setting_and_a_templates_own(site, pki):
    site.write("templates/default.j2", "x\n")
    site.write("templates/models/IP1202.j2", "{# configserver: final=iresetn #}\ny\n")
    app = site.app(final_command="ser")
    assert poll(app, pki).text.endswith(f"mod cmd UP1 check ser {digest('x')}\r\n")
    assert call(app, "/", terminator_headers(pki.gateway)).text.endswith("\r\niresetn\r\n")


def test_an_options_comment_with_a_typo_is_a_configuration_error(site, pki, caplog):
    site.write("templates/default.j2", "x\n{# configserver: final=rest #}\n")
    with caplog.at_level(logging.INFO, logger="configserver.poll"):
        answer = poll(site.app(), pki)
    assert (answer.status, answer.text) == (500, "# configuration error\n")
    assert caplog.records[-1].fields["detail"].startswith("default.j2:2: final='rest'")


def test_refusals_and_missing_configuration_carry_no_serial(site, pki):
    app = site.app()
    answer = poll(app, pki, "abc")
    assert answer.status == 404 and "check" not in answer.text
