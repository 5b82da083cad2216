"""`configserver check` and `render` see the firmware lines: each problem by file and line."""

from __future__ import annotations

import pytest

from configserver.cli import main

FLEET = """
[groups]
phones = ["IP232", "IP222"]

[firmware]
url = "http://fw.example.com/firmware/"
folder = "{folder}"
prot = "13.4711"
boot = "13.4711"
"""


@pytest.fixture
def tree(site, monkeypatch, tmp_path):
    """A tree with firmware for IP232 and IP222 whose files are all in the folder."""
    monkeypatch.chdir(site.root)
    folder = tmp_path / "firmware"
    for name in ("ip232.bin", "boot232.bin", "ip222.bin", "boot222.bin"):
        (folder / "13.4711").mkdir(parents=True, exist_ok=True)
        (folder / "13.4711" / name).write_bytes(b"image")
    site.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n')
    site.write("templates/default.j2", "config change SIP0 /user {{ device.hwid }}\n")
    site.write("vars/default.toml", FLEET.format(folder=folder))
    site.write("vars/devices/IP232-30-00-af.toml", "[firmware]\nprot = \"13.4711\"\n")
    site.folder = folder
    return site


def check(capsys) -> tuple[int, list[str]]:
    status = main(["--config", "configserver.toml", "check"])
    return status, capsys.readouterr().out.splitlines()


def test_a_tree_whose_files_are_all_there_passes(tree, capsys):
    assert check(capsys) == (0, [])


def test_a_file_missing_from_the_folder_is_named_with_the_url_the_device_would_fetch(tree, capsys):
    (tree.folder / "13.4711" / "boot222.bin").unlink()
    status, lines = check(capsys)
    assert status == 1
    assert lines == [
        (f"vars/default.toml:7: {tree.folder}/13.4711/boot222.bin is missing: IP222 devices would be sent "
        "http://fw.example.com/firmware/13.4711/boot222.bin and fail to fetch it (for synthetic device IP222-00-00-00)")
    ]


def test_a_bad_build_in_a_device_file_is_named_there(tree, capsys):
    tree.write("vars/devices/IP232-30-00-af.toml", "# pinned\n[firmware]\nprot = \"13 4711\"\n")
    status, lines = check(capsys)
    assert status == 1
    assert len(lines) == 1
    assert lines[0].startswith("vars/devices/IP232-30-00-af.toml:3: firmware.prot = '13 4711' is not a build")
    assert lines[0].endswith("(for IP232-30-00-af)")


def test_a_build_for_a_model_that_takes_none_is_named(tree, capsys):
    tree.write("vars/models/IPBS2.toml", "[firmware]\nboot = \"13.4711\"\n")
    tree.write("vars/models/IPVA.toml", "[firmware]\nboot = \"13.4711\"\n")
    (tree.folder / "13.4711" / "ipva.bin").write_bytes(b"image")
    status, lines = check(capsys)
    assert status == 1
    assert lines == [
        ("vars/models/IPBS2.toml:2: firmware.boot: IPBS2 takes no boot code updates (innovaphone's list): "
        "this build is never sent; remove it (for synthetic device IPBS2-00-00-00)"),
        ("vars/models/IPVA.toml:2: firmware.boot: IPVA takes no boot code updates (innovaphone's list): "
        "this build is never sent; remove it (for synthetic device IPVA-00-00-00)"),
    ]


def test_unknown_model_loopback_url_and_a_first_device_that_is_nothing(tree, capsys):
    tree.write("vars/models/IP999.toml", "[firmware]\nurl = \"http://127.0.0.1/firmware/\"\nfolder = \"/nonexistent\"\n"
                                         "[firmware.rollout]\nfirst = [\"reception\"]\n")
    status, lines = check(capsys)
    assert status == 1
    assert [line.split(": ", 1)[0] for line in lines] == ["vars/models/IP999.toml:2", "vars/models/IP999.toml:2",
                                                          "vars/models/IP999.toml:3", "vars/models/IP999.toml:3",
                                                          "vars/models/IP999.toml:5"]
    text = "\n".join(lines)
    assert "model IP999 is not one innovaphone's update server knows" in text
    assert "points at loopback" in text
    assert "/nonexistent/13.4711/ip999.bin is missing" in text
    assert "'reception' is no group, hwid or MAC" in text


@pytest.mark.parametrize("start, named", [
    ("2020-03-01T22:00:00+01:00", True),    # every wave open long ago: a new target would go to all at once
    ("2999-03-01T22:00:00Z", False),        # the rollout has not begun
])
def test_a_rollout_whose_every_wave_is_open_already_is_named(tree, capsys, start, named):
    tree.write("vars/models/IP232.toml", f"[firmware]\nprot = \"13.4800\"\n[firmware.rollout]\nstart = {start}\n"
               "waves = [{ after = \"1d\", share = 5 }, { after = \"2d\", share = 100 }]\n")
    (tree.folder / "13.4800").mkdir()
    (tree.folder / "13.4800" / "ip232.bin").write_bytes(b"image")
    status, lines = check(capsys)
    if not named:
        assert (status, lines) == (0, [])
        return
    assert status == 1
    assert lines == [
        ("vars/models/IP232.toml:4: firmware.rollout.start 2020-03-01T22:00:00+01:00: every wave is open already "
         "(the last since 2020-03-03 21:00 UTC), so a target changed now reaches all its devices at once. For a new "
         "build, move start to when its rollout begins; once a rollout is through, drop its start, first and waves "
         "(for IP232-30-00-af and 1 more)"),
    ]


def test_a_window_declared_twice_is_named(tree, capsys):
    tree.write("vars/models/IP222.toml", "[firmware]\nallow = [1, 2]\n")
    tree.write("templates/models/IP222.j2", "mod cmd UP1 times /allow 3\nconfig change SIP0 /user x\n")
    status, lines = check(capsys)
    assert status == 1
    assert lines == [("vars/models/IP222.toml:2: a window is declared here and templates/models/IP222.j2 writes a "
                     "times line of its own: the device would get two; keep one (for synthetic device IP222-00-00-00)")]


def test_a_wave_too_far_ahead_is_named_by_check_and_render_says_configuration_error(tree, capsys):
    tree.write("vars/models/IP232.toml", "[firmware.rollout]\nstart = 2026-12-01T22:00:00Z\n"
               "waves = [{ after = \"3000000d\", share = 100 }]\n")
    status, lines = check(capsys)
    assert status == 1
    assert lines[0].startswith("vars/models/IP232.toml:3: firmware.rollout.waves[0]: after = '3000000d' is longer than")
    status = main(["--config", "configserver.toml", "render", "IP232-30-00-af", "--query", "CHECK=abc"])
    out = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in out.out + out.err
    assert "firmware.rollout.waves[0]" in out.out + out.err


def test_fast_poll_and_allow_for_a_template_not_applied_once_are_named(tree, capsys):
    tree.write("vars/models/IP232.toml", "[firmware]\nfast_poll = 2\n")
    tree.write("vars/models/IP222.toml", "[firmware]\nallow = [1, 2]\n")
    tree.write("templates/default.j2", "{# configserver: apply_once=false #}\nconfig change SIP0 /user x\n")
    status, lines = check(capsys)
    assert status == 1
    assert lines == [
        ("vars/models/IP222.toml:2: firmware.allow: templates/default.j2 is not applied once (apply_once off), "
         "so its devices never report CHECK and are never seen being provisioned: the window holds for its first "
         "provisioning too (no /allow lifted); apply it once, or drop the key (for synthetic device IP222-00-00-00)"),
        ("vars/models/IP232.toml:2: firmware.fast_poll: templates/default.j2 is not applied once (apply_once off), "
         "so its devices never report CHECK and are never seen being provisioned: it is never sent; apply it once, "
         "or drop the key (for IP232-30-00-af and 1 more)"),
    ]


@pytest.mark.parametrize("template, provision", [
    ("config change SIP0 /user x\n", ["mod cmd UP1 provision 2"]),
    ("{# configserver: apply_once=false #}\nconfig change SIP0 /user x\n", []),
])
def test_render_sends_fast_polling_only_where_the_template_is_applied_once(tree, capsysbinary, template, provision):
    tree.write("vars/models/IP232.toml", "[firmware]\nfast_poll = 2\n")
    tree.write("templates/default.j2", template)
    status = main(["--config", "configserver.toml", "render", "IP232-30-00-af",
                   "--query", "PROT=13.4711", "--query", "BOOT=13.4711"])   # no CHECK
    out = capsysbinary.readouterr().out.decode()
    assert status == 0
    assert [line for line in out.splitlines() if "provision" in line] == provision


def test_render_previews_the_firmware_lines_above_the_script(tree, capsysbinary):
    status = main(["--config", "configserver.toml", "render", "IP232-30-00-af",
                   "--query", "PROT=13.4000", "--query", "BOOT=13.4711", "--query", "CHECK=abc"])
    out = capsysbinary.readouterr().out.decode()
    assert status == 0
    assert out.splitlines()[:3] == [
        "mod cmd UP0 prot http://fw.example.com/firmware/13.4711/ip232.bin ser 13.4711",
        "iresetn",
        "config change SIP0 /user IP232-30-00-af",
    ]


def test_render_leaves_out_the_firmware_of_a_halted_rollout(tree, capsysbinary):
    render = ["--config", "configserver.toml", "render", "IP232-30-00-af",
              "--query", "PROT=13.4000", "--query", "BOOT=13.4000", "--query", "CHECK=abc"]
    assert main(["--config", "configserver.toml", "migrate"]) == 0
    assert main(["--config", "configserver.toml", "firmware", "halt", "IP232", "--kind", "prot"]) == 0
    capsysbinary.readouterr()
    assert main(render) == 0
    lines = capsysbinary.readouterr().out.decode().splitlines()
    assert not any(" prot " in line for line in lines)   # halted: no device is sent it, nor shown it
    assert any(line.startswith("mod cmd UP0 boot http://fw.example.com/firmware/13.4711/boot232.bin") for line in lines)


def test_render_says_when_it_cannot_know_the_halts(tree, capsysbinary):
    tree.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n'
               'database = "postgresql://configserver@127.0.0.1:1/configserver"\n')
    assert main(["--config", "configserver.toml", "render", "IP232-30-00-af", "--query", "PROT=13.4000"]) == 0
    captured = capsysbinary.readouterr()
    assert "firmware halts not known: the database does not answer" in captured.err.decode()
    assert "mod cmd UP0 prot http://fw.example.com/firmware/13.4711/ip232.bin" in captured.out.decode()


def test_render_of_a_device_without_firmware_never_looks_at_the_database(tree, capsysbinary):
    tree.write("vars/default.toml", "")
    tree.write("vars/devices/IP232-30-00-af.toml", "")
    tree.write("configserver.toml", 'templates = "templates"\nvars = "vars"\n'
               'database = "postgresql://configserver@127.0.0.1:1/configserver"\n')
    assert main(["--config", "configserver.toml", "render", "IP232-30-00-af"]) == 0
    assert "halts" not in capsysbinary.readouterr().err.decode()
