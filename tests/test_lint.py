"""`configserver check`: one problem of each kind, named by file and line, and a clean tree passes."""

import subprocess
import sys

import pytest

from configserver.apply_once import EVERY_POLL_MARKER
from configserver.cli import main


@pytest.fixture
def tree(site, monkeypatch):
    """A tree without problems, in the working directory, with its settings file."""
    monkeypatch.chdir(site.root)
    site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n[groups]\nphones = ["IP232", "IP222"]\n')
    site.write("templates/default.j2", "# default\nconfig change SIP0 /user {{ device.hwid }}\n")
    site.write("templates/models/IP1202.j2", "mod cmd UP1 times /allow {{ vars.hours }}\n" + EVERY_POLL_MARKER + "\nconfig change UP1 /poll 15\n")
    site.write("templates/groups/phones.j2", "{% include 'common/sip.j2' %}\n# at {{ now }}\n")
    site.write("templates/common/sip.j2", "config change SIP0 /pwd {{ vars.password }}\n")
    site.write("templates/devices/IP232-30-00-af.j2", "{# configserver: final=reset #}\nconfig change SIP0 /user {{ vars.user }}\n")
    site.write("vars/default.toml", 'password = "secret"\nhours = "0,1,2"\n')
    site.write("vars/devices/IP232-30-00-af.toml", 'user = "reception"\n')
    site.write("vars/devices.csv", "hwid,mac,user\nIP232-30-00-c1,,alice\n,00-90-33-30-00-c2,bob\n")
    return site


def check(capsys) -> tuple[int, list[str]]:
    status = main(["--config", "configserver.toml", "check"])
    out = capsys.readouterr()
    return status, out.out.splitlines()


def test_a_clean_tree_passes(tree, capsys):
    assert check(capsys) == (0, [])


def test_one_problem_of_each_kind(tree, capsys):
    tree.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n[groups]\nphones = ["IP232", "IP2320"]\n')
    tree.write("templates/models/IP1202.j2", "config change UP1 /poll 15\n{% if %}\n")
    tree.write("templates/devices/IP232-30-00-af.j2", "config change SIP0 /user {{ vars.user }}\n{{ vars.missing }}\n")
    tree.write("templates/groups/phones.j2", "# phones\n\n{% include 'common/nothere.j2' %}\n")
    tree.write("vars/site.toml", 'password = "never read"\n')
    tree.write("vars/devices.csv", "hwid,mac,user\nIP232-30-00-c1,,alice\nIP23-30-00,,bob\n")
    status, lines = check(capsys)
    assert status == 1
    assert lines == [
        "configserver.toml:4: group phones: 'IP2320' is no innovaphone model this check knows, and no file names it",
        "templates/devices/IP232-30-00-af.j2:2: UndefinedError: undefined variable 'missing' (for IP232-30-00-af)",
        "templates/groups/phones.j2:3: template not found: common/nothere.j2",
        "templates/models/IP1202.j2:2: syntax error: Expected an expression, got 'end of statement block'",
        "vars/devices.csv:3: hwid 'IP23-30-00' is not <model>-xx-xx-xx: the row names no device",
        "vars/site.toml:1: no device reads this file: vars files are default.toml, models/<model>.toml, devices/<hwid or MAC>.toml and devices.csv",
    ]


def test_problems_go_to_stdout_and_the_count_to_stderr(tree, capsys):
    tree.write("templates/default.j2", "{{ vars.nope }}\n")
    assert main(["--config", "configserver.toml", "check"]) == 1
    out = capsys.readouterr()
    assert out.out.startswith("templates/default.j2:1: ")
    assert "1 problem in templates and vars" in out.err


def test_undefined_variables_are_found_for_every_device_the_vars_name(tree, capsys):
    tree.write("templates/groups/phones.j2", "config change SIP0 /user {{ vars.user }}\n")
    status, lines = check(capsys)
    # IP232-30-00-af has its own template; IP232-30-00-c1 (devices.csv) has a user; the synthetic phones have none
    assert lines == [
        "templates/groups/phones.j2:1: UndefinedError: undefined variable 'user' "
        "(for synthetic device IP222-00-00-00 and 1 more)"
    ]


def test_devices_named_only_by_mac_get_their_own_template_and_vars(tree, capsys):
    tree.write("templates/devices/00-90-33-30-00-d1.j2", "config change SIP0 /user {{ vars.user }}\n")
    tree.write("templates/devices/00-90-33-30-00-d2.j2", "config change SIP0 /user {{ vars.user }}\n")
    tree.write("vars/devices/00-90-33-30-00-d1.toml", 'user = "d1"\n')
    assert check(capsys) == (1, [
        "templates/devices/00-90-33-30-00-d2.j2:1: UndefinedError: undefined variable 'user' "
        "(for 00-90-33-30-00-d2, model unknown)"
    ])


def test_a_devices_csv_row_named_by_mac_alone_is_rendered_as_each_model_it_could_be(tree, capsys):
    # no template of its own: it gets a model, group or default template once its model is known
    tree.write("templates/default.j2", "# default\n{% if vars.role == 'reception' %}{% include 'reception.j2' %}{% endif %}\n")
    tree.write("templates/reception.j2", "config change DESK0 /desk {{ vars.desk }}\n")
    tree.write("vars/devices.csv", "hwid,mac,user,role,desk\nIP232-30-00-c1,,alice,reception,1\n"
                                   ",00-90-33-30-00-c2,bob,reception,\n")
    assert check(capsys) == (1, [
        "templates/reception.j2:1: UndefinedError: undefined variable 'desk' "
        "(for 00-90-33-30-00-c2, model unknown, as LINT-30-00-c2)"
    ])


def test_a_vars_file_named_by_mac_alone_is_rendered_with_the_model_templates_it_could_get(tree, capsys):
    tree.write("vars/devices/00-90-33-30-00-d3.toml", 'hours = 7\n')
    tree.write("templates/models/IP1202.j2", "mod cmd UP1 times /allow {{ vars.hours.split(',') | first }}\n")
    assert check(capsys) == (1, [
        "templates/models/IP1202.j2:1: UndefinedError: 'int object' has no attribute 'split' "
        "(for 00-90-33-30-00-d3, model unknown, as IP1202-30-00-d3)"
    ])


def test_a_default_template_no_named_device_reaches_is_rendered_for_a_synthetic_device(site, monkeypatch, capsys):
    monkeypatch.chdir(site.root)
    site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n')
    site.write("templates/default.j2", "x\n{{ vars.password }}\n")
    status, lines = check(capsys)
    assert (status, lines) == (1, [
        "templates/default.j2:2: UndefinedError: undefined variable 'password' "
        "(for synthetic device LINT-00-00-00 of a model no file names)"
    ])


def test_a_script_that_changes_from_poll_to_poll_would_be_applied_on_every_poll(tree, capsys):
    tree.write("templates/devices/IP232-30-00-af.j2", "config change SIP0 /user {{ vars.user }}\nconfig change X /t {{ now.day }}\n")
    tree.write("templates/models/IP1202.j2", "mod cmd UP1 times /allow {{ now.hour }}\n" + EVERY_POLL_MARKER + "\nx\n")
    status, lines = check(capsys)
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith("templates/devices/IP232-30-00-af.j2:1: the part applied once changes from poll to poll")


def test_a_check_line_of_its_own_needs_apply_once_off(tree, capsys):
    tree.write("templates/devices/IP232-30-00-af.j2", "x\n  mod cmd UP1 check iresetn 42\n")
    status, lines = check(capsys)
    assert lines == [
        "templates/devices/IP232-30-00-af.j2:2: a check line of its own while configserver applies the script once: "
        "remove it, or turn that off with {# configserver: apply_once=false #} (for IP232-30-00-af)"
    ]
    tree.write("templates/devices/IP232-30-00-af.j2", "{# configserver: apply_once=false #}\nx\nmod cmd UP1 check iresetn 42\n")
    assert check(capsys) == (0, [])


def test_options_markers_and_files_no_device_gets(tree, capsys):
    tree.write("templates/models/IP1202.j2", "{# configserver: final=rest #}\n#configserver: every poll\nx\n")
    tree.write("templates/common/sip.j2", "{# configserver: apply_once=false #}\nconfig change SIP0 /pwd {{ vars.password }}\n")
    tree.write("templates/groups/dect.j2", "x\n")
    tree.write("templates/devices/reception.j2", "x\n")
    tree.write("templates/models/IP222s.j2", "x\n")
    tree.write("vars/devices/01-02-03-04-05-06.toml", "x = 1\n")
    tree.write("vars/devices/ip232-30-00-AF.toml", "x = 1\n")
    tree.write("vars/models/IP1202.toml", "x = 1\ny = \nz = 2\n")
    status, lines = check(capsys)
    assert status == 1
    assert lines == [
        "templates/common/sip.j2:1: options here are ignored: only the template a device is given "
        "(devices/, models/, groups/, default.j2) has options",
        "templates/devices/reception.j2:1: 'reception' is neither a hwid (<model>-xx-xx-xx) nor a MAC: no device gets this template",
        "templates/groups/dect.j2:1: no group 'dect' in the groups table: no device gets this template",
        "templates/models/IP1202.j2:1: final='rest': give one of iresetn, ireset, resetn, reset, ser",
        "templates/models/IP1202.j2:2: not the every-poll marker, which reads exactly '# configserver: every poll above'",
        "templates/models/IP222s.j2:1: IP222s devices are served as IP222: name this file models/IP222.j2",
        "vars/devices/01-02-03-04-05-06.toml:1: 01-02-03-04-05-06 is no innovaphone MAC (they start 00-90-33): no device gets this vars file",
        "vars/devices/ip232-30-00-AF.toml:1: ignored: devices/IP232-30-00-af.toml is the vars file for the same devices",
        "vars/models/IP1202.toml:2: not valid TOML: Invalid value (at line 2, column 5)",
    ]


def test_csv_rows_that_name_no_valid_device(tree, capsys):
    tree.write(
        "vars/devices.csv",
        "hwid,mac,user\n"
        "IP232-30-00-c1,,alice\n"
        ",,nobody\n"
        ",11-22-33-44-55-66,foreign\n"
        ",00-90-33-zz-00-01,typo\n"
        "IP232-30-00-c3,00-90-33-30-00-c4,two devices\n"
        "ip232-30-00-C1,,alice again\n"
        "\n",
    )
    status, lines = check(capsys)
    assert lines == [
        "vars/devices.csv:3: neither hwid nor mac: the row names no device",
        "vars/devices.csv:4: mac 11-22-33-44-55-66 is no innovaphone MAC (they start 00-90-33)",
        "vars/devices.csv:5: mac '00-90-33-zz-00-01' is not a MAC",
        "vars/devices.csv:6: hwid IP232-30-00-c3 and mac 00-90-33-30-00-c4 are different devices: only the hwid counts",
        "vars/devices.csv:7: names the same device as line 2, whose values this row replaces",
    ]
    tree.write("vars/devices.csv", "device,user\nIP232-30-00-c1,alice\n")
    assert check(capsys)[1] == ["vars/devices.csv:1: no hwid or mac column: no row names a device"]


def test_groups_in_vars_default_toml_are_checked_there(tree, capsys):
    tree.write("vars/default.toml", 'password = "secret"\nhours = "0"\n\n[groups]\ngateways = ["IP1202", "IP12O2"]\nold = ["IP222s"]\n')
    status, lines = check(capsys)
    assert lines == [
        "vars/default.toml:5: group gateways: 'IP12O2' is no innovaphone model this check knows, and no file names it",
        "vars/default.toml:6: group old: IP222s devices are served as IP222: list IP222",
    ]
    tree.write("vars/default.toml", 'password = "secret"\nhours = "0"\ngroups = "phones"\n')
    assert check(capsys)[1] == ["vars/default.toml:3: groups must be a table of group = [model, ...]"]


def test_a_model_the_vendor_list_lacks_is_known_once_a_file_names_it(tree, capsys):
    tree.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n[groups]\nphones = ["IP232", "IP2600"]\n')
    assert check(capsys)[0] == 1
    tree.write("vars/models/IP2600.toml", "")
    assert check(capsys) == (0, [])


def test_the_command_exits_non_zero_for_ci(tree):
    tree.write("templates/default.j2", "{% endif %}\n")
    done = subprocess.run([sys.executable, "-m", "configserver", "--config", "configserver.toml", "check"],
                          capture_output=True, text=True, cwd=tree.root)
    assert done.returncode == 1
    assert done.stdout.startswith("templates/default.j2:1: syntax error: ")


# -- what a folder cannot answer, and what a device could not reach ------------------------------

def test_an_empty_templates_folder_is_a_problem(site, capsys, monkeypatch):
    monkeypatch.chdir(site.root)
    site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n')
    status, lines = check(capsys)
    assert status == 1
    assert lines == ["templates:1: no template at all: every device would get 404 # no configuration; "
                     "start from deploy/starter (README, Deploying)"]


def test_a_missing_default_template_is_a_problem(tree, capsys):
    (tree.templates / "default.j2").unlink()
    status, lines = check(capsys)
    assert status == 1 and lines[0].startswith("templates/default.j2:1: missing: a device with no device, model")


@pytest.mark.parametrize(("url", "why"), [
    ("https://127.0.0.1:8443/update", "points at loopback"),
    ("https://localhost/update", "points at loopback"),
    ("http://[::1]/cfg", "points at loopback"),
    ("https://config.example.net:8443/update", "uses port 8443, the lab's built-in listener"),
])
def test_a_url_a_real_device_could_not_reach_is_named_with_its_line(tree, capsys, url, why):
    tree.write("vars/default.toml", f'password = "secret"\nhours = "0,1,2"\nupdate_url = "{url}"\n')
    tree.write("templates/default.j2", "# default\nconfig change UP1 /url {{ vars.update_url }}\n")
    status, lines = check(capsys)
    assert status == 1
    assert any(line.startswith(f"vars/default.toml:3: {url} {why}") for line in lines), lines


def test_a_url_written_in_the_template_is_named_there(tree, capsys):
    tree.write("templates/default.j2", "# default\nconfig change UP1 /url https://127.0.0.1:8443/update\n")
    status, lines = check(capsys)
    assert any(line.startswith("templates/default.j2:2: https://127.0.0.1:8443/update points at") for line in lines)


def test_a_public_update_url_passes(tree, capsys):
    tree.write("templates/default.j2", "# default\nconfig change UP1 /url https://config.example.net/update\n")
    assert check(capsys) == (0, [])


def test_config_write_of_a_templates_own_would_be_sent_twice(tree, capsys):
    tree.write("templates/default.j2", "# default\nconfig change SIP0 /user {{ device.hwid }}\nconfig write\nconfig activate\n")
    status, lines = check(capsys)
    assert status == 1
    assert any(line.startswith("templates/default.j2:3: 'config write' of its own") for line in lines), lines
    assert any(line.startswith("templates/default.j2:4: 'config activate' of its own") for line in lines), lines


def test_a_template_that_cannot_even_be_compiled_is_one_problem_not_a_traceback(tree, capsys):
    tree.write("templates/models/IP1202.j2", "{{ 2**100000 }}\n")
    tree.write("templates/devices/IP232-30-00-af.j2", "{% if 1 %}" * 5000 + "x" + "{% endif %}" * 5000)
    status, lines = check(capsys)
    assert status == 1
    assert any(line.startswith("templates/models/IP1202.j2:1: SecurityError: the exponent 100000 is too large")
               for line in lines), lines
    assert any(line.startswith("templates/devices/IP232-30-00-af.j2:1: nested too deeply") for line in lines), lines
