"""`configserver render`: exactly what a device would get now, and how it was chosen, without a device."""

import os
import subprocess
import sys

import pytest
from driving import call, terminator_headers

from configserver.apply_once import digest
from configserver.cli import main


@pytest.fixture
def tree(site, monkeypatch):
    monkeypatch.chdir(site.root)
    site.write(
        "configserver.toml",
        f'templates = "templates"\nvars = "vars"\nca_bundle = "{site.ca_bundle}"\n[groups]\nphones = ["IP232", "IP222"]\n',
    )
    site.write("templates/default.j2", "# default\nconfig change SIP0 /user {{ device.hwid }}\n")
    site.write("templates/groups/phones.j2", "# phones\nconfig change SIP0 /pwd {{ vars.password }} {{ device.groups | join(',') }}\n")
    site.write("templates/models/IP1202.j2", "# gateway {{ device.hwid }} asked {{ request.path }} {{ request.query.get('type', '-') }}\n")
    site.write("templates/devices/IP232-30-00-af.j2", "# own {{ device.hwid }}\nconfig change SIP0 /user {{ vars.user }}\n")
    site.write("templates/devices/00-90-33-30-00-b5.j2", "# by MAC {{ device.mac }}\nconfig change SIP0 /user {{ vars.user }}\n")
    site.write("vars/default.toml", 'password = "secret"\nuser = "nobody"\n')
    site.write("vars/devices/IP232-30-00-af.toml", 'user = "reception"\n')
    site.write("vars/devices.csv", "hwid,mac,user\nIP232-30-00-b5,,kitchen\n,00-90-33-30-00-b6,hall\n")
    return site


def render(capsysbinary, *args: str) -> tuple[int, str, dict[str, str]]:
    status = main(["--config", "configserver.toml", "render", *args])
    out = capsysbinary.readouterr()
    headers = dict(line.split(": ", 1) for line in out.err.decode().splitlines() if ": " in line)
    return status, out.out.decode(), headers


def sent(script: str, final: str = "iresetn") -> str:
    return script + f"config write\r\nconfig activate\r\nmod cmd UP1 check ser {digest(script)}\r\n{final}\r\n"


@pytest.mark.parametrize(
    "name, template, script",
    [
        ("IP232-30-00-af", "devices/IP232-30-00-af.j2", "# own IP232-30-00-af\r\nconfig change SIP0 /user reception\r\n"),
        ("IP232-30-00-b5", "devices/00-90-33-30-00-b5.j2", "# by MAC 00-90-33-30-00-b5\r\nconfig change SIP0 /user kitchen\r\n"),
        ("IP1202-35-fe-4d", "models/IP1202.j2", "# gateway IP1202-35-fe-4d asked / -\r\n"),
        ("IP222-30-00-c0", "groups/phones.j2", "# phones\r\nconfig change SIP0 /pwd secret phones\r\n"),
        ("IP222s-30-00-c0", "groups/phones.j2", "# phones\r\nconfig change SIP0 /pwd secret phones\r\n"),
        ("IP811-30-00-c0", "default.j2", "# default\r\nconfig change SIP0 /user IP811-30-00-c0\r\n"),
    ],
)
def test_each_lookup_level(tree, capsysbinary, name, template, script):
    status, out, headers = render(capsysbinary, name)
    assert status == 0
    assert out == sent(script)
    assert headers["template"] == template
    assert headers["digest"] == digest(script)
    assert headers["decision"] == "sent (CHECK not given)"


def test_the_decision_headers(tree, capsysbinary):
    status, _, headers = render(capsysbinary, "IP232-30-00-af")
    assert headers == {
        "device": "IP232-30-00-af (model IP232, MAC 00-90-33-30-00-af, groups: phones)",
        "status": "200",
        "template": "devices/IP232-30-00-af.j2",
        "vars": "default.toml, devices/IP232-30-00-af.toml",
        "apply once": "on, final command iresetn",
        "digest": digest("config change SIP0 /user reception"),
        "decision": "sent (CHECK not given)",
    }


def test_the_same_bytes_the_service_sends_the_device(tree, capsysbinary, pki):
    app = tree.app()
    for cert in (pki.phone, pki.gateway, pki.broken):
        answer = call(app, "/update", terminator_headers(cert), query="type=IP&CHECK=x")
        status = main(["--config", "configserver.toml", "render", cert.certificate.subject.rfc4514_string().split(",")[0][3:],
                       "--path", "/update?type=IP", "--query", "CHECK=x"])
        assert (status, capsysbinary.readouterr().out) == (0, answer.body)


def test_the_serial_the_device_reports_gets_the_short_answer(tree, capsysbinary):
    serial = digest("config change SIP0 /user reception")
    status, out, headers = render(capsysbinary, "IP232-30-00-af", "--query", f"CHECK={serial}")
    assert (status, out) == (0, f"# unchanged: the device has applied this script (CHECK {serial})\r\n")
    assert headers["decision"] == f"unchanged (CHECK '{serial}')"


def test_path_and_query(tree, capsysbinary):
    status, out, _ = render(capsysbinary, "IP1202-35-fe-4d", "--path", "/gw/update?type=IP1202&x=1", "--query", "CHECK=")
    assert out.startswith("# gateway IP1202-35-fe-4d asked /gw/update IP1202\r\n")


def test_a_mac_is_resolved_through_the_hwid_a_file_names(tree, capsysbinary):
    status, out, headers = render(capsysbinary, "0090333000AF")
    assert status == 0 and out.startswith("# own IP232-30-00-af\r\n")
    assert headers["note"] == "hwid IP232-30-00-af found for MAC 00-90-33-30-00-af in the file names"
    assert render(capsysbinary, "00:90:33:30:00:b5")[1].startswith("# by MAC 00-90-33-30-00-b5\r\nconfig change SIP0 /user kitchen")


def test_a_mac_with_a_template_of_its_own_but_no_known_model_is_rendered_with_a_note(tree, capsysbinary):
    tree.write("templates/devices/00-90-33-30-00-b6.j2", "config change SIP0 /user {{ vars.user }}\n")
    status, out, headers = render(capsysbinary, "00-90-33-30-00-b6")
    assert status == 0 and out.startswith("config change SIP0 /user hall\r\n")
    assert headers["note"].startswith("model unknown (no file names the hwid of 00-90-33-30-00-b6)")
    assert headers["device"] == "(hwid unknown) (model unknown, MAC 00-90-33-30-00-b6, groups: none)"


@pytest.mark.parametrize(
    "name, message",
    [
        ("00-90-33-30-00-b6", "cannot tell which device 00-90-33-30-00-b6 is: no template is named by this MAC and no "
                              "file names its hwid, and model, group and default templates depend on the model: "
                              "give the hwid (<model>-30-00-b6)"),
        ("00-11-22-30-00-b6", "00-11-22-30-00-b6 is not an innovaphone MAC (they start 00-90-33)"),
        ("reception", "'reception' is neither a hwid (<model>-xx-xx-xx, e.g. IP232-30-00-af) nor a MAC"),
    ],
)
def test_a_name_that_cannot_be_resolved_says_why(tree, capsysbinary, name, message):
    status = main(["--config", "configserver.toml", "render", name])
    out = capsysbinary.readouterr()
    assert (status, out.out) == (2, b"")
    assert out.err.decode() == f"configserver render: {message}\n"


def test_a_query_naming_another_device_is_refused_as_in_a_poll(tree, capsysbinary):
    status, out, headers = render(capsysbinary, "IP232-30-00-af", "--query", "hwid=IP232-30-00-b0")
    assert (status, out) == (1, "# device mismatch\n")
    assert headers["status"] == "403 device mismatch"


def test_a_configuration_error_names_file_and_line(tree, capsysbinary):
    tree.write("templates/devices/IP232-30-00-af.j2", "x\n{{ vars.nope }}\n")
    status, out, headers = render(capsysbinary, "IP232-30-00-af")
    assert (status, out) == (1, "# configuration error\n")
    assert headers["status"] == "500 configuration error"
    assert headers["detail"].startswith("devices/IP232-30-00-af.j2:2: ")


def test_no_template_at_all(tree, capsysbinary):
    (tree.templates / "default.j2").unlink()
    status, out, headers = render(capsysbinary, "IP811-30-00-c0")
    assert (status, out, headers["template"]) == (1, "# no configuration for IP811-30-00-c0\n", "none")


def test_apply_once_off_and_a_templates_final_command(tree, capsysbinary):
    tree.write("templates/models/IP1202.j2", "{# configserver: final=reset -#}\nx\n")
    assert render(capsysbinary, "IP1202-35-fe-4d")[1] == sent("x\r\n", "reset")
    tree.write("templates/models/IP1202.j2", "{# configserver: apply_once=false -#}\nx\n")
    status, out, headers = render(capsysbinary, "IP1202-35-fe-4d")
    assert (out, headers["apply once"]) == ("x\r\n", "off")
    assert "digest" not in headers


def test_the_script_reaches_stdout_byte_for_byte(tree):
    done = subprocess.run([sys.executable, "-m", "configserver", "--config", "configserver.toml", "render", "IP232-30-00-af"],
                          capture_output=True, cwd=tree.root)
    assert done.returncode == 0
    assert done.stdout == sent("# own IP232-30-00-af\r\nconfig change SIP0 /user reception\r\n").encode()
    assert b"template: devices/IP232-30-00-af.j2\n" in done.stderr


def test_render_shows_the_backup_requests_a_poll_would_carry(tree, capsysbinary):
    tree.write("configserver.toml", tree.root.joinpath("configserver.toml").read_text().replace(
        'vars = "vars"\n', 'vars = "vars"\nbackup_url = "https://config.example.net/backup"\n'
        'database = "sqlite:///inventory.db"\n', 1))
    assert main(["migrate"]) == 0
    capsysbinary.readouterr()
    status, body, _ = render(capsysbinary, "IP232-30-00-af")
    assert status == 0
    assert "mod cmd UP0 scfg https://config.example.net/backup?" in body
    assert body.index("scfg") < body.index("# own IP232-30-00-af")   # above the script and its check line


def test_render_says_so_when_the_backup_schedule_cannot_be_read(tree, capsysbinary):
    tree.write("configserver.toml", tree.root.joinpath("configserver.toml").read_text().replace(
        'vars = "vars"\n', 'vars = "vars"\nbackup_url = "https://config.example.net/backup"\n'
        'database = "postgresql://nobody@127.0.0.1:1/none"\n', 1))
    status = main(["--config", "configserver.toml", "render", "IP232-30-00-af"])
    out = capsysbinary.readouterr()
    assert status == 0 and b"scfg" not in out.out
    assert b"note: backup requests not shown: the database does not answer" in out.err


@pytest.mark.parametrize("command", ["render", "history"])
def test_a_device_argument_that_is_not_text_is_one_clear_line(tree, command):
    result = subprocess.run([sys.executable, "-m", "configserver", command, b"\xff\xfe".decode("utf-8", "surrogateescape")],
                            cwd=tree.root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "argument HWID|MAC: '\\xff\\xfe' is neither a hwid (IP232-30-00-af) nor a MAC (00-90-33-30-00-af)")
    assert "Traceback" not in result.stderr


def test_two_devices_known_by_mac_alone_are_previewed_apart_on_one_service(tmp_path):
    # the admin page keeps one service between previews: each device gets its own template and vars
    from configserver.preview import preview
    from configserver.service import Service
    from configserver.settings import Settings

    for mac in ("00-90-33-30-00-d1", "00-90-33-30-00-d2"):
        for relative, text in ((f"templates/devices/{mac}.j2", "config change SIP0 /pwd {{ vars.password }}\n"),
                               (f"vars/devices/{mac}.toml", f'password = "secret-of-{mac[-2:]}"\n')):
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_text(text)
            os.utime(tmp_path / relative, (1, 1))
    service = Service.from_settings(Settings(templates=tmp_path / "templates", vars=tmp_path / "vars"), grace_seconds=0)
    service.store.refresh()
    first, second = preview(service, "00-90-33-30-00-d1"), preview(service, "00-90-33-30-00-d2")
    assert first.choice.template == "devices/00-90-33-30-00-d1.j2" and b"/pwd secret-of-d1\r\n" in first.body
    assert second.choice.template == "devices/00-90-33-30-00-d2.j2" and b"/pwd secret-of-d2\r\n" in second.body
