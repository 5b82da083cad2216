"""The rules of configuration backups, without a database: what counts as a change, when a device
is asked, what the upload URL carries, and the facts read from the devices' xml-info documents."""

from __future__ import annotations

import statistics
import urllib.parse

import pytest

from configserver.backups import (
    FactsUnreadable,
    NotText,
    check_backup_url,
    check_text,
    content_digest,
    is_due,
    lines_changed,
    meaningful_lines,
    parse_certificate_facts,
    parse_device_facts,
    slot_offset,
    slot_start,
    unified_diff,
    upload_kind,
    upload_lines,
)
from configserver.backups._schedule import ASK_AGAIN_SECONDS, REQUEST_SECONDS, Knowledge
from configserver.backups._urls import UnknownUpload

DAY = 86400.0

CONFIG = (
    "config change IP0 /addr 10.0.0.5 /mask 255.255.255.0\r\n"
    "config change PHONE /user-1 /name Reception /pwd s3cret-Passw0rd\r\n"
    "config change UP1 /url https://config.example.com/update /poll 15\r\n"
    "vars create UPDATE/CHECK p 5a87b4adefdc2322e5374f92adecc1d4\r\n"
    "vars create TLS0/TICKET/0 pb 00112233445566778899\r\n"
    "mod cmd FLASHDIR0 add-item 101 (cn=Alice)(type=call)(info=2026-11-29 08:00)\r\n"
    "\r\n"
    "config write\r\n"
)


def same_config_next_day() -> str:
    return (
        CONFIG.replace("/poll 15", "/poll 15 /url-serial 2")
        .replace("5a87b4adefdc2322e5374f92adecc1d4", "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f")
        .replace("00112233445566778899", "99887766554433221100")
        .replace("(cn=Alice)(type=call)(info=2026-11-29 08:00)", "(cn=Bob)(type=call)(info=2026-11-30 09:12)")
    )


# -- what counts as a change ----------------------------------------------------------------


def test_volatile_lines_and_empty_lines_do_not_count() -> None:
    assert meaningful_lines(CONFIG) == [
        "config change IP0 /addr 10.0.0.5 /mask 255.255.255.0",
        "config change PHONE /user-1 /name Reception /pwd s3cret-Passw0rd",
        "config write",
    ]


def test_an_upload_that_differs_only_in_volatile_lines_has_the_same_digest() -> None:
    assert content_digest(meaningful_lines(same_config_next_day())) == content_digest(meaningful_lines(CONFIG))


def test_a_changed_setting_changes_the_digest() -> None:
    changed = CONFIG.replace("/name Reception", "/name Lobby")
    assert content_digest(meaningful_lines(changed)) != content_digest(meaningful_lines(CONFIG))


@pytest.mark.parametrize("newline", ["\r\n", "\n", "\r"])
def test_lines_split_on_crlf_lf_or_cr_alike(newline: str) -> None:
    assert meaningful_lines(CONFIG.replace("\r\n", newline)) == meaningful_lines(CONFIG)


def test_a_flashdir_line_that_is_no_call_list_entry_counts() -> None:
    line = "mod cmd FLASHDIR0 add-item 200 (cn=Directory)(h323=200)"
    assert meaningful_lines(line + "\n") == [line]


def test_lines_changed_counts_lines_gone_and_come() -> None:
    old = ["a", "b", "c"]
    assert lines_changed(old, ["a", "B", "c"]) == 2
    assert lines_changed(old, ["a", "b", "c", "d"]) == 1
    assert lines_changed(old, old) == 0


def test_unified_diff_shows_the_changed_line_with_labels() -> None:
    old = meaningful_lines(CONFIG)
    new = meaningful_lines(CONFIG.replace("/name Reception", "/name Lobby"))
    diff = unified_diff(old, new, "version 1", "version 2")
    assert diff.splitlines()[:2] == ["--- version 1", "+++ version 2"]
    assert "-config change PHONE /user-1 /name Reception /pwd s3cret-Passw0rd" in diff.splitlines()
    assert "+config change PHONE /user-1 /name Lobby /pwd s3cret-Passw0rd" in diff.splitlines()
    assert unified_diff(old, old, "a", "b") == ""


def repeated_lines(step: int) -> list[str]:
    """About 50,000 lines (1.3 MB), 505 distinct ones 99 times each, in an order set by `step`
    (1, 7: the same lines): each repeats just under the share at which difflib stops looking at
    a line, which makes its matcher take minutes. A device may upload 4 MB of them."""
    distinct = 505
    values = [f"config change X /a {i}" for i in range(distinct)]
    return [values[(i * step) % distinct] for i in range(distinct * 99)]


def test_lines_changed_does_not_count_a_line_that_only_moved() -> None:
    assert lines_changed(["a", "b", "c"], ["c", "a", "b"]) == 0
    assert lines_changed(["a", "a", "b"], ["a", "b"]) == 1


def test_lines_changed_of_many_repeated_lines_is_counted_at_once() -> None:
    same = ["config change X /a 1"] * 50_000
    alternating = ["config change X /a 1", "config change X /b 2"] * 25_000
    assert lines_changed(same, alternating) == 50_000   # 25,000 gone, 25,000 come
    assert lines_changed(repeated_lines(1), repeated_lines(7)) == 0


def test_a_diff_of_many_repeated_changed_lines_lists_them_without_placing_them() -> None:
    old = repeated_lines(1)
    new = repeated_lines(7) + ["config change PHONE /user-1 /name Lobby"]
    diff = unified_diff(old, new, "version 1", "version 2").splitlines()
    assert diff[:2] == ["--- version 1", "+++ version 2"]
    assert diff[2].startswith("@@ too many changed lines to place here: 0 gone, 1 come, of 49995 and 49996;")
    assert "`configserver backups DEVICE --show N`" in diff[2]
    assert diff[3:] == ["+config change PHONE /user-1 /name Lobby"]


def test_a_diff_lists_each_line_gone_and_come_in_its_version_s_order_when_too_many_to_place() -> None:
    old = [f"line {i}" for i in range(3000)]
    new = [f"line {i}" for i in reversed(range(3000))]
    new[0], new[-1] = "first", "last"   # line 2999 and line 0 went
    diff = unified_diff(old, new, "a", "b").splitlines()
    assert diff[2].startswith("@@ too many changed lines to place here: 2 gone, 2 come, of 3000 and 3000;")
    assert diff[3:] == ["-line 0", "-line 2999", "+first", "+last"]


def test_a_diff_deep_in_a_long_configuration_numbers_its_lines_as_in_the_whole() -> None:
    old = [f"config change X /a {i}" for i in range(5000)]
    new = old[:4000] + ["config change X /b 1"] + old[4001:]
    diff = unified_diff(old, new, "a", "b").splitlines()
    assert diff[2:] == ["@@ -3998,7 +3998,7 @@", *(" " + line for line in old[3997:4000]),
                        "-config change X /a 4000", "+config change X /b 1",
                        *(" " + line for line in old[4001:4004])]
    assert unified_diff(old, old + ["new"], "a", "b").splitlines()[2] == "@@ -4998,3 +4998,4 @@"


def test_text_with_umlauts_in_latin1_or_utf8_is_text() -> None:
    check_text("config change PHONE /name Müller\r\n".encode("utf-8"))
    check_text("config change PHONE /name Müller\r\n".encode("latin-1"))


@pytest.mark.parametrize("body", [b"\x00\x01\x02binary", b"config\x1b[31m", b"\x7fELF"])
def test_control_characters_are_not_text_and_the_message_never_quotes_the_body(body: bytes) -> None:
    with pytest.raises(NotText) as raised:
        check_text(b"config change PHONE /pwd s3cret " + body)
    assert "s3cret" not in str(raised.value)
    assert "control character" in str(raised.value)


# -- when a device is asked -----------------------------------------------------------------


def test_each_device_has_its_own_stable_time_of_day() -> None:
    assert slot_offset("IP232-30-00-af", DAY) == slot_offset("ip232-30-00-AF", DAY)
    assert 0 <= slot_offset("IP232-30-00-af", DAY) < DAY
    assert slot_offset("IP232-30-00-af", DAY) != slot_offset("IP232-30-00-b0", DAY)


def test_a_fleet_spreads_over_the_day() -> None:
    offsets = [slot_offset(f"IP232-30-{i // 256:02x}-{i % 256:02x}", DAY) for i in range(4096)]
    hours = [int(offset // 3600) for offset in offsets]
    per_hour = [hours.count(hour) for hour in range(24)]
    # 4096 devices, about 171 an hour; no hour gets twice its share or half of it
    assert min(per_hour) > 171 / 2 and max(per_hour) < 171 * 2
    assert statistics.pstdev(per_hour) < 30


def test_slot_start_is_the_latest_due_time_at_or_before_now() -> None:
    hwid = "IP232-30-00-af"
    offset = slot_offset(hwid, DAY)
    day_start = 1_800_000_000 - 1_800_000_000 % DAY
    assert slot_start(hwid, DAY, day_start + offset) == day_start + offset
    assert slot_start(hwid, DAY, day_start + offset - 1) == day_start + offset - DAY
    assert slot_start(hwid, DAY, day_start + offset + DAY - 1) == day_start + offset


def _times(hwid: str) -> tuple[float, float]:
    """The device's due time today, and the day's start."""
    day_start = 1_800_000_000 - 1_800_000_000 % DAY
    return day_start + slot_offset(hwid, DAY), day_start


def test_a_device_backed_up_since_its_slot_is_not_asked() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    assert not is_due(hwid, due + 60, DAY, Knowledge(last_upload=due + 10), since=0)


def test_a_device_whose_slot_passed_since_its_last_upload_is_asked() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    assert is_due(hwid, due + 60, DAY, Knowledge(last_upload=due - DAY + 5), since=0)
    assert not is_due(hwid, due - 60, DAY, Knowledge(last_upload=due - DAY + 5), since=0)


def test_a_device_never_backed_up_waits_for_its_slot_after_the_node_started() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    started = due - 3600
    assert not is_due(hwid, due - 60, DAY, Knowledge(), since=started)
    assert is_due(hwid, due + 60, DAY, Knowledge(), since=started)


def test_a_device_asked_without_uploading_is_asked_again_only_an_hour_later() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    asked = due + 60
    assert not is_due(hwid, asked + 900, DAY, Knowledge(last_upload=due - DAY, asked=asked), since=0)
    assert is_due(hwid, asked + ASK_AGAIN_SECONDS, DAY, Knowledge(last_upload=due - DAY, asked=asked), since=0)


def test_an_admin_request_asks_at_once_and_ends_with_the_upload() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    now = due + 3 * 3600
    uploaded = due + 10  # today's backup is in
    assert not is_due(hwid, now, DAY, Knowledge(last_upload=uploaded), since=0)
    requested = now - 5
    assert is_due(hwid, now, DAY, Knowledge(last_upload=uploaded, requested=requested), since=0)
    # asked meanwhile for an older reason: a newer request still asks
    assert is_due(hwid, now, DAY, Knowledge(last_upload=uploaded, requested=requested, asked=now - 60), since=0)
    assert not is_due(hwid, now + 30, DAY, Knowledge(last_upload=now + 20, requested=requested), since=0)


def test_a_request_ends_after_a_week() -> None:
    hwid = "IP232-30-00-af"
    due, _ = _times(hwid)
    requested = due + 10
    later = requested + REQUEST_SECONDS + 1
    assert not is_due(hwid, later, 0, Knowledge(requested=requested), since=0)


def test_interval_zero_asks_only_on_request() -> None:
    assert not is_due("IP232-30-00-af", 1_800_000_000, 0, Knowledge(), since=0)
    assert is_due("IP232-30-00-af", 1_800_000_000, 0, Knowledge(requested=1_800_000_000 - 1), since=0)


# -- the URL the device uploads to ----------------------------------------------------------


def test_the_answer_asks_for_the_configuration_and_both_fact_documents() -> None:
    lines = upload_lines("https://config.example.com/backup", facts=True)
    assert lines[0] == "mod cmd UP0 scfg https://config.example.com/backup?mode=backup&hwid=#h&sn=#m"
    assert lines[1] == (
        "mod cmd UP0 scfg https://config.example.com/backup?mode=query&id=x509&hwid=#h&sn=#m"
        " ser nop /always mod%20cmd%20X509%20xml-info"
    )
    assert lines[2].endswith("?mode=query&id=cmd0&hwid=#h&sn=#m ser nop /always mod%20cmd%20CMD0%20xml-info")
    assert upload_lines("https://config.example.com/backup", facts=False) == lines[:1]


@pytest.mark.parametrize("line", upload_lines("https://config.example.com/backup", facts=True))
def test_each_upload_url_tells_what_it_carries(line: str) -> None:
    url = line.split()[4].replace("#h", "IP232-30-00-af").replace("#m", "0090333000af")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert upload_kind(query).what in ("config", "x509", "cmd0")
    assert query["hwid"] == ["IP232-30-00-af"] and query["sn"] == ["0090333000af"]


@pytest.mark.parametrize("query", [
    {}, {"mode": ["restore"]}, {"mode": ["backup", "query"]}, {"mode": ["query"]},
    {"mode": ["query"], "id": ["vars"]}, {"mode": ["query"], "id": ["x509", "cmd0"]},
])
def test_an_upload_we_never_asked_for_is_unknown(query: dict[str, list[str]]) -> None:
    with pytest.raises(UnknownUpload):
        upload_kind(query)


@pytest.mark.parametrize("url", [
    "http://config.example.com/backup", "https://config.example.com", "https://config.example.com/",
    "https://config.example.com/backup?x=1", "https:///backup", "https://config.example.com/back up",
])
def test_a_backup_url_must_be_https_with_a_path_and_no_query(url: str) -> None:
    with pytest.raises(ValueError):
        check_backup_url(url)


# -- facts ----------------------------------------------------------------------------------

X509_INFO = """<?xml version="1.0" encoding="utf-8"?>
<info>
  <servercert>
    <certificate subject_cn="IP232-30-00-af" issuer_cn="innovaphone Device Certification Authority"
                 not_before="2015-06-01 00:00:00" not_after="2035-06-01 00:00:00" serial="01ab"/>
    <certificate subject_cn="innovaphone Device Certification Authority"
                 issuer_cn="innovaphone Device Certification Authority"
                 not_before="2010-01-01 00:00:00" not_after="2040-01-01 00:00:00"/>
  </servercert>
  <requests><request id="1"/></requests>
  <busy/>
</info>"""

CMD0_INFO = (
    '<info name="Reception phone" serial="0090333000af" '
    'version="13r1 dvl IP232[13.A127], Bootcode[113454], Hardware[300]"/>'
)


def test_certificate_facts_list_the_devices_certificates() -> None:
    facts = parse_certificate_facts(X509_INFO)
    assert [c.subject_cn for c in facts.certificates] == [
        "IP232-30-00-af", "innovaphone Device Certification Authority",
    ]
    first = facts.certificates[0]
    assert first.issuer_cn == "innovaphone Device Certification Authority"
    assert (first.not_before, first.not_after) == ("2015-06-01 00:00:00", "2035-06-01 00:00:00")
    assert first.attributes["serial"] == "01ab"
    assert (facts.requests, facts.busy, facts.request_error) == (1, True, False)


def test_device_facts_give_name_firmware_boot_code_and_hardware() -> None:
    facts = parse_device_facts(CMD0_INFO)
    assert facts.name == "Reception phone"
    assert (facts.firmware, facts.boot, facts.hardware) == ("13.A127", "113454", "300")
    assert facts.attributes["serial"] == "0090333000af"


def test_device_facts_read_a_box_info_style_sys_version() -> None:
    facts = parse_device_facts('<info name="gw"><sys version="IP1202[13.A127], Bootcode[1234], Hardware[108]"/></info>')
    assert (facts.name, facts.firmware, facts.boot, facts.hardware) == ("gw", "13.A127", "1234", "108")


def test_a_document_without_a_version_still_gives_its_name() -> None:
    facts = parse_device_facts('<info name="x"/>')
    assert facts.name == "x" and facts.firmware is None and facts.version is None


def test_facts_values_are_bounded() -> None:
    facts = parse_device_facts(f'<info name="{"n" * 5000}"/>')
    assert facts.name is not None and len(facts.name) < 300


@pytest.mark.parametrize("document", [
    "<info><servercert></info>",
    "plain text, no xml",
    "<other/>",
    '<!DOCTYPE info [<!ENTITY a "aaaaaaaaaa">]><info name="&a;"/>',
])
def test_a_document_that_is_not_the_one_asked_for_is_unreadable(document: str) -> None:
    with pytest.raises(FactsUnreadable):
        parse_certificate_facts(document)


def test_an_entity_bomb_is_refused_without_expanding_it() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        '<info name="&lol3;"/>'
    )
    with pytest.raises(FactsUnreadable):
        parse_device_facts(bomb)


@pytest.mark.parametrize("package", ["configserver.backups", "configserver.admin"])
def test_every_error_the_backups_and_the_admin_page_raise_is_a_configserver_error(package: str) -> None:
    import importlib
    import inspect
    import pkgutil

    from configserver.errors import ConfigserverError

    root = importlib.import_module(package)
    errors = [
        value for info in pkgutil.iter_modules(root.__path__, f"{package}.")
        for _, value in inspect.getmembers(importlib.import_module(info.name), inspect.isclass)
        if issubclass(value, Exception) and value.__module__ == info.name
    ]
    assert errors   # the walk found the packages' own errors
    assert [error.__name__ for error in errors if not issubclass(error, ConfigserverError)] == []


def test_the_backups_package_lists_its_names_once_and_loads_each_module_on_first_use() -> None:
    import subprocess
    import sys

    program = (
        "import sys, configserver.backups as backups\n"
        "assert 'sqlalchemy' not in sys.modules and 'configserver.backups._store' not in sys.modules\n"
        "from configserver.backups import check_backup_url, UnknownUpload\n"
        "assert 'sqlalchemy' not in sys.modules   # the URL rule needs no database layer\n"
        "from configserver.backups import BodyTooSlow\n"
        "assert len(set(backups.__all__)) == len(backups.__all__)\n"
        "import inspect\n"
        "values = {n: getattr(backups, n) for n in backups.__all__}\n"
        "print(' '.join(sorted(n for n, v in values.items() if (inspect.isclass(v) or inspect.isfunction(v))"
        " and not v.__module__.startswith('configserver.backups._'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []   # every name resolves, to the backups' own modules
